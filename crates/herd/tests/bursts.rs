//! Bursts through the whole product, on real containers: a user's burst granted in
//! place by the VM's host (its cgroup's CPU quota and memory limit change, the workload
//! gets more done), one the host has no room for refused with the figures, bad asks
//! refused before any host is asked, the lease ended at its expiry by the agent with the
//! server down, and a guest's own ask (`herd-guest burst` inside the container) answered
//! by its host with no server at all.

mod common;

use common::{guest_binary, runc_usable, Containers, Server};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A container's CPU quota in whole vCPUs' worth (µs per period) and its memory limit
/// in MiB, read from its cgroup on the host (v1 here, v2 elsewhere).
fn limits(vm: &str) -> (f64, u64) {
    let read = |path: PathBuf| std::fs::read_to_string(&path).unwrap_or_default();
    let v1 = Path::new("/sys/fs/cgroup/cpu/herd").join(vm);
    if v1.exists() {
        let quota: f64 = read(v1.join("cpu.cfs_quota_us"))
            .trim()
            .parse()
            .unwrap_or(0.0);
        let period: f64 = read(v1.join("cpu.cfs_period_us"))
            .trim()
            .parse()
            .unwrap_or(1.0);
        let memory: u64 = read(
            Path::new("/sys/fs/cgroup/memory/herd")
                .join(vm)
                .join("memory.limit_in_bytes"),
        )
        .trim()
        .parse()
        .unwrap_or(0);
        return (quota / period, memory >> 20);
    }
    let v2 = Path::new("/sys/fs/cgroup/herd").join(vm);
    let max = read(v2.join("cpu.max"));
    let mut words = max.split_whitespace();
    let quota: f64 = words.next().and_then(|q| q.parse().ok()).unwrap_or(0.0);
    let period: f64 = words.next().and_then(|p| p.parse().ok()).unwrap_or(1.0);
    let memory: u64 = read(v2.join("memory.max")).trim().parse().unwrap_or(0);
    (quota / period, memory >> 20)
}

/// How long the container's cgroup has held its processes back for its quota, in ms.
fn throttled_ms(vm: &str) -> u64 {
    let (path, key, per_ms) = if Path::new("/sys/fs/cgroup/cpu/herd").exists() {
        ("/sys/fs/cgroup/cpu/herd", "throttled_time", 1_000_000)
    } else {
        ("/sys/fs/cgroup/herd", "throttled_usec", 1_000)
    };
    std::fs::read_to_string(Path::new(path).join(vm).join("cpu.stat"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key)?.trim().parse::<u64>().ok())
        .unwrap_or(0)
        / per_ms
}

/// Ticks the workload wrote to its console so far: each is a fixed chunk of work done
/// by one of its two busy workers.
fn ticks(console: &Path) -> usize {
    std::fs::read_to_string(console)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.trim() == "tick")
        .count()
}

/// Work per second over `window`, as the workload itself counts it, and how long its
/// quota held it back meanwhile (ms).
fn work_rate(vm: &str, console: &Path, window: Duration) -> (f64, u64) {
    let (before, held) = (ticks(console), throttled_ms(vm));
    std::thread::sleep(window);
    let rate = (ticks(console) - before) as f64 / window.as_secs_f64();
    (rate, throttled_ms(vm) - held)
}

fn console_of(agent_dir: &Path, vm: &str) -> PathBuf {
    agent_dir.join("oci").join(vm).join("console.log")
}

