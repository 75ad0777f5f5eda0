//! `herd sim` against a real server in another process: its simulated hosts join over
//! mTLS, its VMs are launched and run, its churn is acknowledged in full, and a host it
//! kills is marked down.

mod common;

use common::Server;
use serde_json::Value;
use std::collections::HashMap;
use std::time::Duration;

/// Runs `herd sim` on 20 hosts of 5 VMs with `extra` arguments against `server`, its
/// state in `root`; returns its JSON report.
async fn run_sim(server: &Server, root: &std::path::Path, extra: &[&str], timeout_s: u64) -> Value {
    let run = tokio::process::Command::new(common::herd_bin())
        .args(["sim", "--hosts", "20", "--vms-per-host", "5", "-o", "json"])
        .args(extra)
        .arg("--dir")
        .arg(root.join("sim"))
        .env("HERD_URL", &server.url)
        .env("HERD_TOKEN", &server.token)
        .env("HERD_CA", server.data_dir.join("ca.pem"))
        // Nobody's client config but the environment's.
        .env("XDG_CONFIG_HOME", root.join("config"))
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(timeout_s), run)
        .await
        .expect("herd sim finished in time")
        .expect("herd sim ran");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "herd sim failed: {stderr}");
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {stderr}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sim_runs_hosts_churns_vms_and_sees_a_killed_host_marked_down() {
    let root = tempfile::tempdir().expect("tempdir");
    // A short grace so the killed host is marked down quickly, long enough that the
    // other hosts are still up when the sim has exited and the VMs are checked.
    let server = Server::start(root.path(), &["--host-grace-s", "5"]).await;
    let report = run_sim(
        &server,
        root.path(),
        &["--churn", "5", "--duration", "5", "--kill-hosts", "1"],
        240,
    )
    .await;

    assert_eq!(report["hosts"], 20, "{report}");
    assert_eq!(report["hosts_joined"], 20, "{report}");
    assert_eq!(report["vms"], 100, "{report}");
    assert_eq!(report["vms_launched"], 100, "{report}");
    let made = report["changes_made"].as_u64().expect("changes_made");
    // 5% of 100 VMs per 1 s interval for 5 s.
    assert!(made >= 20, "{report}");
    assert_eq!(report["changes_acked"].as_u64(), Some(made), "{report}");
    assert!(report["lag_ms"]["max"].as_f64().is_some(), "{report}");
    assert!(report["reports_per_s"].as_f64() > Some(10.0), "{report}");
    let kills = report["kills"].as_array().expect("kills");
    assert_eq!(kills.len(), 1, "{report}");
    assert!(kills[0]["detect_ms"].as_u64().is_some(), "{report}");
    let killed = kills[0]["host"].as_str().expect("killed host id");

    // The server agrees: 20 hosts, the killed one down; all 100 VMs placed on them and
    // running (after the churn the sim resumed every VM it had paused), except those
    // on the killed host, whose state the server no longer knows.
    let api = server.client();
    let hosts = api.hosts().await;
    assert_eq!(hosts.len(), 20);
    let host_state: HashMap<&str, &str> = hosts
        .iter()
        .map(|h| {
            (
                h["id"].as_str().expect("id"),
                h["state"].as_str().expect("state"),
            )
        })
        .collect();
    assert_eq!(host_state.get(killed), Some(&"down"), "{hosts:?}");
    let vms = api.vms().await;
    assert_eq!(vms.len(), 100);
    for vm in &vms {
        let host = vm["host"].as_str().expect("every VM placed");
        assert!(host_state.contains_key(host), "{vm}");
        if host == killed {
            assert_ne!(vm["state"], "running", "{vm}");
        } else {
            assert_eq!(vm["state"], "running", "{vm}");
        }
    }

    // A second run reuses the hosts and VMs: nothing joins, nothing is launched.
    let report = run_sim(
        &server,
        root.path(),
        &["--churn", "0", "--duration", "1"],
        120,
    )
    .await;
    assert_eq!(report["hosts_joined"], 0, "{report}");
    assert_eq!(report["vms_launched"], 0, "{report}");
    assert_eq!(report["vms"], 100, "{report}");
    assert_eq!(api.vms().await.len(), 100);
}
