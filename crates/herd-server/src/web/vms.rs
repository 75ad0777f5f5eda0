//! VM pages: the filtered, paged list; one VM with its policies, usage, events and
//! actions; its console; and the launch form.

use super::chart;
use super::layout::{self, Section};
use super::login::Nothing;
use super::operate;
use super::{given, Caller, Posted, WebError, WebState, PAGE};
use crate::access::Perm;
use crate::api::{self, ApiPath, ApiQuery, ConsoleQuery, VmQuery, VmView};
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Redirect, Response};
use herd_proto::lifecycle::Action;
use herd_proto::policy::{Enforcement, PolicySpec};
use herd_proto::VmState;
use maud::{html, Markup};
use serde::Deserialize;

/// The list's filters, as the filter form sends them (empty fields mean no filter).
#[derive(Debug, Clone, Default, Deserialize, serde::Serialize)]
#[serde(default)]
pub struct ListQuery {
    pub project: String,
    pub state: String,
    pub name: String,
    pub cursor: String,
}

impl ListQuery {
    fn api(&self) -> VmQuery {
        VmQuery {
            project: given(&self.project),
            state: given(&self.state),
            host: None,
            name: given(&self.name),
            limit: Some(PAGE),
            cursor: given(&self.cursor),
        }
    }

    /// The query string of this filter at another page.
    fn at(&self, cursor: Option<&str>) -> String {
        let pairs = [
            ("project", self.project.as_str()),
            ("state", self.state.as_str()),
            ("name", self.name.as_str()),
            ("cursor", cursor.unwrap_or("")),
        ];
        let kept: Vec<(&str, &str)> = pairs.into_iter().filter(|(_, v)| !v.is_empty()).collect();
        serde_urlencoded::to_string(kept).unwrap_or_default()
    }
}

pub async fn list(
    caller: Caller,
    State(web): State<WebState>,
    Query(query): Query<ListQuery>,
) -> Result<Markup, WebError> {
    let table = list_live(&caller, &web, &query).await?;
    let operate = caller.is_cloud_admin()
        || caller
            .user
            .principal
            .roles
            .keys()
            .any(|p| caller.may(p, Perm::OperateVms));
    Ok(layout::page(
        &caller,
        Section::Vms,
        "VMs",
        html! {
            div.bar {
                form.filters method="get" action="/ui/vms" role="search" {
                    label { "Project " input type="text" name="project" value=(query.project) size="12"; }
                    label { "State "
                        select name="state" {
                            option value="" { "any" }
                            @for state in VmState::ALL {
                                option value=(state.as_str()) selected[query.state == state.as_str()] { (state.as_str()) }
                            }
                        }
                    }
                    label { "Name " input type="text" name="name" value=(query.name) size="16"; }
                    button type="submit" { "Filter" }
                }
                @if operate { a.button href="/ui/vms/new" { "Launch a VM" } }
            }
            div data-live={ "/ui/live/vms?" (query.at(given(&query.cursor).as_deref())) } { (table) }
        },
    ))
}

/// The table and the pager: the live part of the list.
pub async fn list_live(
    caller: &Caller,
    web: &WebState,
    query: &ListQuery,
) -> Result<Markup, WebError> {
    let asked = query.api();
    let filtered = asked.state.is_some() || asked.name.is_some() || asked.project.is_some();
    let axum::Json(page) = api::vms::list_vms(
        caller.user.clone(),
        State(web.cloud.clone()),
        ApiQuery(asked),
    )
    .await?;
    Ok(html! {
        @if page.items.is_empty() {
            p.muted { "No VMs" @if filtered { " match these filters" } "." }
        } @else {
            table.vms {
                thead { tr {
                    th scope="col" { "Name" } th scope="col" { "Project" } th scope="col" { "State" }
                    th scope="col" { "Type" } th scope="col" { "vCPUs" } th scope="col" { "Memory" }
                    th scope="col" { "Host" } th scope="col" { "Since" }
                } }
                tbody {
                    @for vm in &page.items {
                        tr {
                            td { a href={ "/ui/vms/" (vm.id) } { (vm.name) } }
                            td { (vm.project) }
                            td title=[vm.pending_reason.as_deref()] { (layout::state(vm.state))
                                @if vm.desired_state != vm.state && !matches!(vm.desired_state, VmState::Running) || vm.deleting {
                                    " → " (vm.desired_state.as_str())
                                }
                            }
                            td { (vm.hypervisor) }
                            td { (vm.vcpus) }
                            td { (layout::mib(vm.memory_mib)) }
                            td { @match vm.host { Some(h) => code { (layout::short(&h)) }, None => "–" } }
                            td { (layout::time(&vm.state_since)) }
                        }
                    }
                }
            }
        }
        nav.pager aria-label="Pages" {
            @if given(&query.cursor).is_some() { a href={ "/ui/vms?" (query.at(None)) } { "← First page" } }
            @if let Some(next) = &page.next_cursor { a href={ "/ui/vms?" (query.at(Some(next))) } { "Next page →" } }
        }
    })
}

