//! Real VMs under QEMU/TCG with herd-guest inside (tier 3 in conventions.md).
//!
//! The image is built once per run from Debian's packages (kernel .deb cached under the
//! cargo target tmpdir). Tests skip, saying so, when qemu-system-x86_64 is absent.

use herd_agent::driver::Driver;
use herd_agent::drivers::qemu::launch::Accel;
use herd_agent::drivers::qemu::{AccelChoice, QemuConfig, QemuDriver};
use herd_proto::guest::GuestMsg;
use herd_proto::wire::{VmId, VmSpec};
use herd_proto::VmState;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

type Events = herd_agent::agent::GuestEvents;

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
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("herd-qemu-tests");
    let root = herd_image::workspace_root(env!("CARGO_MANIFEST_DIR"));
    let guest = match std::env::var_os("HERD_GUEST_BINARY") {
        Some(p) => PathBuf::from(p),
        // Rebuild so the image has the current herd-guest; if the shared workspace does
        // not build right now, fall back to the binary built last, and say so.
        None => herd_image::guest_binary(&root, true).unwrap_or_else(|e| {
            eprintln!("WARNING: cannot rebuild herd-guest ({e}); using the last build");
            herd_image::guest_binary(&root, false).expect("building herd-guest")
        }),
    };
    let started = Instant::now();
    let info = herd_image::build_image(&dir, "default", &guest, |m| eprintln!("image: {m}"))
        .expect("building the guest image");
    eprintln!(
        "image ready in {:?}: herd-guest {} bytes, initrd {} bytes",
        started.elapsed(),
        info.guest_bytes,
        info.initrd_bytes
    );
    // A second build with the same inputs is a cache hit.
    let again = Instant::now();
    let cached = herd_image::build_image(&dir, "default", &guest, |_| {}).expect("cached image");
    assert_eq!(cached, info);
    assert!(
        again.elapsed() < Duration::from_secs(2),
        "cached build took {:?}",
        again.elapsed()
    );
    assert_eq!(
        herd_image::list_images(&dir).expect("list images"),
        vec![info]
    );
    *built = Some(dir.clone());
    dir
}

fn open(state: &Path, accel: AccelChoice) -> (QemuDriver, Events) {
    let mut config = QemuConfig::new(herd_image::images_dir(&data_dir()));
    config.accel = accel;
    config.stop_timeout = Duration::from_secs(15);
    let (tx, rx) = herd_agent::agent::guest_event_channel();
    let driver = QemuDriver::open(state.to_path_buf(), config, tx).expect("open driver");
    (driver, rx)
}

fn tcg() -> AccelChoice {
    AccelChoice::Force(Accel::Tcg)
}

fn spec(command: &[&str]) -> VmSpec {
    VmSpec {
        name: "t".into(),
        hypervisor: "qemu".into(),
        vcpus: 1,
        memory_mib: 128,
        image: "default".into(),
        command: command.iter().map(|s| s.to_string()).collect(),
        policy: Default::default(),
        keep_running: false,
        disk_mib: 0,
        burst: Default::default(),
        seed: None,
    }
}

const COUNTER: &[&str] = &[
    "/bin/sh",
    "-c",
    "i=0; while true; do i=$((i+1)); echo count=$i; sleep 0.3; done",
];

async fn state_of(driver: &QemuDriver, id: VmId) -> Option<VmState> {
    driver
        .list()
        .await
        .expect("list")
        .into_iter()
        .find(|v| v.id == id)
        .map(|v| v.state)
}

