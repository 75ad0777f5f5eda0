//! Node restriction: an agent speaks only for its own host. A reused or expired join
//! token, a second live session for one host, and reports, usage or guest messages
//! about another host's VM are all refused, and the refusals are written down.

mod common;

use axum::http::StatusCode;
use common::{call, fixture, sim_host, sim_vm, Fixture};
use futures_util::{SinkExt, StreamExt};
use herd_proto::policy::PolicyAction;
use herd_proto::wire::{
    self, AgentMsg, Capacity, GuestReport, HostId, HostUtil, HypervisorInfo, Report, ReportBody,
    ServerMsg, VmStatus, VmUsage, PROTOCOL_VERSION,
};
use herd_proto::VmState;
use herd_server::{api, ingest};
use herd_sync::HostView;
use serde_json::{json, Value};
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

fn sim() -> Vec<HypervisorInfo> {
    vec![HypervisorInfo {
        kind: "sim".into(),
        detail: String::new(),
    }]
}

async fn join(fx: &Fixture, token: &str) -> (StatusCode, Value) {
    let body = json!({"join_token": token, "hostname": "h", "csr_pem": ""});
    call(
        fx,
        "POST",
        "/v1/agent/join",
        None,
        Some("application/json"),
        body.to_string(),
    )
    .await
}

async fn audit(fx: &Fixture) -> Vec<Value> {
    let (_, list) = call(fx, "GET", "/v1/audit?limit=50", Some(&fx.token), None, "").await;
    list["items"].as_array().cloned().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn reused_and_expired_join_tokens_are_refused_and_audited() {
    let fx = fixture();
    let (token, _) = fx
        .cloud
        .create_join_token(Duration::from_secs(60))
        .expect("token");
    let (status, body) = join(&fx, &token).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (status, body) = join(&fx, &token).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "reused: {body}");

    let (short, _) = fx
        .cloud
        .create_join_token(Duration::from_millis(1))
        .expect("token");
    tokio::time::sleep(Duration::from_millis(20)).await;
    let (status, body) = join(&fx, &short).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "expired: {body}");

    let refused = audit(&fx)
        .await
        .iter()
        .filter(|row| row["action"] == "POST /v1/agent/join" && row["status"] == 401)
        .count();
    assert_eq!(refused, 2, "both refusals are in the audit log");
    assert_eq!(fx.cloud.hosts().expect("hosts").len(), 1);
}

async fn agent_socket(
    addr: std::net::SocketAddr,
    token: &str,
) -> tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>> {
    let mut request = format!("ws://{addr}/v1/agent/bus")
        .into_client_request()
        .expect("request");
    request.headers_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("header"),
    );
    let (socket, _) = tokio_tungstenite::connect_async(request)
        .await
        .expect("connect");
    socket
}

async fn hello(
    socket: &mut tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
) -> ServerMsg {
    let hello = AgentMsg::Hello {
        protocol: PROTOCOL_VERSION,
        agent_version: "test".into(),
        hostname: "h".into(),
        capacity: Capacity {
            cpus: 4,
            memory_mib: 4096,
        },
        hypervisors: sim(),
        transfer_port: None,
    };
    socket
        .send(Message::Binary(wire::encode(&hello).into()))
        .await
        .expect("send");
    loop {
        match socket.next().await {
            Some(Ok(Message::Binary(frame))) => {
                return wire::decode::<ServerMsg>(&frame).expect("decode")
            }
            Some(Ok(_)) => continue,
            other => panic!("connection ended: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_live_session_for_one_host_is_refused() {
    let fx = fixture();
    let (token, _) = fx
        .cloud
        .create_join_token(Duration::from_secs(60))
        .expect("token");
    let (_, joined) = join(&fx, &token).await;
    let agent_token = joined["agent_token"].as_str().expect("agent token");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let app = api::router(fx.cloud.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });

    let mut first = agent_socket(addr, agent_token).await;
    assert!(
        matches!(hello(&mut first).await, ServerMsg::Welcome { .. }),
        "the first session is welcome"
    );
    let mut second = agent_socket(addr, agent_token).await;
    match hello(&mut second).await {
        ServerMsg::Refused { reason } => {
            eprintln!("second session refused: {reason}");
            assert!(
                reason.contains("already has a live agent session"),
                "{reason}"
            );
        }
        other => panic!("a second session was not refused: {other:?}"),
    }
    let rows = audit(&fx).await;
    assert!(
        rows.iter()
            .any(|row| row["action"] == "agent hello" && row["result"] == "host_connected"),
        "the refusal is audited: {rows:?}"
    );
    // The first session still works.
    first
        .send(Message::Binary(
            wire::encode(&AgentMsg::Report(Report {
                epoch: 1,
                seq: 1,
                util: HostUtil::default(),
                body: ReportBody::Full { vms: vec![] },
                events: vec![],
            }))
            .into(),
        ))
        .await
        .expect("report on the first session");
}

#[tokio::test(flavor = "multi_thread")]
async fn reports_about_another_hosts_vm_change_nothing() {
    let fx = fixture();
    let cloud = &fx.cloud;
    let hosts: Vec<HostId> = ["a", "b"].iter().map(|n| sim_host(cloud, n)).collect();
    let vm = sim_vm(cloud, None, "victim");
    let owner = vm.host.expect("placed");
    let intruder = *hosts.iter().find(|h| **h != owner).expect("other host");
    let rejected_before = cloud.metrics.rejected_reports.load(Ordering::Relaxed);

    // A state report.
    let mut view = HostView::new();
    let forged = Report {
        epoch: 1,
        seq: 1,
        util: HostUtil::default(),
        body: ReportBody::Full {
            vms: vec![VmStatus {
                slot: 0,
                vm: Some(vm.id),
                state: VmState::Terminated,
            }],
        },
        events: vec![],
    };
    ingest::apply_report(cloud, intruder, &mut view, &forged)
        .await
        .expect("apply");
    // Usage, and a guest's policy action relayed by the wrong host.
    let usage = [VmUsage {
        vm: vm.id,
        cpu_ms: 1_000_000,
        ..VmUsage::default()
    }];
    let rejected = cloud
        .record_usage(intruder, herd_server::store::now_ms() as u64 - 100, &usage)
        .await
        .expect("usage");
    assert_eq!(rejected, 1, "the forged usage sample is dropped");
    let action = GuestReport::PolicyAction {
        rule: "lifespan".into(),
        action: PolicyAction::Terminate,
        reason: "forged".into(),
    };
    assert!(!cloud.record_guest(intruder, vm.id, &action).expect("guest"));
    // Even the right host's guest may take only actions its policy has.
    assert!(
        !cloud.record_guest(owner, vm.id, &action).expect("guest"),
        "a VM without policies takes no policy action"
    );

    let after = cloud.vm(&vm.id.to_string()).expect("vm");
    assert_eq!(after.observed, vm.observed, "state unchanged");
    assert_eq!(after.desired, VmState::Running, "desired state unchanged");
    assert!(cloud
        .usage_samples(vm.id, i64::MAX)
        .expect("samples")
        .is_empty());
    assert!(cloud.metrics.rejected_reports.load(Ordering::Relaxed) > rejected_before);
}
