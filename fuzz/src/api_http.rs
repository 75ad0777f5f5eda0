//! Target `api_http`: the real REST router and web UI, and the store, driven by
//! arbitrary requests.
//!
//! Like cloud-hypervisor's `fuzz/fuzz_targets/http_api.rs`, requests go straight to the
//! router (`tower::ServiceExt::oneshot`), no socket. Unlike it, the handler behind the
//! router is not a stub: it is a real [`Cloud`] on a SQLite store in a scratch dir (on
//! tmpfs when there is one), with one joined `sim` host and one VM on it, so that
//! requests reach validation, the store and the placement code. A request is built from
//! a structure ([`FuzzRequest`]) whose paths, query keys, JSON field names and values
//! come mostly from herd's own vocabulary, because random bytes would rarely get past
//! the router's 404.
//!
//! What must hold for every request:
//! - nothing panics;
//! - the answer is never a server error other than 503 (a 500 means an unhandled error
//!   path or an internal detail reaching the client);
//! - a request without a valid credential gets a 2xx only on a public route, and an
//!   agent's credential gets a 2xx only on the agent's routes (see [`may_succeed`]).
//!
//! The web UI's routes are in too: requests may carry the admin's session cookie, and
//! forms (with or without the session's CSRF token) of the UI's field names.
//!
//! The store keeps what successful requests create, so later inputs see it. That makes
//! a crash depend a little on history; to keep it bounded (and reproducible from a fresh
//! state in most cases), the whole fixture is rebuilt every [`RESET_EVERY`] requests.

use crate::json::{Json, NUMBERS, WORDS};
use arbitrary::Arbitrary;
use axum::body::Body as AxumBody;
use axum::http::{HeaderName, HeaderValue, Method as HttpMethod, Request, StatusCode, Uri};
use axum::Router;
use herd_proto::wire::HypervisorInfo;
use herd_server::ServerConfig;
use http_body_util::BodyExt;
use serde_json::{json, Value};
use std::sync::{Mutex, OnceLock};
use tower::ServiceExt;
use uuid::Uuid;

/// Requests served by one fixture before it is rebuilt.
pub const RESET_EVERY: u32 = 2000;

/// Known routes; `{}` is filled from the request's segments. Routes the server lacks
/// just answer 404, and paths built from [`PATH_WORDS`] reach routes added later.
pub const ROUTES: &[&str] = &[
    "/healthz",
    "/metrics",
    "/openapi.json",
    "/v1/vms",
    "/v1/vms/{}",
    "/v1/vms/{}/actions/{}",
    "/v1/vms/{}/events",
    "/v1/vms/{}/console",
    "/v1/events",
    "/v1/hosts",
    "/v1/hosts/{}",
    "/v1/join-tokens",
    "/v1/rate-cards/{}",
    "/v1/billing",
    "/v1/whoami",
    "/v1/projects",
    "/v1/projects/{}",
    "/v1/projects/{}/quota",
    "/v1/projects/{}/members",
    "/v1/projects/{}/members/{}",
    "/v1/users",
    "/v1/users/{}",
    "/v1/tokens",
    "/v1/tokens/{}",
    "/v1/audit",
    "/v1/agent/join",
    "/v1/agent/discovery",
    "/v1/agent/bus",
    "/",
    "/ui",
    "/ui/login",
    "/ui/logout",
    "/ui/vms",
    "/ui/vms/new",
    "/ui/vms/{}",
    "/ui/vms/{}/actions/{}",
    "/ui/vms/{}/console",
    "/ui/vms/{}/resize",
    "/ui/vms/{}/burst",
    "/ui/vms/{}/broadcast",
    "/ui/vms/{}/migrate",
    "/ui/projects",
    "/ui/hosts",
    "/ui/billing",
    "/ui/billing.csv",
    "/ui/audit",
    "/ui/assets/{}",
];

