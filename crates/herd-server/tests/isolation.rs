//! The isolation matrix: every route the server publishes in `/openapi.json`, called
//! by every persona, must be allowed or denied exactly as the access rules say; and no
//! answer to a caller may carry another project's objects.
//!
//! The route list comes from the live OpenAPI document, so a new route that nobody
//! classified here fails this test until someone decides who may call it.

mod common;

use axum::http::StatusCode;
use common::{call, fixture, sim_host, sim_vm, Fixture};
use herd_proto::join::JoinRequest;
use herd_proto::policy::RateCard;
use herd_server::access::Role;
use herd_server::store::Quota;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Persona {
    NoToken,
    ExpiredToken,
    Viewer,
    Member,
    ProjectAdmin,
    OtherProjectMember,
    CloudAdmin,
}

const PERSONAS: [Persona; 7] = [
    Persona::NoToken,
    Persona::ExpiredToken,
    Persona::Viewer,
    Persona::Member,
    Persona::ProjectAdmin,
    Persona::OtherProjectMember,
    Persona::CloudAdmin,
];

/// Who may call a route. Objects named in paths live in project `p`.
#[derive(Debug, Clone, Copy)]
enum Rule {
    Public,
    /// Any valid user token; what the answer holds is scoped to the caller.
    AnyUser,
    /// At least this role in `p`.
    InProject(Role),
    CloudAdmin,
    /// The token named in the path belongs to the `Member` persona.
    OwnToken,
    /// Agents only: no user persona may call it.
    AgentOnly,
}

fn rule(method: &str, path: &str) -> Option<Rule> {
    use Role::{Admin, Member, Viewer};
    use Rule::*;
    Some(match (method, path) {
        ("GET", "/healthz") => Public,
        ("GET", "/metrics") => CloudAdmin,
        ("GET", "/openapi.json") => AnyUser,
        ("POST", "/v1/vms") => InProject(Member),
        ("GET", "/v1/vms") => AnyUser,
        ("POST", "/v1/vms/batch") => InProject(Member),
        ("GET", "/v1/vms/{id}") => InProject(Viewer),
        ("DELETE", "/v1/vms/{id}") => InProject(Member),
        ("POST", "/v1/vms/{id}/actions/{action}") => InProject(Member),
        ("GET", "/v1/vms/{id}/events") => InProject(Viewer),
        // Moving VMs between hosts is the operator's; anyone who sees a VM sees its moves.
        ("POST", "/v1/vms/{id}/migrate") => CloudAdmin,
        ("GET", "/v1/vms/{id}/migrations") => InProject(Viewer),
        // A resize is the project's: the cloud decides whether the VM moves for it.
        ("POST", "/v1/vms/{id}/resize") => InProject(Member),
        ("GET", "/v1/vms/{id}/resizes") => InProject(Viewer),
        ("POST", "/v1/vms/{id}/bursts") => InProject(Member),
        ("POST", "/v1/vms/{id}/broadcast") => InProject(Member),
        ("GET", "/v1/vms/{id}/broadcasts") => InProject(Viewer),
        ("GET", "/v1/vms/{id}/console") => InProject(Member),
        ("GET", "/v1/events") => AnyUser,
        ("GET", "/v1/hosts") => CloudAdmin,
        ("GET", "/v1/hosts/{id}") => CloudAdmin,
        ("GET", "/v1/hosts/{id}/status") => CloudAdmin,
        ("POST", "/v1/hosts/{id}/labels") => CloudAdmin,
        ("GET", "/v1/topology") => CloudAdmin,
        // Cloud admins get hosts and free room; others their projects' aggregates.
        ("GET", "/v1/map") => AnyUser,
        ("POST", "/v1/join-tokens") => CloudAdmin,
        ("GET", "/v1/rate-cards/{project}") => InProject(Viewer),
        ("PUT", "/v1/rate-cards/{project}") => CloudAdmin,
        ("GET", "/v1/billing") => AnyUser,
        ("POST", "/v1/agent/join") => AgentOnly,
        ("GET", "/v1/agent/discovery") => AgentOnly,
        ("GET", "/v1/agent/bus") => AgentOnly,
        ("GET", "/v1/whoami") => AnyUser,
        ("GET", "/v1/projects") => AnyUser,
        ("POST", "/v1/projects") => CloudAdmin,
        ("GET", "/v1/projects/{project}") => InProject(Viewer),
        ("DELETE", "/v1/projects/{project}") => CloudAdmin,
        ("PUT", "/v1/projects/{project}/quota") => CloudAdmin,
        ("GET", "/v1/projects/{project}/members") => InProject(Viewer),
        ("PUT", "/v1/projects/{project}/members/{user}") => InProject(Admin),
        ("DELETE", "/v1/projects/{project}/members/{user}") => InProject(Admin),
        ("GET", "/v1/users") => CloudAdmin,
        ("POST", "/v1/users") => CloudAdmin,
        ("DELETE", "/v1/users/{user}") => CloudAdmin,
        ("GET", "/v1/tokens") => AnyUser,
        ("POST", "/v1/tokens") => AnyUser,
        ("DELETE", "/v1/tokens/{id}") => OwnToken,
        ("GET", "/v1/audit") => InProject(Admin),
        _ => return None,
    })
}

