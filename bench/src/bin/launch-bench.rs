//! Time from `POST /v1/vms` to the VM being `running` (which needs its guest's hello)
//! through a real `herd up`, against a bare `qemu-system-x86_64` boot of the same image
//! with the same command line to the same hello, in the same run, alternating so both
//! see the same machine load.

use anyhow::{bail, Context, Result};
use clap::Parser;
use herd_agent::drivers::qemu::launch::{host_tsc_khz, qemu_args, Accel, LaunchSpec, VmPaths};
use herd_bench::herd_up::{median, Herd};
use herd_proto::guest::{FrameDecoder, GuestMsg};
use herd_proto::wire::VmSpec;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Parser)]
struct Args {
    /// Boots per side.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    #[arg(long)]
    json: Option<PathBuf>,
}

fn workspace_root() -> PathBuf {
    herd_image::workspace_root(env!("CARGO_MANIFEST_DIR"))
}

/// Boots the image with QEMU directly and waits for the guest's hello.
fn bare_boot(dir: &Path, kernel: &Path, initrd: &Path, n: usize) -> Result<Duration> {
    let id = uuid::Uuid::from_u128(0xbe00 + n as u128);
    let paths = VmPaths::new(dir, id);
    let _ = std::fs::remove_dir_all(&paths.dir);
    std::fs::create_dir_all(&paths.dir)?;
    let spec = VmSpec {
        name: "bare".into(),
        hypervisor: "qemu".into(),
        vcpus: 1,
        memory_mib: 256,
        image: "default".into(),
        command: vec![],
        policy: Default::default(),
        keep_running: false,
        disk_mib: 0,
        burst: Default::default(),
        seed: None,
    };
    let launch = LaunchSpec {
        id,
        spec: &spec,
        token: "bench",
        kernel,
        initrd,
        accel: Accel::Tcg,
        tsc_khz: host_tsc_khz(),
        incoming: None,
        foreground: true,
        born_unix_ms: None,
        now_unix_ms: herd_proto::clock::unix_ms(),
    };
    let args = qemu_args(&paths, &launch)?;
    let started = Instant::now();
    let mut child: Child = Command::new("qemu-system-x86_64")
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting qemu")?;
    let result = (|| {
        let mut socket = loop {
            match std::os::unix::net::UnixStream::connect(paths.guest()) {
                Ok(socket) => break socket,
                Err(_) if started.elapsed() < Duration::from_secs(60) => {
                    std::thread::sleep(Duration::from_millis(2))
                }
                Err(e) => bail!("guest socket never appeared: {e}"),
            }
        };
        socket.set_read_timeout(Some(Duration::from_secs(60)))?;
        let mut decoder = FrameDecoder::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = socket.read(&mut buf)?;
            if n == 0 {
                bail!("guest channel closed before hello");
            }
            for msg in decoder.feed::<GuestMsg>(&buf[..n])? {
                if matches!(msg, GuestMsg::Hello { .. }) {
                    return Ok(started.elapsed());
                }
            }
        }
    })();
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&paths.dir);
    result
}

fn herd_boot(herd: &Herd, n: usize) -> Result<Duration> {
    let started = Instant::now();
    let vm: serde_json::Value = herd
        .http
        .post(format!("{}/v1/vms", herd.url))
        .bearer_auth(&herd.token)
        .json(&serde_json::json!({"name": format!("bench-{n}"), "memory_mib": 256}))
        .send()?
        .error_for_status()?
        .json()?;
    let id = vm["id"].as_str().context("id")?.to_owned();
    let elapsed = loop {
        let vm: serde_json::Value = herd
            .http
            .get(format!("{}/v1/vms/{id}", herd.url))
            .bearer_auth(&herd.token)
            .send()?
            .json()?;
        if vm["state"] == "running" {
            break started.elapsed();
        }
        if started.elapsed() > Duration::from_secs(120) {
            bail!("VM never ran: {vm}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    herd.http
        .delete(format!("{}/v1/vms/{id}", herd.url))
        .bearer_auth(&herd.token)
        .send()?;
    // Let the terminate finish so it does not load the next boot.
    let deadline = Instant::now() + Duration::from_secs(30);
    while herd
        .http
        .get(format!("{}/v1/vms/{id}", herd.url))
        .bearer_auth(&herd.token)
        .send()?
        .status()
        .is_success()
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(elapsed)
}

fn main() -> Result<()> {
    let args = Args::parse();
    let root = tempfile::tempdir()?;
    let image_dir = workspace_root().join("target/tmp/herd-bench-images");
    let guest = herd_image::guest_binary(&workspace_root(), true)?;
    let image =
        herd_image::build_image(&image_dir, "default", &guest, |m| eprintln!("image: {m}"))?;
    let herd = Herd::start(root.path(), &image_dir, "qemu")?;
    let bare_dir = root.path().join("bare");
    let mut bare = Vec::new();
    let mut through_herd = Vec::new();
    // One boot each to warm caches, not counted.
    bare_boot(&bare_dir, &image.vmlinuz, &image.initrd, 999)?;
    herd_boot(&herd, 999)?;
    for n in 0..args.runs {
        bare.push(bare_boot(&bare_dir, &image.vmlinuz, &image.initrd, n)?.as_secs_f64());
        through_herd.push(herd_boot(&herd, n)?.as_secs_f64());
        eprintln!(
            "run {n}: bare {:.3} s, herd {:.3} s",
            bare[n], through_herd[n]
        );
    }
    let (mb, mh) = (median(bare.clone()), median(through_herd.clone()));
    let mean = |xs: &[f64]| xs.iter().sum::<f64>() / xs.len() as f64;
    println!(
        "launch to guest hello, {} boots each, TCG, 1 vCPU, 256 MiB",
        args.runs
    );
    println!("{:>8} {:>10} {:>10}", "", "median s", "mean s");
    println!("{:>8} {:>10.3} {:>10.3}", "bare", mb, mean(&bare));
    println!("{:>8} {:>10.3} {:>10.3}", "herd", mh, mean(&through_herd));
    println!(
        "herd adds {:+.1}% (median), {:+.1}% (mean) over a bare QEMU boot to the same hello",
        (mh / mb - 1.0) * 100.0,
        (mean(&through_herd) / mean(&bare) - 1.0) * 100.0
    );
    if let Some(path) = args.json {
        std::fs::write(
            path,
            serde_json::to_vec_pretty(
                &serde_json::json!({"bare_s": bare, "herd_s": through_herd}),
            )?,
        )?;
    }
    Ok(())
}
