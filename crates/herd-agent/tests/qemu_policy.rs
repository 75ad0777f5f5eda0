//! Self-management policies enforced by herd-guest inside real VMs (QEMU/TCG), observed
//! from the driver's guest events (tier 3 in conventions.md). Several VMs run at once so
//! the whole file stays under two minutes; tests skip when qemu-system-x86_64 is absent.

use herd_agent::driver::Driver;
use herd_agent::drivers::qemu::launch::Accel;
use herd_agent::drivers::qemu::{AccelChoice, QemuConfig, QemuDriver};
use herd_proto::guest::GuestMsg;
use herd_proto::policy::*;
use herd_proto::wire::{VmId, VmSpec};
use herd_proto::VmState;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn qemu_present() -> bool {
    let ok = std::process::Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("SKIPPED: qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)");
    }
    ok
}

/// Builds the guest image once per test process; returns the data dir holding it.
fn data_dir() -> PathBuf {
    static BUILT: Mutex<Option<PathBuf>> = Mutex::new(None);
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(dir) = built.as_ref() {
        return dir.clone();
    }
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("herd-qemu-policy-tests");
    let root = herd_image::workspace_root(env!("CARGO_MANIFEST_DIR"));
    let guest = match std::env::var_os("HERD_GUEST_BINARY") {
        Some(p) => PathBuf::from(p),
        None => herd_image::guest_binary(&root, true).unwrap_or_else(|e| {
            eprintln!("WARNING: cannot rebuild herd-guest ({e}); using the last build");
            herd_image::guest_binary(&root, false).expect("building herd-guest")
        }),
    };
    let info = herd_image::build_image(&dir, "default", &guest, |m| eprintln!("image: {m}"))
        .expect("building the guest image");
    eprintln!(
        "herd-guest binary {} bytes (limit 3 MB), initrd {} bytes",
        info.guest_bytes, info.initrd_bytes
    );
    assert!(info.guest_bytes <= 3_000_000, "herd-guest is too big");
    *built = Some(dir.clone());
    dir
}

type Log = Arc<Mutex<Vec<(VmId, u64, GuestMsg)>>>;

fn open(state: &Path) -> (QemuDriver, herd_agent::agent::GuestEvents) {
    let mut config = QemuConfig::new(herd_image::images_dir(&data_dir()));
    config.accel = AccelChoice::Force(Accel::Tcg);
    config.stop_timeout = Duration::from_secs(15);
    let (tx, rx) = herd_agent::agent::guest_event_channel();
    let driver = QemuDriver::open(state.to_path_buf(), config, tx).expect("open driver");
    (driver, rx)
}

/// Records every guest message with the wall-clock time it arrived.
fn collect(mut rx: herd_agent::agent::GuestEvents) -> Log {
    let log: Log = Arc::default();
    let l = log.clone();
    tokio::spawn(async move {
        while let Some((id, msg)) = rx.recv().await {
            l.lock().expect("log").push((id, unix_ms(), msg));
        }
    });
    log
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64
}

fn enforce(action: PolicyAction, warn: Option<u64>) -> Enforcement {
    Enforcement { action, warn }
}

fn spec(command: &[&str], policy: PolicySpec) -> VmSpec {
    VmSpec {
        name: "p".into(),
        hypervisor: "qemu".into(),
        vcpus: 1,
        memory_mib: 128,
        image: "default".into(),
        command: command.iter().map(|s| s.to_string()).collect(),
        policy,
        keep_running: false,
        disk_mib: 0,
        burst: Default::default(),
        seed: None,
    }
}

fn lifespan(seconds: u64, warn: Option<u64>) -> PolicySpec {
    PolicySpec {
        lifespan: Some(Lifespan {
            max_seconds: Some(seconds),
            end_at: None,
            enforce: enforce(PolicyAction::Stop, warn),
        }),
        ..Default::default()
    }
}

