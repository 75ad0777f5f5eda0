//! Real system containers under runc with herd-guest as PID 1 (tier 3 in conventions.md).
//!
//! The image is the one the qemu driver boots, built once per run. Tests skip, saying
//! so, when runc is absent or the test does not run as root.

use herd_agent::driver::{Driver, DriverError};
use herd_agent::drivers::oci::{OciConfig, OciDriver};
use herd_proto::guest::GuestMsg;
use herd_proto::wire::{VmId, VmSpec};
use herd_proto::VmState;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

type Events = herd_agent::agent::GuestEvents;

fn runc_usable() -> bool {
    let present = std::process::Command::new("runc")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    let root = nix::unistd::geteuid().is_root();
    if !present || !root {
        eprintln!("SKIPPED: containers need runc (apt-get install runc) and root");
    }
    present && root
}

/// Builds the guest image once per test process; returns the images dir.
fn images_dir() -> PathBuf {
    static BUILT: Mutex<Option<PathBuf>> = Mutex::new(None);
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(dir) = built.as_ref() {
        return dir.clone();
    }
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("herd-oci-tests");
    let root = herd_image::workspace_root(env!("CARGO_MANIFEST_DIR"));
    let guest = herd_image::guest_binary(&root, true).expect("building herd-guest");
    herd_image::build_image(&dir, "default", &guest, |m| eprintln!("image: {m}"))
        .expect("building the guest image");
    let images = herd_image::images_dir(&dir);
    *built = Some(images.clone());
    images
}

fn open(state: &Path) -> (OciDriver, Events) {
    let mut config = OciConfig::new(images_dir());
    config.stop_timeout = Duration::from_secs(5);
    let (tx, rx) = herd_agent::agent::guest_event_channel();
    (
        OciDriver::open(state.to_path_buf(), config, tx).expect("open"),
        rx,
    )
}

