//! Real VMs through the whole product: `herd up` as a process, the REST API, the agent,
//! QEMU under TCG and herd-guest inside, and the state coming back.

mod common;

use common::{err, herd_cli, ok, qemu_present, Api, Up};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

async fn wait_vm(
    api: &Api,
    id: &str,
    what: &str,
    timeout: Duration,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let vm = api.get(&format!("/v1/vms/{id}")).await;
        if done(&vm) {
            return vm;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {vm}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn console(api: &Api, id: &str) -> String {
    let response = api
        .http
        .get(format!("{}/v1/vms/{id}/console", api.url))
        .bearer_auth(&api.token)
        .send()
        .await
        .expect("console");
    assert_eq!(response.status(), 200);
    response.text().await.expect("console text")
}

fn counts(console: &str) -> Vec<u64> {
    console
        .lines()
        .filter_map(|line| {
            line.trim()
                .strip_prefix("count=")
                .and_then(|n| n.trim().parse().ok())
        })
        .collect()
}

async fn action(api: &Api, id: &str, action: &str) {
    api.post(&format!("/v1/vms/{id}/actions/{action}"), json!({}))
        .await
        .unwrap_or_else(|e| panic!("{action}: {e}"));
}

fn running_and_connected(vm: &Value) -> bool {
    vm["state"] == "running" && vm["guest"]["connected"] == true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn real_vms_through_herd_up() {
    if !qemu_present() {
        return;
    }
    let root = tempfile::tempdir().expect("tempdir");
    let mut up = Up::start(root.path()).await;
    let api = up.api.clone();

    // Three VMs at once; one counts so that its state can be followed.
    let counter = "i=0; while true; do i=$((i+1)); echo count=$i; sleep 1; done";
    let mut ids = Vec::new();
    for (name, command) in [
        ("counter", vec!["sh", "-c", counter]),
        ("b", vec![]),
        ("c", vec![]),
    ] {
        let mut body = json!({"name": name, "memory_mib": 128});
        if !command.is_empty() {
            body["command"] = json!(command);
        }
        let vm = api.post("/v1/vms", body).await.expect("launch");
        ids.push(vm["id"].as_str().expect("id").to_owned());
    }
    let started = Instant::now();
    for id in &ids {
        wait_vm(
            &api,
            id,
            "running with the guest connected",
            Duration::from_secs(120),
            running_and_connected,
        )
        .await;
    }
    eprintln!(
        "3 VMs running with guests connected {:.1} s after launch",
        started.elapsed().as_secs_f64()
    );
    let (a, b, c) = (&ids[0], &ids[1], &ids[2]);

    // Pause and resume.
    action(&api, a, "pause").await;
    wait_vm(&api, a, "paused", Duration::from_secs(30), |vm| {
        vm["state"] == "paused"
    })
    .await;
    action(&api, a, "resume").await;
    wait_vm(&api, a, "running", Duration::from_secs(30), |vm| {
        vm["state"] == "running"
    })
    .await;

    // The README's own example through the CLI: each action waits until it is done,
    // so the resume finds the VM paused and both succeed.
    let ca = up.data_dir.join("server").join("ca.pem");
    let env = [
        ("HERD_URL", api.url.as_str()),
        ("HERD_TOKEN", api.token.as_str()),
        ("HERD_CA", ca.to_str().expect("utf-8 path")),
    ];
    let cli_config = root.path().join("cli");
    let paused = ok(herd_cli(&cli_config, &env, &["vm", "pause", "counter"]));
    assert!(paused.contains("counter: paused"), "{paused}");
    let vm = api.get(&format!("/v1/vms/{a}")).await;
    assert_eq!(
        vm["state"], "paused",
        "the CLI returned before the VM was paused"
    );
    let resumed = ok(herd_cli(&cli_config, &env, &["vm", "resume", "counter"]));
    assert!(resumed.contains("counter: running"), "{resumed}");
    // Asking again for what already holds is done at once.
    let again = ok(herd_cli(&cli_config, &env, &["vm", "resume", "counter"]));
    assert!(again.contains("counter: running"), "{again}");
    // A VM that is not there is a clear error, not a wait.
    let missing = err(herd_cli(&cli_config, &env, &["vm", "pause", "nosuchvm"]));
    assert!(missing.contains("no VM named"), "{missing}");

    // Suspend to disk and resume: the workload continues where it was.
    wait_vm(&api, a, "some counting", Duration::from_secs(30), |_| true).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    action(&api, a, "suspend").await;
    wait_vm(&api, a, "suspended", Duration::from_secs(60), |vm| {
        vm["state"] == "suspended"
    })
    .await;
    let before = counts(&console(&api, a).await);
    let last_before = *before
        .last()
        .expect("the counter counted before the suspend");
    assert!(
        up.qemu_pid(a)
            .is_none_or(|pid| !up.qemu_processes().contains(&pid)),
        "suspended VM still has a QEMU"
    );
    action(&api, a, "resume").await;
    wait_vm(
        &api,
        a,
        "resumed and connected",
        Duration::from_secs(60),
        running_and_connected,
    )
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = counts(&console(&api, a).await);
    assert!(after.len() > before.len(), "no counting after resume");
    assert!(
        after.windows(2).all(|w| w[1] > w[0]),
        "the counter restarted instead of continuing: {after:?}"
    );
    assert!(after.last() > Some(&last_before));
    eprintln!(
        "counter went from {last_before} to {:?} across suspend/resume",
        after.last()
    );

    // Stop.
    action(&api, b, "stop").await;
    wait_vm(&api, b, "stopped", Duration::from_secs(60), |vm| {
        vm["state"] == "stopped"
    })
    .await;

    // kill -9 of herd (server and agent): the VMs keep running and are re-adopted.
    let pids_before = up.qemu_processes();
    assert_eq!(pids_before.len(), 2, "counter and c run");
    up.proc.kill9();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(up.qemu_processes(), pids_before, "VMs must outlive herd");
    up.restart().await;
    for id in [a, c] {
        wait_vm(
            &api,
            id,
            "running after re-adoption",
            Duration::from_secs(60),
            |vm| vm["state"] == "running",
        )
        .await;
    }
    let mut pids_after = up.qemu_processes();
    pids_after.sort();
    let mut expected = pids_before.clone();
    expected.sort();
    assert_eq!(
        pids_after, expected,
        "re-adoption must not start or duplicate QEMU"
    );

    // A QEMU killed behind herd's back is seen and reported.
    let victim = up.qemu_pid(c).expect("pid of c");
    let killed_at = Instant::now();
    let _ = std::process::Command::new("kill")
        .args(["-9", &victim.to_string()])
        .status();
    wait_vm(
        &api,
        c,
        "error after out-of-band kill",
        Duration::from_secs(10),
        |vm| vm["state"] == "error",
    )
    .await;
    eprintln!(
        "out-of-band kill seen {:.2} s later",
        killed_at.elapsed().as_secs_f64()
    );

    // A workload that exits is reported with its code; the VM powers off.
    let exiter = api
        .post(
            "/v1/vms",
            json!({"name": "exiter", "memory_mib": 128, "command": ["sh", "-c", "exit 3"]}),
        )
        .await
        .expect("launch exiter");
    let exiter = exiter["id"].as_str().expect("id").to_owned();
    let vm = wait_vm(
        &api,
        &exiter,
        "stopped after the workload",
        Duration::from_secs(120),
        |vm| vm["state"] == "stopped",
    )
    .await;
    assert_eq!(vm["guest"]["exit_code"], 3, "{vm}");

    // ...unless its spec says to keep it up.
    let keeper = api
        .post(
            "/v1/vms",
            json!({"name": "keeper", "memory_mib": 128, "keep_running": true,
                   "command": ["sh", "-c", "exit 0"]}),
        )
        .await
        .expect("launch keeper");
    let keeper = keeper["id"].as_str().expect("id").to_owned();
    wait_vm(
        &api,
        &keeper,
        "the workload's exit reported",
        Duration::from_secs(120),
        |vm| vm["guest"]["exit_code"] == 0,
    )
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let vm = api.get(&format!("/v1/vms/{keeper}")).await;
    assert_eq!(vm["state"], "running", "a keep_running VM stays up: {vm}");

    // Delete everything: no QEMU process and no file of any VM is left.
    for id in ids.iter().chain([&exiter, &keeper]) {
        let (status, _) = api
            .request(reqwest::Method::DELETE, &format!("/v1/vms/{id}"), None)
            .await
            .expect("delete");
        assert!(status == 202 || status == 204, "delete {id}: {status}");
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while !api.vms().await.is_empty() {
        assert!(
            Instant::now() < deadline,
            "VMs not purged: {:?}",
            api.vms().await
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(up.qemu_processes().is_empty(), "QEMU left behind");
    let left: Vec<_> = std::fs::read_dir(up.data_dir.join("agent/qemu"))
        .map(|dir| dir.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "VM files left behind: {left:?}");
}
