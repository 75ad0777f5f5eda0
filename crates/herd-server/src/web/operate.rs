//! A VM's longer operations from its page: resize, burst, migrate and broadcast. Each
//! form sends the API's own request; its outcome shows in the VM's events and state.

use super::launch::number;
use super::layout;
use super::{given, Caller, Posted, WebError, WebState};
use crate::api::{
    self, ApiJson, ApiPath, BroadcastRequest, BurstRequest, MigrateRequest, ResizeRequest, VmView,
};
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Redirect, Response};
use maud::{html, Markup};
use serde::Deserialize;

/// The forms, for a caller who may operate the VM (migration for cloud admins only).
pub fn forms(caller: &Caller, vm: &VmView) -> Markup {
    let action = |what: &str| format!("/ui/vms/{}/{what}", vm.id);
    html! {
        section aria-labelledby="operate" {
            h2 #operate { "Change it" }
            div.operations {
                form.card method="post" action=(action("resize")) {
                    (layout::csrf(caller))
                    strong { "Resize" }
                    label { "vCPUs" input type="number" name="vcpus" min="1" max="256" placeholder=(vm.vcpus); }
                    label { "Memory (MiB)" input type="number" name="memory_mib" min="16" placeholder=(vm.memory_mib); }
                    label.check { input type="checkbox" name="restart" value="true"; " restart if it must" }
                    label.check { input type="checkbox" name="wait_for_room" value="true"; " wait for room" }
                    button type="submit" { "Resize" }
                }
                form.card method="post" action=(action("burst")) {
                    (layout::csrf(caller))
                    strong { "Burst" }
                    label { "Extra vCPUs" input type="number" name="cpus" min="0" value="1"; }
                    label { "Extra memory (MiB)" input type="number" name="memory_mib" min="0" value="0"; }
                    label { "For" input type="text" name="seconds" value="10m" required; }
                    button type="submit" { "Ask for a burst" }
                }
                form.card method="post" action=(action("broadcast")) {
                    (layout::csrf(caller))
                    strong { "Broadcast" }
                    label { "To" input type="text" name="to" value="all" placeholder="all or KEY=VALUE"; }
                    label.check { input type="checkbox" name="start" value="true"; " start a copy on each" }
                    button type="submit" { "Broadcast its snapshot" }
                }
                @if caller.is_cloud_admin() {
                    form.card method="post" action=(action("migrate")) {
                        (layout::csrf(caller))
                        strong { "Migrate" }
                        label { "To host" input type="text" name="to" placeholder="the scheduler's choice"; }
                        button type="submit" { "Migrate it live" }
                    }
                }
            }
        }
    }
}

fn back(id: &str) -> Response {
    Redirect::to(&format!("/ui/vms/{id}")).into_response()
}

fn checked(text: &str) -> bool {
    matches!(text, "true" | "on")
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct ResizeForm {
    vcpus: String,
    memory_mib: String,
    restart: String,
    wait_for_room: String,
}

pub async fn resize(
    State(web): State<WebState>,
    Path(id): Path<String>,
    posted: Posted<ResizeForm>,
) -> Result<Response, WebError> {
    let f = &posted.form;
    let request = ResizeRequest {
        vcpus: number("vcpus", &f.vcpus)?,
        memory_mib: number("memory_mib", &f.memory_mib)?,
        restart: checked(&f.restart),
        wait_for_room: checked(&f.wait_for_room),
    };
    let user = posted.caller.user;
    let (_, _accepted) = api::vms::resize_vm(
        user,
        State(web.cloud.clone()),
        ApiPath(id.clone()),
        ApiJson(request),
    )
    .await?;
    Ok(back(&id))
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct BurstForm {
    cpus: String,
    memory_mib: String,
    seconds: String,
}

pub async fn burst(
    State(web): State<WebState>,
    Path(id): Path<String>,
    posted: Posted<BurstForm>,
) -> Result<Response, WebError> {
    let f = &posted.form;
    let seconds = given(&f.seconds)
        .and_then(|t| humantime::parse_duration(&t).ok())
        .and_then(|d| u32::try_from(d.as_secs()).ok())
        .ok_or_else(|| WebError::bad_form("for: a duration like 90s, 10m or 1h"))?;
    let request = BurstRequest {
        cpus: number("cpus", &f.cpus)?.unwrap_or(0),
        memory_mib: number("memory_mib", &f.memory_mib)?.unwrap_or(0),
        seconds,
    };
    let user = posted.caller.user;
    let (_, _accepted) = api::vms::burst_vm(
        user,
        State(web.cloud.clone()),
        ApiPath(id.clone()),
        ApiJson(request),
    )
    .await?;
    Ok(back(&id))
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct ToForm {
    to: String,
    start: String,
}

pub async fn broadcast(
    State(web): State<WebState>,
    Path(id): Path<String>,
    posted: Posted<ToForm>,
) -> Result<Response, WebError> {
    let request = BroadcastRequest {
        to: given(&posted.form.to),
        start: checked(&posted.form.start),
        fanout: None,
    };
    let user = posted.caller.user;
    let (_, _accepted) = api::vms::broadcast_vm(
        user,
        State(web.cloud.clone()),
        ApiPath(id.clone()),
        ApiJson(request),
    )
    .await?;
    Ok(back(&id))
}

pub async fn migrate(
    State(web): State<WebState>,
    Path(id): Path<String>,
    posted: Posted<ToForm>,
) -> Result<Response, WebError> {
    let request = MigrateRequest {
        to: given(&posted.form.to),
    };
    let user = posted.caller.user;
    let (_, _accepted) = api::vms::migrate_vm(
        user,
        State(web.cloud.clone()),
        ApiPath(id.clone()),
        ApiJson(request),
    )
    .await?;
    Ok(back(&id))
}
