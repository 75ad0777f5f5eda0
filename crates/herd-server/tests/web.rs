//! The web UI through the real router, in-process: sessions and their cookie, CSRF on
//! every form, the same rights as the API on every page, and escaping. The browser
//! suite (`crates/herd/tests/browser.rs`) drives the same pages in Chromium.

mod common;

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use common::{fixture, sim_host, sim_vm, Fixture};
use herd_server::access::Role;
use herd_server::store::Quota;
use http_body_util::BodyExt;
use std::time::Duration;
use tower::ServiceExt;

const ORIGIN: &str = "https://herd.test";

struct Reply {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    body: String,
}

/// The fixture and its app, built once: the sessions live in the app.
struct Site {
    fx: Fixture,
    app: axum::Router,
}

impl std::ops::Deref for Site {
    type Target = Fixture;
    fn deref(&self) -> &Fixture {
        &self.fx
    }
}

async fn send(fx: &Site, request: Request<Body>) -> Reply {
    let response = fx.app.clone().oneshot(request).await.expect("response");
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    Reply {
        status,
        headers,
        body: String::from_utf8_lossy(&bytes).into_owned(),
    }
}

/// A logged-in browser, as far as the server can tell: its cookie and its CSRF token.
struct Session {
    cookie: String,
    csrf: String,
}

fn form_request(
    path: &str,
    cookie: Option<&str>,
    origin: Option<&str>,
    body: String,
) -> Request<Body> {
    let mut request = Request::post(path)
        .header(header::HOST, "herd.test")
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded");
    if let Some(origin) = origin {
        request = request.header(header::ORIGIN, origin);
    }
    if let Some(cookie) = cookie {
        request = request.header(header::COOKIE, cookie);
    }
    request.body(Body::from(body)).expect("request")
}

async fn get(fx: &Site, session: &Session, path: &str) -> Reply {
    let request = Request::get(path)
        .header(header::HOST, "herd.test")
        .header(header::COOKIE, &session.cookie)
        .body(Body::empty())
        .expect("request");
    send(fx, request).await
}

async fn post(fx: &Site, session: &Session, path: &str, fields: &[(&str, &str)]) -> Reply {
    let body = serde_urlencoded::to_string(fields).expect("form");
    send(
        fx,
        form_request(path, Some(&session.cookie), Some(ORIGIN), body),
    )
    .await
}

async fn login(fx: &Site, token: &str) -> Session {
    let body = serde_urlencoded::to_string([("token", token)]).expect("form");
    let reply = send(fx, form_request("/ui/login", None, Some(ORIGIN), body)).await;
    assert_eq!(reply.status, StatusCode::SEE_OTHER, "{}", reply.body);
    let set_cookie = reply.headers[header::SET_COOKIE].to_str().expect("cookie");
    let cookie = set_cookie.split(';').next().expect("pair").to_owned();
    let mut session = Session {
        cookie,
        csrf: String::new(),
    };
    let page = get(fx, &session, "/ui").await;
    assert_eq!(page.status, StatusCode::OK, "{}", page.body);
    session.csrf = page
        .body
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("a csrf field on the page")
        .to_owned();
    session
}

/// Projects `p` and `q`, a VM in each, a sim host, and users with roles.
struct World {
    fx: Site,
    vm_p: String,
    vm_q: String,
}

impl World {
    fn token(&self, user: &str, project: &str, role: Role) -> String {
        let cloud = &self.fx.cloud;
        cloud.create_user(user, false).expect("user");
        cloud.set_member(project, user, role).expect("grant");
        cloud.create_token(user, "t", None).expect("token").secret
    }
}

fn world() -> World {
    let fx = fixture();
    for project in ["p", "q"] {
        fx.cloud
            .create_project(project, &Quota::default())
            .expect("project");
    }
    sim_host(&fx.cloud, "h");
    let vm_p = sim_vm(&fx.cloud, Some("p"), "secret-of-p").id.to_string();
    let vm_q = sim_vm(&fx.cloud, Some("q"), "visible-in-q").id.to_string();
    let app = herd_server::app(fx.cloud.clone());
    World {
        fx: Site { fx, app },
        vm_p,
        vm_q,
    }
}