/// Path segments, besides [`WORDS`].
pub const PATH_WORDS: &[&str] = &[
    "v1",
    "vms",
    "actions",
    "events",
    "console",
    "hosts",
    "join-tokens",
    "rate-cards",
    "billing",
    "whoami",
    "projects",
    "quota",
    "members",
    "users",
    "tokens",
    "audit",
    "agent",
    "join",
    "discovery",
    "bus",
    "healthz",
    "metrics",
    "openapi.json",
    "ui",
    "new",
    "resize",
    "burst",
    "broadcast",
    "migrate",
    "login",
    "logout",
    "assets",
    "herd.css",
    "herd.js",
    "billing.csv",
    "..",
    ".",
];

pub const QUERY_KEYS: &[&str] = &[
    "project", "state", "host", "name", "limit", "cursor", "after", "bytes", "from", "to", "actor",
    "before", "next",
];

/// Fields of the web UI's forms.
pub const FORM_KEYS: &[&str] = &[
    "csrf",
    "token",
    "next",
    "name",
    "project",
    "hypervisor",
    "image",
    "vcpus",
    "memory_mib",
    "disk_mib",
    "command",
    "lifespan",
    "on_lifespan",
    "idle",
    "on_idle",
    "budget",
    "on_budget",
    "cpus",
    "seconds",
    "to",
    "start",
    "restart",
    "wait_for_room",
];

pub const HEADERS: &[&str] = &[
    "content-length",
    "accept",
    "upgrade",
    "connection",
    "sec-websocket-key",
    "sec-websocket-version",
    "host",
    "transfer-encoding",
    "content-encoding",
    "authorization",
    "expect",
    "cookie",
    "origin",
];

#[derive(Arbitrary, Debug)]
pub struct FuzzRequest {
    pub method: Method,
    pub path: Path,
    pub query: Query,
    pub auth: Auth,
    pub content_type: ContentType,
    pub headers: Vec<(Header, Vec<u8>)>,
    pub body: Body,
}

#[derive(Arbitrary, Debug, Clone)]
pub enum Method {
    Get,
    Post,
    Put,
    Delete,
    Patch,
    Head,
    Options,
    Other(String),
}

#[derive(Arbitrary, Debug)]
pub enum Path {
    /// One of [`ROUTES`] (index mod its length), placeholders filled in order.
    Route(u8, Segment, Segment),
    /// Segments joined with `/`.
    Segments(Vec<Segment>),
    /// Whatever the URI parser makes of it.
    Raw(String),
}

