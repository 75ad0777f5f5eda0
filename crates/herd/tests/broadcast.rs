//! Broadcasts through the whole product, on real containers: four hosts in two racks,
//! a container that wrote a file, its snapshot spread down the chain from its host
//! with `herd vm broadcast --start --watch`; every host sends its first chunk with a
//! flipped byte once (`HERD_FAULT_FLIP_CHUNK`), and every child finds it out and gets
//! it again; every host holds a byte-identical snapshot, every copy starts with the
//! file the original wrote, and bad asks are refused with the reason, the original left
//! running.

mod common;

use common::{err, guest_binary, herd_cli, login_admin, runc_usable, Containers, Server};
use serde_json::{json, Value};
use std::path::Path;
use std::time::{Duration, Instant};

async fn wait_until(what: &str, timeout: Duration, mut done: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn console(agent_dir: &Path, vm: &str) -> String {
    std::fs::read_to_string(agent_dir.join("oci").join(vm).join("console.log")).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_container_goes_to_every_host_and_each_copy_starts_with_its_files() {
    if !runc_usable() {
        return;
    }
    let root = tempfile::tempdir().expect("tempdir");
    let server = Server::start(root.path(), &[]).await;
    let api = server.client();
    let images = Path::new(env!("CARGO_TARGET_TMPDIR")).join("herd-e2e-images");
    let images = images.display().to_string();
    let mut agents = Vec::new();
    for (name, rack) in [("h1", "r1"), ("h2", "r1"), ("h3", "r2"), ("h4", "r2")] {
        let rack = format!("rack={rack}");
        let args = [
            "--drivers",
            "oci",
            "--cpus",
            "2",
            "--memory-mib",
            "2048",
            "--image-dir",
            &images,
            "--label",
            &rack,
        ];
        let agent = server
            .start_agent_env(
                root.path(),
                name,
                &args,
                &[
                    ("HERD_GUEST_BINARY", &guest_binary()),
                    ("HERD_FAULT_FLIP_CHUNK", Path::new("0")),
                ],
            )
            .await;
        agents.push(agent);
    }
    let _containers = Containers(agents.iter().map(|a| a.data_dir.clone()).collect());
    wait_until("four hosts up", Duration::from_secs(300), async || {
        let hosts = api.get("/v1/hosts").await;
        hosts
            .as_array()
            .is_some_and(|h| h.iter().filter(|h| h["state"] == "up").count() == 4)
    })
    .await;

    // The original writes a mark into its writable layer once; a copy finds it.
    let workload = "if [ -f /mark ]; then echo \"found $(cat /mark)\"; \
                    else cat /proc/sys/kernel/random/uuid > /mark; echo wrote; fi; \
                    while :; do sleep 1; done";
    let vm = api
        .post(
            "/v1/vms",
            json!({"name": "c1", "hypervisor": "oci", "vcpus": 1, "memory_mib": 64,
                   "command": ["sh", "-c", workload]}),
        )
        .await
        .expect("launch");
    let id = vm["id"].as_str().expect("id").to_owned();
    wait_until("c1 running", Duration::from_secs(180), async || {
        api.get(&format!("/v1/vms/{id}")).await["state"] == "running"
    })
    .await;
    let record = api.get(&format!("/v1/vms/{id}")).await;
    let source_host = record["host"].as_str().expect("host").to_owned();
    let hosts = api.get("/v1/hosts").await;
    let hostname_of = |host: &str| -> String {
        hosts
            .as_array()
            .and_then(|hs| hs.iter().find(|h| h["id"] == host))
            .and_then(|h| h["hostname"].as_str())
            .unwrap_or_default()
            .to_owned()
    };
    let source = agents
        .iter()
        .find(|a| a.data_dir.ends_with(hostname_of(&source_host)))
        .expect("the source's agent");
    wait_until("c1 wrote its mark", Duration::from_secs(60), async || {
        console(&source.data_dir, &id).contains("wrote")
    })
    .await;
    let mark = std::fs::read_to_string(source.data_dir.join("oci").join(&id).join("upper/mark"))
        .expect("the mark in c1's layer");

    // Bad asks first: refused with the reason, nothing started, c1 still running.
    let cfg = root.path().join("cli");
    login_admin(&cfg, &server);
    let refused = err(herd_cli(
        &cfg,
        &[],
        &["vm", "broadcast", "c1", "--to", "rack=nowhere"],
    ));
    assert!(refused.contains("rack=nowhere"), "{refused}");
    let refused = err(herd_cli(
        &cfg,
        &[],
        &["vm", "broadcast", "c1", "--fanout", "0"],
    ));
    assert!(refused.contains("fanout"), "{refused}");
    let refused = err(herd_cli(&cfg, &[], &["vm", "broadcast", "nosuchvm"]));
    assert!(refused.contains("nosuchvm"), "{refused}");
    assert_eq!(api.get(&format!("/v1/vms/{id}")).await["state"], "running");

    // The broadcast, followed to its end.
    let started = Instant::now();
    let out = herd_cli(&cfg, &[], &["vm", "broadcast", "c1", "--start", "--watch"]);
    let watched = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{watched}");
    eprintln!(
        "{watched}broadcast to 3 hosts in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert!(watched.contains("ended"), "{watched}");
    let list = api.get(&format!("/v1/vms/{id}/broadcasts")).await;
    let b = &list["items"][0];
    assert_eq!(b["phase"], "ended", "{b}");
    let parts = b["hosts"].as_array().expect("hosts");
    assert_eq!(parts.len(), 3);
    assert!(parts.iter().all(|p| p["phase"] == "done"), "{b}");
    // Each host got its first chunk corrupted once by its parent, and fetched it again.
    assert!(parts.iter().all(|p| p["refetched"] == 1), "{b}");
    assert!(b["paused_ms"].as_u64().is_some());
    // A chain from the source, its own rack first.
    let parents: Vec<&Value> = parts.iter().map(|p| &p["parent"]).collect();
    assert_eq!(parents[0], &json!(source_host));
    for w in parts.windows(2) {
        assert_eq!(w[1]["parent"], w[0]["host"], "a chain: {b}");
    }

    // Every host holds the same bytes as the source.
    let bid = b["id"].as_str().expect("id").replace('-', "");
    let held = |dir: &Path| std::fs::read(dir.join("broadcasts").join(&bid).join("layer.tar"));
    let original = held(&source.data_dir).expect("the source's snapshot");
    for agent in &agents {
        assert_eq!(held(&agent.data_dir).expect("a held snapshot"), original);
    }

    // Every copy runs and starts with the original's mark.
    let copies: Vec<String> = parts
        .iter()
        .map(|p| p["copy"].as_str().expect("a copy").to_owned())
        .collect();
    for copy in &copies {
        wait_until("a copy running", Duration::from_secs(180), async || {
            api.get(&format!("/v1/vms/{copy}")).await["state"] == "running"
        })
        .await;
        let vm = api.get(&format!("/v1/vms/{copy}")).await;
        assert!(
            vm["name"].as_str().is_some_and(|n| n.starts_with("c1-h")),
            "{vm}"
        );
        let host = vm["host"].as_str().expect("host");
        let agent = agents
            .iter()
            .find(|a| a.data_dir.ends_with(hostname_of(host)))
            .expect("its agent");
        wait_until("the copy's workload", Duration::from_secs(60), async || {
            console(&agent.data_dir, copy).contains("found")
        })
        .await;
        assert!(
            console(&agent.data_dir, copy).contains(&format!("found {}", mark.trim())),
            "{}",
            console(&agent.data_dir, copy)
        );
    }
    assert_eq!(api.get(&format!("/v1/vms/{id}")).await["state"], "running");
    // Once one has ended, the VM can be broadcast again.
    let again = api
        .post(&format!("/v1/vms/{id}/broadcast"), json!({"fanout": 3}))
        .await
        .expect("a second broadcast");
    assert_eq!(again["hosts"].as_array().map(Vec::len), Some(3));
    for copy in copies.iter().chain([&id]) {
        let _ = api
            .request(reqwest::Method::DELETE, &format!("/v1/vms/{copy}"), None)
            .await;
    }
}

/// A qemu VM with a disk, on the netns testbed: its snapshot (memory and disk in one
/// stream) reaches both other hosts byte for byte, the original is paused only while
/// the stream's last pass goes, and each copy goes on counting from where the
/// original was, not from one.
#[test]
fn a_qemu_vm_with_a_disk_is_copied_to_every_host_and_each_copy_goes_on_counting() {
    use common::cluster::{counts, launch_counter, start_with, vm, wait_vm};
    if !common::qemu_present() {
        return;
    }
    let root = tempfile::tempdir().expect("tempdir");
    let cluster = start_with(root.path(), "qemu", &[]);
    launch_counter(&cluster);
    let console = |name: &str| cluster.cli(&["vm", "console", name]).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(120);
    while counts(&console("m1")).last().copied().unwrap_or(0) < 5 {
        assert!(
            Instant::now() < deadline,
            "m1 never counted: {}",
            console("m1")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let before = counts(&console("m1")).last().copied().unwrap_or(0);

    let started = Instant::now();
    cluster
        .cli(&["vm", "broadcast", "m1", "--start", "--watch"])
        .expect("the broadcast");
    eprintln!(
        "broadcast of m1 to 2 hosts in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let list = cluster
        .cli_json(&["vm", "broadcasts", "m1"])
        .expect("broadcasts");
    let b = &list["items"][0];
    assert_eq!(b["phase"], "ended", "{b}");
    let parts = b["hosts"].as_array().expect("hosts");
    assert_eq!(parts.len(), 2);
    assert!(parts.iter().all(|p| p["phase"] == "done"), "{b}");
    eprintln!(
        "snapshot {} bytes, m1 paused {} ms",
        b["size_bytes"], b["paused_ms"]
    );
    assert_eq!(vm(&cluster, "m1")["state"], "running");

    // The same bytes on all three hosts.
    let bid = b["id"].as_str().expect("id").replace('-', "");
    let held: Vec<Vec<u8>> = (0..3)
        .map(|i| {
            let path = root.path().join(format!("host{i}/broadcasts/{bid}/state"));
            std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        })
        .collect();
    assert!(held[0].len() as u64 == b["size_bytes"].as_u64().unwrap_or(0));
    assert!(held.iter().all(|h| *h == held[0]), "the snapshots differ");

    // Each copy runs on its host and counts on from the snapshot's instant.
    for part in parts {
        let copy = part["copy"].as_str().expect("a copy");
        let view = wait_vm(&cluster, copy, "running", |v| v["state"] == "running");
        assert_eq!(view["host"], part["host"], "{view}");
        let deadline = Instant::now() + Duration::from_secs(60);
        let first = loop {
            if let Some(first) = counts(&console(copy)).first().copied() {
                break first;
            }
            assert!(
                Instant::now() < deadline,
                "the copy never counted: {}",
                console(copy)
            );
            std::thread::sleep(Duration::from_millis(200));
        };
        assert!(
            first > before,
            "the copy started at {first}, not after the {before} m1 had shown: it rebooted"
        );
    }
}

/// A job with a deadline on the netns testbed, its workload longer than the deadline:
/// at the deadline it is copied to three hosts, each copy going on from the snapshot's
/// instant; the first runner to finish is the job's result and every other one is
/// terminated.
#[test]
fn a_job_past_its_deadline_is_copied_to_three_hosts_and_one_result_is_kept() {
    use common::cluster::{start_hosts, vm, wait_vm};
    if !common::qemu_present() {
        return;
    }
    let root = tempfile::tempdir().expect("tempdir");
    let cluster = start_hosts(root.path(), "qemu", 4, &[], &[]);
    let workload = "i=0; while [ $i -lt 45 ]; do i=$((i+1)); echo tick=$i; sleep 1; done; \
                    echo finished";
    cluster
        .cli(&[
            "vm",
            "launch",
            "job",
            "--memory",
            "128",
            "--deadline",
            "20s",
            "--on-deadline",
            "duplicate=3",
            "--",
            "sh",
            "-c",
            workload,
        ])
        .expect("launch");
    let view = wait_vm(&cluster, "job", "duplicated", |v| {
        v["job"]["broadcast"].is_string()
    });
    let at = |key: &str| {
        let text = view
            .pointer(key)
            .and_then(Value::as_str)
            .unwrap_or_default();
        humantime::parse_rfc3339(text).unwrap_or_else(|e| panic!("{key}: {text:?}: {e}"))
    };
    let waited = at("/job/duplicated_at")
        .duration_since(at("/created_at"))
        .unwrap_or_default();
    assert!(
        waited >= Duration::from_secs(20),
        "duplicated {waited:?} after launch"
    );
    let id = view["id"].as_str().expect("id").to_owned();

    let deadline = Instant::now() + Duration::from_secs(180);
    let b = loop {
        let list = cluster
            .cli_json(&["vm", "broadcasts", "job"])
            .expect("broadcasts");
        let b = list["items"][0].clone();
        if b["phase"] == "ended"
            && b["hosts"]
                .as_array()
                .is_some_and(|h| h.iter().all(|p| p["copy"].is_string()))
        {
            break b;
        }
        assert!(
            Instant::now() < deadline,
            "the broadcast did not end: {b:#}"
        );
        std::thread::sleep(Duration::from_millis(300));
    };
    let copies: Vec<String> = b["hosts"]
        .as_array()
        .expect("hosts")
        .iter()
        .map(|p| p["copy"].as_str().expect("copy").to_owned())
        .collect();
    assert_eq!(copies.len(), 3, "{b:#}");
    for copy in &copies {
        let view = vm(&cluster, copy);
        assert_eq!(view["copy_of_broadcast"], b["id"], "{view:#}");
        assert!(
            view["policy"]["deadline"].is_null(),
            "a copy is not duplicated again: {view:#}"
        );
    }

    let view = wait_vm(&cluster, "job", "decided", |v| v["job"]["settled"] == true);
    let winner = view["job"]["winner"].as_str().expect("a winner").to_owned();
    assert_eq!(view["job"]["exit_code"], 0, "{view:#}");
    let runners: Vec<&String> = copies.iter().chain([&id]).collect();
    assert!(
        runners.contains(&&winner),
        "the winner {winner} is not a runner"
    );
    for runner in runners.iter().filter(|r| ***r != winner) {
        wait_vm(&cluster, runner, "terminated", |v| {
            v["state"] == "terminated"
        });
    }
    let console = cluster.cli(&["vm", "console", &winner]).unwrap_or_default();
    assert!(console.contains("finished"), "{console}");
    if winner != id {
        // A copy went on from the snapshot: it never printed the first ticks itself.
        assert!(
            !console.lines().any(|l| l.trim() == "tick=1"),
            "the copy started over: {console}"
        );
    }
    let shown = cluster.cli(&["vm", "show", "job"]).expect("vm show");
    assert!(shown.contains("result: exit code 0"), "{shown}");
    assert_ne!(vm(&cluster, &winner)["state"], "terminated");
}

/// Four hosts of the testbed in a chain, each link at 100 Mbit/s, and a container
/// whose 48 MiB layer goes down it; every sender corrupts its first chunk once. The
/// first host of the chain dies while it forwards: the source gives up on it and feeds
/// the next host itself, which resumes from the chunks it held. Every host that is left
/// holds the source's bytes, each having fetched the bad chunk again.
#[test]
fn when_an_interior_host_dies_its_children_are_fed_and_nothing_corrupt_is_kept() {
    use common::cluster::{start_hosts, wait_vm};
    if !runc_usable() || !common::qemu_present() {
        eprintln!("SKIPPED: needs runc (and the guest image)");
        return;
    }
    let root = tempfile::tempdir().expect("tempdir");
    let mut cluster = start_hosts(
        root.path(),
        "oci",
        4,
        &[],
        &[("HERD_FAULT_FLIP_CHUNK", "0")],
    );
    let _containers = Containers(
        (0..4)
            .map(|i| root.path().join(format!("host{i}")))
            .collect(),
    );
    let fill = "head -c 50331648 /dev/urandom > /big && echo ready; while :; do sleep 1; done";
    cluster
        .cli(&[
            "vm",
            "launch",
            "big",
            "--hypervisor",
            "oci",
            "--memory",
            "128",
            "--",
            "sh",
            "-c",
            fill,
        ])
        .expect("launch");
    let view = wait_vm(&cluster, "big", "running", |v| v["state"] == "running");
    let id = view["id"].as_str().expect("id").to_owned();
    let deadline = Instant::now() + Duration::from_secs(120);
    while !cluster
        .cli(&["vm", "console", "big"])
        .unwrap_or_default()
        .contains("ready")
    {
        assert!(
            Instant::now() < deadline,
            "the container never wrote its file"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let hosts = cluster.cli_json(&["host", "ls"]).expect("host ls");
    let index_of = |host: &str| -> usize {
        hosts
            .as_array()
            .and_then(|hs| hs.iter().find(|h| h["id"] == host))
            .and_then(|h| h["hostname"].as_str())
            .and_then(|n| n.strip_prefix("host"))
            .and_then(|n| n.parse().ok())
            .expect("a testbed host")
    };
    let link = herd_testbed::Shape {
        rate_kbit: 100_000,
        ..herd_testbed::Shape::default()
    };
    for i in 0..4 {
        cluster.bed.shape(i, link).expect("shape");
    }

    let b = cluster
        .cli_json(&["vm", "broadcast", "big"])
        .expect("broadcast");
    let bid = b["id"].as_str().expect("id").to_owned();
    let first = b["hosts"][0]["host"]
        .as_str()
        .expect("the first host")
        .to_owned();
    assert_eq!(b["hosts"][1]["parent"], first.as_str(), "a chain: {b:#}");
    // The first host dies once it holds a few chunks, while it forwards them.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let list = cluster
            .cli_json(&["vm", "broadcasts", "big"])
            .expect("broadcasts");
        let part = &list["items"][0]["hosts"][0];
        if part["chunks"].as_u64().unwrap_or(0) >= 4 {
            assert_ne!(
                part["phase"], "done",
                "the broadcast was too quick to cut: {list:#}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the first host got no chunks: {list:#}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let dead = index_of(&first);
    cluster
        .kill_agent(dead)
        .expect("kill the first host's agent");

    let deadline = Instant::now() + Duration::from_secs(180);
    let b = loop {
        let list = cluster
            .cli_json(&["vm", "broadcasts", "big"])
            .expect("broadcasts");
        let b = list["items"][0].clone();
        if b["phase"] == "ended" || b["phase"] == "failed" {
            break b;
        }
        assert!(
            Instant::now() < deadline,
            "the broadcast did not end: {b:#}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(b["phase"], "ended", "{b:#}");
    let parts = b["hosts"].as_array().expect("hosts");
    assert_eq!(parts[0]["host"], first.as_str());
    assert_eq!(
        parts[0]["phase"], "failed",
        "the dead host was given up on: {b:#}"
    );
    let source = index_of(b["source"].as_str().expect("source"));
    let dir = |i: usize| {
        root.path()
            .join(format!("host{i}/broadcasts/{}", bid.replace('-', "")))
    };
    let original = std::fs::read(dir(source).join("layer.tar")).expect("the source's snapshot");
    for part in &parts[1..] {
        assert_eq!(part["phase"], "done", "{b:#}");
        assert!(
            part["refetched"].as_u64() >= Some(1),
            "the bad chunk was not caught: {b:#}"
        );
        let held =
            std::fs::read(dir(index_of(part["host"].as_str().expect("host"))).join("layer.tar"))
                .expect("a held snapshot");
        assert!(
            held == original,
            "a host holds bytes that differ from the source's"
        );
    }
    let _ = cluster.cli(&["vm", "rm", &id, "--no-wait"]);
}