fn role_in_p(persona: Persona) -> Option<Role> {
    match persona {
        Persona::Viewer => Some(Role::Viewer),
        Persona::Member => Some(Role::Member),
        Persona::ProjectAdmin => Some(Role::Admin),
        _ => None,
    }
}

fn expected_allowed(rule: Rule, persona: Persona) -> bool {
    let user = !matches!(persona, Persona::NoToken | Persona::ExpiredToken);
    match rule {
        Rule::Public => true,
        Rule::AnyUser => user,
        Rule::CloudAdmin => persona == Persona::CloudAdmin,
        Rule::InProject(least) => {
            persona == Persona::CloudAdmin || role_in_p(persona).is_some_and(|r| r >= least)
        }
        Rule::OwnToken => matches!(persona, Persona::Member | Persona::CloudAdmin),
        Rule::AgentOnly => false,
    }
}

struct World {
    fx: Fixture,
    tokens: Vec<(Persona, Option<String>)>,
    member_token_owner: String,
    host: String,
    vm_p: String,
    vm_q: String,
    unique: AtomicU32,
}

impl World {
    fn token(&self, persona: Persona) -> Option<&str> {
        self.tokens
            .iter()
            .find(|(p, _)| *p == persona)
            .and_then(|(_, t)| t.as_deref())
    }

    fn fresh(&self, prefix: &str) -> String {
        format!("{prefix}-{}", self.unique.fetch_add(1, Ordering::Relaxed))
    }

    fn launch(&self, project: &str, name: &str) -> String {
        sim_vm(&self.fx.cloud, Some(project), name).id.to_string()
    }

    fn fresh_user(&self) -> String {
        let name = self.fresh("bystander");
        self.fx.cloud.create_user(&name, false).expect("user");
        name
    }

    /// The concrete URI and body for one call of a route, with fresh objects for
    /// calls that destroy them.
    fn instantiate(&self, method: &str, path: &str) -> (String, Option<Value>) {
        let destroys = method != "GET";
        let id = if path.starts_with("/v1/vms/") {
            if destroys {
                self.launch("p", &self.fresh("doomed"))
            } else {
                self.vm_p.clone()
            }
        } else if path.starts_with("/v1/hosts/") {
            self.host.clone()
        } else if path.starts_with("/v1/tokens/") {
            self.fx
                .cloud
                .create_token(&self.member_token_owner, "victim", None)
                .expect("token")
                .row
                .id
        } else {
            String::new()
        };
        let project = if (method, path) == ("DELETE", "/v1/projects/{project}") {
            let name = self.fresh("empty");
            self.fx
                .cloud
                .create_project(&name, &Quota::default())
                .expect("project");
            name
        } else {
            "p".to_owned()
        };
        let user = match (method, path) {
            ("PUT", "/v1/projects/{project}/members/{user}") => self.fresh_user(),
            ("DELETE", "/v1/projects/{project}/members/{user}") => {
                let user = self.fresh_user();
                self.fx
                    .cloud
                    .set_member("p", &user, Role::Viewer)
                    .expect("grant");
                user
            }
            ("DELETE", "/v1/users/{user}") => self.fresh_user(),
            _ => String::new(),
        };
        let uri = path
            .replace("{id}", &id)
            .replace("{action}", "stop")
            .replace("{project}", &project)
            .replace("{user}", &user);
        let body = match (method, path) {
            ("POST", "/v1/vms") => {
                Some(json!({"name": self.fresh("new"), "project": "p", "hypervisor": "sim"}))
            }
            ("POST", "/v1/vms/batch") => Some(json!({
                "count": 2,
                "vm": {"name": self.fresh("many"), "project": "p", "hypervisor": "sim"}
            })),
            ("POST", "/v1/projects") => Some(json!({"name": self.fresh("made")})),
            ("PUT", "/v1/projects/{project}/quota") => Some(json!({})),
            ("PUT", "/v1/projects/{project}/members/{user}") => Some(json!({"role": "viewer"})),
            ("POST", "/v1/users") => Some(json!({"name": self.fresh("newbie")})),
            ("POST", "/v1/tokens") => Some(json!({"label": "mine", "ttl_seconds": 60})),
            ("POST", "/v1/join-tokens") => Some(json!({})),
            ("POST", "/v1/hosts/{id}/labels") => Some(json!({"set": {"rack": "r1"}})),
            ("POST", "/v1/vms/{id}/migrate") => Some(json!({})),
            ("POST", "/v1/vms/{id}/resize") => Some(json!({"memory_mib": 300})),
            ("POST", "/v1/vms/{id}/bursts") => Some(json!({"cpus": 1, "seconds": 60})),
            ("POST", "/v1/vms/{id}/broadcast") => Some(json!({})),
            ("PUT", "/v1/rate-cards/{project}") => {
                Some(serde_json::to_value(RateCard::default()).expect("json"))
            }
            ("POST", "/v1/agent/join") => Some(
                serde_json::to_value(JoinRequest {
                    join_token: "herd_join_forged".into(),
                    hostname: "intruder".into(),
                    csr_pem: String::new(),
                    labels: Default::default(),
                })
                .expect("json"),
            ),
            _ => None,
        };
        (uri, body)
    }
}

