//! Real VMs through the whole product: `herd up` as a process, the REST API, the agent,
//! QEMU under TCG and herd-guest inside, and the state coming back.

mod common;

use common::{free_port, wait_healthy, Api, Proc};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

fn qemu_present() -> bool {
    let ok = std::process::Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("SKIPPED: qemu-system-x86_64 is not installed (scripts/test installs it)");
    }
    ok
}

struct Up {
    proc: Proc,
    args: Vec<String>,
    log: PathBuf,
    data_dir: PathBuf,
    api: Api,
}

impl Up {
    async fn start(root: &Path) -> Up {
        let data_dir = root.join("data");
        let port = free_port();
        // Images are shared by every test run (built once, under a lock).
        let image_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("herd-e2e-images");
        let args: Vec<String> = vec![
            "up".into(),
            "--data-dir".into(),
            data_dir.display().to_string(),
            "--listen".into(),
            format!("127.0.0.1:{port}"),
            "--drivers".into(),
            "qemu".into(),
            "--accel".into(),
            "tcg".into(),
            "--image-dir".into(),
            image_dir.display().to_string(),
        ];
        let log = root.join("up.log");
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut proc =
            Proc::spawn_env("up", &refs, &log, &[("HERD_GUEST_BINARY", &guest_binary())]);
        let url = format!("http://127.0.0.1:{port}");
        wait_healthy_long(&mut proc, &url, &log).await;
        let token = std::fs::read_to_string(data_dir.join("admin.token"))
            .expect("admin token")
            .trim()
            .to_owned();
        Up {
            proc,
            args,
            log,
            data_dir,
            api: Api {
                url,
                token,
                http: reqwest::Client::new(),
            },
        }
    }

    async fn restart(&mut self) {
        let refs: Vec<&str> = self.args.iter().map(String::as_str).collect();
        self.proc = Proc::spawn_env(
            "up",
            &refs,
            &self.log,
            &[("HERD_GUEST_BINARY", &guest_binary())],
        );
        wait_healthy_long(&mut self.proc, &self.api.url, &self.log).await;
    }

    fn qemu_pid(&self, vm: &str) -> Option<i32> {
        std::fs::read_to_string(self.data_dir.join("agent/qemu").join(vm).join("qemu.pid"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
    }

    /// QEMU processes whose command line names this test's data dir.
    fn qemu_processes(&self) -> Vec<i32> {
        let needle = self.data_dir.display().to_string();
        let mut pids = Vec::new();
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            let state = stat
                .rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .chars()
                .next();
            if matches!(state, Some('Z') | Some('X')) {
                continue;
            }
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline);
            if cmdline.contains("qemu-system") && cmdline.contains(&needle) {
                pids.push(pid);
            }
        }
        pids
    }
}

/// The static herd-guest, built from this tree (wherever the target dir is).
fn guest_binary() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    herd_image::guest_binary(&root, true).expect("building herd-guest")
}

/// `herd up` may first build the guest image; allow for it.
async fn wait_healthy_long(proc: &mut Proc, url: &str, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        if let Some(status) = proc.exited() {
            panic!(
                "herd up exited ({status}): {}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        if let Ok(response) = reqwest::get(format!("{url}/healthz")).await {
            if response.status().is_success() {
                return wait_healthy(url).await;
            }
        }
        assert!(
            Instant::now() < deadline,
            "herd up did not come up: {}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

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

    // Delete everything: no QEMU process and no file of any VM is left.
    for id in ids.iter().chain([&exiter]) {
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
