//! Bad input of every kind gets a 4xx with a stable code and a message, and changes
//! nothing. Runs the real router and store in-process.

mod common;

use axum::http::StatusCode;
use common::{call, fixture, fixture_with, json_call, sim_host, Fixture};
use serde_json::{json, Value};

fn assert_error(
    case: &str,
    (status, body): &(StatusCode, Value),
    want_status: u16,
    want_code: &str,
) {
    assert_eq!(status.as_u16(), want_status, "{case}: {body}");
    assert_eq!(body["error"]["code"], want_code, "{case}: {body}");
    let message = body["error"]["message"].as_str().unwrap_or("");
    assert!(!message.is_empty(), "{case}: empty message");
    assert!(
        !message.contains("sqlite"),
        "{case}: leaks internals: {message}"
    );
}

async fn snapshot(fx: &Fixture) -> (Value, Value, Value) {
    let vms = json_call(fx, "GET", "/v1/vms", "").await.1;
    let events = json_call(fx, "GET", "/v1/events", "").await.1;
    let hosts = json_call(fx, "GET", "/v1/hosts", "").await.1;
    (vms, events, hosts)
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_is_rejected_with_stable_codes_and_changes_nothing() {
    let fx = fixture();
    let no_host = json_call(
        &fx,
        "POST",
        "/v1/vms",
        r#"{"name":"early","hypervisor":"sim"}"#,
    )
    .await;
    assert_error("no host yet", &no_host, 400, "invalid_request");
    sim_host(&fx.cloud, "h1");
    let (status, vm) = json_call(
        &fx,
        "POST",
        "/v1/vms",
        r#"{"name":"ok","hypervisor":"sim"}"#,
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{vm}");
    let vm_id = vm["id"].as_str().expect("id").to_owned();
    let before = snapshot(&fx).await;

    let launch = "/v1/vms";
    let big = format!(
        r#"{{"name":"big","command":["{}"]}}"#,
        "x".repeat(70 * 1024)
    );
    let many_args =
        serde_json::to_string(&json!({"name": "many", "command": vec!["a"; 100]})).expect("json");
    let long_name = serde_json::to_string(&json!({"name": "a".repeat(64)})).expect("json");
    let cases: Vec<(&str, (StatusCode, Value), u16, &str)> = vec![
        (
            "no token",
            call(&fx, "GET", launch, None, None, "").await,
            401,
            "unauthorized",
        ),
        (
            "wrong token",
            call(&fx, "GET", launch, Some("herd_adm_nope"), None, "").await,
            401,
            "unauthorized",
        ),
        (
            "not bearer",
            call(&fx, "GET", "/v1/hosts", None, None, "").await,
            401,
            "unauthorized",
        ),
        (
            "malformed json",
            json_call(&fx, "POST", launch, r#"{"name": "x""#).await,
            400,
            "malformed_json",
        ),
        (
            "not an object",
            json_call(&fx, "POST", launch, "[1,2]").await,
            400,
            "invalid_body",
        ),
        (
            "unknown field",
            json_call(&fx, "POST", launch, r#"{"name":"x","colour":"red"}"#).await,
            400,
            "unknown_field",
        ),
        (
            "missing name",
            json_call(&fx, "POST", launch, r#"{"vcpus":1}"#).await,
            400,
            "invalid_body",
        ),
        (
            "negative vcpus",
            json_call(&fx, "POST", launch, r#"{"name":"x","vcpus":-1}"#).await,
            400,
            "invalid_body",
        ),
        (
            "empty disk",
            json_call(&fx, "POST", launch, r#"{"name":"x","disk_mib":0}"#).await,
            400,
            "invalid_request",
        ),
        (
            "huge disk",
            json_call(
                &fx,
                "POST",
                launch,
                r#"{"name":"x","disk_mib":99999999999}"#,
            )
            .await,
            400,
            "invalid_request",
        ),
        (
            "huge vcpus",
            json_call(&fx, "POST", launch, r#"{"name":"x","vcpus":100000}"#).await,
            400,
            "invalid_request",
        ),
        (
            "overflowing vcpus",
            json_call(
                &fx,
                "POST",
                launch,
                r#"{"name":"x","vcpus":99999999999999999999}"#,
            )
            .await,
            400,
            "invalid_body",
        ),
        (
            "zero vcpus",
            json_call(&fx, "POST", launch, r#"{"name":"x","vcpus":0}"#).await,
            400,
            "invalid_request",
        ),
        (
            "huge memory",
            json_call(
                &fx,
                "POST",
                launch,
                r#"{"name":"x","memory_mib":1000000000000}"#,
            )
            .await,
            400,
            "invalid_request",
        ),
        (
            "tiny memory",
            json_call(&fx, "POST", launch, r#"{"name":"x","memory_mib":1}"#).await,
            400,
            "invalid_request",
        ),
        (
            "bad name",
            json_call(&fx, "POST", launch, r#"{"name":"Bad Name!"}"#).await,
            400,
            "invalid_request",
        ),
        (
            "long name",
            json_call(&fx, "POST", launch, &long_name).await,
            400,
            "invalid_request",
        ),
        (
            "unknown hypervisor",
            json_call(&fx, "POST", launch, r#"{"name":"x","hypervisor":"vmware"}"#).await,
            400,
            "invalid_request",
        ),
        (
            "a hypervisor type no host has a driver for",
            json_call(&fx, "POST", launch, r#"{"name":"x","hypervisor":"oci"}"#).await,
            400,
            "invalid_request",
        ),
        (
            "bad image",
            json_call(&fx, "POST", launch, r#"{"name":"x","image":"../etc"}"#).await,
            400,
            "invalid_request",
        ),
        (
            "too many args",
            json_call(&fx, "POST", launch, &many_args).await,
            400,
            "invalid_request",
        ),
        (
            "body too large",
            json_call(&fx, "POST", launch, &big).await,
            413,
            "body_too_large",
        ),
        (
            "no content type",
            call(
                &fx,
                "POST",
                launch,
                Some(&fx.token),
                None,
                r#"{"name":"x"}"#,
            )
            .await,
            415,
            "unsupported_media_type",
        ),
        (
            "duplicate name",
            json_call(&fx, "POST", launch, r#"{"name":"ok","hypervisor":"sim"}"#).await,
            409,
            "name_taken",
        ),
        (
            "unknown vm",
            json_call(&fx, "GET", &format!("/v1/vms/{}", uuid::Uuid::new_v4()), "").await,
            404,
            "not_found",
        ),
        (
            "non-utf8 vm id",
            json_call(&fx, "GET", "/v1/vms/%00%ff", "").await,
            400,
            "invalid_path",
        ),
        (
            "garbage vm id",
            json_call(&fx, "GET", "/v1/vms/%00abc", "").await,
            404,
            "not_found",
        ),
        (
            "unknown vm action",
            json_call(
                &fx,
                "POST",
                &format!("/v1/vms/{}/actions/pause", uuid::Uuid::new_v4()),
                "",
            )
            .await,
            404,
            "not_found",
        ),
        (
            "unknown action",
            json_call(&fx, "POST", &format!("/v1/vms/{vm_id}/actions/explode"), "").await,
            404,
            "not_found",
        ),
        (
            "invalid transition",
            json_call(&fx, "POST", &format!("/v1/vms/{vm_id}/actions/pause"), "").await,
            409,
            "invalid_transition",
        ),
        (
            "unknown vm delete",
            json_call(
                &fx,
                "DELETE",
                &format!("/v1/vms/{}", uuid::Uuid::new_v4()),
                "",
            )
            .await,
            404,
            "not_found",
        ),
        (
            "unknown vm events",
            json_call(
                &fx,
                "GET",
                &format!("/v1/vms/{}/events", uuid::Uuid::new_v4()),
                "",
            )
            .await,
            404,
            "not_found",
        ),
        (
            "unknown host",
            json_call(&fx, "GET", "/v1/hosts/nope", "").await,
            404,
            "not_found",
        ),
        (
            "bad state filter",
            json_call(&fx, "GET", "/v1/vms?state=sleepy", "").await,
            400,
            "invalid_query",
        ),
        (
            "bad limit",
            json_call(&fx, "GET", "/v1/vms?limit=0", "").await,
            400,
            "invalid_query",
        ),
        (
            "huge limit",
            json_call(&fx, "GET", "/v1/vms?limit=99999999999999999999999", "").await,
            400,
            "invalid_query",
        ),
        (
            "bad cursor",
            json_call(&fx, "GET", "/v1/vms?cursor=xyz", "").await,
            400,
            "invalid_query",
        ),
        (
            "unknown query param",
            json_call(&fx, "GET", "/v1/vms?colour=red", "").await,
            400,
            "invalid_query",
        ),
        (
            "bad host filter",
            json_call(&fx, "GET", "/v1/vms?host=abc", "").await,
            400,
            "invalid_query",
        ),
        (
            "bad events cursor",
            json_call(&fx, "GET", "/v1/events?after=abc", "").await,
            400,
            "invalid_query",
        ),
        (
            "unknown route",
            json_call(&fx, "GET", "/v1/nothing", "").await,
            404,
            "no_route",
        ),
        (
            "wrong method",
            json_call(&fx, "PUT", "/v1/vms", "{}").await,
            405,
            "method_not_allowed",
        ),
        (
            "bad join token",
            call(
                &fx,
                "POST",
                "/v1/agent/join",
                None,
                Some("application/json"),
                r#"{"join_token":"herd_join_nope","hostname":"h","csr_pem":""}"#,
            )
            .await,
            401,
            "unauthorized",
        ),
        (
            "join unknown field",
            call(
                &fx,
                "POST",
                "/v1/agent/join",
                None,
                Some("application/json"),
                r#"{"join_token":"t","hostname":"h","csr_pem":"","admin":true}"#,
            )
            .await,
            400,
            "unknown_field",
        ),
        (
            "admin on agent route",
            json_call(&fx, "GET", "/v1/agent/discovery", "").await,
            403,
            "forbidden",
        ),
        (
            "bad join ttl",
            json_call(&fx, "POST", "/v1/join-tokens", r#"{"ttl_seconds":0}"#).await,
            400,
            "invalid_request",
        ),
    ];
    let n_cases = cases.len();
    for (case, response, status, code) in &cases {
        assert_error(case, response, *status, code);
    }

    // An agent credential may not use operator routes.
    let (join_token, _) = fx
        .cloud
        .create_join_token(std::time::Duration::from_secs(60))
        .expect("join token");
    let joined = fx
        .cloud
        .join(&herd_proto::join::JoinRequest {
            join_token: join_token.clone(),
            hostname: "h".into(),
            // A Cloud opened without a CA issues no certificate.
            csr_pem: String::new(),
            labels: Default::default(),
        })
        .expect("join");
    let agent_call = call(&fx, "GET", "/v1/vms", Some(&joined.agent_token), None, "").await;
    assert_error("agent on operator route", &agent_call, 403, "forbidden");
    // A join token works once.
    let reused = call(
        &fx,
        "POST",
        "/v1/agent/join",
        None,
        Some("application/json"),
        serde_json::to_string(&json!({"join_token": join_token, "hostname": "h2", "csr_pem": ""}))
            .expect("json"),
    )
    .await;
    assert_error("reused join token", &reused, 401, "unauthorized");

    let after = snapshot(&fx).await;
    assert_eq!(before.0, after.0, "VMs changed");
    // The one legitimate join adds a host and its event; nothing else changed.
    let events_after: Vec<Value> = after.1["items"].as_array().cloned().unwrap_or_default();
    let events_before: Vec<Value> = before.1["items"].as_array().cloned().unwrap_or_default();
    assert_eq!(events_after.len(), events_before.len() + 1);
    assert_eq!(
        events_after.last().map(|e| e["kind"].clone()),
        Some(json!("host.joined"))
    );
    // The sim host from the start, and the one joined here.
    assert_eq!(after.2.as_array().map(|h| h.len()), Some(2));
    eprintln!("{} bad requests rejected with stable codes", n_cases + 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn openapi_lists_every_route() {
    let fx = fixture();
    let (status, doc) = json_call(&fx, "GET", "/openapi.json", "").await;
    assert_eq!(status, StatusCode::OK);
    let paths = doc["paths"].as_object().expect("paths");
    for path in [
        "/healthz",
        "/metrics",
        "/openapi.json",
        "/v1/vms",
        "/v1/vms/{id}",
        "/v1/vms/{id}/actions/{action}",
        "/v1/vms/{id}/events",
        "/v1/events",
        "/v1/hosts",
        "/v1/hosts/{id}",
        "/v1/join-tokens",
        "/v1/agent/join",
        "/v1/agent/discovery",
        "/v1/agent/bus",
    ] {
        assert!(
            paths.contains_key(path),
            "{path} missing from /openapi.json"
        );
    }
    let (status, _) = call(&fx, "GET", "/openapi.json", None, None, "").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = call(&fx, "GET", "/healthz", None, None, "").await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_vm_may_name_only_a_hypervisor_type_a_driver_serves() {
    let fx = fixture_with(|config| config.hypervisor_kinds = vec!["qemu".into(), "sim".into()]);
    let launch = |body: &'static str| json_call(&fx, "POST", "/v1/vms", body);
    // Before any host is known, the build's driver types: the VM waits for its host.
    let (status, body) = launch(r#"{"name":"early","hypervisor":"qemu"}"#).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let refused = launch(r#"{"name":"x","hypervisor":"oci"}"#).await;
    assert_error("a type no driver serves", &refused, 400, "invalid_request");
    assert!(refused.1["error"]["message"]
        .as_str()
        .unwrap_or("")
        .contains("qemu, sim"));
    // Once hosts are known, only what they offer.
    sim_host(&fx.cloud, "h1");
    let (status, body) = launch(r#"{"name":"ok","hypervisor":"sim"}"#).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let refused = launch(r#"{"name":"late","hypervisor":"qemu"}"#).await;
    assert_error("a type no host offers", &refused, 400, "invalid_request");
    assert!(refused.1["error"]["message"]
        .as_str()
        .unwrap_or("")
        .contains("the hosts offer sim"));
}
