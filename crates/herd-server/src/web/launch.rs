//! The launch form: a VM's shape, image and command, and the common policies with the
//! CLI's defaults; what it sends is the API's own launch request.

use super::layout::{self, Section};
use super::{given, Caller, Posted, WebError, WebState};
use crate::access::Perm;
use crate::api::{self, LaunchRequest};
use axum::extract::State;
use axum::response::{IntoResponse, Redirect, Response};
use herd_proto::policy::{
    CostCap, Enforcement, Idle, Lifespan, PolicyAction, PolicySpec, RateCard,
};
use maud::{html, Markup};
use serde::Deserialize;

/// The launch form's fields; the policies are the common ones, with the CLI's defaults.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct LaunchForm {
    name: String,
    project: String,
    hypervisor: String,
    image: String,
    vcpus: String,
    memory_mib: String,
    disk_mib: String,
    command: String,
    lifespan: String,
    on_lifespan: String,
    idle: String,
    on_idle: String,
    budget: String,
    on_budget: String,
}

pub(super) fn number<T: std::str::FromStr>(field: &str, text: &str) -> Result<Option<T>, WebError> {
    given(text)
        .map(|t| {
            t.parse()
                .map_err(|_| WebError::bad_form(format!("{field}: {t:?} is not a whole number")))
        })
        .transpose()
}

fn seconds(field: &str, text: &str) -> Result<Option<u64>, WebError> {
    given(text)
        .map(|t| {
            humantime::parse_duration(&t)
                .map(|d| d.as_secs())
                .map_err(|_| {
                    WebError::bad_form(format!(
                        "{field}: {t:?} is not a duration like 90s, 15m or 2h"
                    ))
                })
        })
        .transpose()
}

fn enforce(field: &str, text: &str, default: PolicyAction) -> Result<Enforcement, WebError> {
    let action = match given(text) {
        None => default,
        Some(t) => PolicyAction::parse(&t)
            .ok_or_else(|| WebError::bad_form(format!("{field}: {t:?} is not an action")))?,
    };
    Ok(Enforcement { action, warn: None })
}

impl LaunchForm {
    fn request(&self) -> Result<LaunchRequest, WebError> {
        let name =
            given(&self.name).ok_or_else(|| WebError::bad_form("name: a VM needs a name"))?;
        let mut policy = PolicySpec::default();
        if let Some(max_seconds) = seconds("lifespan", &self.lifespan)? {
            policy.lifespan = Some(Lifespan {
                max_seconds: Some(max_seconds),
                end_at: None,
                enforce: enforce("on_lifespan", &self.on_lifespan, PolicyAction::Terminate)?,
            });
        }
        if let Some(for_seconds) = seconds("idle", &self.idle)? {
            policy.idle = Some(Idle {
                cpu_below_permille: 50,
                net_below_bps: 10_240,
                for_seconds,
                warmup_seconds: 0,
                enforce: enforce("on_idle", &self.on_idle, PolicyAction::Suspend)?,
            });
        }
        if let Some(budget) = given(&self.budget) {
            let max_micros = herd_proto::policy::parse_money(&budget).ok_or_else(|| {
                WebError::bad_form(format!("budget: {budget:?} is not an amount like 5.00"))
            })?;
            policy.cost_cap = Some(CostCap {
                max_micros,
                // The server prices it with the project's rate card.
                rates: RateCard::default(),
                enforce: enforce("on_budget", &self.on_budget, PolicyAction::Stop)?,
            });
        }
        Ok(LaunchRequest {
            name,
            project: given(&self.project),
            hypervisor: given(&self.hypervisor),
            vcpus: number("vcpus", &self.vcpus)?,
            memory_mib: number("memory_mib", &self.memory_mib)?,
            image: given(&self.image),
            command: given(&self.command)
                .map(|c| c.split_whitespace().map(str::to_owned).collect()),
            policy: (!policy.is_empty()).then_some(policy),
            keep_running: None,
            disk_mib: number("disk_mib", &self.disk_mib)?,
        })
    }
}

