//! A hostile guest cannot hurt the agent or other VMs: a flood of frames, garbage and
//! oversized messages from one guest leaves the agent serving every other VM.
//!
//! A server and an agent run as separate processes; the agent runs two real guests
//! under QEMU/TCG. The hostile one kills its herd-guest module (a workload runs as
//! root) and takes over the virtio-serial port for 30 s: frames that are valid and carry
//! the VM's real token (read from the kernel command line) as fast as it can write them,
//! then random bytes, then endless maximum-size frames of zeros. Meanwhile the test
//! samples the agent's RSS and pauses and resumes the steady VM over and over, timing
//! each change from the API call until the server shows it. It prints the figures.
//!
//! Asserted: the agent's RSS grows less than 64 MiB; every change of the steady VM
//! reaches the server (within a generous sanity bound, not a speed target); the flood
//! left a bounded number of events on the hostile VM and log lines in the agent.

mod common;

use common::{qemu_present, Api, Server};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long each of the three flood phases lasts (seconds, inside the guest).
const PHASE_SECS: u64 = 10;

/// The hostile workload: waits, kills its module, floods the port, then idles.
/// The valid frames are built by hand: `hello` is postcard's `GuestMsg::Hello` (variant
/// 0, the VM id as 16 bytes, the token, version "x") behind a 4-byte length; `err` is
/// `GuestMsg::Error` (variant 4) with a 1000-byte message.
fn hostile_script(wait_secs: u64) -> String {
    format!(
        r#"
sleep {wait_secs}
kill -9 $(cat /run/herd-guest.pid)
sleep 1
for p in /sys/class/virtio-ports/*; do
  [ "$(cat $p/name)" = herd.0 ] && dev=/dev/${{p##*/}}
