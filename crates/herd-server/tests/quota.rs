//! Quotas hold under concurrency: launches racing for the last places in a project
//! cannot squeeze past its limit.

mod common;

use axum::http::StatusCode;
use common::{call, fixture, sim_host};
use herd_server::access::Role;
use herd_server::store::Quota;
use serde_json::json;
use std::sync::Arc;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_concurrent_launches_against_a_quota_of_ten_create_exactly_ten() {
    let fx = Arc::new(fixture());
    sim_host(&fx.cloud, "h1");
    let quota = Quota {
        max_vms: Some(10),
        ..Quota::default()
    };
    fx.cloud.create_project("team", &quota).expect("project");
    fx.cloud.create_user("tess", false).expect("user");
    fx.cloud
        .set_member("team", "tess", Role::Member)
        .expect("grant");
    let token = fx
        .cloud
        .create_token("tess", "t", None)
        .expect("token")
        .secret;

    let mut tasks = Vec::new();
    for i in 0..50 {
        let fx = fx.clone();
        let token = token.clone();
        tasks.push(tokio::spawn(async move {
            let body = json!({"name": format!("vm-{i}"), "project": "team", "hypervisor": "sim"});
            call(
                &fx,
                "POST",
                "/v1/vms",
                Some(&token),
                Some("application/json"),
                body.to_string(),
            )
            .await
        }));
    }
    let mut created = 0;
    let mut refused = 0;
    for task in tasks {
        let (status, body) = task.await.expect("task");
        match status {
            StatusCode::CREATED => created += 1,
            StatusCode::CONFLICT => {
                assert_eq!(body["error"]["code"], "quota_exceeded", "{body}");
                refused += 1;
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    let (_, list) = call(&fx, "GET", "/v1/vms?project=team", Some(&token), None, "").await;
    let stored = list["items"].as_array().expect("items").len();
    eprintln!(
        "50 concurrent launches, quota 10: {created} created, {refused} refused, {stored} stored"
    );
    assert_eq!(created, 10);
    assert_eq!(refused, 40);
    assert_eq!(stored, 10);

    // vCPUs and memory are counted too, and raising the quota lets launches in again.
    fx.cloud
        .set_quota(
            "team",
            &Quota {
                max_vms: Some(20),
                max_vcpus: Some(12),
                ..Quota::default()
            },
        )
        .expect("quota");
    let launch = |body: serde_json::Value| {
        let (fx, token) = (fx.clone(), token.clone());
        async move {
            call(
                &fx,
                "POST",
                "/v1/vms",
                Some(&token),
                Some("application/json"),
                body.to_string(),
            )
            .await
        }
    };
    let (status, body) =
        launch(json!({"name": "big", "project": "team", "hypervisor": "sim", "vcpus": 4})).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("vCPUs"),
        "{body}"
    );
    let (status, body) =
        launch(json!({"name": "small", "project": "team", "hypervisor": "sim", "vcpus": 2})).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
}
