//! The audit log, newest first, for cloud admins and project admins.

use super::layout::{self, Section};
use super::{given, Caller, WebError, WebState, PAGE};
use crate::api::audit::AuditQuery;
use crate::api::{self, ApiQuery};
use axum::extract::{Query, State};
use maud::{html, Markup};
use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Filter {
    project: String,
    actor: String,
    before: Option<i64>,
}

pub async fn page(
    caller: Caller,
    State(web): State<WebState>,
    Query(filter): Query<Filter>,
) -> Result<Markup, WebError> {
    let axum::Json(log) = api::audit::list(
        caller.user.clone(),
        State(web.cloud.clone()),
        ApiQuery(AuditQuery {
            project: given(&filter.project),
            actor: given(&filter.actor),
            before: filter.before,
            limit: Some(PAGE),
        }),
    )
    .await?;
    let next = log.next_before.map(|before| {
        serde_urlencoded::to_string([
            ("project", filter.project.clone()),
            ("actor", filter.actor.clone()),
            ("before", before.to_string()),
        ])
        .unwrap_or_default()
    });
    Ok(layout::page(
        &caller,
        Section::Audit,
        "Audit log",
        html! {
            form.filters method="get" action="/ui/audit" {
                label { "Project " input type="text" name="project" value=(filter.project) size="12"; }
                label { "Actor " input type="text" name="actor" value=(filter.actor) size="16"; }
                button type="submit" { "Filter" }
            }
            table.audit {
                thead { tr {
                    th scope="col" { "Time" } th scope="col" { "Actor" } th scope="col" { "Action" }
                    th scope="col" { "Object" } th scope="col" { "Project" } th scope="col" { "Result" }
                } }
                tbody {
                    @for row in &log.items {
                        tr class=[(row.result != "ok").then_some("failed")] {
                            td { (layout::time(&row.time)) } td { (row.actor) } td { code { (row.action) } }
                            td { code { (row.object) } } td { (row.project.as_deref().unwrap_or("–")) }
                            td { (row.result) }
                        }
                    }
                }
            }
            @if let Some(next) = next { nav.pager { a href={ "/ui/audit?" (next) } { "Older →" } } }
        },
    ))
}