pub async fn launch_form(caller: Caller, State(web): State<WebState>) -> Markup {
    let projects: Vec<String> = if caller.is_cloud_admin() {
        let mut names: Vec<String> = web
            .cloud
            .tenancy
            .projects()
            .into_iter()
            .map(|p| p.name)
            .collect();
        names.sort();
        names
    } else {
        caller
            .user
            .principal
            .roles
            .keys()
            .filter(|p| caller.may(p, Perm::OperateVms))
            .cloned()
            .collect()
    };
    // The types some host offers (a name, not a project's data).
    let types: Vec<String> = web
        .cloud
        .resource_map(&crate::map::MapScope::Cloud)
        .map(|map| map.types.into_iter().map(|t| t.hypervisor).collect())
        .unwrap_or_default();
    let action_choice = |name: &str, default: PolicyAction| {
        html! {
            select name=(name) aria-label={ "Action for " (name) } {
                @for a in [PolicyAction::Notify, PolicyAction::Suspend, PolicyAction::Stop, PolicyAction::Terminate] {
                    option value=(a.as_str()) selected[a == default] { (a.as_str()) }
                }
            }
        }
    };
    layout::page(
        &caller,
        Section::Vms,
        "Launch a VM",
        html! {
            form.card.launch method="post" action="/ui/vms/new" {
                (layout::csrf(&caller))
                fieldset {
                    legend { "The VM" }
                    label { "Name" input type="text" name="name" required maxlength="63" pattern="[a-z0-9][a-z0-9-]*" title="lowercase letters, digits and -"; }
                    label { "Project" select name="project" { @for p in &projects { option value=(p) { (p) } } } }
                    label { "Type" select name="hypervisor" {
                        option value="" { "default" }
                        @for t in &types { option value=(t) { (t) } }
                    } }
                    label { "Image" input type="text" name="image" placeholder="the type's default"; }
                    label { "vCPUs" input type="number" name="vcpus" min="1" max="256" placeholder="1"; }
                    label { "Memory (MiB)" input type="number" name="memory_mib" min="16" placeholder="256"; }
                    label { "Disk (MiB)" input type="number" name="disk_mib" min="1" placeholder="none"; }
                    label { "Command" input type="text" name="command" placeholder="the image's default"; }
                }
                fieldset {
                    legend { "Policies " span.muted { "(enforced inside the VM, even with no server reachable)" } }
                    label { "Lifespan" input type="text" name="lifespan" placeholder="e.g. 2h"; (action_choice("on_lifespan", PolicyAction::Terminate)) }
                    label { "Idle for" input type="text" name="idle" placeholder="e.g. 15m"; (action_choice("on_idle", PolicyAction::Suspend)) }
                    label { "Budget" input type="text" name="budget" placeholder="e.g. 5.00"; (action_choice("on_budget", PolicyAction::Stop)) }
                }
                button type="submit" { "Launch" }
            }
        },
    )
}

pub async fn launch(
    State(web): State<WebState>,
    posted: Posted<LaunchForm>,
) -> Result<Response, WebError> {
    let request = posted.form.request()?;
    let (_, axum::Json(vm)) = api::vms::launch_vm(
        posted.caller.user,
        State(web.cloud.clone()),
        api::ApiJson(request),
    )
    .await?;
    Ok(Redirect::to(&format!("/ui/vms/{}", vm.id)).into_response())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::super::vms::rules;
    use super::*;

    #[test]
    fn the_launch_form_becomes_a_launch_request_with_its_policies() {
        let form = LaunchForm {
            name: " web ".into(),
            vcpus: "2".into(),
            lifespan: "2h".into(),
            budget: "5.00".into(),
            on_budget: "terminate".into(),
            ..LaunchForm::default()
        };
        let request = form.request().unwrap();
        assert_eq!(request.name, "web");
        assert_eq!(request.vcpus, Some(2));
        assert_eq!(request.memory_mib, None);
        let policy = request.policy.unwrap();
        assert_eq!(policy.lifespan.unwrap().max_seconds, Some(7200));
        let cap = policy.cost_cap.unwrap();
        assert_eq!(cap.max_micros, 5_000_000);
        assert_eq!(cap.enforce.action, PolicyAction::Terminate);
        assert!(policy.idle.is_none());
    }

    #[test]
    fn policies_read_as_rules_with_their_actions() {
        let form = LaunchForm {
            name: "x".into(),
            lifespan: "2h".into(),
            budget: "5.00".into(),
            ..LaunchForm::default()
        };
        let policy = form.request().unwrap().policy.unwrap();
        assert_eq!(
            rules(&policy),
            vec![
                "lifespan 2 h 0 min, then terminate",
                "cost cap 5.00, then stop"
            ]
        );
        assert!(rules(&PolicySpec::default()).is_empty());
    }

    #[test]
    fn a_bad_field_is_named_in_the_error() {
        for (form, field) in [
            (
                LaunchForm {
                    vcpus: "two".into(),
                    ..LaunchForm::default()
                },
                "vcpus",
            ),
            (
                LaunchForm {
                    lifespan: "soon".into(),
                    ..LaunchForm::default()
                },
                "lifespan",
            ),
            (
                LaunchForm {
                    budget: "lots".into(),
                    ..LaunchForm::default()
                },
                "budget",
            ),
            (
                LaunchForm {
                    on_idle: "explode".into(),
                    idle: "5m".into(),
                    ..LaunchForm::default()
                },
                "on_idle",
            ),
        ] {
            let form = LaunchForm {
                name: "x".into(),
                ..form
            };
            match form.request() {
                Err(WebError::Api(err)) => {
                    assert!(err.message.starts_with(field), "{}", err.message)
                }
                other => panic!("{field}: {other:?}"),
            }
        }
        assert!(
            LaunchForm::default().request().is_err(),
            "a name is required"
        );
    }
}
