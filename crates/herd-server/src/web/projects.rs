//! Projects, the sub-clouds: each one's quota against what its VMs hold, its members
//! and their roles, and the prices its VMs pay.

use super::launch::number;
use super::layout::{self, Section};
use super::{given, Caller, Posted, WebError, WebState};
use crate::access::{Perm, Role};
use crate::api::tenants::{PutMember, QuotaView};
use crate::api::{self, tenants, ApiJson, ApiPath, CloudAdmin};
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Redirect, Response};
use herd_proto::policy::Rate;
use maud::{html, Markup};
use serde::Deserialize;

fn limit(used: u64, max: Option<u64>, show: impl Fn(u64) -> String) -> Markup {
    match max {
        Some(max) => layout::meter(used, max, &format!("{} of {}", show(used), show(max))),
        None => html! { (show(used)) span.muted { " (no limit)" } },
    }
}

fn rate(rate: &Rate) -> Markup {
    html! {
        td.num { (layout::price(rate.peak)) } td.num { (layout::price(rate.off_peak)) }
    }
}

pub async fn page(caller: Caller, State(web): State<WebState>) -> Result<Markup, WebError> {
    let cloud = State(web.cloud.clone());
    let axum::Json(mut projects) = tenants::list_projects(caller.user.clone(), cloud.clone()).await;
    projects.sort_by(|a, b| a.name.cmp(&b.name));
    let mut sections = Vec::new();
    for project in &projects {
        let path = || ApiPath(project.name.clone());
        let axum::Json(detail) =
            tenants::get_project(caller.user.clone(), cloud.clone(), path()).await?;
        let axum::Json(members) =
            tenants::list_members(caller.user.clone(), cloud.clone(), path()).await?;
        let axum::Json(card) =
            api::billing::get_rate_card(caller.user.clone(), cloud.clone(), path()).await?;
        let usage = detail.usage.as_ref();
        let (vms, vcpus, memory) = usage.map_or((0, 0, 0), |u| (u.vms, u.vcpus, u.memory_mib));
        let quota = &detail.quota;
        let administer = caller.may(&project.name, Perm::Administer);
        sections.push(html! {
            section.project aria-labelledby={ "p-" (project.name) } {
                h2 id={ "p-" (project.name) } {
                    (project.name) " "
                    a.muted href={ "/ui/vms?project=" (project.name) } { "its VMs" }
                }
                div.columns {
                    div {
                        h3 { "Quota" }
                        dl.facts {
                            dt { "VMs" } dd { (limit(vms, quota.max_vms, |n| n.to_string())) }
                            dt { "vCPUs" } dd { (limit(vcpus, quota.max_vcpus, |n| n.to_string())) }
                            dt { "Memory" } dd { (limit(memory, quota.max_memory_mib, layout::mib)) }
                            dt { "Budget" } dd { @match quota.budget_micros {
                                Some(b) => { (layout::money(b)) " per 30 days" },
                                None => span.muted { "none" },
                            } }
                        }
                        @if caller.is_cloud_admin() { (quota_form(&caller, &project.name, quota)) }
                        h3 { "Members" }
                        @if members.is_empty() { p.muted { "None yet." } }
                        ul.plain { @for m in &members { li {
                            (m.user) " " span.muted { (m.role.as_str()) } " "
                            @if administer {
                                (layout::button(&caller, &format!("/ui/projects/{}/members/{}/remove", project.name, m.user),
                                    "Remove", Some(&format!("Remove {} from {}?", m.user, project.name))))
                            }
                        } } }
                        @if administer {
                            form.inline-form method="post" action={ "/ui/projects/" (project.name) "/members" } {
                                (layout::csrf(&caller))
                                label { "User " input type="text" name="user" required size="14"; }
                                label { "Role "
                                    select name="role" { @for r in ["viewer", "member", "admin"] { option value=(r) { (r) } } }
                                }
                                button type="submit" { "Add or change" }
                            }
                        }
                    }
                    div {
                        h3 { "Prices " span.muted { (format!("(peak {:02}:00 to {:02}:00 UTC)", card.peak_start_hour, card.peak_end_hour)) } }
                        table.rates {
                            thead { tr { th scope="col" { "" } th scope="col" { "Peak" } th scope="col" { "Off-peak" } } }
                            tbody {
                                tr { th scope="row" { "per VM-hour" } (rate(&card.per_hour)) }
                                tr { th scope="row" { "per CPU-second" } (rate(&card.per_cpu_second)) }
                                tr { th scope="row" { "per GiB-hour of memory" } (rate(&card.per_gib_hour_memory)) }
                                tr { th scope="row" { "per GiB transferred" } (rate(&card.per_gib_transferred)) }
                                tr { th scope="row" { "per burst vCPU-hour" } (rate(&card.burst_per_vcpu_hour)) }
                            }
                        }
                    }
                }
            }
        });
    }
    Ok(layout::page(
        &caller,
        Section::Projects,
        "Projects",
        html! {
            @if projects.is_empty() { p.muted { "You are a member of no project." } }
            @for section in sections { (section) }
        },
    ))
}