pub async fn detail(
    caller: Caller,
    State(web): State<WebState>,
    Path(id): Path<String>,
) -> Result<Markup, WebError> {
    let (vm, live) = detail_live(&caller, &web, &id).await?;
    let operate = caller.may(&vm.project, Perm::OperateVms);
    let cost = if caller.may(&vm.project, Perm::ReadBill) {
        cost_chart(&web, &vm)?
    } else {
        None
    };
    Ok(layout::page(
        &caller,
        Section::Vms,
        &vm.name,
        html! {
            p.crumbs { a href="/ui/vms" { "VMs" } " / " (vm.name) " · " code { (vm.id) } }
            div data-live={ "/ui/live/vms/" (vm.id) } { (live) }
            @if let Some(cost) = cost { (cost) }
            // Outside the live region: what is typed here is not redrawn away.
            @if operate && !vm.deleting { (operate::forms(&caller, &vm)) }
        },
    ))
}

/// What the VM has cost since it was made, as a curve over its life (drawn when the
/// page loads: pricing its whole history every tick would be wasted work).
fn cost_chart(web: &WebState, vm: &VmView) -> Result<Option<Markup>, WebError> {
    const POINTS: i64 = 24;
    let now = crate::store::now_ms();
    let created = humantime::parse_rfc3339_weak(&vm.created_at)
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(now, |d| d.as_millis() as i64);
    let span = (now - created).max(1);
    let ends: Vec<i64> = (1..=POINTS).map(|i| created + span * i / POINTS).collect();
    let periods: Vec<(i64, i64)> = ends.iter().map(|&end| (created, end)).collect();
    let Some(costs) = web.cloud.vm_costs(vm.id, &periods)? else {
        return Ok(None);
    };
    let total = costs.last().copied().unwrap_or(0);
    let points: Vec<(i64, f64)> = ends
        .iter()
        .zip(&costs)
        .map(|(&t, &c)| (t, c as f64))
        .collect();
    Ok(Some(html! {
        section aria-labelledby="cost" {
            h2 #cost { "Cost so far: " (layout::money(total)) }
            (chart::sparkline(&points, 0.0, "Cost since it was made"))
        }
    }))
}

