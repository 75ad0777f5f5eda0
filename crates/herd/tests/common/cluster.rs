//! Helpers for tests on the netns testbed: a cluster of real hosts, and a counting
//! guest whose console and disk say whether it went on or started over.

use super::guest_binary;
use herd_testbed::{Cluster, ClusterConfig, Testbed};
use serde_json::Value;
use std::path::Path;
use std::time::{Duration, Instant};

/// The counts a workload printed (`count=N` lines).
pub fn counts(console: &str) -> Vec<u64> {
    console
        .lines()
        .filter_map(|l| l.trim().strip_prefix("count=")?.trim().parse().ok())
        .collect()
}

pub fn vm(cluster: &Cluster, name: &str) -> Value {
    cluster.cli_json(&["vm", "show", name]).expect("vm show")
}

pub fn wait_vm(cluster: &Cluster, name: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let view = vm(cluster, name);
        if done(&view) {
            return view;
        }
        assert!(Instant::now() < deadline, "{name}: not {what}: {view:#}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Three hosts with these drivers on the testbed, up.
pub fn start_with(root: &Path, drivers: &str, host_args: &[&[&str]]) -> Cluster {
    start_hosts(root, drivers, 3, host_args, &[])
}

/// `n` hosts with these drivers on the testbed, up, every herd process with `env`.
pub fn start_hosts(
    root: &Path,
    drivers: &str,
    n: usize,
    host_args: &[&[&str]],
    env: &[(&str, &str)],
) -> Cluster {
    let bed = Testbed::create(n).expect("testbed (needs root)");
    let image_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("herd-e2e-images");
    if drivers.contains("qemu") {
        // Built here, outside the namespaces: they cannot reach the kernel's download.
        let built = std::process::Command::new(env!("CARGO_BIN_EXE_herd"))
            .args(["image", "build", "--data-dir"])
            .arg(&image_dir)
            .env("HERD_GUEST_BINARY", guest_binary())
            .status()
            .expect("herd image build");
        assert!(built.success(), "herd image build: {built}");
    }
    let mut config = ClusterConfig::new(Path::new(env!("CARGO_BIN_EXE_herd")), root, drivers);
    config.server_args = ["--default-hypervisor", "qemu", "--host-grace-s", "5"]
        .map(str::to_owned)
        .to_vec();
    config.agent_args = vec![
        "--accel".into(),
        "tcg".into(),
        "--image-dir".into(),
        image_dir.display().to_string(),
        "--util-interval-ms".into(),
        "0".into(),
    ];
    config.env = vec![("HERD_GUEST_BINARY".into(), guest_binary())];
    config
        .env
        .extend(env.iter().map(|(k, v)| ((*k).to_owned(), v.into())));
    config.host_args = host_args
        .iter()
        .map(|args| args.iter().map(|a| a.to_string()).collect())
        .collect();
    let cluster = Cluster::start(bed, config).expect("cluster");
    cluster
        .wait_hosts(Duration::from_secs(300), |hosts| {
            hosts.len() == n && hosts.iter().all(|h| h["state"] == "up")
        })
        .expect("the hosts up");
    cluster
}

/// A guest with a disk that counts every 100 ms, appending each count to /data/count
/// and printing it on its console, running; its view. At boot it says what the disk
/// holds (`disk-last=N`, `disk-gaps=G`: counts not one more than the one before) and
/// goes on from there.
pub fn launch_counter(cluster: &Cluster) -> Value {
    let counter = "if [ -s /data/count ]; then \
         awk 'NR > 1 && $1 != p + 1 { g++ } { p = $1 } \
              END { print \"disk-last=\" p + 0; print \"disk-gaps=\" g + 0 }' /data/count; \
         i=$(tail -n 1 /data/count); else i=0; fi; \
         while true; do i=$((i+1)); echo $i >> /data/count; echo count=$i; sleep 0.1; done";
    cluster
        .cli(&[
            "vm", "launch", "m1", "--memory", "128", "--disk", "64M", "--", "sh", "-c", counter,
        ])
        .expect("launch");
    wait_vm(cluster, "m1", "running", |v| v["state"] == "running")
}