#[tokio::test]
async fn a_session_cookie_carries_its_flags_and_a_logout_ends_it() {
    let w = world();
    let fx = &w.fx;
    // Without a session every page sends the browser to the login, and back after.
    let request = Request::get("/ui/vms?state=running")
        .body(Body::empty())
        .expect("request");
    let reply = send(fx, request).await;
    assert_eq!(reply.status, StatusCode::SEE_OTHER);
    assert_eq!(
        reply.headers[header::LOCATION],
        "/ui/login?next=%2Fui%2Fvms%3Fstate%3Drunning"
    );
    // A bad token is refused with the form again.
    let body = "token=herd_nonsense".to_owned();
    let reply = send(fx, form_request("/ui/login", None, Some(ORIGIN), body)).await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    assert!(reply.body.contains("not valid"), "{}", reply.body);
    assert!(reply.headers.get(header::SET_COOKIE).is_none());

    let body = serde_urlencoded::to_string([("token", fx.token.as_str())]).expect("form");
    let reply = send(fx, form_request("/ui/login", None, Some(ORIGIN), body)).await;
    let cookie = reply.headers[header::SET_COOKIE].to_str().expect("cookie");
    for flag in ["HttpOnly", "Secure", "SameSite=Strict", "Path=/"] {
        assert!(cookie.contains(flag), "{cookie} lacks {flag}");
    }
    let session = login(fx, &fx.token).await;
    let page = get(fx, &session, "/ui").await;
    let csp = page.headers[header::CONTENT_SECURITY_POLICY]
        .to_str()
        .expect("csp");
    assert!(csp.contains("default-src 'none'") && csp.contains("frame-ancestors 'none'"));
    let reply = post(fx, &session, "/ui/logout", &[("csrf", &session.csrf)]).await;
    assert_eq!(reply.status, StatusCode::SEE_OTHER);
    assert!(reply.headers[header::SET_COOKIE]
        .to_str()
        .expect("cookie")
        .contains("Max-Age=0"));
    assert_eq!(get(fx, &session, "/ui").await.status, StatusCode::SEE_OTHER);
}

#[tokio::test]
async fn no_form_acts_without_the_session_csrf_token_and_our_origin() {
    let w = world();
    let fx = &w.fx;
    let member = login(fx, &w.token("mona", "p", Role::Member)).await;
    // Terminate: the one action a VM placed on a host that never ran it allows.
    let stop = format!("/ui/vms/{}/actions/terminate", w.vm_p);
    let desired = || {
        fx.cloud
            .vm(&w.vm_p)
            .expect("vm")
            .desired
            .as_str()
            .to_owned()
    };
    let before = desired();
    for (fields, origin) in [
        (vec![], Some(ORIGIN)),
        (vec![("csrf", "0123")], Some(ORIGIN)),
        (
            vec![("csrf", member.csrf.as_str())],
            Some("https://evil.example"),
        ),
    ] {
        let body = serde_urlencoded::to_string(&fields).expect("form");
        let reply = send(fx, form_request(&stop, Some(&member.cookie), origin, body)).await;
        assert_eq!(reply.status, StatusCode::FORBIDDEN, "{fields:?} {origin:?}");
        assert_eq!(desired(), before, "a refused form changed the VM");
    }
    // Another session's token is no good either.
    let other = login(fx, &fx.token).await;
    let reply = post(fx, &member, &stop, &[("csrf", &other.csrf)]).await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN);
    assert_eq!(desired(), before);

    let reply = post(fx, &member, &stop, &[("csrf", &member.csrf)]).await;
    assert_eq!(reply.status, StatusCode::SEE_OTHER, "{}", reply.body);
    assert_eq!(desired(), "terminated");
    // Every one of those requests is in the audit log, refused ones too.
    let log = fx
        .cloud
        .audit_log(&herd_server::store::AuditFilter {
            projects: None,
            actor: Some("mona".into()),
            before: None,
            limit: 100,
        })
        .expect("audit");
    assert!(
        log.iter()
            .any(|row| row.action.contains("/ui/vms/{id}/actions/{action}") && row.result == "ok"),
        "{log:?}"
    );
}