fn setup() -> World {
    let fx = fixture();
    let cloud = &fx.cloud;
    for project in ["p", "q"] {
        cloud
            .create_project(project, &Quota::default())
            .expect("project");
    }
    cloud
        .set_rate_card("p", &RateCard::default())
        .expect("rate card");
    let mut tokens = vec![
        (Persona::NoToken, None),
        (Persona::CloudAdmin, Some(fx.token.clone())),
    ];
    for (persona, name, project, role) in [
        (Persona::Viewer, "vera", "p", Role::Viewer),
        (Persona::Member, "mona", "p", Role::Member),
        (Persona::ProjectAdmin, "ada", "p", Role::Admin),
        (Persona::OtherProjectMember, "otto", "q", Role::Member),
    ] {
        cloud.create_user(name, false).expect("user");
        cloud.set_member(project, name, role).expect("grant");
        let token = cloud.create_token(name, "t", None).expect("token");
        tokens.push((persona, Some(token.secret)));
    }
    let short = cloud
        .create_token("mona", "short-lived", Some(Duration::from_secs(1)))
        .expect("token");
    tokens.push((Persona::ExpiredToken, Some(short.secret)));

    let host = sim_host(cloud, "h");
    let world = World {
        tokens,
        member_token_owner: "mona".into(),
        host: host.to_string(),
        vm_p: String::new(),
        vm_q: String::new(),
        unique: AtomicU32::new(0),
        fx,
    };
    World {
        vm_p: world.launch("p", "secret-of-p"),
        vm_q: world.launch("q", "secret-of-q"),
        ..world
    }
}

