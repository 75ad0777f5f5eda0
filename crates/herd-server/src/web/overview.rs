//! The first page: how many VMs are in each state, the resource map as a heatmap of
//! hosts, and what needs attention.

use super::layout::{self, Section};
use super::{Caller, WebError, WebState};
use crate::access::Perm;
use crate::api::{self, ApiQuery, VmQuery};
use crate::map::{HostMap, ResourceMap};
use axum::extract::State;
use herd_proto::VmState;
use maud::{html, Markup};

/// Policies that act this soon are shown as alerts.
const ACTING_SOON_SECONDS: u64 = 600;

/// The states shown even when no VM is in them.
const ALWAYS_SHOWN: [VmState; 5] = [
    VmState::Pending,
    VmState::Running,
    VmState::Paused,
    VmState::Stopped,
    VmState::Error,
];

pub async fn page(caller: Caller, State(web): State<WebState>) -> Result<Markup, WebError> {
    let live = live(&caller, &web).await?;
    Ok(layout::page(
        &caller,
        Section::Overview,
        "Overview",
        html! { div data-live="/ui/live/overview" { (live) } },
    ))
}

/// The part of the page that updates itself.
pub async fn live(caller: &Caller, web: &WebState) -> Result<Markup, WebError> {
    let cloud = &web.cloud;
    let counts = match caller.user.principal.scope(Perm::Read) {
        None => cloud.vm_state_counts(),
        Some(projects) => cloud.vm_state_counts_in(&projects)?,
    };
    let count = |state: VmState| {
        counts
            .iter()
            .find(|(s, _)| *s == state)
            .map_or(0, |(_, n)| *n)
    };
    let total: u64 = counts.iter().map(|(_, n)| n).sum();
    let axum::Json(map) = api::hosts::get_map(caller.user.clone(), State(cloud.clone())).await?;
    let axum::Json(errors) = api::vms::list_vms(
        caller.user.clone(),
        State(cloud.clone()),
        ApiQuery(VmQuery {
            state: Some("error".into()),
            limit: Some(10),
            ..VmQuery::default()
        }),
    )
    .await?;
    let lost: Vec<&HostMap> = map.hosts.iter().filter(|h| h.state == "down").collect();
    // Policies about to act, on the VMs the caller may read.
    let acting: Vec<(String, String, String, u64)> = cloud
        .policies_acting_within(ACTING_SOON_SECONDS)
        .into_iter()
        .filter_map(|(vm, rule, text, left)| {
            let record = cloud.vm(&vm.to_string()).ok()?;
            if !caller.may(&record.project, Perm::Read) {
                return None;
            }
            Some((vm.to_string(), record.name, format!("{rule}: {text}"), left))
        })
        .take(10)
        .collect();
    Ok(html! {
        section aria-labelledby="counts" {
            h2 #counts { "VMs by state " span.muted { "(" (total) " in all)" } }
            ul.counts {
                @for state in VmState::ALL.into_iter().filter(|s| ALWAYS_SHOWN.contains(s) || count(*s) > 0) {
                    li {
                        a href={ "/ui/vms?state=" (state.as_str()) } {
                            span.n { (count(state)) }
                            (layout::state(state))
                        }
                    }
                }
            }
        }
        section aria-labelledby="alerts" {
            h2 #alerts { "Needs attention" }
            @if lost.is_empty() && errors.items.is_empty() && acting.is_empty() {
                p.muted { "Nothing: every host is up, no VM is in error and no policy acts within 10 minutes." }
            } @else {
                ul.alerts {
                    @for host in &lost {
                        li.alert { "Host " strong { (host.hostname) } " is down" }
                    }
                    @for (id, name, what, left) in &acting {
                        li.alert.soon {
                            "VM " a href={ "/ui/vms/" (id) } { (name) } " acts in " (layout::duration(*left)) " (" (what) ")"
                        }
                    }
                    @for vm in &errors.items {
                        li.alert {
                            "VM " a href={ "/ui/vms/" (vm.id) } { (vm.name) } " is in error"
                            @if let Some(error) = &vm.last_error { ": " (error) }
                        }
                    }
                }
            }
        }
        (heatmap(&map))
    })
}

fn heatmap(map: &ResourceMap) -> Markup {
    html! {
        section aria-labelledby="map" {
            h2 #map { "Resources" }
            table.types {
                caption.muted { "Per hypervisor type: allocated of what its hosts offer, and measured use" }
                thead { tr {
                    th scope="col" { "Type" } th scope="col" { "Hosts" } th scope="col" { "VMs" }
                    th scope="col" { "Pending" } th scope="col" { "vCPUs allocated" }
                    th scope="col" { "Memory allocated" } th scope="col" { "CPU used" }
                    th scope="col" { "Free" }
                } }
                tbody {
                    @for t in &map.types {
                        tr {
                            th scope="row" { (t.hypervisor) }
                            td { (t.n_hosts) @if t.n_stale_hosts > 0 { " (+" (t.n_stale_hosts) " stale)" } }
                            td { (t.n_vms) } td { (t.n_pending) }
                            td { (t.allocated_vcpus) } td { (layout::mib(t.allocated_memory_mib)) }
                            td { @match t.used_millicores { Some(m) => { (format!("{:.2}", m as f64 / 1000.0)) " CPUs" }, None => "–" } }
                            td { @match (t.free_vcpus, t.free_memory_mib) {
                                (Some(c), Some(m)) => { (c) " vCPUs, " (layout::mib(m)) },
                                _ => "–",
                            } }
                        }
                    }
                }
            }
            @if !map.hosts.is_empty() {
                ul.heatmap aria-label="Hosts" {
                    @for host in &map.hosts { li { (tile(host)) } }
                }
            }
        }
    }
}

/// One host: a tile whose bars show allocated and used CPU and memory.
fn tile(host: &HostMap) -> Markup {
    let vcpus = u64::from(host.cpus);
    let used_cpus = host.used_millicores.unwrap_or(0);
    let class = if host.state != "up" {
        "tile down"
    } else if host.stale {
        "tile stale"
    } else {
        "tile"
    };
    html! {
        div class=(class) {
            div.name { strong { (host.hostname) } " " span.muted { (host.state) @if host.stale { ", stale" } } }
            dl {
                dt { "vCPUs" }
                dd { (layout::meter(host.allocated_vcpus, vcpus, &format!("{} of {} allocated", host.allocated_vcpus, vcpus))) }
                dt { "CPU used" }
                dd { (layout::meter(used_cpus, vcpus * 1000, &format!("{:.2} of {}", used_cpus as f64 / 1000.0, vcpus))) }
                dt { "Memory" }
                dd { (layout::meter(host.allocated_memory_mib, host.memory_mib, &format!("{} of {} allocated", layout::mib(host.allocated_memory_mib), layout::mib(host.memory_mib)))) }
            }
            div.types {
                @for t in &host.types {
                    span class={ "type health-" (t.health) } title=[t.health_detail.as_deref()] {
                        (t.hypervisor) ": " (t.n_vms) " VMs, " (t.health)
                    }
                }
            }
        }
    }
}