#[tokio::test]
async fn a_viewer_sees_no_actions_and_is_refused_them_anyway() {
    let w = world();
    let fx = &w.fx;
    let viewer = login(fx, &w.token("vera", "p", Role::Viewer)).await;
    let page = get(fx, &viewer, &format!("/ui/vms/{}", w.vm_p)).await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(page.body.contains("secret-of-p"));
    assert!(
        !page.body.contains("/actions/"),
        "a viewer was shown actions"
    );
    let list = get(fx, &viewer, "/ui/vms").await;
    assert!(!list.body.contains("Launch a VM"));
    let reply = post(
        fx,
        &viewer,
        &format!("/ui/vms/{}/actions/stop", w.vm_p),
        &[("csrf", &viewer.csrf)],
    )
    .await;
    assert!(reply.status.is_client_error(), "{}", reply.status);
    assert_eq!(
        fx.cloud.vm(&w.vm_p).expect("vm").desired.as_str(),
        "running"
    );
}

#[tokio::test]
async fn no_page_shows_another_projects_objects() {
    let w = world();
    let fx = &w.fx;
    let otto = login(fx, &w.token("otto", "q", Role::Member)).await;
    for path in [
        "/ui".to_owned(),
        "/ui/vms".to_owned(),
        "/ui/vms?project=p".to_owned(),
        format!("/ui/vms/{}", w.vm_p),
        format!("/ui/vms/{}/console", w.vm_p),
        "/ui/vms/new".to_owned(),
        "/ui/projects".to_owned(),
        "/ui/billing".to_owned(),
        "/ui/billing?project=p".to_owned(),
        "/ui/billing.csv".to_owned(),
        "/ui/audit".to_owned(),
        "/ui/audit?project=p".to_owned(),
        "/ui/hosts".to_owned(),
    ] {
        let reply = get(fx, &otto, &path).await;
        // (A page about an id the caller typed may repeat that id.)
        assert!(
            !reply.body.contains("secret-of-p")
                && (path.contains(&w.vm_p) || !reply.body.contains(&w.vm_p)),
            "{path} leaks project p: {}",
            reply.body
        );
        assert!(
            reply.status == StatusCode::OK
                || reply.status == StatusCode::NOT_FOUND
                || reply.status == StatusCode::FORBIDDEN,
            "{path}: {}",
            reply.status
        );
    }
    // Another project's VM is not found, exactly as in the API.
    let reply = get(fx, &otto, &format!("/ui/vms/{}", w.vm_p)).await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    assert_eq!(
        get(fx, &otto, "/ui/hosts").await.status,
        StatusCode::FORBIDDEN
    );
    // And their own is there.
    let list = get(fx, &otto, "/ui/vms").await;
    assert!(list.body.contains("visible-in-q") && list.body.contains(&w.vm_q));
    // The launch form offers only their own projects.
    let form = get(fx, &otto, "/ui/vms/new").await;
    assert!(form.body.contains("<option value=\"q\">") && !form.body.contains("value=\"p\""));
}

#[tokio::test]
async fn text_from_users_and_guests_is_escaped() {
    let w = world();
    let fx = &w.fx;
    let admin = login(fx, &fx.token).await;
    let vm = fx
        .cloud
        .launch(herd_server::cloud::LaunchSpec {
            name: "x".into(),
            project: Some("p".into()),
            hypervisor: Some("sim".into()),
            vcpus: Some(1),
            memory_mib: Some(64),
            image: None,
            command: vec!["<script>alert(1)</script>".into()],
            policy: Default::default(),
            keep_running: false,
            disk_mib: None,
        })
        .expect("launch");
    let page = get(fx, &admin, &format!("/ui/vms/{}", vm.id)).await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(
        page.body.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
        "{}",
        page.body
    );
    assert!(!page.body.contains("<script>alert"), "{}", page.body);
    // A filter echoed back in the form is escaped too.
    let page = get(fx, &admin, "/ui/vms?name=%22%3E%3Cscript%3E").await;
    assert!(!page.body.contains("\"><script>"), "{}", page.body);
}

