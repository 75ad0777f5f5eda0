//! Projects, the sub-clouds: each one's quota against what its VMs hold, its members
//! and their roles, and the prices its VMs pay.

use super::layout::{self, Section};
use super::{Caller, WebError, WebState};
use crate::api::{self, tenants, ApiPath};
use axum::extract::State;
use herd_proto::policy::Rate;
use maud::{html, Markup};

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
                        h3 { "Members" }
                        @if members.is_empty() { p.muted { "None yet." } }
                        ul.plain { @for m in &members { li { (m.user) " " span.muted { (m.role.as_str()) } } } }
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