/// Waits until `done`; a timeout says so with the end of every log in `root`.
async fn wait_for(root: &Path, what: &str, timeout: Duration, mut done: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done().await {
        if Instant::now() > deadline {
            let mut logs = String::new();
            for entry in std::fs::read_dir(root).into_iter().flatten().flatten() {
                let path = entry.path();
                if path.extension().is_some_and(|e| e == "log") {
                    let text = std::fs::read_to_string(&path).unwrap_or_default();
                    let tail: Vec<&str> = text.lines().rev().take(30).collect();
                    logs.push_str(&format!("--- {}\n", path.display()));
                    for line in tail.into_iter().rev() {
                        logs.push_str(line);
                        logs.push('\n');
                    }
                }
            }
            panic!("timed out waiting for {what}\n{logs}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs `herd-guest burst ARGS` inside the container, as its workload would.
fn guest_burst(agent_dir: &Path, vm: &str, args: &[&str]) -> (bool, String) {
    let runc_root = agent_dir.join("oci").join(".runc");
    let out = std::process::Command::new("runc")
        .arg("--root")
        .arg(&runc_root)
        .args(["exec", &format!("herd-{vm}"), "herd-guest", "burst"])
        .args(args)
        .output()
        .expect("runc exec");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text.trim().to_owned())
}

/// A user's ask for a burst of `vm`: the status and the answer.
async fn ask(api: &common::Api, vm: &str, body: Value) -> (u16, Value) {
    api.request(
        reqwest::Method::POST,
        &format!("/v1/vms/{vm}/bursts"),
        Some(body),
    )
    .await
    .expect("request")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_burst_is_granted_in_place_refused_without_room_and_ends_on_time_with_the_server_down() {
    if !runc_usable() {
        return;
    }
    let root = tempfile::tempdir().expect("tempdir");
    let mut server = Server::start(root.path(), &[]).await;
    let api = server.client();
    let images = Path::new(env!("CARGO_TARGET_TMPDIR")).join("herd-e2e-images");
    let images = images.display().to_string();
    // Three vCPUs offered: two one-vCPU containers and one vCPU of room for a burst.
    let agent = server
        .start_agent_env(
            root.path(),
            "host1",
            &[
                "--drivers",
                "oci",
                "--cpus",
                "3",
                "--memory-mib",
                "4096",
                "--image-dir",
                &images,
            ],
            &[("HERD_GUEST_BINARY", &guest_binary())],
        )
        .await;
    let _containers = Containers(vec![agent.data_dir.clone()]);
    // The agent may first build the guest image (herd-guest changed), as `herd up` does.
    wait_for(
        root.path(),
        "the host",
        Duration::from_secs(300),
        async || {
            let hosts = api.get("/v1/hosts").await;
            hosts
                .as_array()
                .is_some_and(|h| h.iter().any(|h| h["state"] == "up"))
        },
    )
    .await;
    // Two busy workers, each writing a tick per chunk of work: with one vCPU of quota
    // they share one CPU, with two each has its own.
    let workload = "work() { while :; do i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done; \
                    echo tick; done; }; work & work & wait";
    // c2 only holds its vCPU (this machine may have no more CPUs than c1 can use).
    let mut ids = Vec::new();
    for (name, command) in [("c1", workload), ("c2", "while :; do sleep 1; done")] {
        let vm = api
            .post(
                "/v1/vms",
                json!({"name": name, "hypervisor": "oci", "vcpus": 1, "memory_mib": 64,
                       "command": ["sh", "-c", command]}),
            )
            .await
            .expect("launch");
        ids.push(vm["id"].as_str().expect("id").to_owned());
    }
    for id in &ids {
        wait_for(
            root.path(),
            "the containers running",
            Duration::from_secs(180),
            async || api.get(&format!("/v1/vms/{id}")).await["state"] == "running",
        )
        .await;
    }
    let (c1, c2) = (ids[0].clone(), ids[1].clone());
    assert_eq!(limits(&c1), (1.0, 64), "c1 starts in its shape");
    let console = console_of(&agent.data_dir, &c1);
    let (before, held_before) = work_rate(&c1, &console, Duration::from_secs(4));

    // Bad asks: refused before any host is asked, and nothing changes.
    for (body, why) in [
        (
            json!({"cpus": 0, "memory_mib": 0, "seconds": 30}),
            "asks for neither",
        ),
        (json!({"cpus": 1, "seconds": 0}), "at least one second"),
        (
            json!({"cpus": 9, "seconds": 30}),
            "past what this VM's project allows",
        ),
        (
            json!({"cpus": 1, "seconds": 999999}),
            "past what this VM's project allows",
        ),
    ] {
        let (status, answer) = ask(&api, &c1, body).await;
        assert_eq!(status, 400, "{answer}");
        assert!(answer.to_string().contains(why), "{answer}");
    }
    // A type whose VMs cannot burst is refused as such (the agent runs sim VMs too).
    let sim = api
        .post("/v1/vms", json!({"name": "s1", "hypervisor": "sim"}))
        .await
        .expect("a sim VM");
    let sim = sim["id"].as_str().expect("id").to_owned();
    let (status, answer) = ask(&api, &sim, json!({"cpus": 1, "seconds": 30})).await;
    assert_eq!(status, 409, "{answer}");
    assert!(
        answer.to_string().contains("only oci VMs burst"),
        "{answer}"
    );
    for body in [json!({"cpus": 1, "seconds": -5}), json!({"cpus": 1})] {
        assert_eq!(ask(&api, &c1, body).await.0, 400);
    }
    assert_eq!(limits(&c1), (1.0, 64));

    // Granted in place: the quota and the limit change at once.
    let lease_s: u64 = 20;
    let lease = api
        .post(
            &format!("/v1/vms/{c1}/bursts"),
            json!({"cpus": 1, "memory_mib": 64, "seconds": lease_s}),
        )
        .await
        .expect("a burst with room");
    assert_eq!(lease["cpus"], 1);
    assert!(
        lease["seconds_left"].as_u64() >= Some(lease_s - 2),
        "{lease}"
    );
    assert_eq!(limits(&c1), (2.0, 128), "c1 bursts");
    let shown = api.get(&format!("/v1/vms/{c1}")).await;
    assert_eq!(shown["burst"]["cpus"], 1, "{shown:#}");
    let (during, held_during) = work_rate(&c1, &console, Duration::from_secs(4));
    eprintln!(
        "work per second inside c1: {before:.1} in its shape, {during:.1} with +1 vCPU \
         ({:.2}x); held back by its quota {held_before} ms, then {held_during} ms",
        during / before.max(0.1)
    );
    // Two busy workers need two vCPUs: one vCPU's quota holds them back, two do not.
    // On a machine busy with other work they may not get even one CPU, and then no
    // quota holds them back: the quota itself (checked above) is the outcome then.
    let contended = held_before < 500;
    if contended {
        eprintln!("NOTE: this machine is too busy for c1's quota to hold it back");
    } else {
        assert!(
            held_during * 10 < held_before,
            "the burst let it run: held back {held_before} ms, then {held_during} ms"
        );
    }

    // No room left for c2: refused with the figures that decided it.
    let (status, answer) = ask(&api, &c2, json!({"cpus": 1, "seconds": 30})).await;
    assert_eq!(status, 409, "{answer}");
    let reason = answer["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        reason.contains("no room") && reason.contains("0 vCPUs"),
        "{answer}"
    );
    assert_eq!(limits(&c2), (1.0, 64));

    // The server goes away; the lease still ends at its expiry, by the agent alone.
    let expires_ms = humantime::parse_rfc3339(lease["expires_at"].as_str().expect("expiry"))
        .expect("rfc3339")
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_millis() as i64;
    server.proc.kill9();
    let deadline = Instant::now() + Duration::from_secs(lease_s + 30);
    while limits(&c1).0 > 1.0 {
        assert!(Instant::now() < deadline, "the burst was never taken back");
        std::thread::sleep(Duration::from_millis(20));
    }
    let late_ms = herd_proto::clock::unix_ms() as i64 - expires_ms;
    eprintln!("with the server down, the burst ended {late_ms} ms after its expiry");
    assert!(late_ms > -100, "ended {late_ms} ms early");
    assert!(late_ms < 3_000, "ended {late_ms} ms late");
    assert_eq!(limits(&c1), (1.0, 64), "c1 back in its shape");
    let (after, held_after) = work_rate(&c1, &console, Duration::from_secs(4));
    eprintln!("work per second inside c1 after the burst: {after:.1}, held back {held_after} ms");
    // Whether the quota holds c1 back again depends on how busy the machine is now,
    // which can change since the first window; the quota itself is the outcome.
    if held_after <= 500 {
        eprintln!("NOTE: c1 was not held back after the burst: this machine is busy");
    }

    // The guest asks for itself, with no server at all: its host answers.
    let (granted, text) = guest_burst(&agent.data_dir, &c1, &["--cpu", "1", "--for", "3s"]);
    assert!(granted, "a guest's burst with room: {text}");
    assert!(text.starts_with("granted 1 0 "), "{text}");
    assert_eq!(limits(&c1).0, 2.0);
    let (granted, text) = guest_burst(&agent.data_dir, &c2, &["--cpu", "1", "--for", "3s"]);
    assert!(!granted && text.contains("no room"), "{text}");
    let (granted, text) = guest_burst(&agent.data_dir, &c2, &["--cpu", "5", "--for", "3s"]);
    assert!(!granted && text.contains("past what"), "{text}");
    let (granted, text) = guest_burst(&agent.data_dir, &c2, &["--cpu", "1", "--for", "0s"]);
    assert!(!granted, "{text}");
    let (granted, text) = guest_burst(&agent.data_dir, &c2, &["--cpu", "x", "--for", "3s"]);
    assert!(!granted && text.contains("not a whole number"), "{text}");
    // A guest that asks in a loop is held back; its neighbour is answered as before.
    let flood: Vec<String> = (0..5)
        .map(|_| guest_burst(&agent.data_dir, &c2, &["--memory", "16M", "--for", "3s"]).1)
        .collect();
    assert!(
        flood.iter().any(|t| t.contains("asked too often")),
        "{flood:#?}"
    );
    let (granted, text) = guest_burst(&agent.data_dir, &c1, &["--cpu", "1", "--for", "3s"]);
    assert!(granted, "c1 renews while c2 floods: {text}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while limits(&c1).0 > 1.0 {
        assert!(
            Instant::now() < deadline,
            "the guest's burst was never taken back"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // Back, the server hears the host's leases again: none.
    server.kill9_and_restart(root.path()).await;
    let api = server.client();
    let shown: Value = api.get(&format!("/v1/vms/{c1}")).await;
    assert!(shown["burst"].is_null(), "{shown:#}");

    // The bill has each burst as a line of its own, the guest's too (granted and
    // ended while the server was away), priced by the rate card: 1 per ms per vCPU.
    let per_ms = json!({"peak": 3_600_000, "off_peak": 3_600_000});
    let zero = json!({"peak": 0, "off_peak": 0});
    let put = |path: String, body: Value| {
        let api = api.clone();
        async move {
            let (status, answer) = api
                .request(reqwest::Method::PUT, &path, Some(body))
                .await
                .expect("request");
            assert_eq!(status, 200, "{answer}");
        }
    };
    put(
        "/v1/rate-cards/default".into(),
        json!({"per_hour": zero, "per_cpu_second": zero, "per_gib_hour_memory": zero,
               "per_gib_transferred": zero, "burst_per_vcpu_hour": per_ms}),
    )
    .await;
    let mut bill = Value::Null;
    wait_for(
        root.path(),
        "both bursts billed",
        Duration::from_secs(30),
        async || {
            bill = api.get("/v1/billing").await;
            let bursts = |b: &Value| -> usize {
                b["lines"]
                    .as_array()
                    .and_then(|l| l.iter().find(|l| l["vm"] == c1.as_str()))
                    .and_then(|l| l["bursts"].as_array().map(Vec::len))
                    .unwrap_or(0)
            };
            bursts(&bill) >= 2
        },
    )
    .await;
    let line = bill["lines"]
        .as_array()
        .and_then(|l| l.iter().find(|l| l["vm"] == c1.as_str()))
        .cloned()
        .expect("c1's line");
    let user = &line["bursts"][0];
    assert_eq!(
        (user["cpus"].as_u64(), user["memory_mib"].as_u64()),
        (Some(1), Some(64))
    );
    let cost = user["cost_micros"].as_u64().unwrap_or(0);
    assert!(
        (19_900..=20_200).contains(&cost),
        "a 20 s lease of one vCPU: {line:#}"
    );
    assert_eq!(
        line["bursts"][1]["memory_mib"], 0,
        "the guest's own: {line:#}"
    );
    let spent = bill["total_micros"].as_u64().unwrap_or(0);

    // A burst that could take the project past its budget is refused, and says so.
    put(
        "/v1/projects/default/quota".into(),
        json!({"budget_micros": spent + 1_000}),
    )
    .await;
    let (status, answer) = ask(&api, &c1, json!({"cpus": 1, "seconds": 60})).await;
    assert_eq!(status, 409, "{answer}");
    assert!(answer.to_string().contains("over budget"), "{answer}");
    // An admin's limits hold for the project's VMs.
    put(
        "/v1/projects/default/quota".into(),
        json!({"burst": {"max_cpus": 0, "max_memory_mib": 128, "max_seconds": 60}}),
    )
    .await;
    let (status, answer) = ask(&api, &c1, json!({"cpus": 1, "seconds": 10})).await;
    assert_eq!(status, 400, "{answer}");
    assert!(answer.to_string().contains("allows (+0)"), "{answer}");
    let (status, answer) = ask(&api, &c1, json!({"memory_mib": 64, "seconds": 120})).await;
    assert!(
        status == 400 && answer.to_string().contains("(60 s)"),
        "{answer}"
    );
    assert_eq!(limits(&c1), (1.0, 64), "nothing granted");
    drop(agent);
}
