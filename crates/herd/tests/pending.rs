//! A VM that no host can take: `herd vm launch` says why, in the scheduler's words,
//! and exits non-zero after a short wait; the VM stays pending with that reason in the
//! API and `herd vm show`; `--wait-for-room` and `--no-wait` do not fail.

mod common;

use common::{err, herd_cli, ok, Agent, Server};
use std::path::Path;
use std::time::{Duration, Instant};

/// A server with one sim agent, `host-0` (with these arguments), that is up.
async fn one_host(root: &Path, agent: &[&str]) -> (Server, Agent) {
    let server = Server::start(root, &[]).await;
    let agent = server.start_agent(root, "host-0", agent).await;
    server
        .client()
        .wait_hosts("host up", Duration::from_secs(20), |hosts| {
            hosts.len() == 1 && hosts[0]["state"] == "up"
        })
        .await;
    (server, agent)
}

/// Runs the CLI against `server`, with a config dir of its own under `root`.
fn cli(server: &Server, root: &Path, args: &[&str]) -> std::process::Output {
    let ca = server.data_dir.join("ca.pem");
    let env = [
        ("HERD_URL", server.url.as_str()),
        ("HERD_TOKEN", server.token.as_str()),
        ("HERD_CA", ca.to_str().expect("utf-8 path")),
    ];
    herd_cli(&root.join("cli"), &env, args)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_launch_no_host_can_take_fails_with_the_schedulers_reason() {
    let root = tempfile::tempdir().expect("tempdir");
    let (server, _agent) = one_host(root.path(), &["--cpus", "4", "--memory-mib", "4096"]).await;
    let api = server.client();
    let ca = server.data_dir.join("ca.pem");
    let config = root.path().join("cli");
    let herd = |args: &[&str]| cli(&server, root.path(), args);

    // More memory than the one host has: the launch fails with the reason.
    let started = Instant::now();
    let message = err(herd(&[
        "vm",
        "launch",
        "big",
        "--hypervisor",
        "sim",
        "--memory",
        "65536",
    ]));
    assert!(
        message.contains("big: cannot be placed") && message.contains("short of memory"),
        "{message}"
    );
    assert!(message.contains("--wait-for-room"), "{message}");
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "{:?}",
        started.elapsed()
    );
    // It stays pending, the reason in the API and in `herd vm show`.
    let vm = api
        .vms()
        .await
        .into_iter()
        .find(|vm| vm["name"] == "big")
        .expect("big is kept");
    assert_eq!(vm["state"], "pending", "{vm}");
    let reason = vm["pending_reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("none of 1 hosts fits: 1 short of memory"),
        "{vm}"
    );
    let shown = ok(herd(&["vm", "show", "big"]));
    assert!(shown.contains("short of memory"), "{shown}");

    // --no-wait returns at once; a VM that fits runs.
    ok(herd(&[
        "vm",
        "launch",
        "later",
        "--hypervisor",
        "sim",
        "--memory",
        "65536",
        "--no-wait",
    ]));
    let small = ok(herd(&[
        "vm",
        "launch",
        "small",
        "--hypervisor",
        "sim",
        "--memory",
        "64",
    ]));
    assert!(!small.trim().is_empty(), "{small}");
    // With --wait-for-room the launch keeps waiting well past the 10 s after which a
    // plain launch gives up.
    let waiting = tokio::process::Command::new(common::herd_bin())
        .args([
            "vm",
            "launch",
            "patient",
            "--hypervisor",
            "sim",
            "--memory",
            "65536",
            "--wait-for-room",
        ])
        .env("XDG_CONFIG_HOME", &config)
        .env("HERD_URL", &server.url)
        .env("HERD_TOKEN", &server.token)
        .env("HERD_CA", &ca)
        .kill_on_drop(true)
        .output();
    assert!(
        tokio::time::timeout(Duration::from_secs(20), waiting)
            .await
            .is_err(),
        "--wait-for-room gave up on a VM that is only waiting for room"
    );
}

/// `herd host ls` filters by state and type, and refuses a state that is not one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_ls_filters_by_state_and_type() {
    let root = tempfile::tempdir().expect("tempdir");
    let (server, _agent) = one_host(root.path(), &[]).await;
    let herd = |args: &[&str]| cli(&server, root.path(), args);
    assert!(ok(herd(&["host", "ls", "--state", "up", "--type", "sim"])).contains("host-0"));
    assert!(!ok(herd(&["host", "ls", "--state", "down"])).contains("host-0"));
    assert!(!ok(herd(&["host", "ls", "--type", "qemu"])).contains("host-0"));
    let refused = err(herd(&["host", "ls", "--state", "sleepy"]));
    assert!(
        refused.contains("not one of up, joining, down"),
        "{refused}"
    );
}