/// The VM as the API shows it, and the live part of its page.
pub async fn detail_live(
    caller: &Caller,
    web: &WebState,
    id: &str,
) -> Result<(VmView, Markup), WebError> {
    let axum::Json(vm) = api::vms::get_vm(
        caller.user.clone(),
        State(web.cloud.clone()),
        ApiPath(id.to_owned()),
    )
    .await?;
    let events = web.cloud.latest_events(vm.id, 20)?;
    let history = web.cloud.state_history(vm.id)?;
    let samples = web.cloud.recent_usage(vm.id, 120)?;
    let cpu = chart::cpu_percent(&samples, vm.vcpus);
    let memory: Vec<(i64, f64)> = samples
        .iter()
        .map(|s| (s.sampled_at_ms, s.mem_kib as f64 / 1024.0))
        .collect();
    let now = crate::store::now_ms();
    let operate = caller.may(&vm.project, Perm::OperateVms);
    let console = caller.may(&vm.project, Perm::ReadConsole);
    let markup = html! {
        div.columns {
            section aria-labelledby="about" {
                h2 #about { "State" }
                p.big { (layout::state(vm.state))
                    @if vm.desired_state != vm.state { " → asked: " (vm.desired_state.as_str()) }
                    " " span.muted { "since " (layout::time(&vm.state_since)) }
                }
                @if let Some(error) = &vm.last_error { p.error role="alert" { (error) } }
                @if let Some(reason) = &vm.pending_reason { p.warn role="status" { "Not placed: " (reason) } }
                @if operate && !vm.deleting {
                    div.actions {
                        @for action in Action::ALL.into_iter().filter(|a| a.allowed_in(vm.state)) {
                            (layout::button(caller, &format!("/ui/vms/{}/actions/{}", vm.id, action.as_str()),
                                &capitalized(action.as_str()), confirmation(action, &vm.name).as_deref()))
                        }
                        (layout::button(caller, &format!("/ui/vms/{}/actions/delete", vm.id), "Delete",
                            Some(&format!("Delete {}? It is terminated and its record removed.", vm.name))))
                    }
                }
                @if vm.deleting { p.muted { "Being deleted." } }
                dl.facts {
                    dt { "Project" } dd { (vm.project) }
                    dt { "Type" } dd { (vm.hypervisor) }
                    dt { "Shape" } dd { (vm.vcpus) @if vm.vcpus == 1 { " vCPU, " } @else { " vCPUs, " } (layout::mib(vm.memory_mib))
                        @if vm.disk_mib > 0 { ", disk " (layout::mib(vm.disk_mib)) } }
                    dt { "Image" } dd { code { (vm.image) } }
                    @if !vm.command.is_empty() { dt { "Command" } dd { code { (vm.command.join(" ")) } } }
                    dt { "Host" } dd { @match vm.host { Some(h) => code { (h) }, None => "not placed yet" } }
                    dt { "Created" } dd { (layout::time(&vm.created_at)) }
                    @if let Some(burst) = &vm.burst {
                        dt { "Burst" } dd { "+" (burst.cpus) " vCPUs, +" (layout::mib(burst.memory_mib)) }
                    }
                    @if console { dt { "Console" } dd { a href={ "/ui/vms/" (vm.id) "/console" } { "Open the console" } } }
                }
            }
            section aria-labelledby="guest" {
                h2 #guest { "Guest and policies" }
                @match &vm.guest {
                    None => p.muted { "The guest module has not said hello yet." },
                    Some(guest) => {
                        p { @if guest.connected { "Connected" } @else { "Not connected" }
                            @if let Some(v) = &guest.version { ", herd-guest " (v) }
                            @if let Some(hello) = &guest.hello_at { ", said hello " (layout::time(hello)) }
                            @match guest.workload_running { Some(true) => ", workload running", Some(false) => ", workload not running", None => "" }
                        }
                        ul.policies {
                            @for p in &guest.policy_progress {
                                li {
                                    strong { (p.rule) } " " (p.text)
                                    (layout::meter(u64::from(p.fraction_milli), 1000, &format!("{:.0}%", f64::from(p.fraction_milli) / 10.0)))
                                    @if let Some(left) = p.seconds_left { span.muted { " acts in " (layout::duration(left)) } }
                                }
                            }
                        }
                    }
                }
                @let rules = rules(&vm.policy);
                @if rules.is_empty() { p.muted { "No policies." } }
                @else if vm.guest.as_ref().is_none_or(|g| g.policy_progress.is_empty()) {
                    ul.policies { @for rule in &rules { li { (rule) } } }
                }
                @if let Some(usage) = &vm.usage {
                    h2 { "Usage" }
                    dl.facts {
                        dt { "CPU time" } dd { (layout::duration(usage.cpu_ms / 1000)) }
                        dt { "Memory" } dd { (layout::bytes(usage.mem_kib.saturating_mul(1024))) }
                        dt { "Network" } dd { (layout::bytes(usage.net_rx_bytes)) " in, " (layout::bytes(usage.net_tx_bytes)) " out" }
                        dt { "Disk" } dd { (layout::bytes(usage.disk_read_bytes)) " read, " (layout::bytes(usage.disk_write_bytes)) " written" }
                    }
                }
            }
        }
        section aria-labelledby="history" {
            h2 #history { "History" }
            (chart::timeline(&history, now))
            div.columns {
                figure {
                    figcaption { "CPU, % of its vCPUs " span.muted { "(last " (cpu.len()) " samples)" } }
                    (chart::sparkline(&cpu, 100.0, "CPU use over the latest samples"))
                }
                figure {
                    figcaption { "Memory, MiB " span.muted { "(of " (vm.memory_mib) ")" } }
                    (chart::sparkline(&memory, vm.memory_mib as f64, "Memory use over the latest samples"))
                }
            }
        }
        section aria-labelledby="events" {
            h2 #events { "Events " span.muted { "(newest last)" } }
            @if events.is_empty() { p.muted { "None yet." } }
            ol.events {
                @for e in &events {
                    li {
                        (layout::time(&api::rfc3339(e.time_ms))) " "
                        span.kind { (e.kind) } " "
                        @if let (Some(from), Some(to)) = (e.from, e.to) { (from.as_str()) " → " (to.as_str()) " " }
                        (e.message)
                    }
                }
            }
        }
    };
    Ok((vm, markup))
}