fn spec(command: &[&str]) -> VmSpec {
    VmSpec {
        name: "c1".into(),
        hypervisor: "oci".into(),
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

async fn wait_state(driver: &OciDriver, id: VmId, want: VmState, within: Duration) {
    let started = Instant::now();
    loop {
        let state = driver.state_of(id).await.expect("state");
        if state == Some(want) {
            return;
        }
        assert!(
            started.elapsed() < within,
            "container {id} did not reach {want} within {within:?}; it is {state:?}; console:\n{}",
            std::fs::read_to_string(driver.container_dir(id).join("console.log"))
                .unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn wait_event(events: &mut Events, id: VmId, pred: impl Fn(&GuestMsg) -> bool) -> GuestMsg {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let got = tokio::time::timeout_at(deadline, events.recv())
            .await
            .expect("no such guest message in 30 s")
            .expect("events closed");
        if got.0 == id && pred(&got.1) {
            return got.1;
        }
    }
}

/// Whatever the host still holds of a container: cgroup dirs, runc state, mounts.
fn leftovers(state: &Path, id: VmId) -> Vec<String> {
    let mut left = Vec::new();
    for controller in std::fs::read_dir("/sys/fs/cgroup")
        .expect("cgroups")
        .flatten()
    {
        let dir = controller.path().join("herd").join(id.to_string());
        if dir.exists() {
            left.push(dir.display().to_string());
        }
    }
    if std::path::Path::new("/sys/fs/cgroup/herd")
        .join(id.to_string())
        .exists()
    {
        left.push("unified cgroup".into());
    }
    let runc_state = state.join(".runc").join(OciDriver::runc_name(id));
    if runc_state.exists() {
        left.push(runc_state.display().to_string());
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    if mounts.contains(&id.to_string()) {
        left.push("a mount".into());
    }
    if state.join(id.to_string()).exists() {
        left.push("its dir".into());
    }
    left
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passes_the_conformance_kit() {
    if !runc_usable() {
        return;
    }
    let state = tempfile::tempdir().expect("tempdir");
    let (driver, _events) = open(state.path());
    let id = VmId::from_u128(0x0c1);
    let passed = herd_agent::conformance::check(
        &driver,
        id,
        &spec(&["sleep", "300"]),
        Duration::from_secs(30),
    )
    .await
    .expect("the oci driver breaks the driver contract");
    eprintln!("passed: {passed:?}");
    assert!(leftovers(state.path(), id).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_runs_its_workload_isolated_and_leaves_nothing() {
    if !runc_usable() {
        return;
    }
    let state = tempfile::tempdir().expect("tempdir");
    let (driver, mut events) = open(state.path());
    let id = VmId::from_u128(0x0c2);
    let probe = driver.probe().await.expect("probe");
    assert!(probe.detail.contains("suspend:"), "{}", probe.detail);
    driver
        .create(
            id,
            &spec(&["sh", "-c", "echo hi; echo host=$(hostname); sleep 300"]),
        )
        .await
        .expect("create");
    wait_state(&driver, id, VmState::Running, Duration::from_secs(30)).await;
    wait_event(&mut events, id, |m| matches!(m, GuestMsg::Usage { .. })).await;
    let console =
        String::from_utf8_lossy(&driver.console(id, 4096).await.expect("console")).into_owned();
    assert!(console.contains("hi"), "{console}");
    assert!(
        console.contains("host=c1"),
        "the hostname is the VM's name: {console}"
    );

    let pid = driver.pid(id).expect("pid");
    let usage = driver.usage().await.expect("usage");
    let mine = usage
        .iter()
        .find(|u| u.vm == id)
        .expect("usage of the container");
    assert!(mine.mem_kib > 0, "{mine:?}");
    // Its own pid namespace: the init is PID 1 inside.
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let nspid = status
        .lines()
        .find(|l| l.starts_with("NSpid:"))
        .expect("NSpid");
    assert!(nspid.trim_end().ends_with("\t1"), "{nspid}");

    driver.pause(id).await.expect("pause");
    wait_state(&driver, id, VmState::Paused, Duration::from_secs(5)).await;
    driver.resume(id).await.expect("resume");
    wait_state(&driver, id, VmState::Running, Duration::from_secs(5)).await;

    match driver.suspend(id).await {
        Err(DriverError::Invalid(why)) => assert!(why.contains("criu"), "{why}"),
        other => panic!("suspend of a container answered {other:?}"),
    }
    assert_eq!(
        driver.state_of(id).await.expect("state"),
        Some(VmState::Running)
    );

    driver.terminate(id).await.expect("terminate");
    assert_eq!(driver.state_of(id).await.expect("state"), None);
    assert_eq!(leftovers(state.path(), id), Vec::<String>::new());
    let started = Instant::now();
    while herd_agent::drivers::qemu::procfs::is_running(pid) {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "init {pid} lives on"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containers_outlive_the_agent_and_report_exit_codes() {
    if !runc_usable() {
        return;
    }
    let state = tempfile::tempdir().expect("tempdir");
    let long = VmId::from_u128(0x0c3);
    let short = VmId::from_u128(0x0c4);
    let pid = {
        let (driver, _events) = open(state.path());
        driver
            .create(long, &spec(&["sleep", "300"]))
            .await
            .expect("create");
        wait_state(&driver, long, VmState::Running, Duration::from_secs(30)).await;
        driver.pid(long).expect("pid")
        // Dropped here, like an agent killed with -9: nothing is stopped.
    };
    let (driver, mut events) = open(state.path());
    assert_eq!(driver.pid(long), Some(pid), "adopted, not restarted");
    assert_eq!(
        driver.state_of(long).await.expect("state"),
        Some(VmState::Running)
    );
    // The guest finds the new agent on the same socket.
    wait_event(&mut events, long, |m| matches!(m, GuestMsg::Usage { .. })).await;

    driver
        .create(short, &spec(&["sh", "-c", "echo bye; exit 7"]))
        .await
        .expect("create");
    wait_state(&driver, short, VmState::Stopped, Duration::from_secs(30)).await;
    assert_eq!(driver.exit_code(short), Some(7));
    // What it held on the host is released without a stop or terminate.
    let started = Instant::now();
    while leftovers(state.path(), short) != vec!["its dir".to_string()] {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "an ended container still holds {:?}",
            leftovers(state.path(), short)
        );
        driver.list().await.expect("list");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    driver.start(short).await.expect("start again");
    wait_state(&driver, short, VmState::Stopped, Duration::from_secs(30)).await;

    for id in [long, short] {
        driver.terminate(id).await.expect("terminate");
        assert_eq!(leftovers(state.path(), id), Vec::<String>::new());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_leave_nothing() {
    if !runc_usable() {
        return;
    }
    let state = tempfile::tempdir().expect("tempdir");
    let (driver, _events) = open(state.path());
    let id = VmId::from_u128(0x0c5);
    let mut bad = spec(&["true"]);
    bad.image = "nope".into();
    let err = driver.create(id, &bad).await.expect_err("an unknown image");
    assert!(err.to_string().contains("not found"), "{err}");
    bad.image = "../x".into();
    assert!(driver.create(id, &bad).await.is_err());
    assert_eq!(driver.state_of(id).await.expect("state"), None);
    assert_eq!(leftovers(state.path(), id), Vec::<String>::new());
}

/// A running container's limits, as its cgroup holds them: (memory bytes, CPU quota).
fn cgroup_limits(id: VmId) -> (u64, i64) {
    let read = |controller: &str, file: &str| {
        std::fs::read_to_string(
            Path::new("/sys/fs/cgroup")
                .join(controller)
                .join("herd")
                .join(id.to_string())
                .join(file),
        )
        .unwrap_or_else(|e| panic!("{controller}/{file}: {e}"))
        .trim()
        .to_owned()
    };
    (
        read("memory", "memory.limit_in_bytes")
            .parse()
            .expect("memory"),
        read("cpu", "cpu.cfs_quota_us").parse().expect("quota"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_container_takes_a_new_shape_at_once() {
    if !runc_usable() || !Path::new("/sys/fs/cgroup/memory").exists() {
        return;
    }
    let state = tempfile::tempdir().expect("tempdir");
    let (driver, _events) = open(state.path());
    let id = VmId::from_u128(0x0c6);
    let small = spec(&["sleep", "300"]);
    driver.create(id, &small).await.expect("create");
    wait_state(&driver, id, VmState::Running, Duration::from_secs(30)).await;
    assert_eq!(cgroup_limits(id), (128 << 20, 100_000));
    let pid = driver.pid(id).expect("pid");
    let big = VmSpec {
        vcpus: 2,
        memory_mib: 384,
        ..small.clone()
    };
    assert!(driver.reshape(id, &big).await.expect("reshape"));
    assert_eq!(cgroup_limits(id), (384 << 20, 200_000));
    // The same container, still running: no restart.
    assert_eq!(driver.pid(id), Some(pid));
    assert_eq!(
        driver.state_of(id).await.expect("state"),
        Some(VmState::Running)
    );
    assert!(
        !driver.reshape(id, &big).await.expect("again"),
        "nothing left to change"
    );
    // Smaller again, and the shape holds across a restart.
    assert!(driver.reshape(id, &small).await.expect("shrink"));
    driver.stop(id).await.expect("stop");
    wait_state(&driver, id, VmState::Stopped, Duration::from_secs(15)).await;
    assert!(driver.reshape(id, &big).await.expect("reshape stopped"));
    driver.start(id).await.expect("start");
    wait_state(&driver, id, VmState::Running, Duration::from_secs(30)).await;
    assert_eq!(cgroup_limits(id), (384 << 20, 200_000));
    driver.terminate(id).await.expect("terminate");
    assert!(leftovers(state.path(), id).is_empty());
}