const HOG: &[&str] = &["/bin/sh", "-c", "while :; do :; done"];
const IDLE: &[&str] = &["/bin/sh", "-c", "sleep 1000"];

/// The VM's birth as the driver recorded it.
fn born(driver: &QemuDriver, id: VmId) -> u64 {
    let state = std::fs::read_to_string(driver.vm_dir(id).join("state.json")).expect("state");
    let v: serde_json::Value = serde_json::from_str(&state).expect("json");
    v["born_unix_ms"].as_u64().expect("born_unix_ms")
}

fn console(driver: &QemuDriver, id: VmId) -> String {
    std::fs::read_to_string(driver.vm_dir(id).join("console.log")).unwrap_or_default()
}

/// Waits for the guest's PolicyAction; returns (warnings before it with their arrival
/// times, the action's arrival time, rule, action, reason).
async fn wait_action(
    log: &Log,
    driver: &QemuDriver,
    id: VmId,
    within: Duration,
) -> (Vec<(u64, String)>, u64, String, PolicyAction, String) {
    let until = Instant::now() + within;
    loop {
        {
            let log = log.lock().expect("log");
            let mine = log.iter().filter(|(from, _, _)| *from == id);
            let mut warnings = Vec::new();
            for (_, at, msg) in mine {
                match msg {
                    GuestMsg::PolicyWarning { rule, message } => {
                        warnings.push((*at, format!("{rule}: {message}")))
                    }
                    GuestMsg::PolicyAction {
                        rule,
                        action,
                        reason,
                    } => return (warnings, *at, rule.clone(), *action, reason.clone()),
                    _ => {}
                }
            }
        }
        assert!(
            Instant::now() < until,
            "no policy action from {id} within {within:?}; console:\n{}",
            console(driver, id)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn state_of(driver: &QemuDriver, id: VmId) -> Option<VmState> {
    driver
        .list()
        .await
        .expect("list")
        .into_iter()
        .find(|v| v.id == id)
        .map(|v| v.state)
}

async fn wait_state(driver: &QemuDriver, id: VmId, want: VmState, within: Duration) {
    let until = Instant::now() + within;
    loop {
        let state = state_of(driver, id).await;
        if state == Some(want) {
            return;
        }
        assert!(
            Instant::now() < until,
            "VM {id} is {state:?}, not {want}, after {within:?}; console:\n{}",
            console(driver, id)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn process_alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            let state = s
                .rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .chars()
                .next();
            !matches!(state, Some('Z') | Some('X'))
        })
        .unwrap_or(false)
}

/// The seconds figure that follows `prefix` in a reason such as "... cpu 3.2 of 3 s".
fn number_after(text: &str, prefix: &str) -> f64 {
    let rest = &text[text
        .find(prefix)
        .unwrap_or_else(|| panic!("{prefix:?} in {text:?}"))
        + prefix.len()..];
    rest.split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("a number after {prefix:?} in {text:?}"))
}

/// utime + stime, in ms, of a /proc/<pid>/stat line printed by the workload.
fn stat_cpu_ms(line: &str) -> u64 {
    let rest = line.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<u64> = rest
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    (f[10] + f[11]) * 10
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guests_enforce_their_own_policies() {
    if !qemu_present() {
        return;
    }
    let started = Instant::now();
    let state = tempfile::tempdir().expect("tempdir");
    let (driver, rx) = open(state.path());
    let log = collect(rx);
    let id = |n: u128| VmId::from_u128(0x7000 + n);
    let (a, b, c, d, e, g) = (id(1), id(2), id(3), id(4), id(5), id(7));

    // (g) runs throughout: measures herd-guest's CPU over 30 s of idling, then kills the
    // module, which must leave the VM running (init neither powers off nor restarts it).
    let measure = "sleep 3; p=$(cat /run/herd-guest.pid); \
        echo M0 $(cat /proc/$p/stat); echo I0 $(cat /proc/1/stat); sleep 30; \
        echo M1 $(cat /proc/$p/stat); echo I1 $(cat /proc/1/stat); \
        kill -9 $p; echo KILLED; sleep 1000";
    let waves: [Vec<(VmId, VmSpec)>; 2] = [
        vec![
            (
                c,
                spec(
                    IDLE,
                    PolicySpec {
                        idle: Some(Idle {
                            cpu_below_permille: 150,
                            net_below_bps: 1000,
                            for_seconds: 5,
                            warmup_seconds: 2,
                            enforce: enforce(PolicyAction::Stop, Some(2)),
                        }),
                        ..Default::default()
                    },
                ),
            ),
            (g, spec(&["/bin/sh", "-c", measure], PolicySpec::default())),
        ],
        vec![
            (
                b,
                spec(
                    HOG,
                    PolicySpec {
                        budget: Some(Budget {
                            cpu_seconds: Some(15),
                            mem_gib_hours_milli: None,
                            net_bytes: None,
                            enforce: enforce(PolicyAction::Stop, Some(800)),
                        }),
                        ..Default::default()
                    },
                ),
            ),
            (
                d,
                spec(
                    HOG,
                    PolicySpec {
                        overuse: Some(Overuse {
                            cpu_above_permille: Some(500),
                            mem_above_mib: None,
                            net_above_bps: None,
                            for_seconds: 3,
                            enforce: enforce(PolicyAction::Stop, Some(1)),
                        }),
                        ..Default::default()
                    },
                ),
            ),
            (
                e,
                spec(
                    HOG,
                    PolicySpec {
                        cost_cap: Some(CostCap {
                            max_micros: 15_000,
                            rates: RateCard {
                                per_cpu_second: Rate {
                                    peak: 1_000,
                                    off_peak: 1_000,
                                },
                                ..Default::default()
                            },
                            enforce: enforce(PolicyAction::Stop, Some(500)),
                        }),
                        ..Default::default()
                    },
                ),
            ),
        ],
    ];
    let [wave1, wave2] = waves;
    // Alone, so that its boot (slow under TCG when VMs boot together) fits in 6 s.
    driver
        .create(a, &spec(IDLE, lifespan(6, Some(3))))
        .await
        .expect("create");

    // (a) Lifespan 6 s, warned 3 s ahead: warning first, action on time, VM powered off.
    let born_a = born(&driver, a);
    let (warnings, at, rule, action, reason) =
        wait_action(&log, &driver, a, Duration::from_secs(60)).await;
    eprintln!(
        "(a) lifespan: warnings {warnings:?}; action {action:?} at born+{} ms: {reason}",
        at - born_a
    );
    eprintln!(
        "(a) warning at born+{} ms",
        warnings.first().map(|w| w.0 - born_a).unwrap_or(0)
    );
    if std::env::var_os("HERD_TEST_CONSOLE").is_some() {
        eprintln!("console:\n{}", console(&driver, a));
    }
    assert_eq!((rule.as_str(), action), ("lifespan", PolicyAction::Stop));
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(warnings[0].0 <= at);
    assert!(
        at >= born_a + 6_000 - 100,
        "acted early: born+{} ms",
        at - born_a
    );
    // On time, or, when a loaded machine booted the guest after its deadline, at once
    // after its module came up.
    let hello_a = log
        .lock()
        .expect("log")
        .iter()
        .find(|(id, _, msg)| *id == a && matches!(msg, GuestMsg::Hello { .. }))
        .map(|(_, t, _)| *t)
        .unwrap_or(born_a);
    assert!(
        at <= (born_a + 7_500).max(hello_a + 1_500),
        "acted late: born+{} ms, module up at born+{} ms",
        at - born_a,
        hello_a.saturating_sub(born_a)
    );
    wait_state(&driver, a, VmState::Stopped, Duration::from_secs(20)).await;

    for (vm, s) in &wave1 {
        driver.create(*vm, s).await.expect("create");
    }
    lifespan_is_enforced_with_no_host_connected(&log).await;

    // (c) Idle 5 s after a 2 s warm-up, on `sleep 1000`.
    let born_c = born(&driver, c);
    let (warnings, at, rule, action, reason) =
        wait_action(&log, &driver, c, Duration::from_secs(60)).await;
    eprintln!(
        "(c) idle: warnings {warnings:?}; action {action:?} at born+{} ms: {reason}",
        at - born_c
    );
    assert_eq!((rule.as_str(), action), ("idle", PolicyAction::Stop));
    assert_eq!(warnings.len(), 1);
    assert!(at >= born_c + 7_000, "idle fired before warm-up + 5 s");
    assert!(number_after(&reason, "idle for ") >= 5.0, "{reason}");
    wait_state(&driver, c, VmState::Stopped, Duration::from_secs(20)).await;

    for (vm, s) in &wave2 {
        driver.create(*vm, s).await.expect("create");
    }
    // (b) CPU budget against a hog: warning at 80%, action within one sample (at most
    // 1 s of CPU on 1 vCPU) of crossing the limit. The guest counts CPU since boot, and a
    // TCG boot next to others takes up to ~7 CPU-seconds, so the limit is 15 s, not 3.
    let (warnings, _, rule, action, reason) =
        wait_action(&log, &driver, b, Duration::from_secs(60)).await;
    eprintln!("(b) budget: warnings {warnings:?}; action {action:?}: {reason}");
    assert_eq!((rule.as_str(), action), ("budget", PolicyAction::Stop));
    assert_eq!(warnings.len(), 1);
    let warned_at = number_after(&warnings[0].1, "cpu ");
    assert!((12.0..15.0).contains(&warned_at), "{warnings:?}");
    let used = number_after(&reason, "cpu ");
    assert!(
        (15.0..=16.1).contains(&used),
        "fired at {used} cpu-s: {reason}"
    );

    // (d) Over-use: CPU above 500 permille for 3 s.
    let (warnings, _, rule, action, reason) =
        wait_action(&log, &driver, d, Duration::from_secs(60)).await;
    eprintln!("(d) overuse: warnings {warnings:?}; action {action:?}: {reason}");
    assert_eq!((rule.as_str(), action), ("overuse", PolicyAction::Stop));
    assert_eq!(warnings.len(), 1);
    let streak = number_after(&reason, "over-use for ");
    assert!((3.0..=4.1).contains(&streak), "{reason}");

    // (e) Cost cap: 0.001 per CPU-second, capped at 0.015 (see (b) for why not lower).
    let (warnings, _, rule, action, reason) =
        wait_action(&log, &driver, e, Duration::from_secs(60)).await;
    eprintln!("(e) cost cap: warnings {warnings:?}; action {action:?}: {reason}");
    assert_eq!((rule.as_str(), action), ("cost_cap", PolicyAction::Stop));
    assert_eq!(warnings.len(), 1);
    let cost = number_after(&reason, "cost ");
    assert!((0.015..=0.0161).contains(&cost), "{reason}");
    for vm in [b, d, e] {
        wait_state(&driver, vm, VmState::Stopped, Duration::from_secs(20)).await;
    }

    // Every policy VM reported progress along the way, and herd-guest's memory.
    {
        let log = log.lock().expect("log");
        for vm in [a, b, c, d, e] {
            assert!(log.iter().any(|(from, _, m)| *from == vm
                && (matches!(m, GuestMsg::PolicyProgress { items } if !items.is_empty())
                    || matches!(m, GuestMsg::PolicyAction { .. }))));
        }
        let rss: Vec<u64> = log
            .iter()
            .filter_map(|(_, _, m)| match m {
                GuestMsg::Status { guest_rss_kib, .. } => Some(*guest_rss_kib),
                _ => None,
            })
            .collect();
        let max = rss.iter().max().copied().unwrap_or(0);
        eprintln!("herd-guest RSS (module + init) over all Status reports: max {max} KiB");
        assert!(max > 0 && max <= 8 * 1024, "RSS {max} KiB");
    }

    // (g) Idle CPU of herd-guest over 30 s, and a killed module.
    let until = Instant::now() + Duration::from_secs(90);
    while !console(&driver, g).contains("KILLED") {
        assert!(
            Instant::now() < until,
            "measuring VM did not finish:\n{}",
            console(&driver, g)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let con = console(&driver, g);
    let line = |tag: &str| {
        con.lines()
            .find_map(|l| l.trim().strip_prefix(tag))
            .unwrap_or_else(|| panic!("{tag} in console:\n{con}"))
            .to_string()
    };
    let module_ms = stat_cpu_ms(&line("M1 ")) - stat_cpu_ms(&line("M0 "));
    let init_ms = stat_cpu_ms(&line("I1 ")) - stat_cpu_ms(&line("I0 "));
    eprintln!(
        "herd-guest idle CPU over 30 s: module {module_ms} ms, init {init_ms} ms ({:.2}% of a CPU)",
        (module_ms + init_ms) as f64 / 300.0
    );
    assert!(module_ms + init_ms <= 300, "more than 1% of a CPU");
    let pid_g = driver.pid(g).expect("pid");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(process_alive(pid_g), "the VM went down with its module");
    assert!(console(&driver, g).contains("the module was killed"));
    driver.terminate(g).await.expect("terminate");
    for vm in [a, b, c, d, e] {
        driver.terminate(vm).await.expect("terminate");
    }
    eprintln!("all policy checks passed in {:?}", started.elapsed());
}

/// (f) A guest with no host connected still ends itself on time. Its own driver (and
/// state dir), dropped once the guest said hello, so nothing is connected to the guest.
async fn lifespan_is_enforced_with_no_host_connected(log: &Log) {
    const LIFE_MS: u64 = 20_000;
    let state = tempfile::tempdir().expect("tempdir");
    let id = VmId::from_u128(0x7006);
    let (driver, rx) = open(state.path());
    let own = collect(rx);
    driver
        .create(id, &spec(IDLE, lifespan(LIFE_MS / 1000, Some(5))))
        .await
        .expect("create");
    wait_state(&driver, id, VmState::Running, Duration::from_secs(60)).await;
    let born = born(&driver, id);
    let pid = driver.pid(id).expect("pid");
    // Let the greeting (and the clock sync after it) through, then go away entirely.
    tokio::time::sleep(Duration::from_millis(500)).await;
    drop(driver);
    let dropped_at = unix_ms();
    assert!(
        dropped_at < born + LIFE_MS - 5_000,
        "booting took too long for this test ({} ms)",
        dropped_at - born
    );
    while process_alive(pid) {
        assert!(
            unix_ms() < born + LIFE_MS + 2_000,
            "QEMU still running 2 s after the deadline"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let gone = unix_ms();
    eprintln!(
        "(f) no host: QEMU exited at born+{} ms (deadline born+{LIFE_MS})",
        gone - born
    );
    assert!(
        gone >= born + 15_000 - 200,
        "ended early at born+{} ms",
        gone - born
    );
    // Nothing reached the (gone) host after the drop; the guest kept its reports.
    let _ = log;
    let late = own
        .lock()
        .expect("log")
        .iter()
        .filter(|(_, at, m)| *at > dropped_at && matches!(m, GuestMsg::PolicyAction { .. }))
        .count();
    assert_eq!(late, 0);
    // A new driver sees the VM powered off (the action report is lost with the VM; the
    // outbox only survives while the VM does).
    let (driver, _rx) = open(state.path());
    wait_state(&driver, id, VmState::Stopped, Duration::from_secs(20)).await;
    driver.terminate(id).await.expect("terminate");
}