fn routes(doc: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for method in ["get", "post", "put", "patch", "delete"] {
            if item.get(method).is_some() {
                out.push((method.to_uppercase(), path.clone()));
            }
        }
    }
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn every_route_by_every_persona_is_allowed_or_denied_as_the_rules_say() {
    let world = setup();
    let (status, doc) = call(
        &world.fx,
        "GET",
        "/openapi.json",
        Some(&world.fx.token),
        None,
        "",
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let routes = routes(&doc);
    let unclassified: Vec<String> = routes
        .iter()
        .filter(|(m, p)| rule(m, p).is_none())
        .map(|(m, p)| format!("{m} {p}"))
        .collect();
    assert!(
        unclassified.is_empty(),
        "routes nobody classified: {unclassified:?}"
    );
    // Let the short-lived token expire.
    tokio::time::sleep(Duration::from_millis(1200)).await;

    let mut unexpected_allows = Vec::new();
    let mut unexpected_denies = Vec::new();
    let mut leaks = Vec::new();
    for (method, path) in &routes {
        let rule = rule(method, path).expect("classified");
        for persona in PERSONAS {
            let (uri, body) = world.instantiate(method, path);
            let body_text = body.map(|b| b.to_string()).unwrap_or_default();
            let content_type = (!body_text.is_empty()).then_some("application/json");
            let (status, answer) = call(
                &world.fx,
                method,
                &uri,
                world.token(persona),
                content_type,
                body_text,
            )
            .await;
            assert!(
                !status.is_server_error(),
                "{method} {uri} as {persona:?}: {status} {answer}"
            );
            let denied = matches!(status.as_u16(), 401 | 403 | 404);
            let expected = expected_allowed(rule, persona);
            let case = format!("{method} {path} as {persona:?}: {status} {answer}");
            if !denied && !expected {
                unexpected_allows.push(case);
            } else if denied && expected {
                unexpected_denies.push(case);
            } else if !denied {
                // Allowed: the answer must hold nothing of a project the caller has
                // no role in.
                let text = answer.to_string();
                let foreign: &[&str] = match persona {
                    Persona::OtherProjectMember => &[&world.vm_p, "secret-of-p"],
                    Persona::Viewer | Persona::Member | Persona::ProjectAdmin => {
                        &[&world.vm_q, "secret-of-q"]
                    }
                    _ => &[],
                };
                for needle in foreign {
                    if text.contains(needle) {
                        leaks.push(format!("{case} carries {needle}"));
                    }
                }
            }
        }
    }
    eprintln!(
        "{} routes x {} personas, {} unexpected allows, {} unexpected denies, {} leaks",
        routes.len(),
        PERSONAS.len(),
        unexpected_allows.len(),
        unexpected_denies.len(),
        leaks.len()
    );
    assert!(
        unexpected_allows.is_empty(),
        "unexpected allows:\n{}",
        unexpected_allows.join("\n")
    );
    assert!(
        unexpected_denies.is_empty(),
        "unexpected denies:\n{}",
        unexpected_denies.join("\n")
    );
    assert!(leaks.is_empty(), "leaks:\n{}", leaks.join("\n"));
}

#[tokio::test(flavor = "multi_thread")]
async fn another_projects_vm_is_not_found_not_forbidden() {
    let world = setup();
    let other = world.token(Persona::OtherProjectMember);
    let viewer = world.token(Persona::Viewer);
    let uri = format!("/v1/vms/{}", world.vm_p);
    let (status, body) = call(&world.fx, "GET", &uri, other, None, "").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    let missing = format!("/v1/vms/{}", uuid::Uuid::new_v4());
    let (_, missing_body) = call(&world.fx, "GET", &missing, other, None, "").await;
    assert_eq!(
        body["error"]["code"], missing_body["error"]["code"],
        "a hidden VM must look exactly like a missing one"
    );
    // A viewer of the VM's own project sees it but may not stop it.
    let stop = format!("/v1/vms/{}/actions/stop", world.vm_p);
    let (status, body) = call(&world.fx, "POST", &stop, viewer, None, "").await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(body["error"]["code"], "forbidden");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_revoked_token_stops_working_at_once_and_every_mutation_is_audited() {
    let world = setup();
    let fx = &world.fx;
    let token = fx
        .cloud
        .create_token("mona", "to revoke", None)
        .expect("token");
    let (status, _) = call(fx, "GET", "/v1/whoami", Some(&token.secret), None, "").await;
    assert_eq!(status, StatusCode::OK);
    let revoke = format!("/v1/tokens/{}", token.row.id);
    let (status, body) = call(fx, "DELETE", &revoke, Some(&token.secret), None, "").await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    let (status, _) = call(fx, "GET", "/v1/whoami", Some(&token.secret), None, "").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    // A denied attempt is audited too.
    let viewer = world.token(Persona::Viewer);
    let stop = format!("/v1/vms/{}/actions/stop", world.vm_p);
    call(fx, "POST", &stop, viewer, None, "").await;
    let (status, audit) = call(fx, "GET", "/v1/audit?limit=10", Some(&fx.token), None, "").await;
    assert_eq!(status, StatusCode::OK, "{audit}");
    let items = audit["items"].as_array().expect("items");
    let newest = &items[0];
    assert_eq!(newest["actor"], "vera");
    assert_eq!(newest["action"], "POST /v1/vms/{id}/actions/{action}");
    assert_eq!(newest["project"], "p");
    assert_eq!(newest["status"], 403);
    assert_eq!(newest["result"], "forbidden");
    let revoked = &items[1];
    assert_eq!(revoked["actor"], "mona");
    assert_eq!(revoked["action"], "DELETE /v1/tokens/{id}");
    assert_eq!(revoked["result"], "ok");

    // A project admin reads their project's audit, not the cloud's.
    let admin = world.token(Persona::ProjectAdmin);
    let (status, mine) = call(fx, "GET", "/v1/audit", admin, None, "").await;
    assert_eq!(status, StatusCode::OK, "{mine}");
    assert!(mine["items"]
        .as_array()
        .expect("items")
        .iter()
        .all(|row| row["project"] == "p"));
    let (status, _) = call(fx, "GET", "/v1/audit?project=q", admin, None, "").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}