/// A cloud admin's form for a project's quota; empty fields mean no limit.
fn quota_form(caller: &Caller, project: &str, quota: &QuotaView) -> Markup {
    let shown = |n: Option<u64>| n.map(|n| n.to_string()).unwrap_or_default();
    html! {
        form.inline-form method="post" action={ "/ui/projects/" (project) "/quota" } {
            (layout::csrf(caller))
            label { "VMs " input type="number" name="max_vms" min="0" value=(shown(quota.max_vms)) size="6"; }
            label { "vCPUs " input type="number" name="max_vcpus" min="0" value=(shown(quota.max_vcpus)) size="6"; }
            label { "Memory (MiB) " input type="number" name="max_memory_mib" min="0" value=(shown(quota.max_memory_mib)) size="8"; }
            label { "Budget " input type="text" name="budget" value=(quota.budget_micros.map(layout::money).unwrap_or_default()) size="8" placeholder="none"; }
            button type="submit" { "Set the quota" }
        }
    }
}

fn back() -> Response {
    Redirect::to("/ui/projects").into_response()
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct MemberForm {
    user: String,
    role: String,
}

pub async fn put_member(
    State(web): State<WebState>,
    Path(project): Path<String>,
    posted: Posted<MemberForm>,
) -> Result<Response, WebError> {
    let user = given(&posted.form.user).ok_or_else(|| WebError::bad_form("user: whom to add"))?;
    let role = Role::parse(&posted.form.role)
        .ok_or_else(|| WebError::bad_form("role: viewer, member or admin"))?;
    let axum::Json(_member) = tenants::put_member(
        posted.caller.user,
        State(web.cloud.clone()),
        ApiPath((project, user)),
        ApiJson(PutMember { role }),
    )
    .await?;
    Ok(back())
}

pub async fn remove_member(
    State(web): State<WebState>,
    Path((project, user)): Path<(String, String)>,
    posted: Posted<super::login::Nothing>,
) -> Result<Response, WebError> {
    tenants::delete_member(
        posted.caller.user,
        State(web.cloud.clone()),
        ApiPath((project, user)),
    )
    .await?;
    Ok(back())
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct QuotaForm {
    max_vms: String,
    max_vcpus: String,
    max_memory_mib: String,
    budget: String,
}

pub async fn put_quota(
    State(web): State<WebState>,
    Path(project): Path<String>,
    posted: Posted<QuotaForm>,
) -> Result<Response, WebError> {
    let admin = CloudAdmin::of(posted.caller.user.clone())?;
    let f = &posted.form;
    let budget_micros = given(&f.budget)
        .map(|b| {
            herd_proto::policy::parse_money(&b).ok_or_else(|| {
                WebError::bad_form(format!("budget: {b:?} is not an amount like 50.00"))
            })
        })
        .transpose()?;
    // The burst limits are not on this form: keep what the project has.
    let axum::Json(current) = tenants::get_project(
        posted.caller.user.clone(),
        State(web.cloud.clone()),
        ApiPath(project.clone()),
    )
    .await?;
    let quota = QuotaView {
        max_vms: number("max_vms", &f.max_vms)?,
        max_vcpus: number("max_vcpus", &f.max_vcpus)?,
        max_memory_mib: number("max_memory_mib", &f.max_memory_mib)?,
        budget_micros,
        burst: current.quota.burst,
    };
    let axum::Json(_project) = tenants::put_quota(
        admin,
        State(web.cloud.clone()),
        ApiPath(project),
        ApiJson(quota),
    )
    .await?;
    Ok(back())
}