#[tokio::test]
async fn a_live_region_streams_the_vm_as_it_is_now() {
    let w = world();
    let fx = &w.fx;
    let admin = login(fx, &fx.token).await;
    let request = Request::get(format!("/ui/live/vms/{}", w.vm_p))
        .header(header::COOKIE, &admin.cookie)
        .body(Body::empty())
        .expect("request");
    let response = fx.app.clone().oneshot(request).await.expect("response");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.headers()[header::CONTENT_TYPE],
        "text/event-stream"
    );
    let mut body = response.into_body();
    let mut text = String::new();
    let read = async {
        while !text.contains("\n\n") {
            let frame = body.frame().await.expect("a frame").expect("frame");
            if let Ok(data) = frame.into_data() {
                text.push_str(&String::from_utf8_lossy(&data));
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .expect("an event within 5 s");
    assert!(text.starts_with("data:"), "{text}");
    assert!(text.contains("state state-"), "{text}");
}

#[tokio::test]
async fn project_admins_manage_members_and_cloud_admins_set_quotas() {
    let w = world();
    let fx = &w.fx;
    w.fx.cloud.create_user("newbie", false).expect("user");
    let ada = login(fx, &w.token("ada", "p", Role::Admin)).await;
    let mona = login(fx, &w.token("mona", "p", Role::Member)).await;
    let admin = login(fx, &fx.token).await;
    let members = || fx.cloud.tenancy.members("p");

    // A member may not add anyone; the project admin may.
    let add = [("user", "newbie"), ("role", "viewer")];
    let reply = post(
        fx,
        &mona,
        "/ui/projects/p/members",
        &[add[0], add[1], ("csrf", &mona.csrf)],
    )
    .await;
    assert!(reply.status.is_client_error(), "{}", reply.status);
    assert!(!members().iter().any(|(u, _)| u == "newbie"));
    let reply = post(
        fx,
        &ada,
        "/ui/projects/p/members",
        &[add[0], add[1], ("csrf", &ada.csrf)],
    )
    .await;
    assert_eq!(reply.status, StatusCode::SEE_OTHER, "{}", reply.body);
    assert!(members().contains(&("newbie".to_owned(), Role::Viewer)));
    let page = get(fx, &ada, "/ui/projects").await;
    assert!(page.body.contains("newbie") && page.body.contains("/members/newbie/remove"));
    // A bad role is a clear error, and nothing changes.
    let reply = post(
        fx,
        &ada,
        "/ui/projects/p/members",
        &[("user", "newbie"), ("role", "boss"), ("csrf", &ada.csrf)],
    )
    .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert!(
        reply.body.contains("viewer, member or admin"),
        "{}",
        reply.body
    );
    let reply = post(
        fx,
        &ada,
        "/ui/projects/p/members/newbie/remove",
        &[("csrf", &ada.csrf)],
    )
    .await;
    assert_eq!(reply.status, StatusCode::SEE_OTHER);
    assert!(!members().iter().any(|(u, _)| u == "newbie"));

    // Quotas are a cloud admin's: the project admin is refused, the cloud admin is not.
    let quota = [
        ("max_vms", "7"),
        ("max_vcpus", ""),
        ("max_memory_mib", "4096"),
        ("budget", "50.00"),
    ];
    let mut fields = quota.to_vec();
    fields.push(("csrf", &ada.csrf));
    let reply = post(fx, &ada, "/ui/projects/p/quota", &fields).await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN);
    let mut fields = quota.to_vec();
    fields.push(("csrf", &admin.csrf));
    let reply = post(fx, &admin, "/ui/projects/p/quota", &fields).await;
    assert_eq!(reply.status, StatusCode::SEE_OTHER, "{}", reply.body);
    let set = fx.cloud.tenancy.project("p").expect("p").quota;
    assert_eq!(set.max_vms, Some(7));
    assert_eq!(set.max_vcpus, None);
    assert_eq!(set.max_memory_mib, Some(4096));
    assert_eq!(set.budget_micros, Some(50_000_000));
}
