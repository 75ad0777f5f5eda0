//! Live migration of real QEMU guests between hosts of the netns testbed: the guest's
//! workload goes on counting across the move, the API names exactly one host at every
//! moment and the source keeps no QEMU; a target agent killed mid-transfer leaves the
//! VM running on its source, and the next host takes it; bad requests change nothing.
//! A resize applies where the VM is when its host has room, moves the VM to the host
//! that has when it has not, and is refused with its reason when no host could. A
//! container moves cold, with the files it wrote.

mod common;

use common::cluster::{counts, launch_counter, start_with, vm, wait_vm};
use common::qemu_present;
use herd_testbed::{Cluster, Shape};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Waits until m1's latest migration has ended `done` (the source's copy removed and
/// acknowledged: until then the VM counts as migrating) and returns its line.
fn migration_done(cluster: &Cluster) -> String {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let shown = cluster.cli(&["vm", "show", "m1"]).expect("show");
        if let Some(line) = shown
            .lines()
            .find(|l| l.starts_with("migration") && l.contains(" done (attempt"))
        {
            return line.to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "the migration did not end done: {shown}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// What a failing check needs to be understood: the VM, its events, the logs' words
/// about migrations.
fn diagnose(cluster: &Cluster, root: &Path) {
    eprintln!("{}", cluster.cli(&["vm", "show", "m1"]).unwrap_or_default());
    eprintln!(
        "{}",
        cluster.cli(&["vm", "events", "m1"]).unwrap_or_default()
    );
    for log in ["server.log", "host0.log", "host1.log", "host2.log"] {
        let text = std::fs::read_to_string(root.join(log)).unwrap_or_default();
        for line in text.lines().filter(|l| {
            ["migrat", "transfer", "VM", "qemu", "WARN", "ERROR"]
                .iter()
                .any(|word| l.contains(word))
        }) {
            eprintln!("{log}: {line}");
        }
    }
}

/// Stops and starts m1; its boot number `boot` (counting from the first restart) must
/// find on its disk every count up to `shown` at least, none missing or repeated.
fn disk_holds_every_count(cluster: &Cluster, root: &Path, shown: u64, boot: usize) {
    cluster.cli(&["vm", "stop", "m1"]).expect("stop");
    wait_vm(cluster, "m1", "stopped", |v| v["state"] == "stopped");
    cluster.cli(&["vm", "start", "m1"]).expect("start");
    let deadline = Instant::now() + Duration::from_secs(120);
    let (disk_last, disk_gaps) = loop {
        let console = cluster.cli(&["vm", "console", "m1"]).expect("console");
        let said = console
            .lines()
            .filter(|l| l.starts_with("disk-gaps="))
            .count();
        if let (true, Some(last), Some(gaps)) = (
            said >= boot,
            last_said(&console, "disk-last"),
            last_said(&console, "disk-gaps"),
        ) {
            break (last, gaps);
        }
        if Instant::now() > deadline {
            diagnose(cluster, root);
            panic!("the restarted guest said nothing of its disk: {console}");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        disk_last >= shown,
        "the disk ends at {disk_last}, before the {shown} the console showed"
    );
    assert_eq!(disk_gaps, 0, "counts went missing or back on the disk");
    wait_vm(cluster, "m1", "running again", |v| v["state"] == "running");
}

/// The last `key=N` a console shows.
fn last_said(console: &str, key: &str) -> Option<u64> {
    console.lines().rev().find_map(|l| {
        l.trim()
            .strip_prefix(key)?
            .strip_prefix('=')?
            .trim()
            .parse()
            .ok()
    })
}

/// Host ids by testbed index, from `herd host ls`.
fn host_ids(cluster: &Cluster) -> Vec<String> {
    let hosts = cluster.cli_json(&["host", "ls"]).expect("host ls");
    let mut named: Vec<(String, String)> = hosts
        .as_array()
        .expect("hosts")
        .iter()
        .map(|h| {
            (
                h["hostname"].as_str().unwrap_or("").to_owned(),
                h["id"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    named.sort();
    named.into_iter().map(|(_, id)| id).collect()
}

/// QEMU processes whose command line names this directory.
fn qemus_under(dir: &Path) -> Vec<i32> {
    let needle = dir.display().to_string();
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        if matches!(
            stat.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .chars()
                .next(),
            Some('Z') | Some('X') | None
        ) {
            continue;
        }
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline);
        let argv0 = cmdline.split('\0').next().unwrap_or("");
        if argv0.contains("qemu-system") && cmdline.contains(&needle) {
            pids.push(pid);
        }
    }
    pids
}

/// Polls the VM's host in the background, for the "one host at every moment" check.
struct HostWatch {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<Option<String>>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl HostWatch {
    fn start(herd: PathBuf, env: Vec<(String, String)>, name: String) -> HostWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (stop2, seen2) = (stop.clone(), seen.clone());
        let thread = std::thread::spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                let out = std::process::Command::new(&herd)
                    .args(["vm", "show", &name, "-o", "json"])
                    .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
                    .output()
                    .expect("herd vm show");
                if out.status.success() {
                    let view: Value = serde_json::from_slice(&out.stdout).expect("json");
                    let host = view["host"].as_str().map(str::to_owned);
                    seen2.lock().expect("lock").push(host);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        HostWatch {
            stop,
            seen,
            thread: Some(thread),
        }
    }

    /// The distinct hosts seen, in order.
    fn finish(mut self) -> Vec<Option<String>> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            thread.join().expect("watcher");
        }
        let seen = self.seen.lock().expect("lock").clone();
        let mut distinct: Vec<Option<String>> = Vec::new();
        for host in seen {
            if distinct.last() != Some(&host) {
                distinct.push(host);
            }
        }
        distinct
    }
}

/// Three qemu hosts on the testbed, up.
fn start(root: &Path) -> Cluster {
    start_sized(root, &[])
}

/// Three qemu hosts on the testbed, up, host `i` with `host_args[i]` besides.
fn start_sized(root: &Path, host_args: &[&[&str]]) -> Cluster {
    start_with(root, "qemu", host_args)
}

/// Starts moving m1 to the host the scheduler picks, without waiting; its target.
fn migrate_no_wait(cluster: &Cluster) -> String {
    let started: Value = serde_json::from_str(
        &cluster
            .cli(&["vm", "migrate", "m1", "--no-wait", "-o", "json"])
            .expect("migrate"),
    )
    .expect("json");
    started["target"].as_str().expect("target").to_owned()
}

/// Slows `host`'s link so that a transfer lasts long enough to be interrupted, starts
/// a migration without waiting, and returns its target once bytes are moving.
fn slow_migration_under_way(cluster: &Cluster, host: usize, root: &Path) -> String {
    let slow = Shape {
        rate_kbit: 40_000,
        ..Shape::default()
    };
    cluster.bed.shape(host, slow).expect("shape");
    let target = migrate_no_wait(cluster);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = cluster.cli(&["vm", "show", "m1"]).expect("show");
        if out.contains("transferring") && out.contains("MiB sent") && !out.contains(" 0 MiB sent")
        {
            return target;
        }
        if Instant::now() > deadline {
            diagnose(cluster, root);
            panic!("the transfer did not start: {out}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_server_killed_mid_transfer_a_cut_link_and_a_source_killed_after_the_switch_over_lose_nothing()
{
    if !qemu_present() {
        return;
    }
    let root = tempfile::tempdir().expect("tempdir");
    let mut cluster = start(root.path());
    let ids = host_ids(&cluster);
    let index_of = |id: &str| ids.iter().position(|h| h == id).expect("a known host");
    let view = launch_counter(&cluster);
    let vm_id = view["id"].as_str().expect("id").to_owned();
    let source = view["host"].as_str().expect("host").to_owned();

    // The server dies mid-transfer and comes back: the move ends as it would have, on
    // the target, with one QEMU in the whole cloud.
    let target = slow_migration_under_way(&cluster, index_of(&source), root.path());
    cluster.kill_server();
    std::thread::sleep(Duration::from_secs(2));
    cluster.restart_server().expect("server back");
    let view = wait_vm(&cluster, "m1", "running on its target", |v| {
        v["state"] == "running" && v["host"] == target.as_str()
    });
    assert_eq!(view["id"], vm_id.as_str());
    let deadline = Instant::now() + Duration::from_secs(60);
    while !qemus_under(&root.path().join(format!("host{}", index_of(&source)))).is_empty() {
        assert!(Instant::now() < deadline, "the source kept its QEMU");
        std::thread::sleep(Duration::from_millis(200));
    }
    if qemus_under(root.path()).len() != 1 {
        diagnose(&cluster, root.path());
        for host in 0..3 {
            let console = root
                .path()
                .join(format!("host{host}/qemu/{vm_id}/console.log"));
            let text = std::fs::read_to_string(&console).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(15).collect();
            eprintln!("host{host} console tail: {tail:?}");
        }
        panic!("not one QEMU in the cloud: {:?}", qemus_under(root.path()));
    }
    cluster.bed.unshape(index_of(&source)).expect("unshape");
    migration_done(&cluster);

    // The target's cable is pulled mid-transfer: nothing moves, the source gives up,
    // and the VM goes to the remaining host instead, never leaving its source before.
    let source = target;
    let cut = slow_migration_under_way(&cluster, index_of(&source), root.path());
    cluster.bed.cut(index_of(&cut)).expect("cut");
    cluster.bed.unshape(index_of(&source)).expect("unshape");
    let deadline = Instant::now() + Duration::from_secs(180);
    let landed = loop {
        let view = vm(&cluster, "m1");
        let host = view["host"].as_str().unwrap_or("").to_owned();
        if host != source && view["state"] == "running" {
            break host;
        }
        assert_eq!(host, source, "the VM left its source before the move");
        if Instant::now() > deadline {
            diagnose(&cluster, root.path());
            panic!("the VM did not move elsewhere: {view:#}");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_ne!(landed, cut, "moved to the cut host");
    let line = migration_done(&cluster);
    assert!(line.contains("(attempt 2)"), "{line}");
    // Healed, the cut host drops its half-received copy.
    cluster.bed.heal(index_of(&cut)).expect("heal");
    let cut_dir = root.path().join(format!("host{}", index_of(&cut)));
    let deadline = Instant::now() + Duration::from_secs(90);
    while cut_dir.join("qemu").join(&vm_id).exists() || !qemus_under(&cut_dir).is_empty() {
        assert!(Instant::now() < deadline, "the cut host kept the VM");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(qemus_under(root.path()).len(), 1, "one QEMU in the cloud");

    // The source's agent killed -9 the moment its QEMU has sent everything and
    // stopped (the switch-over): the target owns the VM, and the source, back, drops
    // its stopped copy.
    // The window between the switch-over and the source's cleanup can be a few
    // milliseconds; a try that misses it (the source's record already gone) goes again
    // from where the VM landed.
    let mut source = landed;
    let mut tries = 0;
    let (source_index, target) = loop {
        tries += 1;
        let source_index = index_of(&source);
        let record = root
            .path()
            .join(format!("host{source_index}"))
            .join("qemu")
            .join(&vm_id)
            .join("state.json");
        let target = migrate_no_wait(&cluster);
        let deadline = Instant::now() + Duration::from_secs(60);
        let seen = loop {
            match std::fs::read_to_string(&record) {
                Ok(text) if text.contains("\"migrated_out\": true") => break true,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => break false,
                _ => {}
            }
            if Instant::now() > deadline {
                diagnose(&cluster, root.path());
                panic!("the source never switched over");
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        if seen {
            break (source_index, target);
        }
        assert!(tries < 3, "missed the switch-over {tries} times");
        eprintln!("missed the switch-over window; again");
        migration_done(&cluster);
        source = target;
    };
    cluster
        .kill_agent(source_index)
        .expect("kill the source's agent");
    // The source's agent relays its QEMU's stream: killed within the last milliseconds
    // of it, the target never gets the whole VM and only the source, back, can run it
    // again. Either way the VM runs on exactly one host, and the other keeps nothing.
    std::thread::sleep(Duration::from_secs(1));
    cluster.restart_agent(source_index).expect("restart");
    let view = wait_vm(&cluster, "m1", "running again", |v| v["state"] == "running");
    assert_eq!(view["id"], vm_id.as_str());
    let owner = view["host"].as_str().unwrap_or_default().to_owned();
    let loser = if owner == target {
        source_index
    } else {
        eprintln!("the stream was cut before its end: the VM went back to its source");
        index_of(&target)
    };
    let loser_dir = root.path().join(format!("host{loser}"));
    let deadline = Instant::now() + Duration::from_secs(90);
    while loser_dir.join("qemu").join(&vm_id).exists() || !qemus_under(&loser_dir).is_empty() {
        if Instant::now() > deadline {
            diagnose(&cluster, root.path());
            panic!("the host that does not run the VM kept a copy");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(qemus_under(root.path()).len(), 1, "one QEMU in the cloud");
}

#[test]
fn a_running_guest_moves_between_hosts_and_a_failed_target_leaves_it_running() {
    if !qemu_present() {
        return;
    }
    let root = tempfile::tempdir().expect("tempdir");
    let mut cluster = start(root.path());
    let ids = host_ids(&cluster);
    let index_of = |id: &str| ids.iter().position(|h| h == id).expect("a known host");

    let view = launch_counter(&cluster);
    let vm_id = view["id"].as_str().expect("id").to_owned();
    let source = view["host"].as_str().expect("host").to_owned();
    let source_dir = root.path().join(format!("host{}", index_of(&source)));
    assert_eq!(qemus_under(&source_dir).len(), 1, "one QEMU on the source");

    // Bad requests: each refused with its reason, nothing changed.
    let refused = |args: &[&str], needle: &str| {
        let err = cluster.cli(args).expect_err("refused");
        assert!(err.to_string().contains(needle), "{args:?}: {err}");
    };
    refused(&["vm", "migrate", "m1", "--to", &source], "already on host");
    refused(&["vm", "migrate", "m1", "--to", "no-such-host"], "no host");
    refused(&["vm", "migrate", "no-such-vm"], "no VM named");
    assert_eq!(vm(&cluster, "m1")["host"], source.as_str());

    // The move, watched from outside.
    std::thread::sleep(Duration::from_secs(2));
    let before = counts(&cluster.cli(&["vm", "console", "m1"]).expect("console"));
    let last_before = *before.last().expect("the workload counts");
    let env: Vec<(String, String)> = vec![
        (
            "XDG_CONFIG_HOME".into(),
            root.path().join("cli").display().to_string(),
        ),
        ("HERD_URL".into(), cluster.url.clone()),
        ("HERD_TOKEN".into(), cluster.token.clone()),
        ("HERD_CA".into(), cluster.ca.display().to_string()),
    ];
    let watch = HostWatch::start(env!("CARGO_BIN_EXE_herd").into(), env.clone(), "m1".into());
    let started = Instant::now();
    let moved = cluster
        .cli(&["vm", "migrate", "m1", "-o", "json"])
        .expect("migrate");
    let took = started.elapsed();
    std::thread::sleep(Duration::from_millis(500));
    let hosts_seen = watch.finish();
    let moved: Value = serde_json::from_str(&moved).expect("migration json");
    eprintln!("migration: {moved:#} in {took:?}");
    assert_eq!(moved["phase"], "done", "{moved:#}");
    let target = moved["target"].as_str().expect("target").to_owned();
    assert_ne!(target, source);
    assert_eq!(
        hosts_seen,
        vec![Some(source.clone()), Some(target.clone())],
        "the VM must be on the source, then on the target, and nowhere else"
    );
    let view = wait_vm(&cluster, "m1", "running on the target", |v| {
        v["state"] == "running" && v["host"] == target.as_str()
    });
    assert_eq!(view["id"], vm_id.as_str());
    let target_dir = root.path().join(format!("host{}", index_of(&target)));
    assert!(
        qemus_under(&source_dir).is_empty(),
        "a QEMU is left on the source"
    );
    assert_eq!(qemus_under(&target_dir).len(), 1, "one QEMU on the target");
    assert!(
        !source_dir.join("qemu").join(&vm_id).exists(),
        "the source kept the VM's files"
    );
    // The same guest, not a new boot: its count goes on from where it was.
    std::thread::sleep(Duration::from_secs(2));
    let after = counts(&cluster.cli(&["vm", "console", "m1"]).expect("console"));
    let first_after = *after.first().expect("the workload counts on the target");
    assert!(
        first_after > last_before,
        "the count started over ({first_after} after {last_before}): the guest rebooted"
    );
    assert!(
        after.windows(2).all(|w| w[1] == w[0] + 1),
        "the count skipped or went back on the target: {after:?}"
    );
    let shown = cluster.cli(&["vm", "show", "m1"]).expect("vm show");
    assert!(
        shown.contains("migration") && shown.contains("done"),
        "{shown}"
    );
    assert!(shown.contains("64 MiB at /data"), "{shown}");
    assert!(
        target_dir
            .join("qemu")
            .join(&vm_id)
            .join("disk.qcow2")
            .exists(),
        "the disk is on the target"
    );

    // The disk came along: stopped and started on the target, the guest finds every
    // count it wrote, before and after the move, with none missing and none repeated.
    let last_shown = *after.last().expect("counts");
    disk_holds_every_count(&cluster, root.path(), last_shown, 1);
    // And across a suspend to disk and a resume.
    cluster.cli(&["vm", "suspend", "m1"]).expect("suspend");
    wait_vm(&cluster, "m1", "suspended", |v| v["state"] == "suspended");
    cluster.cli(&["vm", "resume", "m1"]).expect("resume");
    wait_vm(&cluster, "m1", "running again", |v| v["state"] == "running");
    std::thread::sleep(Duration::from_secs(1));
    let console = cluster.cli(&["vm", "console", "m1"]).expect("console");
    let last_shown = *counts(&console).last().expect("counts");
    disk_holds_every_count(&cluster, root.path(), last_shown, 2);

    // A target agent killed mid-transfer: the VM stays on its source, and the next
    // host takes it. The source's link is slowed so the transfer lasts long enough.
    let source = target;
    let source_index = index_of(&source);
    let first_target = slow_migration_under_way(&cluster, source_index, root.path());
    cluster
        .kill_agent(index_of(&first_target))
        .expect("kill the target's agent");
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut on_source_while_failing = true;
    let final_view = loop {
        let view = vm(&cluster, "m1");
        if view["host"] != source.as_str() && view["host"] != Value::Null {
            break view;
        }
        on_source_while_failing &= view["host"] == source.as_str();
        if Instant::now() > deadline {
            diagnose(&cluster, root.path());
            panic!("no second attempt landed: {view:#}");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(on_source_while_failing);
    let second_target = final_view["host"].as_str().expect("host").to_owned();
    assert_ne!(second_target, first_target, "moved to the killed host");
    cluster.bed.unshape(source_index).expect("unshape");
    wait_vm(&cluster, "m1", "running on the second target", |v| {
        v["state"] == "running" && v["host"] == second_target.as_str()
    });
    let shown = cluster.cli(&["vm", "show", "m1"]).expect("vm show");
    assert!(shown.contains("attempt 2"), "{shown}");
    let events = cluster.cli(&["vm", "events", "m1"]).expect("events");
    assert!(events.contains("attempt 1"), "{events}");
    // The killed host, back, drops what it had of the VM.
    cluster
        .restart_agent(index_of(&first_target))
        .expect("restart");
    let killed_dir = root.path().join(format!("host{}", index_of(&first_target)));
    let deadline = Instant::now() + Duration::from_secs(60);
    while killed_dir.join("qemu").join(&vm_id).exists() || !qemus_under(&killed_dir).is_empty() {
        assert!(Instant::now() < deadline, "the failed target kept the VM");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A resize refused for want of room now, which leaves the VM as it was.
fn refused_now(cluster: &Cluster, args: &[&str]) {
    let before = vm(cluster, "r1");
    let err = cluster.cli(args).expect_err("no room now");
    assert!(err.to_string().contains("has room for"), "{args:?}: {err}");
    let after = vm(cluster, "r1");
    assert_eq!(before["memory_mib"], after["memory_mib"]);
    assert_eq!(before["host"], after["host"]);
}

/// The shape a guest saw at its last boot (`cpus=N`, `mem=MiB`) and whether its disk
/// held the mark an earlier boot left (`kept=1`).
fn shape_seen(cluster: &Cluster, root: &Path, boots: usize) -> (u64, u64, bool) {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let console = cluster.cli(&["vm", "console", "r1"]).expect("console");
        let seen = console.lines().filter(|l| l.starts_with("cpus=")).count();
        // The boot's whole say: its shape, then whether the disk kept its mark (the
        // console may be read between the lines).
        let last_boot: Vec<&str> = console
            .lines()
            .rev()
            .take_while(|l| !l.starts_with("cpus="))
            .collect();
        let kept = last_boot
            .iter()
            .find_map(|l| l.trim().strip_prefix("kept="));
        if seen >= boots {
            if let (Some(cpus), Some(mem), Some(kept)) = (
                last_said(&console, "cpus"),
                last_said(&console, "mem"),
                kept,
            ) {
                return (cpus, mem, kept == "1");
            }
        }
        if Instant::now() > deadline {
            diagnose(cluster, root);
            panic!("boot {boots} did not say its shape: {console}");
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[test]
fn a_resize_applies_in_place_moves_to_a_host_with_room_or_is_refused() {
    if !qemu_present() {
        return;
    }
    let root = tempfile::tempdir().expect("tempdir");
    // Two small hosts and a big one.
    let small: &[&str] = &["--memory-mib", "640"];
    let big: &[&str] = &["--memory-mib", "2048"];
    let cluster = start_sized(root.path(), &[small, small, big]);
    let ids = host_ids(&cluster);
    let shape = "echo cpus=$(grep -c ^processor /proc/cpuinfo); \
         awk '/MemTotal/ { print \"mem=\" int($2 / 1024) }' /proc/meminfo; \
         if [ -f /data/mark ]; then echo kept=1; else echo kept=0; fi; \
         echo x > /data/mark; sync; \
         while true; do sleep 1; done";
    cluster
        .cli(&[
            "vm", "launch", "r1", "--memory", "128", "--disk", "32M", "--", "sh", "-c", shape,
        ])
        .expect("launch");
    wait_vm(&cluster, "r1", "running", |v| v["state"] == "running");
    let (cpus, _, _) = shape_seen(&cluster, root.path(), 1);
    assert_eq!(cpus, 1);
    // Onto a small host first (a console starts afresh on each host).
    cluster
        .cli(&["vm", "migrate", "r1", "--to", "host0"])
        .expect("migrate to host0");
    assert_eq!(vm(&cluster, "r1")["host"], ids[0].as_str());

    // Refused, each with its reason, and nothing changes.
    let refused = |args: &[&str], needle: &str| {
        let err = cluster.cli(args).expect_err("refused");
        assert!(err.to_string().contains(needle), "{args:?}: {err}");
        let view = vm(&cluster, "r1");
        assert_eq!(view["memory_mib"], 128, "{view:#}");
        assert_eq!(view["host"], ids[0].as_str(), "{view:#}");
    };
    refused(&["vm", "resize", "r1", "--memory", "256"], "--restart");
    refused(
        &["vm", "resize", "r1", "--memory", "4096", "--restart"],
        "the largest holds",
    );
    refused(
        &["vm", "resize", "r1", "--memory", "0", "--restart"],
        "memory_mib",
    );
    refused(
        &["vm", "resize", "r1", "--memory", "128"],
        "nothing to change",
    );

    // Room where it is: the VM restarts there in its new shape, its disk intact.
    cluster
        .cli(&[
            "vm",
            "resize",
            "r1",
            "--vcpus",
            "2",
            "--memory",
            "256",
            "--restart",
        ])
        .expect("resize in place");
    let view = wait_vm(&cluster, "r1", "running resized", |v| {
        v["state"] == "running" && v["memory_mib"] == 256
    });
    assert_eq!(
        view["host"],
        ids[0].as_str(),
        "moved though its host had room"
    );
    assert_eq!(view["vcpus"], 2);
    let (cpus, mem, kept) = shape_seen(&cluster, root.path(), 1);
    assert_eq!(cpus, 2, "the guest sees its new vCPUs");
    assert!(mem > 160, "the guest sees {mem} MiB, not its new 256");
    assert!(kept, "the disk lost its content in the restart");

    // No room where it is: it moves to the big host, then takes its new shape there.
    let started = Instant::now();
    let out = cluster
        .cli(&[
            "vm",
            "resize",
            "r1",
            "--memory",
            "1024",
            "--restart",
            "-o",
            "json",
        ])
        .expect("resize with a move");
    eprintln!("resize with a move: {out} in {:?}", started.elapsed());
    let done: Value = serde_json::from_str(&out).expect("json");
    assert_eq!(done["status"], "done", "{done:#}");
    assert!(done["migration"].is_string(), "{done:#}");
    let view = wait_vm(&cluster, "r1", "running on the big host", |v| {
        v["state"] == "running" && v["memory_mib"] == 1024
    });
    assert_eq!(view["host"], ids[2].as_str(), "not on the host with room");
    let (_, mem, kept) = shape_seen(&cluster, root.path(), 1);
    assert!(mem > 800, "the guest sees {mem} MiB, not its new 1024");
    assert!(kept, "the disk did not come along");
    assert!(qemus_under(&root.path().join("host0")).is_empty());
    let shown = cluster.cli(&["vm", "show", "r1"]).expect("show");
    assert!(
        shown.contains("resize") && shown.contains("done"),
        "{shown}"
    );
    // A stopped VM takes its new shape at its next start, and stays stopped until then.
    cluster.cli(&["vm", "stop", "r1"]).expect("stop");
    wait_vm(&cluster, "r1", "stopped", |v| v["state"] == "stopped");
    let out = cluster
        .cli(&["vm", "resize", "r1", "--memory", "768", "-o", "json"])
        .expect("resize a stopped VM");
    let done: Value = serde_json::from_str(&out).expect("json");
    assert_eq!(done["status"], "done", "{done:#}");
    std::thread::sleep(Duration::from_secs(3));
    let view = vm(&cluster, "r1");
    assert_eq!(view["state"], "stopped", "the resize started it: {view:#}");
    assert_eq!(view["memory_mib"], 768);
    cluster.cli(&["vm", "start", "r1"]).expect("start");
    wait_vm(&cluster, "r1", "running again", |v| v["state"] == "running");
    // Its second boot on this host (the console goes on across boots).
    let (_, mem, kept) = shape_seen(&cluster, root.path(), 2);
    assert!(
        (600..800).contains(&mem),
        "the guest sees {mem} MiB, not its new 768"
    );
    assert!(kept, "the disk lost its content across the stop");

    // A host too small for it is refused as a target, and nothing moves.
    let err = cluster
        .cli(&["vm", "migrate", "r1", "--to", "host0"])
        .expect_err("host0 is too small");
    assert!(err.to_string().contains("cannot take"), "{err}");
    assert_eq!(vm(&cluster, "r1")["host"], ids[2].as_str());

    // No room anywhere now, but a host big enough: asked to wait, it waits, and goes
    // ahead when room appears.
    cluster
        .cli(&[
            "vm", "launch", "filler", "--memory", "900", "--", "sleep", "3600",
        ])
        .expect("launch the filler");
    let filler = wait_vm(&cluster, "filler", "running", |v| v["state"] == "running");
    assert_eq!(
        filler["host"],
        ids[2].as_str(),
        "the filler is on the big host"
    );
    refused_now(
        &cluster,
        &["vm", "resize", "r1", "--memory", "1536", "--restart"],
    );
    let waiting: Value = serde_json::from_str(
        &cluster
            .cli(&[
                "vm",
                "resize",
                "r1",
                "--memory",
                "1536",
                "--restart",
                "--wait-for-room",
                "--no-wait",
                "-o",
                "json",
            ])
            .expect("resize that waits"),
    )
    .expect("json");
    assert_eq!(waiting["status"], "deferred", "{waiting:#}");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        vm(&cluster, "r1")["memory_mib"],
        768,
        "applied without room"
    );
    cluster.cli(&["vm", "rm", "filler"]).expect("rm the filler");
    let view = wait_vm(&cluster, "r1", "resized once room appeared", |v| {
        v["state"] == "running" && v["memory_mib"] == 1536
    });
    assert_eq!(view["host"], ids[2].as_str());
    // Its record has the new shape at once; the resize is done once the host says so.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let shown = cluster.cli(&["vm", "show", "r1"]).expect("show");
        if shown.contains("1536 MiB: done") {
            break;
        }
        assert!(Instant::now() < deadline, "the resize did not end: {shown}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let map = cluster.cli_json(&["map"]).expect("map");
    eprintln!("map after the resize: {map}");
}

#[test]
fn a_container_moves_cold_with_the_files_it_wrote() {
    let runc = std::process::Command::new("runc")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !runc || !qemu_present() {
        eprintln!("SKIPPED: needs runc (and the guest image QEMU boots)");
        return;
    }
    let root = tempfile::tempdir().expect("tempdir");
    let cluster = start_with(root.path(), "oci", &[]);
    let ids = host_ids(&cluster);
    let index_of = |id: &str| ids.iter().position(|h| h == id).expect("a known host");
    // Each boot counts itself in a file of its own root, says what the last one left
    // and removes a file of the image (a whiteout in its layer).
    let workload = "n=$(cat /var/boots 2>/dev/null || echo 0); n=$((n+1)); echo $n > /var/boots; \
         echo boot=$n; [ -f /srv/note ] && echo note=$(cat /srv/note); \
         [ -e /bin/yes ] || echo yes=gone; mkdir -p /srv; echo kept > /srv/note; rm -f /bin/yes; \
         sync; while true; do sleep 1; done";
    cluster
        .cli(&[
            "vm",
            "launch",
            "c1",
            "--hypervisor",
            "oci",
            "--",
            "sh",
            "-c",
            workload,
        ])
        .expect("launch");
    let view = wait_vm(&cluster, "c1", "running", |v| v["state"] == "running");
    let vm_id = view["id"].as_str().expect("id").to_owned();
    let source = view["host"].as_str().expect("host").to_owned();
    let started = Instant::now();
    let moved: Value = serde_json::from_str(
        &cluster
            .cli(&["vm", "migrate", "c1", "-o", "json"])
            .expect("migrate"),
    )
    .expect("json");
    eprintln!("container moved: {moved:#} in {:?}", started.elapsed());
    assert_eq!(moved["phase"], "done", "{moved:#}");
    let target = moved["target"].as_str().expect("target").to_owned();
    assert_ne!(target, source);
    wait_vm(&cluster, "c1", "running on its target", |v| {
        v["state"] == "running" && v["host"] == target.as_str()
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let console = loop {
        let console = cluster.cli(&["vm", "console", "c1"]).expect("console");
        if console.contains("boot=2") || Instant::now() > deadline {
            break console;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        console.contains("boot=2"),
        "a second boot, from the moved files: {console}"
    );
    assert!(
        console.contains("note=kept"),
        "the files it wrote moved: {console}"
    );
    assert!(
        console.contains("yes=gone"),
        "the file it removed came back: {console}"
    );
    let source_dir = root
        .path()
        .join(format!("host{}", index_of(&source)))
        .join("oci")
        .join(&vm_id);
    let deadline = Instant::now() + Duration::from_secs(30);
    while source_dir.exists() {
        assert!(Instant::now() < deadline, "the source kept the container");
        std::thread::sleep(Duration::from_millis(200));
    }
    cluster.cli(&["vm", "rm", "c1"]).expect("rm");
}