#[derive(Arbitrary, Debug)]
pub enum Segment {
    /// The fixture's VM.
    Vm,
    /// The fixture's host.
    Host,
    /// One of [`WORDS`] then [`PATH_WORDS`], index mod their total length.
    Word(u8),
    /// One of [`NUMBERS`].
    Number(u8),
    Int(i64),
    Uuid(u128),
    /// Percent-encoded, so it may decode to anything, including invalid UTF-8.
    Text(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
pub enum Query {
    None,
    Pairs(Vec<(QueryKey, Segment)>),
    Raw(String),
}

#[derive(Arbitrary, Debug)]
pub enum QueryKey {
    Known(u8),
    Text(Vec<u8>),
}

/// Who a request claims to be, for [`may_succeed`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthKind {
    Admin,
    /// The admin's web UI session cookie.
    Session,
    Agent,
    None,
    Other,
}

#[derive(Arbitrary, Debug)]
pub enum Auth {
    Admin,
    Session,
    Agent,
    None,
    /// `Bearer <text>`.
    Bearer(String),
    /// The whole header value.
    Raw(Vec<u8>),
}

impl Auth {
    fn kind(&self) -> AuthKind {
        match self {
            Auth::Admin => AuthKind::Admin,
            Auth::Session => AuthKind::Session,
            Auth::Agent => AuthKind::Agent,
            Auth::None => AuthKind::None,
            Auth::Bearer(_) | Auth::Raw(_) => AuthKind::Other,
        }
    }
}

#[derive(Arbitrary, Debug)]
pub enum ContentType {
    Json,
    Form,
    None,
    JsonUtf8,
    Text,
    Raw(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
pub enum Header {
    Known(u8),
    Raw(String),
}

#[derive(Arbitrary, Debug)]
pub enum Body {
    Json(Json),
    /// A web form: fields of [`FORM_KEYS`] (index mod its length).
    Form(Vec<(u8, FormValue)>),
    Empty,
    Raw(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
pub enum FormValue {
    /// The session's CSRF token.
    Csrf,
    Value(Segment),
}

// ---- the fixture: everything this target needs from herd-server's auth API --------

/// A server with an admin, one joined `sim` host that said hello, and one VM on it.
pub struct Fixture {
    _dir: tempfile::TempDir,
    pub router: Router,
    pub admin_token: String,
    pub agent_token: String,
    /// An unused join token, offered to the fuzzer as a JSON string (`$join_token`).
    pub join_token: String,
    /// A valid certificate signing request for an agent key (`$csr`).
    pub csr_pem: String,
    pub host: Uuid,
    pub vm: Uuid,
    /// The admin's web session: its `Cookie` header and its CSRF token.
    pub session_cookie: String,
    pub csrf: String,
}

/// Where the fixture's store lives: `HERD_FUZZ_SCRATCH` (set by `scripts/fuzz`, which
/// removes it afterwards), else tmpfs if there is one, since the store syncs every write.
fn scratch_dir() -> std::path::PathBuf {
    if let Some(dir) = std::env::var_os("HERD_FUZZ_SCRATCH") {
        return dir.into();
    }
    let shm = std::path::Path::new("/dev/shm");
    if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    }
}

/// Builds the fixture. This is the one place that knows how to get credentials: the
/// admin token from `Cloud::ensure_admin_token` on an empty store, the agent's through
/// the public join API (with a CSR from `herd_tls::agent_key_and_csr`, since the server
/// runs with its CA as in production), and the host's hello through `Cloud::host_hello`
/// (an agent says it over the bus, which this target does not open).
pub async fn setup() -> Fixture {
    let dir = tempfile::Builder::new()
        .prefix("herd-fuzz-")
        .tempdir_in(scratch_dir())
        .expect("scratch dir");
    let mut config = ServerConfig::new(dir.path().to_path_buf(), "http://127.0.0.1:1".into());
    config.default_hypervisor = "sim".into();
    let cloud = herd_server::open(config).expect("open the server");
    let admin_token = cloud
        .ensure_admin_token()
        .expect("admin token")
        .expect("a fresh store has no admin token");
    let router = herd_server::app(cloud.clone());
    let admin = |method: &str, uri: &str, body: Value| {
        let request = Request::builder()
            .method(method)
            .uri(uri)
            .header("authorization", format!("Bearer {admin_token}"))
            .header("content-type", "application/json")
            .body(AxumBody::from(body.to_string()))
            .expect("setup request");
        call(&router, request)
    };
    let join_token = |body: (StatusCode, Value)| {
        assert_eq!(body.0, StatusCode::CREATED, "join token: {}", body.1);
        body.1["token"].as_str().expect("join token").to_owned()
    };
    let first = join_token(admin("POST", "/v1/join-tokens", json!({})).await);
    let (_key_pem, csr_pem) = herd_tls::agent_key_and_csr().expect("agent key and CSR");
    let (status, joined) = call(
        &router,
        Request::builder()
            .method("POST")
            .uri("/v1/agent/join")
            .header("content-type", "application/json")
            .body(AxumBody::from(
                json!({"join_token": first, "hostname": "fuzz-host", "csr_pem": csr_pem})
                    .to_string(),
            ))
            .expect("join request"),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "join: {joined}");
    let agent_token = joined["agent_token"]
        .as_str()
        .expect("agent token")
        .to_owned();
    let host: Uuid = joined["host_id"]
        .as_str()
        .and_then(|id| id.parse().ok())
        .expect("host id");
    let sim = [HypervisorInfo {
        kind: "sim".into(),
        detail: String::new(),
    }];
    cloud
        .host_hello(host, "fuzz-host", &sim, 64, 1 << 20, "fuzz")
        .expect("hello");
    let (status, vm) = admin("POST", "/v1/vms", json!({"name": "vm-0"})).await;
    assert_eq!(status, StatusCode::CREATED, "launch: {vm}");
    let vm: Uuid = vm["id"]
        .as_str()
        .and_then(|id| id.parse().ok())
        .expect("vm id");
    let second = join_token(admin("POST", "/v1/join-tokens", json!({})).await);
    let (session_cookie, csrf) = web_session(&router, &admin_token).await;
    Fixture {
        _dir: dir,
        router,
        admin_token,
        agent_token,
        join_token: second,
        csr_pem,
        host,
        vm,
        session_cookie,
        csrf,
    }
}

/// Logs in to the web UI as the admin: the session cookie, and the CSRF token its pages
/// carry.
async fn web_session(router: &Router, admin_token: &str) -> (String, String) {
    let login = Request::builder()
        .method("POST")
        .uri("/ui/login")
        .header("content-type", "application/x-www-form-urlencoded")
        .body(AxumBody::from(format!("token={admin_token}")))
        .expect("login request");
    let response = router
        .clone()
        .oneshot(login)
        .await
        .unwrap_or_else(|never| match never {});
    let cookie = response
        .headers()
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .expect("a session cookie")
        .to_owned();
    let page = Request::builder()
        .uri("/ui")
        .header("cookie", &cookie)
        .body(AxumBody::empty())
        .expect("page request");
    let (status, body) = call_raw(router, page).await;
    assert_eq!(status, StatusCode::OK, "overview");
    let body = String::from_utf8_lossy(&body);
    let csrf = body
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("a csrf field")
        .to_owned();
    (cookie, csrf)
}

/// Whether a 2xx answer is allowed for this caller on this path: anyone may use the
/// public routes, an agent only its own, an admin anything.
pub fn may_succeed(auth: AuthKind, path: &str) -> bool {
    const PUBLIC: &[&str] = &["/healthz", "/v1/agent/join", "/ui/login"];
    let public = PUBLIC.contains(&path) || path.starts_with("/ui/assets/");
    match auth {
        AuthKind::Admin | AuthKind::Session => true,
        AuthKind::Agent => public || path.starts_with("/v1/agent/"),
        AuthKind::None | AuthKind::Other => public,
    }
}

// ---- running one request ----------------------------------------------------------

struct Harness {
    runtime: tokio::runtime::Runtime,
    fixture: Mutex<Option<(Fixture, u32)>>,
}

fn harness() -> &'static Harness {
    static HARNESS: OnceLock<Harness> = OnceLock::new();
    HARNESS.get_or_init(|| Harness {
        runtime: tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime"),
        fixture: Mutex::new(None),
    })
}

async fn call(router: &Router, request: Request<AxumBody>) -> (StatusCode, Value) {
    let (status, bytes) = call_raw(router, request).await;
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

async fn call_raw(router: &Router, request: Request<AxumBody>) -> (StatusCode, Vec<u8>) {
    let response = router
        .clone()
        .oneshot(request)
        .await
        .unwrap_or_else(|never| match never {});
    let status = response.status();
    let bytes = response
        .into_body()
        .collect()
        .await
        .map(|body| body.to_bytes().to_vec())
        .unwrap_or_else(|e| format!("<body failed: {e}>").into_bytes());
    (status, bytes)
}

pub fn run(request: &FuzzRequest) {
    let harness = harness();
    let mut slot = harness
        .fixture
        .lock()
        .unwrap_or_else(|poison| poison.into_inner());
    if slot.as_ref().is_none_or(|(_, n)| *n >= RESET_EVERY) {
        // Drop the old store before making the next.
        *slot = None;
        *slot = Some((harness.runtime.block_on(setup()), 0));
    }
    let Some((fixture, n_served)) = slot.as_mut() else {
        return;
    };
    *n_served += 1;
    let Some((http, path)) = render(request, fixture) else {
        return;
    };
    let (status, body) = harness.runtime.block_on(call_raw(&fixture.router, http));
    let body = String::from_utf8_lossy(&body);
    if trace() {
        let short: String = body.chars().take(120).collect();
        eprintln!(
            "{}\t{:?}\t{path}\t{:?}\t{short}",
            status.as_u16(),
            request.method,
            request.auth.kind()
        );
    }
    assert!(
        !status.is_server_error() || status == StatusCode::SERVICE_UNAVAILABLE,
        "{status} for {request:?}: {body}"
    );
    if status.is_success() {
        assert!(
            may_succeed(request.auth.kind(), &path),
            "{status} for a {:?} caller on {path}: {request:?}: {body}",
            request.auth.kind()
        );
    }
}

/// Whether to print each request's outcome (`HERD_FUZZ_TRACE=1`), to see what the
/// corpus reaches: `fuzz/target/.../api_http fuzz/corpus/api_http -runs=0`.
fn trace() -> bool {
    static TRACE: OnceLock<bool> = OnceLock::new();
    *TRACE.get_or_init(|| std::env::var_os("HERD_FUZZ_TRACE").is_some())
}

// ---- rendering --------------------------------------------------------------------

/// The request as HTTP, and its URI's path; `None` for what no client could send
/// (an invalid method or URI).
pub fn render(request: &FuzzRequest, fx: &Fixture) -> Option<(Request<AxumBody>, String)> {
    let method = match &request.method {
        Method::Get => HttpMethod::GET,
        Method::Post => HttpMethod::POST,
        Method::Put => HttpMethod::PUT,
        Method::Delete => HttpMethod::DELETE,
        Method::Patch => HttpMethod::PATCH,
        Method::Head => HttpMethod::HEAD,
        Method::Options => HttpMethod::OPTIONS,
        Method::Other(text) => HttpMethod::from_bytes(text.as_bytes()).ok()?,
    };
    let mut uri = match &request.path {
        Path::Route(idx, first, second) => {
            let template = ROUTES[usize::from(*idx) % ROUTES.len()];
            let mut out = String::new();
            let mut fills = [first, second].into_iter();
            let mut parts = template.split("{}").peekable();
            while let Some(part) = parts.next() {
                out.push_str(part);
                if parts.peek().is_some() {
                    if let Some(segment) = fills.next() {
                        out.push_str(&segment_text(segment, fx));
                    }
                }
            }
            out
        }
        Path::Segments(segments) => {
            let mut out = String::new();
            for segment in segments.iter().take(8) {
                out.push('/');
                out.push_str(&segment_text(segment, fx));
            }
            if out.is_empty() {
                out.push('/');
            }
            out
        }
        Path::Raw(text) => text.clone(),
    };
    match &request.query {
        Query::None => {}
        Query::Pairs(pairs) => {
            for (n, (key, value)) in pairs.iter().take(8).enumerate() {
                uri.push(if n == 0 { '?' } else { '&' });
                match key {
                    QueryKey::Known(idx) => {
                        uri.push_str(QUERY_KEYS[usize::from(*idx) % QUERY_KEYS.len()])
                    }
                    QueryKey::Text(bytes) => uri.push_str(&percent_encode(bytes)),
                }
                uri.push('=');
                uri.push_str(&segment_text(value, fx));
            }
        }
        Query::Raw(text) => {
            uri.push('?');
            uri.push_str(text);
        }
    }
    let uri: Uri = uri.parse().ok()?;
    let path = uri.path().to_owned();
    // A live region's stream never ends, so its body cannot be read to the end here.
    if path.starts_with("/ui/live") {
        return None;
    }
    let mut builder = Request::builder().method(method).uri(uri);
    let auth: Option<Vec<u8>> = match &request.auth {
        Auth::Admin => Some(format!("Bearer {}", fx.admin_token).into_bytes()),
        Auth::Agent => Some(format!("Bearer {}", fx.agent_token).into_bytes()),
        Auth::None | Auth::Session => None,
        Auth::Bearer(text) => Some(format!("Bearer {text}").into_bytes()),
        Auth::Raw(bytes) => Some(bytes.clone()),
    };
    if let Some(value) = auth.and_then(|v| HeaderValue::from_bytes(&v).ok()) {
        builder = builder.header("authorization", value);
    }
    if matches!(request.auth, Auth::Session) {
        builder = builder.header("cookie", &fx.session_cookie);
    }
    let content_type: Option<&[u8]> = match &request.content_type {
        ContentType::Json => Some(b"application/json"),
        ContentType::Form => Some(b"application/x-www-form-urlencoded"),
        ContentType::None => None,
        ContentType::JsonUtf8 => Some(b"application/json; charset=utf-8"),
        ContentType::Text => Some(b"text/plain"),
        ContentType::Raw(bytes) => Some(bytes),
    };
    if let Some(value) = content_type.and_then(|v| HeaderValue::from_bytes(v).ok()) {
        builder = builder.header("content-type", value);
    }
    for (name, value) in request.headers.iter().take(8) {
        let name = match name {
            Header::Known(idx) => {
                HeaderName::from_static(HEADERS[usize::from(*idx) % HEADERS.len()])
            }
            Header::Raw(text) => match HeaderName::from_bytes(text.as_bytes()) {
                Ok(name) => name,
                Err(_) => continue,
            },
        };
        if let Ok(value) = HeaderValue::from_bytes(value) {
            builder = builder.header(name, value);
        }
    }
    let body = match &request.body {
        Body::Json(Json(value)) => {
            let mut value = value.clone();
            resolve(&mut value, fx);
            AxumBody::from(value.to_string())
        }
        Body::Form(fields) => {
            let mut out = String::new();
            for (n, (key, value)) in fields.iter().take(12).enumerate() {
                if n > 0 {
                    out.push('&');
                }
                out.push_str(FORM_KEYS[usize::from(*key) % FORM_KEYS.len()]);
                out.push('=');
                match value {
                    FormValue::Csrf => out.push_str(&fx.csrf),
                    FormValue::Value(segment) => out.push_str(&segment_text(segment, fx)),
                }
            }
            AxumBody::from(out)
        }
        Body::Empty => AxumBody::empty(),
        Body::Raw(bytes) => AxumBody::from(bytes.clone()),
    };
    let http = builder.body(body).ok()?;
    Some((http, path))
}

/// The run-time value of a `$` word, or the word itself.
fn word(text: &str, fx: &Fixture) -> String {
    match text {
        "$vm" => fx.vm.to_string(),
        "$host" => fx.host.to_string(),
        "$join_token" => fx.join_token.clone(),
        "$csr" => fx.csr_pem.clone(),
        other => other.to_owned(),
    }
}

/// Replaces `$` words in every string of a JSON document.
fn resolve(value: &mut Value, fx: &Fixture) {
    match value {
        Value::String(text) if text.starts_with('$') => *text = word(text, fx),
        Value::Array(items) => items.iter_mut().for_each(|item| resolve(item, fx)),
        Value::Object(map) => map.values_mut().for_each(|item| resolve(item, fx)),
        _ => {}
    }
}

fn segment_text(segment: &Segment, fx: &Fixture) -> String {
    match segment {
        Segment::Vm => fx.vm.to_string(),
        Segment::Host => fx.host.to_string(),
        Segment::Word(idx) => {
            let idx = usize::from(*idx) % (WORDS.len() + PATH_WORDS.len());
            let text = WORDS
                .get(idx)
                .unwrap_or_else(|| &PATH_WORDS[idx - WORDS.len()]);
            percent_encode(word(text, fx).as_bytes())
        }
        Segment::Number(idx) => NUMBERS[usize::from(*idx) % NUMBERS.len()].to_string(),
        Segment::Int(n) => n.to_string(),
        Segment::Uuid(n) => Uuid::from_u128(*n).to_string(),
        Segment::Text(bytes) => percent_encode(bytes),
    }
}

/// Percent-encodes every byte but the unreserved ones (RFC 3986).
fn percent_encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for &byte in bytes {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}
