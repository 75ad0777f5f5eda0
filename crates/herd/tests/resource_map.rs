//! The node's own view of itself through the whole product: `herd up` with real QEMU
//! (and runc, where usable), its utility module's figures reaching the host list and
//! the resource map, the module restarted when it dies, a hung QEMU shown as an
//! unresponsive driver and then as healthy again, and a project member's map holding
//! only their project's aggregates.

mod common;

use common::{qemu_present, runc_usable, Api, Up};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// Polls `path` until `done` holds of it.
async fn wait_for(
    api: &Api,
    path: &str,
    what: &str,
    timeout: Duration,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let value = api.get(path).await;
        if done(&value) {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {value:#}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn driver_health<'a>(host: &'a Value, kind: &str) -> Option<&'a str> {
    host["drivers"]
        .as_array()?
        .iter()
        .find(|d| d["kind"] == kind)?["health"]
        .as_str()
}

fn map_type<'a>(map: &'a Value, kind: &str) -> &'a Value {
    map["types"]
        .as_array()
        .and_then(|types| types.iter().find(|t| t["hypervisor"] == kind))
        .unwrap_or_else(|| panic!("no {kind} row in the map: {map:#}"))
}

fn signal(pid: i32, signal: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal).expect("signal");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn utility_figures_driver_health_and_the_resource_map() {
    if !qemu_present() {
        return;
    }
    let containers = runc_usable();
    let root = tempfile::tempdir().expect("tempdir");
    let drivers = if containers { "qemu,oci" } else { "qemu" };
    let up = Up::start_drivers(root.path(), drivers).await;
    let api = up.api.clone();

    // The utility module's figures arrive on their own, before any VM runs.
    let hosts = wait_for(
        &api,
        "/v1/hosts",
        "utility figures and a healthy qemu driver",
        Duration::from_secs(60),
        |hosts| {
            let host = &hosts[0];
            host["utility"]["stats"]["mem_total_mib"].as_u64() > Some(0)
                && driver_health(host, "qemu") == Some("ok")
        },
    )
    .await;
    assert!(hosts[0]["utility_error"].is_null(), "{:#}", hosts[0]);

    let vm = api
        .post("/v1/vms", json!({"name": "v1", "memory_mib": 128}))
        .await
        .expect("launch a VM");
    let vm_id = vm["id"].as_str().expect("id").to_owned();
    let mut ids = vec![vm_id.clone()];
    if containers {
        let c = api
            .post(
                "/v1/vms",
                json!({"name": "c1", "memory_mib": 64, "hypervisor": "oci"}),
            )
            .await
            .expect("launch a container");
        ids.push(c["id"].as_str().expect("id").to_owned());
    }
    for id in &ids {
        wait_for(
            &api,
            &format!("/v1/vms/{id}"),
            "running",
            Duration::from_secs(120),
            |vm| vm["state"] == "running",
        )
        .await;
    }

    // The map: allocations per type from placement, the QEMU measured from outside.
    let map = wait_for(
        &api,
        "/v1/map",
        "the QEMU measured on the host",
        Duration::from_secs(30),
        |map| {
            map["hosts"][0]["types"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|t| t["hypervisor"] == "qemu" && t["measured_guests"].as_u64() >= Some(1))
        },
    )
    .await;
    assert_eq!(map["scope"], "cloud");
    let qemu = map_type(&map, "qemu");
    assert_eq!(qemu["n_vms"], 1, "{map:#}");
    assert_eq!(qemu["allocated_memory_mib"], 128, "{map:#}");
    assert!(qemu["used_memory_mib"].as_u64() > Some(0), "{map:#}");
    assert!(qemu["free_vcpus"].is_u64(), "{map:#}");
    let host = &map["hosts"][0];
    assert_eq!(host["stale"], false, "{map:#}");
    assert!(host["used_memory_mib"].as_u64() > Some(0), "{map:#}");
    if containers {
        let oci = map_type(&map, "oci");
        assert_eq!(oci["n_vms"], 1, "{map:#}");
        assert_eq!(oci["allocated_memory_mib"], 64, "{map:#}");
    }
    let metrics = api
        .http
        .get(format!("{}/metrics", api.url))
        .bearer_auth(&api.token)
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text");
    assert!(
        metrics.contains("herd_driver_healthy{host=") && metrics.contains("herd_host_stale{"),
        "{metrics}"
    );

    // Kill the utility module: the agent starts a new one and figures come again.
    let util = up.processes("herd-util");
    assert_eq!(util.len(), 1, "one utility module: {util:?}");
    signal(util[0], nix::sys::signal::Signal::SIGKILL);
    let deadline = Instant::now() + Duration::from_secs(30);
    let restarted = loop {
        let now = up.processes("herd-util");
        if let [pid] = now[..] {
            if pid != util[0] {
                break pid;
            }
        }
        assert!(Instant::now() < deadline, "herd-util did not come back");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let before = hosts[0]["utility"]["stats"]["sampled_at_ms"]
        .as_u64()
        .expect("sampled_at_ms");
    wait_for(
        &api,
        "/v1/hosts",
        "figures from the new module",
        Duration::from_secs(30),
        |hosts| hosts[0]["utility"]["stats"]["sampled_at_ms"].as_u64() > Some(before),
    )
    .await;
    eprintln!("herd-util {} was replaced by {restarted}", util[0]);

    // A stopped QEMU does not answer QMP: the driver is unresponsive, the host and
    // its figures stay up, and it heals when QEMU goes on.
    let qemu_pid = up.qemu_pid(&vm_id).expect("qemu pid");
    signal(qemu_pid, nix::sys::signal::Signal::SIGSTOP);
    let hosts = wait_for(
        &api,
        "/v1/hosts",
        "qemu unresponsive",
        Duration::from_secs(40),
        |hosts| driver_health(&hosts[0], "qemu") == Some("unresponsive"),
    )
    .await;
    signal(qemu_pid, nix::sys::signal::Signal::SIGCONT);
    assert_eq!(hosts[0]["state"], "up", "{:#}", hosts[0]);
    if containers {
        assert_eq!(
            driver_health(&hosts[0], "oci"),
            Some("ok"),
            "{:#}",
            hosts[0]
        );
    }
    wait_for(
        &api,
        "/v1/hosts",
        "qemu healthy again",
        Duration::from_secs(40),
        |hosts| driver_health(&hosts[0], "qemu") == Some("ok"),
    )
    .await;

    // A viewer of another project sees that project's aggregates only: no hosts, no
    // free figures, none of the default project's VMs.
    api.post("/v1/projects", json!({"name": "other"}))
        .await
        .expect("project");
    let user = api
        .post(
            "/v1/users",
            json!({"name": "olga", "project": "other", "role": "viewer"}),
        )
        .await
        .expect("user");
    let viewer = Api {
        token: user["token"]["token"].as_str().expect("token").to_owned(),
        ..api.clone()
    };
    let theirs = viewer.get("/v1/map").await;
    assert_eq!(theirs["scope"], "project", "{theirs:#}");
    assert_eq!(theirs["hosts"], json!([]), "{theirs:#}");
    for t in theirs["types"].as_array().expect("types") {
        assert_eq!(t["n_vms"], 0, "{theirs:#}");
        assert!(t["free_vcpus"].is_null(), "{theirs:#}");
    }
    let (status, _) = viewer
        .request(reqwest::Method::GET, "/v1/hosts", None)
        .await
        .expect("GET /v1/hosts");
    assert_eq!(status, 403, "a viewer may not list hosts");
}