done
cmdline=$(cat /proc/cmdline)
vm=${{cmdline##*herd.vm=}}; vm=${{vm%% *}}
tok=${{cmdline##*herd.token=}}; tok=${{tok%% *}}
oct() {{ s=$1; while [ -n "$s" ]; do r=${{s#??}}; printf '\\%03o' 0x${{s%"$r"}}; s=$r; done; }}
byte() {{ printf '\\%03o' $1; }}
uuid=$(oct $(echo $vm | tr -d -))
hello="\\000\\000\\000$(byte $((1 + 1 + 16 + 1 + ${{#tok}} + 1 + 1)))\\000\\020$uuid$(byte ${{#tok}})$tok\\001x"
a=AAAAAAAAAA; a=$a$a$a$a$a$a$a$a$a$a; a=$a$a$a$a$a$a$a$a$a$a
err="\\000\\000\\003\\353\\004\\350\\007$a"
export dev hello err
echo "flood-phase valid $dev"
timeout {PHASE_SECS} sh -c 'while :; do {{ printf "$hello"; i=0; while [ $i -lt 50 ]; do printf "$err"; i=$((i+1)); done; }} > $dev; done'
echo "flood-phase random"
timeout {PHASE_SECS} sh -c 'while :; do cat /dev/urandom > $dev; done'
killall -9 cat 2>/dev/null
echo "flood-phase zeros"
timeout {PHASE_SECS} sh -c 'while :; do {{ printf "\\000\\001\\000\\000"; cat /dev/zero; }} > $dev; done'
killall -9 cat 2>/dev/null
echo "flood-end"
while :; do sleep 1000; done
"#
    )
}

/// Ends this test's QEMU processes (found by the temp dir in their command line) if the
/// test fails before terminating its VMs: they are daemons and outlive the agent.
struct QemuReaper(PathBuf);

impl QemuReaper {
    fn pids(&self) -> Vec<i32> {
        let needle = self.0.display().to_string();
        std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_string_lossy().parse::<i32>().ok())
            .filter(|pid| {
                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                let cmdline = String::from_utf8_lossy(&cmdline);
                cmdline.contains("qemu-system") && cmdline.contains(&needle)
            })
            .collect()
    }
}

impl Drop for QemuReaper {
    fn drop(&mut self) {
        for pid in self.pids() {
            let _ = std::process::Command::new("kill")
                .args(["-9", &pid.to_string()])
                .status();
        }
    }
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

async fn vm(api: &Api, id: &str) -> Value {
    api.get(&format!("/v1/vms/{id}")).await
}

async fn wait_state(api: &Api, id: &str, state: &str, timeout: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let vm = vm(api, id).await;
        if vm["state"] == state {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < timeout,
            "{} not {state} after {timeout:?}: {vm}",
            vm["name"]
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Pauses and resumes the VM; returns the time from each call until the server showed it.
async fn pause_resume(api: &Api, id: &str) -> [Duration; 2] {
    // A sanity bound only: speed is measured, not asserted.
    let sanity = Duration::from_secs(60);
    let mut took = [Duration::ZERO; 2];
    for (i, (action, state)) in [("pause", "paused"), ("resume", "running")]
        .into_iter()
        .enumerate()
    {
        let started = Instant::now();
        api.post(&format!("/v1/vms/{id}/actions/{action}"), json!({}))
            .await
            .unwrap_or_else(|e| panic!("{action}: {e}"));
        wait_state(api, id, state, sanity).await;
        took[i] = started.elapsed();
    }
    took
}

fn console(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// The last flood marker the hostile guest printed.
fn phase(console: &str) -> Option<String> {
    console
        .lines()
        .filter_map(|l| l.split("flood-").nth(1))
        .next_back()
        .map(|s| s.split_whitespace().take(2).collect::<Vec<_>>().join(" "))
}

fn ms(d: Duration) -> u128 {
    d.as_millis()
}

fn summary(label: &str, cycles: &[(String, [Duration; 2])]) {
    if cycles.is_empty() {
        eprintln!("{label}: no cycles");
        return;
    }
    let all: Vec<Duration> = cycles.iter().flat_map(|(_, c)| *c).collect();
    let max = all.iter().max().copied().unwrap_or_default();
    let mean = all.iter().sum::<Duration>() / all.len() as u32;
    eprintln!(
        "{label}: {} changes, mean {} ms, max {} ms",
        all.len(),
        ms(mean),
        ms(max)
    );
    for (phase, [pause, resume]) in cycles {
        eprintln!(
            "    {phase:<16} pause {:>5} ms  resume {:>5} ms",
            ms(*pause),
            ms(*resume)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flooding_guest_leaves_the_agent_bounded_and_other_vms_in_sync() {
    if !qemu_present() {
        return;
    }
    let root = tempfile::tempdir().expect("tempdir");
    let reaper = QemuReaper(root.path().to_path_buf());
    let server = Server::start(root.path(), &["--sync-interval-ms", "250"]).await;
    // Images are shared by every test run (built once, under a lock).
    let image_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("herd-e2e-images");
    let image_dir = image_dir.display().to_string();
    let agent = server
        .start_agent(
            root.path(),
            "h1",
            &[
                "--drivers",
                "qemu",
                "--accel",
                "tcg",
                "--image-dir",
                &image_dir,
            ],
        )
        .await;
    let agent_pid = agent.proc.child.id();
    let agent_log = root.path().join("h1.log");
    let api = server.client();
    api.wait_hosts("the agent up", Duration::from_secs(600), |hosts| {
        hosts.len() == 1 && hosts[0]["state"] == "up"
    })
    .await;

    let launch = |name: &str, command: Vec<String>| {
        let api = api.clone();
        let body = json!({"name": name, "hypervisor": "qemu", "memory_mib": 128,
                          "command": command});
        async move {
            let vm = api.post("/v1/vms", body).await.expect("launch");
            vm["id"].as_str().expect("id").to_owned()
        }
    };
    let steady = launch(
        "steady",
        vec!["sh".into(), "-c".into(), "while :; do sleep 1; done".into()],
    )
    .await;
    wait_state(&api, &steady, "running", Duration::from_secs(180)).await;

    // RSS of the agent process, sampled every 100 ms until the end.
    let samples: Arc<Mutex<Vec<(Instant, u64)>>> = Arc::default();
    let sampler = {
        let samples = samples.clone();
        tokio::spawn(async move {
            while let Some(kib) = rss_kib(agent_pid) {
                samples.lock().expect("samples").push((Instant::now(), kib));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };

    let hostile = launch(
        "hostile",
        vec!["sh".into(), "-c".into(), hostile_script(40)],
    )
    .await;
    let hostile_console = root
        .path()
        .join("h1/qemu")
        .join(&hostile)
        .join("console.log");
    wait_state(&api, &hostile, "running", Duration::from_secs(180)).await;

    // Baseline: both guests up, nobody flooding.
    let mut baseline = Vec::new();
    while baseline.len() < 5 && phase(&console(&hostile_console)).is_none() {
        baseline.push(("baseline".to_owned(), pause_resume(&api, &steady).await));
    }
    assert!(
        !baseline.is_empty(),
        "the flood began before any baseline measurement; lengthen the hostile wait"
    );
    let rss_before = samples
        .lock()
        .expect("samples")
        .iter()
        .map(|s| s.1)
        .max()
        .unwrap_or(0);
    let flood_wait = Instant::now();
    while phase(&console(&hostile_console)).is_none() {
        assert!(
            flood_wait.elapsed() < Duration::from_secs(120),
            "the hostile guest never began its flood: {}",
            console(&hostile_console)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let flood_started = Instant::now();
    eprintln!("flood began: {:?}", phase(&console(&hostile_console)));

    // Under the flood: keep changing the steady VM until the flood ends.
    let mut flooded = Vec::new();
    loop {
        let now = phase(&console(&hostile_console)).unwrap_or_default();
        if now.starts_with("end") {
            break;
        }
        assert!(
            flood_started.elapsed() < Duration::from_secs(PHASE_SECS * 3 + 120),
            "the flood did not end: {}",
            console(&hostile_console)
        );
        flooded.push((now, pause_resume(&api, &steady).await));
    }
    let flood_ended = Instant::now();
    let mut after = Vec::new();
    for _ in 0..3 {
        after.push(("after".to_owned(), pause_resume(&api, &steady).await));
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    sampler.abort();

    let samples = samples.lock().expect("samples").clone();
    let during: Vec<u64> = samples
        .iter()
        .filter(|(at, _)| *at >= flood_started && *at <= flood_ended)
        .map(|s| s.1)
        .collect();
    let rss_peak = during.iter().copied().max().unwrap_or(0);
    let rss_after = samples.last().map(|s| s.1).unwrap_or(0);

    let events = api
        .get(&format!("/v1/vms/{hostile}/events?limit=1000"))
        .await["items"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let guest_errors = events
        .iter()
        .filter(|e| e["kind"] == "vm.guest_error")
        .count();
    let log = std::fs::read_to_string(&agent_log).unwrap_or_default();
    let channel_lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(&hostile) && l.contains("guest channel"))
        .collect();
    let hostile_now = vm(&api, &hostile).await;
    let steady_now = vm(&api, &steady).await;

    eprintln!("--- guest flood: {} s in three phases ---", PHASE_SECS * 3);
    eprintln!(
        "agent RSS: before {} KiB, peak during the flood {} KiB, after {} KiB ({} samples)",
        rss_before,
        rss_peak,
        rss_after,
        samples.len()
    );
    summary("baseline", &baseline);
    summary("under flood", &flooded);
    summary("after", &after);
    eprintln!(
        "hostile VM: {} events, {guest_errors} of them guest errors; state {}",
        events.len(),
        hostile_now["state"]
    );
    eprintln!("agent log lines about the hostile channel:");
    for line in &channel_lines {
        eprintln!("    {line}");
    }

    // Memory stays bounded.
    assert!(rss_before > 0 && rss_peak > 0, "no RSS samples");
    assert!(
        rss_peak.saturating_sub(rss_before) < 64 * 1024,
        "agent RSS grew from {rss_before} KiB to {rss_peak} KiB"
    );
    // Every change of the steady VM reached the server during the flood (each
    // pause_resume waited for it), and its guest is still connected.
    assert!(!flooded.is_empty(), "no change measured under the flood");
    assert_eq!(steady_now["state"], "running", "{steady_now}");
    assert_eq!(steady_now["guest"]["connected"], true, "{steady_now}");
    // The hostile guest hurt only itself, and only so much: its valid frames with the
    // real token got through (a burst, then about one report a second), the rest was
    // cut off; the agent said so in a few lines, not one per bad frame.
    assert_eq!(hostile_now["state"], "running", "{hostile_now}");
    assert!(
        guest_errors > 0,
        "the hostile guest's authenticated frames never arrived"
    );
    assert!(
        guest_errors <= 64 + 3 * PHASE_SECS as usize + 10,
        "{guest_errors} guest error events"
    );
    assert!(
        !channel_lines.is_empty() && channel_lines.len() <= 3 * PHASE_SECS as usize / 10 + 4,
        "{} agent log lines about the hostile channel",
        channel_lines.len()
    );

    for id in [&hostile, &steady] {
        api.post(&format!("/v1/vms/{id}/actions/terminate"), json!({}))
            .await
            .expect("terminate");
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while !reaper.pids().is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
