//! Batch launches: each VM placed honestly with its capacity counted, all stored or
//! none, inside the project's quota.

mod common;

use axum::http::StatusCode;
use common::{fixture, json_call, sim_host, Fixture};
use herd_server::store::Quota;
use serde_json::{json, Value};

async fn batch(fx: &Fixture, count: u32, name: &str, project: &str) -> (StatusCode, Value) {
    let body = json!({
        "count": count,
        "vm": {"name": name, "project": project, "hypervisor": "sim", "vcpus": 1, "memory_mib": 64}
    });
    json_call(fx, "POST", "/v1/vms/batch", &body.to_string()).await
}

async fn count_vms(fx: &Fixture, query: &str) -> usize {
    let mut n = 0;
    let mut cursor: Option<String> = None;
    loop {
        let page = match &cursor {
            Some(c) => format!("/v1/vms?limit=500&{query}&cursor={c}"),
            None => format!("/v1/vms?limit=500&{query}"),
        };
        let (status, list) = json_call(fx, "GET", &page, "").await;
        assert_eq!(status, StatusCode::OK, "{list}");
        n += list["items"].as_array().expect("items").len();
        match list["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => return n,
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_batch_is_placed_within_capacity_and_stored_all_or_none() {
    let fx = fixture();
    // Two hosts of 64 CPUs at the default 4x overcommit: 256 one-vCPU VMs each.
    let hosts = [sim_host(&fx.cloud, "a"), sim_host(&fx.cloud, "b")];

    let (status, body) = batch(&fx, 1000, "web", "default").await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["ids"].as_array().expect("ids").len(), 1000);
    assert_eq!(count_vms(&fx, "project=default").await, 1000);
    assert_eq!(count_vms(&fx, "state=scheduled").await, 512);
    assert_eq!(count_vms(&fx, "state=pending").await, 488);
    for host in hosts {
        let (_, view) = json_call(&fx, "GET", &format!("/v1/hosts/{host}"), "").await;
        assert_eq!(view["allocated_vcpus"], 256, "{view}");
        assert_eq!(count_vms(&fx, &format!("host={host}")).await, 256);
    }
    let (_, first) = json_call(&fx, "GET", "/v1/vms?name=web-1", "").await;
    let (_, last) = json_call(&fx, "GET", "/v1/vms?name=web-1000", "").await;
    assert_eq!(first["items"].as_array().map(Vec::len), Some(1));
    assert_eq!(last["items"].as_array().map(Vec::len), Some(1));

    // One name taken: nothing of the batch is stored, and no capacity is held.
    let (status, body) = batch(&fx, 5, "web", "default").await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["error"]["code"], "name_taken");
    assert_eq!(count_vms(&fx, "project=default").await, 1000);
    let (_, view) = json_call(&fx, "GET", &format!("/v1/hosts/{}", hosts[0]), "").await;
    assert_eq!(view["allocated_vcpus"], 256, "{view}");

    for (count, name) in [(0, "x"), (1001, "x")] {
        let (status, body) = batch(&fx, count, name, "default").await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert!(body["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("count"));
    }
    let long = "n".repeat(60);
    let (status, body) = batch(&fx, 100, &long, "default").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap_or("")
        .contains("63"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_batch_counts_against_the_quota_as_a_whole() {
    let fx = fixture();
    sim_host(&fx.cloud, "a");
    let quota = Quota {
        max_vms: Some(10),
        ..Quota::default()
    };
    fx.cloud.create_project("team", &quota).expect("project");
    let (status, body) = batch(&fx, 11, "big", "team").await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["error"]["code"], "quota_exceeded");
    assert_eq!(count_vms(&fx, "project=team").await, 0);
    let (status, body) = batch(&fx, 10, "fits", "team").await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(count_vms(&fx, "project=team").await, 10);
}
