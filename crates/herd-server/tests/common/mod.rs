//! The server core on a fresh store, driven through the real router in-process.

#![allow(dead_code)]

use axum::body::Body;
use axum::http::{Request, StatusCode};
use herd_bus::EmbeddedBus;
use herd_server::{api, Cloud, ServerConfig};
use http_body_util::BodyExt;
use serde_json::Value;
use std::sync::Arc;
use tower::ServiceExt;

pub struct Fixture {
    pub _dir: tempfile::TempDir,
    pub cloud: Arc<Cloud>,
    /// The first cloud admin's token.
    pub token: String,
}

pub fn fixture() -> Fixture {
    fixture_with(|_| {})
}

/// A fixture whose server config `change` adjusts first.
pub fn fixture_with(change: impl FnOnce(&mut ServerConfig)) -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = ServerConfig::new(dir.path().to_path_buf(), "http://127.0.0.1:1".into());
    change(&mut config);
    let bus = EmbeddedBus::open(&dir.path().join("bus.db")).expect("bus");
    let cloud = Arc::new(Cloud::open(config, Box::new(bus)).expect("cloud"));
    let token = cloud
        .ensure_admin_token()
        .expect("token")
        .expect("new token");
    Fixture {
        _dir: dir,
        cloud,
        token,
    }
}

pub async fn call(
    fx: &Fixture,
    method: &str,
    uri: &str,
    token: Option<&str>,
    content_type: Option<&str>,
    body: impl Into<Body>,
) -> (StatusCode, Value) {
    let mut request = Request::builder().method(method).uri(uri);
    if let Some(token) = token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    if let Some(content_type) = content_type {
        request = request.header("content-type", content_type);
    }
    let response = api::router(fx.cloud.clone())
        .oneshot(request.body(body.into()).expect("request"))
        .await
        .expect("response");
    let status = response.status();
    let bytes = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

pub async fn json_call(fx: &Fixture, method: &str, uri: &str, body: &str) -> (StatusCode, Value) {
    call(
        fx,
        method,
        uri,
        Some(&fx.token),
        Some("application/json"),
        body.to_owned(),
    )
    .await
}

/// Joins a host (without a certificate: this Cloud has no CA) and says hello for it
/// with the sim hypervisor.
pub fn sim_host(cloud: &Cloud, name: &str) -> herd_proto::wire::HostId {
    let (token, _) = cloud
        .create_join_token(std::time::Duration::from_secs(60))
        .expect("join token");
    let host = cloud
        .join(&herd_proto::join::JoinRequest {
            join_token: token,
            hostname: name.into(),
            csr_pem: String::new(),
            labels: Default::default(),
        })
        .expect("join")
        .host_id;
    sim_hello(cloud, host, name);
    host
}

/// Says hello for a joined host, as its agent does on every connection.
pub fn sim_hello(cloud: &Cloud, host: herd_proto::wire::HostId, name: &str) {
    let sim = [herd_proto::wire::HypervisorInfo {
        kind: "sim".into(),
        detail: String::new(),
    }];
    cloud
        .host_hello(host, name, &sim, 64, 65536, "test")
        .expect("hello");
}

/// A small sim VM launched straight through the core.
pub fn sim_vm(cloud: &Cloud, project: Option<&str>, name: &str) -> herd_server::store::VmRecord {
    cloud
        .launch(herd_server::cloud::LaunchSpec {
            name: name.into(),
            project: project.map(str::to_owned),
            hypervisor: Some("sim".into()),
            vcpus: Some(1),
            memory_mib: Some(64),
            image: None,
            command: vec![],
            policy: Default::default(),
            keep_running: false,
            disk_mib: None,
        })
        .expect("launch")
}