/// The policies a VM carries, in words, for when its guest has not reported their
/// progress yet.
pub(super) fn rules(policy: &PolicySpec) -> Vec<String> {
    let then = |e: &Enforcement| format!(", then {}", e.action.as_str());
    let mut out = Vec::new();
    if let Some(l) = &policy.lifespan {
        if let Some(s) = l.max_seconds {
            out.push(format!(
                "lifespan {}{}",
                layout::duration(s),
                then(&l.enforce)
            ));
        }
        if let Some(at) = l.end_at {
            out.push(format!(
                "ends at {}{}",
                api::rfc3339(
                    i64::try_from(at)
                        .unwrap_or(i64::MAX / 1000)
                        .saturating_mul(1000)
                ),
                then(&l.enforce)
            ));
        }
    }
    if let Some(i) = &policy.idle {
        out.push(format!(
            "idle for {}{}",
            layout::duration(i.for_seconds),
            then(&i.enforce)
        ));
    }
    if let Some(o) = &policy.overuse {
        out.push(format!(
            "over-use for {}{}",
            layout::duration(o.for_seconds),
            then(&o.enforce)
        ));
    }
    if let Some(b) = &policy.budget {
        out.push(format!("resource budget{}", then(&b.enforce)));
    }
    if let Some(c) = &policy.cost_cap {
        out.push(format!(
            "cost cap {}{}",
            layout::money(c.max_micros),
            then(&c.enforce)
        ));
    }
    if let Some(t) = &policy.task {
        out.push(format!("when the task ends{}", then(&t.enforce)));
    }
    if let Some(e) = &policy.errors {
        out.push(format!(
            "up to {} restarts on errors{}",
            e.max_restarts,
            then(&e.enforce)
        ));
    }
    if let Some(d) = &policy.deadline {
        out.push(format!(
            "deadline {}: duplicated if missed",
            layout::duration(d.seconds)
        ));
    }
    out
}

fn capitalized(word: &str) -> String {
    let mut chars = word.chars();
    chars
        .next()
        .map(|c| c.to_uppercase().chain(chars).collect())
        .unwrap_or_default()
}

/// What to ask before an action that loses work; `None` for the harmless ones.
fn confirmation(action: Action, name: &str) -> Option<String> {
    match action {
        Action::Stop => Some(format!("Stop {name}? Its guest is powered off.")),
        Action::Terminate => Some(format!("Terminate {name}? This cannot be undone.")),
        Action::Suspend => Some(format!("Suspend {name} to disk?")),
        Action::Start | Action::Pause | Action::Resume => None,
    }
}

pub async fn act(
    State(web): State<WebState>,
    Path((id, action)): Path<(String, String)>,
    posted: Posted<Nothing>,
) -> Result<Response, WebError> {
    let user = posted.caller.user;
    let cloud = State(web.cloud.clone());
    if action == "delete" {
        api::vms::delete_vm(user, cloud, ApiPath(id)).await?;
        return Ok(Redirect::to("/ui/vms").into_response());
    }
    let (_, axum::Json(vm)) = api::vms::vm_action(user, cloud, ApiPath((id, action))).await?;
    Ok(Redirect::to(&format!("/ui/vms/{}", vm.id)).into_response())
}

pub async fn console(
    caller: Caller,
    State(web): State<WebState>,
    Path(id): Path<String>,
) -> Result<Markup, WebError> {
    let axum::Json(vm) = api::vms::get_vm(
        caller.user.clone(),
        State(web.cloud.clone()),
        ApiPath(id.clone()),
    )
    .await?;
    let text = console_live(&caller, &web, &id).await?;
    Ok(layout::page(
        &caller,
        Section::Vms,
        &format!("Console of {}", vm.name),
        html! {
            p.crumbs { a href="/ui/vms" { "VMs" } " / " a href={ "/ui/vms/" (vm.id) } { (vm.name) } " / console" }
            div data-live={ "/ui/live/vms/" (vm.id) "/console" } { (text) }
        },
    ))
}

/// The console's tail, or why there is none.
pub async fn console_live(caller: &Caller, web: &WebState, id: &str) -> Result<Markup, WebError> {
    let tail = api::vms::vm_console(
        caller.user.clone(),
        State(web.cloud.clone()),
        ApiPath(id.to_owned()),
        ApiQuery(ConsoleQuery {
            bytes: Some(16 * 1024),
        }),
    )
    .await;
    Ok(match tail {
        Ok(response) => {
            let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
                .await
                .unwrap_or_default();
            // A serial console ends its lines with CR LF.
            let text = String::from_utf8_lossy(&bytes).replace("\r\n", "\n");
            html! { pre.console aria-label="Console output" { (text) } }
        }
        // Not on a host, or its host is away: say so, and keep trying.
        Err(err) if err.status == axum::http::StatusCode::CONFLICT => {
            html! { p.muted { (err.message) } }
        }
        Err(err) => return Err(err.into()),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_list_keeps_its_filters_across_pages() {
        let query = ListQuery {
            state: "running".into(),
            name: "a b".into(),
            ..ListQuery::default()
        };
        assert_eq!(query.at(Some("c1")), "state=running&name=a+b&cursor=c1");
        assert_eq!(query.at(None), "state=running&name=a+b");
    }
}
