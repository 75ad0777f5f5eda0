//! Hosts, for cloud admins: each with its types, drivers' health, labels, capacity and
//! allocation, and the proximity tree they form.

use super::layout::{self, Section};
use super::{Caller, WebError, WebState};
use crate::api::hosts::{HostQuery, TopologyQuery};
use crate::api::{self, ApiQuery, CloudAdmin};
use crate::topology::TopologyHost;
use axum::extract::State;
use maud::{html, Markup};
use uuid::Uuid;

pub async fn page(caller: Caller, State(web): State<WebState>) -> Result<Markup, WebError> {
    let cloud = State(web.cloud.clone());
    let axum::Json(hosts) = api::hosts::list_hosts(
        CloudAdmin::of(caller.user.clone())?,
        cloud.clone(),
        ApiQuery(HostQuery::default()),
    )
    .await?;
    let tree = api::hosts::get_topology(
        CloudAdmin::of(caller.user.clone())?,
        cloud,
        ApiQuery(TopologyQuery::default()),
    )
    .await
    .ok()
    .map(|axum::Json(tree)| tree);
    Ok(layout::page(
        &caller,
        Section::Hosts,
        "Hosts",
        html! {
            @if hosts.is_empty() {
                p.muted { "No host has joined yet. " code { "herd host join-token" } " makes a token for one." }
            } @else {
                table.hosts {
                    thead { tr {
                        th scope="col" { "Host" } th scope="col" { "State" } th scope="col" { "Types and drivers" }
                        th scope="col" { "vCPUs" } th scope="col" { "Memory" } th scope="col" { "VMs" }
                        th scope="col" { "Labels" } th scope="col" { "Agent" }
                    } }
                    tbody {
                        @for h in &hosts {
                            tr {
                                th scope="row" { (h.hostname) br; code.muted { (layout::short(&h.id)) } }
                                td { (h.state) @if !h.connected { ", not connected" }
                                    @if let Some(ago) = h.last_seen_ms_ago { br; span.muted { "seen " (layout::duration(ago / 1000)) " ago" } } }
                                td { ul.plain { @for d in &h.drivers {
                                    li class={ "health-" (d.health) } title=[d.detail.as_deref()] { (d.kind) ": " (d.health) }
                                } } }
                                td { (layout::meter(h.allocated_vcpus, u64::from(h.cpus), &format!("{} of {} allocated", h.allocated_vcpus, h.cpus))) }
                                td { (layout::meter(h.allocated_memory_mib, h.memory_mib, &format!("{} of {}", layout::mib(h.allocated_memory_mib), layout::mib(h.memory_mib)))) }
                                td { (h.n_vms) }
                                td { @for (k, v) in &h.labels { code { (k) "=" (v) } " " } }
                                td { (h.agent_version.as_deref().unwrap_or("–")) }
                            }
                        }
                    }
                }
            }
            @if let Some(tree) = tree {
                section aria-labelledby="tree" {
                    h2 #tree { "Proximity tree " span.muted { "(fan-out " (tree.fanout) ")" } }
                    ul.tree { (branch(&tree.hosts, Some(tree.root), None)) }
                }
            }
        },
    ))
}

/// The hosts whose parent is `parent` (the root when `only` is given), each with its
/// own children, as nested lists.
fn branch(hosts: &[TopologyHost], only: Option<Uuid>, parent: Option<Uuid>) -> Markup {
    html! {
        @for host in hosts.iter().filter(|h| match only { Some(root) => h.id == root, None => h.parent == parent }) {
            li {
                (host.hostname) " " span.muted { (host.region) "/" (host.zone) "/" (host.rack) }
                @if hosts.iter().any(|h| h.parent == Some(host.id)) {
                    ul { (branch(hosts, None, Some(host.id))) }
                }
            }
        }
    }
}
