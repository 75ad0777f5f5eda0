//! The KVM probe guest, killed with its agent and not run again while the host is the
//! same: `herd up` killed -9 mid-probe leaves no probe QEMU, the next start probes and
//! keeps the verdict, and the start after that reuses it.

#![allow(clippy::unwrap_used)]

mod common;

use common::{free_port, guest_binary, qemu_present, Proc, Up};
use std::path::Path;
use std::time::{Duration, Instant};

/// Live QEMUs whose command line names the probe dir under `data_dir`.
fn probes(data_dir: &Path) -> Vec<i32> {
    common::processes(
        "qemu",
        &data_dir.join("agent/qemu/.kvm-probe").display().to_string(),
    )
}

/// The qemu driver's line in `herd host ls`, once it names its accelerator.
async fn qemu_detail(up: &Up) -> String {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let hosts = up.api.get("/v1/hosts").await.to_string();
        if let Some(at) = hosts.find("accel ") {
            let line = &hosts[at..];
            return line[..line.find('"').unwrap_or(line.len())].to_owned();
        }
        assert!(Instant::now() < deadline, "no accelerator shown: {hosts}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_probe_dies_with_its_agent_and_its_verdict_is_kept() {
    if !qemu_present() {
        return;
    }
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        eprintln!("SKIPPED: /dev/kvm is not usable here, so there is no probe");
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let data_dir = root.path().join("data");
    let image_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("herd-e2e-images");
    let (data, images, listen) = (
        data_dir.display().to_string(),
        image_dir.display().to_string(),
        format!("127.0.0.1:{}", free_port()),
    );
    let args = [
        "up",
        "--data-dir",
        &data,
        "--listen",
        &listen,
        "--drivers",
        "qemu",
        "--image-dir",
        &images,
    ];
    let log = root.path().join("first.log");
    let mut first = Proc::spawn_env("up", &args, &log, &[("HERD_GUEST_BINARY", &guest_binary())]);
    // The first start probes (it may build the image first).
    let deadline = Instant::now() + Duration::from_secs(300);
    while probes(&data_dir).is_empty() {
        assert!(
            first.exited().is_none(),
            "herd up exited: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        assert!(
            Instant::now() < deadline,
            "no probe guest started: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    first.kill9();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !probes(&data_dir).is_empty() {
        assert!(
            Instant::now() < deadline,
            "the probe QEMU outlived its killed agent: {:?}",
            probes(&data_dir)
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // The next start probes again (the killed one kept nothing) and keeps the verdict.
    let started = Instant::now();
    let mut up = Up::start_with(root.path(), "qemu", &[]).await;
    let detail = qemu_detail(&up).await;
    let probed = started.elapsed();
    assert!(
        detail.contains("probed ") && !detail.contains("kept"),
        "{detail}"
    );
    assert!(
        probes(&data_dir).is_empty(),
        "a probe QEMU is left: {:?}",
        probes(&data_dir)
    );
    assert!(data_dir.join("agent/qemu/.kvm-verdict.json").exists());

    // The start after that reuses it: no probe guest at all.
    up.proc.kill9();
    let started = Instant::now();
    up.restart().await;
    let detail = qemu_detail(&up).await;
    let kept = started.elapsed();
    assert!(
        detail.contains("kept: same kernel, boot, QEMU and CPU"),
        "{detail}"
    );
    assert!(probes(&data_dir).is_empty());
    eprintln!(
        "start until the accelerator is known: {} ms probing, {} ms with the kept verdict ({detail})",
        probed.as_millis(),
        kept.as_millis()
    );
}