async fn wait_state(driver: &QemuDriver, id: VmId, want: VmState, within: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let state = state_of(driver, id).await;
        if state == Some(want) {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < within,
            "VM {id} did not reach {want} within {within:?}; it is {state:?}; console:\n{}",
            std::fs::read_to_string(driver.vm_dir(id).join("console.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits for a guest message matching `pred` from `id`; returns it.
async fn wait_event(
    events: &mut Events,
    id: VmId,
    within: Duration,
    pred: impl Fn(&GuestMsg) -> bool,
) -> GuestMsg {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let got = tokio::time::timeout_at(deadline, events.recv())
            .await
            .unwrap_or_else(|_| panic!("no matching guest event from {id} within {within:?}"))
            .expect("event channel open");
        if got.0 == id && pred(&got.1) {
            return got.1;
        }
    }
}

fn counts(console: &str) -> Vec<u64> {
    console
        .lines()
        .filter_map(|l| l.trim().strip_prefix("count="))
        .filter_map(|n| n.trim().parse().ok())
        .collect()
}

fn console(driver: &QemuDriver, id: VmId) -> String {
    std::fs::read_to_string(driver.vm_dir(id).join("console.log")).unwrap_or_default()
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

const BOOT: Duration = Duration::from_secs(90);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_vms_boot_pause_resume_stop_terminate() {
    if !qemu_present() {
        return;
    }
    let state = tempfile::tempdir().expect("tempdir");
    let (driver, mut events) = open(state.path(), tcg());
    let ids: Vec<VmId> = (1..=3).map(|i| VmId::from_u128(0x1000 + i)).collect();
    let started = Instant::now();
    let counter = spec(COUNTER);
    let creates = ids.iter().map(|id| driver.create(*id, &counter));
    for r in futures_util::future::join_all(creates).await {
        r.expect("create");
    }
    eprintln!("3 creates returned after {:?}", started.elapsed());
    for id in &ids {
        let t = wait_state(&driver, *id, VmState::Running, BOOT).await;
        eprintln!("VM {id} running, waited {t:?}");
    }
    eprintln!(
        "all 3 running (hello received) {:?} after create",
        started.elapsed()
    );
    // Every VM greeted us with its own id.
    let mut greeted = std::collections::BTreeSet::new();
    while greeted.len() < 3 {
        let (from, msg) = tokio::time::timeout(Duration::from_secs(30), events.recv())
            .await
            .expect("hello events")
            .expect("open");
        if let GuestMsg::Hello { vm_id, .. } = msg {
            assert_eq!(vm_id, from);
            greeted.insert(from);
        }
    }
    // Creating again is a no-op.
    driver
        .create(ids[0], &spec(COUNTER))
        .await
        .expect("create twice");

    // Pause: the counter stops; resume: it goes on.
    let id = ids[0];
    driver.pause(id).await.expect("pause");
    assert_eq!(state_of(&driver, id).await, Some(VmState::Paused));
    driver.pause(id).await.expect("pause twice");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let frozen = counts(&console(&driver, id)).len();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        counts(&console(&driver, id)).len(),
        frozen,
        "paused guest kept counting"
    );
    driver.resume(id).await.expect("resume");
    assert_eq!(state_of(&driver, id).await, Some(VmState::Running));
    let until = Instant::now() + Duration::from_secs(20);
    while counts(&console(&driver, id)).len() <= frozen {
        assert!(Instant::now() < until, "resumed guest does not count");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Usage comes from /proc of each QEMU.
    let usage = driver.usage().await.expect("usage");
    assert_eq!(usage.len(), 3);
    assert!(
        usage.iter().all(|u| u.cpu_ms > 0 && u.mem_kib > 10_000),
        "{usage:?}"
    );

    // Stop: the guest powers off on request.
    let stop_started = Instant::now();
    let pid = driver.pid(ids[1]).expect("pid");
    driver.stop(ids[1]).await.expect("stop");
    eprintln!("stop took {:?}", stop_started.elapsed());
    assert_eq!(state_of(&driver, ids[1]).await, Some(VmState::Stopped));
    assert!(!process_alive(pid));
    driver.stop(ids[1]).await.expect("stop twice");

    // Terminate: no process and no files left, twice is fine.
    let pids: Vec<i32> = [ids[0], ids[2]]
        .iter()
        .map(|id| driver.pid(*id).expect("pid"))
        .collect();
    for id in &ids {
        driver.terminate(*id).await.expect("terminate");
        driver.terminate(*id).await.expect("terminate twice");
        assert!(!driver.vm_dir(*id).exists());
    }
    for pid in pids {
        assert!(!process_alive(pid), "qemu {pid} survived terminate");
    }
    assert!(driver.list().await.expect("list").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suspend_to_disk_and_resume_keeps_the_workload_state() {
    if !qemu_present() {
        return;
    }
    let state = tempfile::tempdir().expect("tempdir");
    let (driver, _events) = open(state.path(), tcg());
    let id = VmId::from_u128(0x2001);
    driver.create(id, &spec(COUNTER)).await.expect("create");
    wait_state(&driver, id, VmState::Running, BOOT).await;
    let until = Instant::now() + Duration::from_secs(30);
    while counts(&console(&driver, id)).len() < 5 {
        assert!(Instant::now() < until, "guest does not count");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let pid = driver.pid(id).expect("pid");
    let started = Instant::now();
    driver.suspend(id).await.expect("suspend");
    let suspend_time = started.elapsed();
    assert_eq!(state_of(&driver, id).await, Some(VmState::Suspended));
    assert!(!process_alive(pid), "qemu still alive after suspend");
    let image = driver.vm_dir(id).join("suspend.img");
    let image_bytes = std::fs::metadata(&image).expect("suspend image").len();
    let before = counts(&console(&driver, id));
    let last_before = *before.last().expect("counts");
    eprintln!(
        "suspend took {suspend_time:?}, image {} MB, last count {last_before}",
        image_bytes / 1_000_000
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        counts(&console(&driver, id)),
        before,
        "suspended guest counted"
    );
    // An agent restart while suspended: the new driver finds the image and resumes it.
    drop(driver);
    let (driver, mut events) = open(state.path(), tcg());
    assert_eq!(state_of(&driver, id).await, Some(VmState::Suspended));
    assert_eq!(driver.pid(id), None);

    let started = Instant::now();
    driver.resume(id).await.expect("resume");
    let resume_call = started.elapsed();
    wait_state(&driver, id, VmState::Running, BOOT).await;
    wait_event(&mut events, id, Duration::from_secs(30), |m| {
        matches!(m, GuestMsg::Hello { .. })
    })
    .await;
    eprintln!(
        "resume returned in {resume_call:?}, running (hello) after {:?}",
        started.elapsed()
    );
    assert_ne!(driver.pid(id), Some(pid));
    let until = Instant::now() + Duration::from_secs(30);
    while counts(&console(&driver, id)).len() < before.len() + 3 {
        assert!(Instant::now() < until, "restored guest does not count");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let after = counts(&console(&driver, id));
    // One counter, strictly increasing across the save: it continued, it did not restart.
    assert!(
        after.windows(2).all(|w| w[1] == w[0] + 1),
        "counter restarted or skipped: {after:?}"
    );
    assert!(after.last() > before.last());
    assert!(
        !image.exists(),
        "suspend image left after a successful restore"
    );
    driver.terminate(id).await.expect("terminate");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_agent_adopts_vms_and_sees_out_of_band_kills() {
    if !qemu_present() {
        return;
    }
    let state = tempfile::tempdir().expect("tempdir");
    let id = VmId::from_u128(0x3001);
    let pid = {
        let (driver, _events) = open(state.path(), tcg());
        driver.create(id, &spec(&[])).await.expect("create");
        wait_state(&driver, id, VmState::Running, BOOT).await;
        driver.pid(id).expect("pid")
    };
    // The old driver is gone; the VM is not.
    assert!(process_alive(pid));
    let (driver, mut events) = open(state.path(), tcg());
    assert_eq!(driver.pid(id), Some(pid), "adopted a different process");
    assert_eq!(state_of(&driver, id).await, Some(VmState::Running));
    // The new driver reaches the guest over a fresh channel connection.
    wait_event(&mut events, id, Duration::from_secs(30), |m| {
        matches!(m, GuestMsg::Hello { .. })
    })
    .await;
    // Pause through the adopted QMP socket, then resume, still the same process.
    driver.pause(id).await.expect("pause adopted");
    // Paused survives a restart too.
    drop(driver);
    let (driver, _events) = open(state.path(), tcg());
    assert_eq!(state_of(&driver, id).await, Some(VmState::Paused));
    driver.resume(id).await.expect("resume adopted");
    assert_eq!(state_of(&driver, id).await, Some(VmState::Running));
    assert_eq!(driver.pid(id), Some(pid));

    // Killed behind our back: an error, with the reason recorded.
    nix_kill(pid);
    let t = wait_state(&driver, id, VmState::Error, Duration::from_secs(10)).await;
    eprintln!(
        "out-of-band kill noticed within {t:?}: {:?}",
        driver.failure(id)
    );
    // A failed VM can be started again.
    driver.start(id).await.expect("start after error");
    wait_state(&driver, id, VmState::Running, BOOT).await;
    driver.terminate(id).await.expect("terminate");
    assert!(!state.path().join(id.to_string()).exists());
}

fn nix_kill(pid: i32) {
    let status = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workload_exit_code_is_reported_and_the_vm_stops() {
    if !qemu_present() {
        return;
    }
    let state = tempfile::tempdir().expect("tempdir");
    let (driver, mut events) = open(state.path(), tcg());
    let id = VmId::from_u128(0x4001);
    let started = Instant::now();
    driver
        .create(id, &spec(&["/bin/sh", "-c", "sleep 2; echo bye; exit 7"]))
        .await
        .expect("create");
    let hello = wait_event(&mut events, id, BOOT, |m| {
        matches!(m, GuestMsg::Hello { .. })
    })
    .await;
    eprintln!(
        "boot to hello (create call to hello received): {:?}",
        started.elapsed()
    );
    if let GuestMsg::Hello { guest_version, .. } = hello {
        assert_eq!(guest_version, env!("CARGO_PKG_VERSION"));
    }
    let status = wait_event(&mut events, id, BOOT, |m| {
        matches!(m, GuestMsg::Status { .. })
    })
    .await;
    eprintln!("guest status: {status:?}");
    let exit = wait_event(&mut events, id, BOOT, |m| {
        matches!(m, GuestMsg::WorkloadExit { .. })
    })
    .await;
    assert_eq!(exit, GuestMsg::WorkloadExit { code: 7 });
    eprintln!(
        "workload exit reported {:?} after create",
        started.elapsed()
    );
    wait_state(&driver, id, VmState::Stopped, Duration::from_secs(20)).await;
    eprintln!(
        "stopped (guest powered off) {:?} after create",
        started.elapsed()
    );
    assert_eq!(driver.exit_code(id), Some(7));
    assert!(console(&driver, id).contains("bye"));
    // A stopped VM boots again.
    let restarted = Instant::now();
    driver.start(id).await.expect("start");
    wait_state(&driver, id, VmState::Running, BOOT).await;
    eprintln!("second boot to running: {:?}", restarted.elapsed());
    driver.terminate(id).await.expect("terminate");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_picks_an_accelerator_and_says_why() {
    if !qemu_present() {
        return;
    }
    let state = tempfile::tempdir().expect("tempdir");
    let (driver, _events) = open(state.path(), AccelChoice::Auto);
    let info = driver.probe().await.expect("probe");
    eprintln!("probe: {}", info.detail);
    assert_eq!(info.kind, "qemu");
    assert!(info.detail.contains("accel kvm") || info.detail.contains("accel tcg"));
    assert!(info.detail.contains("images: default"));
    // A missing image is refused up front, naming the image, and leaves nothing behind.
    let mut bad = spec(&[]);
    bad.image = "nope".into();
    let id = VmId::from_u128(0x5001);
    let err = driver.create(id, &bad).await.expect_err("missing image");
    assert!(err.to_string().contains("\"nope\" not found"), "{err}");
    assert!(driver.list().await.expect("list").is_empty());
    assert!(!driver.vm_dir(id).exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passes_the_conformance_kit() {
    let state = tempfile::tempdir().expect("tempdir");
    let (driver, _events) = open(state.path(), tcg());
    let id = VmId::from_u128(0xc0f0);
    let passed =
        herd_agent::conformance::check(&driver, id, &spec(COUNTER), Duration::from_secs(90))
            .await
            .unwrap_or_else(|breach| {
                panic!(
                    "{breach}; console:\n{}",
                    std::fs::read_to_string(driver.vm_dir(id).join("console.log"))
                        .unwrap_or_default()
                )
            });
    assert!(passed.contains(&"suspend to disk and resume"), "{passed:?}");
}
