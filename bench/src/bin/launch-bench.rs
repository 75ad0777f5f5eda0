//! Time from `POST /v1/vms` to the VM being `running` (which needs its guest's hello)
//! through a real `herd up`, against a bare `qemu-system-x86_64` boot of the same image
//! with the same command line to the same hello, in the same run, alternating so both
//! see the same machine load.

use anyhow::{bail, Context, Result};
use clap::Parser;
use herd_agent::drivers::qemu::launch::{host_tsc_khz, qemu_args, Accel, LaunchSpec, VmPaths};
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

struct Herd {
    child: Child,
    url: String,
    token: String,
    http: reqwest::blocking::Client,
}

impl Drop for Herd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_herd(root: &Path, image_dir: &Path) -> Result<Herd> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"));
    let herd = target.join("release/herd");
    let data = root.join("herd");
    let child = Command::new(&herd)
        .args(["up", "--drivers", "qemu", "--accel", "tcg", "--listen"])
        .arg(format!("127.0.0.1:{port}"))
        .arg("--data-dir")
        .arg(&data)
        .arg("--image-dir")
        .arg(image_dir)
        .env("XDG_CONFIG_HOME", root.join("config"))
        .env(
            "HERD_GUEST_BINARY",
            herd_image::guest_binary(&workspace_root(), true)?,
        )
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(root.join("herd.log"))?)
        .spawn()
        .with_context(|| format!("starting {}", herd.display()))?;
    // `herd up` serves HTTPS with a CA it writes (whole, by rename) before it listens.
    let deadline = Instant::now() + Duration::from_secs(120);
    let ca_path = data.join("server/ca.pem");
    while !ca_path.exists() {
        if Instant::now() > deadline {
            bail!("herd up made no CA");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let ca_pem = std::fs::read_to_string(&ca_path)?;
    let url = format!("https://127.0.0.1:{port}");
    let http = reqwest::blocking::Client::builder()
        .use_preconfigured_tls(herd_tls::client_config(&ca_pem, None)?)
        .build()?;
    while http.get(format!("{url}/healthz")).send().is_err() {
        if Instant::now() > deadline {
            bail!("herd up did not start");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let token = std::fs::read_to_string(data.join("admin.token"))?
        .trim()
        .to_owned();
    // Wait for the local agent to join.
    loop {
        let hosts: serde_json::Value = http
            .get(format!("{url}/v1/hosts"))
            .bearer_auth(&token)
            .send()?
            .json()?;
        if hosts
            .as_array()
            .is_some_and(|h| h.iter().any(|h| h["state"] == "up"))
        {
            break;
        }
        if Instant::now() > deadline {
            bail!("the local agent did not join");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(Herd {
        child,
        url,
        token,
        http,
    })
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

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.total_cmp(b));
    let n = xs.len();
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    let root = tempfile::tempdir()?;
    let image_dir = workspace_root().join("target/tmp/herd-bench-images");
    let guest = herd_image::guest_binary(&workspace_root(), true)?;
    let image =
        herd_image::build_image(&image_dir, "default", &guest, |m| eprintln!("image: {m}"))?;
    let herd = start_herd(root.path(), &image_dir)?;
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
