//! Live migration through herd against raw QEMU, over the same shaped link, in the same
//! run: two hosts of the netns testbed with a 1 Gbit/s link each; for each guest size
//! and workload, a bare pair of QEMU processes (source in one namespace, target in the
//! other, QMP `migrate` over TCP) and then a herd VM of the same shape moved with
//! `herd vm migrate` (QEMU's stream relayed by the agents over mTLS).
//!
//! Figures: QEMU's own total time and downtime on both sides, herd's time from the API
//! call to the migration's end (which adds preparing the target, the switch-over's
//! verify and commit), the bytes sent as a ratio to the guest's RAM, and the transfer
//! time as a ratio to the time the link needs for those bytes.

use anyhow::{bail, Context, Result};
use clap::Parser;
use herd_agent::drivers::qemu::launch::{host_tsc_khz, qemu_args, Accel, LaunchSpec, VmPaths};
use herd_agent::drivers::qemu::qmp::Qmp;
use herd_proto::wire::VmSpec;
use herd_testbed::{Cluster, ClusterConfig, Shape, Testbed};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

#[derive(Parser)]
struct Args {
    /// Guest sizes in MiB.
    #[arg(long, value_delimiter = ',', default_values_t = [256, 1024])]
    sizes: Vec<u64>,
    /// The link's rate, both ways, in Mbit/s.
    #[arg(long, default_value_t = 1000)]
    link_mbit: u64,
    /// The herd binary.
    #[arg(long, default_value = "target/release/herd")]
    herd: PathBuf,
    #[arg(long)]
    json: Option<PathBuf>,
}

/// What a workload does while it is moved.
#[derive(Clone, Copy)]
enum Workload {
    Idle,
    /// Rewrites a 32 MiB file of random bytes in the guest's memory over and over.
    Dirtying,
}

impl Workload {
    fn name(self) -> &'static str {
        match self {
            Workload::Idle => "idle",
            Workload::Dirtying => "dirtying",
        }
    }

    fn command(self) -> Vec<String> {
        let script = match self {
            Workload::Idle => "echo ready; while true; do sleep 1; done",
            Workload::Dirtying => {
                "dd if=/dev/urandom of=/tmp/a bs=1048576 count=32 2>/dev/null; echo ready; \
                 while true; do dd if=/tmp/a of=/tmp/b bs=1048576 conv=notrunc 2>/dev/null; done"
            }
        };
        vec!["sh".into(), "-c".into(), script.into()]
    }
}

/// One migration's figures.
#[derive(Debug, Clone, Copy, Default)]
struct Moved {
    total_ms: u64,
    downtime_ms: u64,
    bytes: u64,
    /// Pre-copy passes (dirty-bitmap syncs): more than a few means the guest dirtied
    /// memory faster than the first pass could send it.
    passes: u64,
    /// From the request to the end, as the caller waits (herd only).
    end_to_end_ms: Option<u64>,
}

fn spec(memory_mib: u64, workload: Workload) -> VmSpec {
    VmSpec {
        name: "bench".into(),
        hypervisor: "qemu".into(),
        vcpus: 1,
        memory_mib,
        image: "default".into(),
        command: workload.command(),
        policy: Default::default(),
        keep_running: false,
        disk_mib: 0,
        burst: Default::default(),
        seed: None,
    }
}

fn wait_console(path: &Path, needle: &str, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if std::fs::read_to_string(path).is_ok_and(|text| text.contains(needle)) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "{} does not say {needle:?} after {timeout:?}",
                path.display()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Two bare QEMU processes, source on host 0 and target on host 1, QMP `migrate`
/// over TCP between the namespaces.
fn raw(
    rt: &tokio::runtime::Runtime,
    bed: &Testbed,
    dir: &Path,
    image: &Path,
    memory_mib: u64,
    workload: Workload,
) -> Result<Moved> {
    let kernel = image.join("vmlinuz");
    let initrd = image.join("initrd");
    let spec = spec(memory_mib, workload);
    let launch = |n: u128, extra: &[String]| -> Result<(Child, VmPaths)> {
        let id = uuid::Uuid::from_u128(0xb0 + n);
        let paths = VmPaths::new(dir, id);
        let _ = std::fs::remove_dir_all(&paths.dir);
        std::fs::create_dir_all(&paths.dir)?;
        let l = LaunchSpec {
            id,
            spec: &spec,
            token: "bench",
            kernel: &kernel,
            initrd: &initrd,
            accel: Accel::Tcg,
            tsc_khz: host_tsc_khz(),
            incoming: None,
            foreground: true,
            born_unix_ms: None,
            now_unix_ms: herd_proto::clock::unix_ms(),
        };
        let mut args = qemu_args(&paths, &l)?;
        args.extend(extra.iter().cloned());
        let host = usize::from(n == 1);
        let child = bed
            .command(host, Path::new("qemu-system-x86_64"))?
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting qemu")?;
        Ok((child, paths))
    };
    let (mut source, source_paths) = launch(0, &[])?;
    let target_addr = format!("{}:4444", bed.addr(1)?);
    let (mut target, _) = launch(1, &["-incoming".into(), format!("tcp:{target_addr}")])?;
    let result = (|| -> Result<Moved> {
        wait_console(&source_paths.console(), "ready", Duration::from_secs(120))?;
        rt.block_on(async {
            let mut qmp = Qmp::connect(&source_paths.qmp(), Duration::from_secs(10)).await?;
            qmp.execute(
                "migrate-set-capabilities",
                Some(json!({"capabilities": [{"capability": "auto-converge", "state": true}]})),
            )
            .await?;
            qmp.execute(
                "migrate-set-parameters",
                Some(json!({"downtime-limit": 300, "max-bandwidth": 10u64 << 30})),
            )
            .await?;
            qmp.execute(
                "migrate",
                Some(json!({"uri": format!("tcp:{target_addr}")})),
            )
            .await?;
            loop {
                let info = qmp.execute("query-migrate", None).await?;
                match info["status"].as_str().unwrap_or("") {
                    "completed" => {
                        return Ok(Moved {
                            total_ms: info["total-time"].as_u64().unwrap_or(0),
                            downtime_ms: info["downtime"].as_u64().unwrap_or(0),
                            bytes: info["ram"]["transferred"].as_u64().unwrap_or(0),
                            passes: info["ram"]["dirty-sync-count"].as_u64().unwrap_or(0),
                            end_to_end_ms: None,
                        })
                    }
                    "failed" | "cancelled" => bail!("raw migration failed: {info}"),
                    _ => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            }
        })
    })();
    kill(&mut source);
    kill(&mut target);
    result
}

/// A herd VM of the same shape, moved with `herd vm migrate`.
fn herd(cluster: &Cluster, n: usize, memory_mib: u64, workload: Workload) -> Result<Moved> {
    let name = format!("b{n}");
    let mut launch: Vec<String> = [
        "vm",
        "launch",
        &name,
        "--memory",
        &memory_mib.to_string(),
        "--",
    ]
    .map(str::to_owned)
    .to_vec();
    launch.extend(workload.command());
    let refs: Vec<&str> = launch.iter().map(String::as_str).collect();
    cluster.cli(&refs)?;
    let deadline = Instant::now() + Duration::from_secs(120);
    while !cluster.cli(&["vm", "console", &name])?.contains("ready") {
        if Instant::now() > deadline {
            bail!("{name}: the workload did not get ready");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let started = Instant::now();
    let out = cluster.cli(&["vm", "migrate", &name, "-o", "json"])?;
    let end_to_end = started.elapsed();
    let m: Value = serde_json::from_str(&out)?;
    if m["phase"] != "done" {
        bail!("{name}: migration did not finish: {m}");
    }
    cluster.cli(&["vm", "rm", &name])?;
    Ok(Moved {
        total_ms: m["transfer_ms"].as_u64().unwrap_or(0),
        downtime_ms: m["downtime_ms"].as_u64().unwrap_or(0),
        bytes: m["progress"]["transferred_bytes"].as_u64().unwrap_or(0),
        passes: m["progress"]["pass"].as_u64().unwrap_or(0),
        end_to_end_ms: Some(end_to_end.as_millis() as u64),
    })
}

fn main() -> Result<()> {
    let args = Args::parse();
    let root = herd_image::workspace_root(env!("CARGO_MANIFEST_DIR"));
    let guest = herd_image::guest_binary(&root, false).context("herd-guest")?;
    let work = tempfile::tempdir()?;
    let images = work.path().join("images-root");
    herd_image::build_image(&images, "default", &guest, |_| {})?;
    let image = herd_image::images_dir(&images).join("default");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;

    let bed = Testbed::create(2)?;
    let link = Shape {
        rate_kbit: args.link_mbit * 1000,
        ..Shape::default()
    };
    let mut config = ClusterConfig::new(&args.herd, &work.path().join("cluster"), "qemu");
    config.server_args = ["--default-hypervisor", "qemu"].map(str::to_owned).to_vec();
    config.agent_args = vec![
        "--accel".into(),
        "tcg".into(),
        "--image-dir".into(),
        images.display().to_string(),
        "--util-interval-ms".into(),
        "0".into(),
    ];
    config.env = vec![("HERD_GUEST_BINARY".into(), guest)];
    std::fs::create_dir_all(&config.root)?;
    let cluster = Cluster::start(bed, config)?;
    for i in 0..2 {
        cluster.bed.shape(i, link)?;
    }
    println!(
        "live migration over a {} Mbit/s link between two testbed hosts, QEMU TCG, 1 vCPU",
        args.link_mbit
    );
    println!(
        "{:>5} {:>8} | {:>7} {:>8} {:>5} {:>6} {:>6} | {:>7} {:>9} {:>5} {:>6} {:>6} {:>8} | {:>5} {:>5}",
        "MiB",
        "workload",
        "raw ms",
        "raw down",
        "pass",
        "B/RAM",
        "/link",
        "herd ms",
        "herd down",
        "pass",
        "B/RAM",
        "/link",
        "herd e2e",
        "x raw",
        "e2e x"
    );
    let mut rows = Vec::new();
    let raw_dir = work.path().join("raw");
    for (n, &size) in args.sizes.iter().enumerate() {
        for (k, workload) in [Workload::Idle, Workload::Dirtying].into_iter().enumerate() {
            let baseline = raw(&rt, &cluster.bed, &raw_dir, &image, size, workload)?;
            let ours = herd(&cluster, n * 2 + k, size, workload)?;
            let ram = (size << 20) as f64;
            let link_ms = |bytes: u64| bytes as f64 * 8.0 / (args.link_mbit as f64 * 1000.0);
            let e2e = ours.end_to_end_ms.unwrap_or(0);
            println!(
                "{:>5} {:>8} | {:>7} {:>8} {:>5} {:>6.2} {:>6.2} | {:>7} {:>9} {:>5} {:>6.2} {:>6.2} {:>8} | {:>5.2} {:>5.2}",
                size,
                workload.name(),
                baseline.total_ms,
                baseline.downtime_ms,
                baseline.passes,
                baseline.bytes as f64 / ram,
                baseline.total_ms as f64 / link_ms(baseline.bytes).max(1.0),
                ours.total_ms,
                ours.downtime_ms,
                ours.passes,
                ours.bytes as f64 / ram,
                ours.total_ms as f64 / link_ms(ours.bytes).max(1.0),
                e2e,
                ours.total_ms as f64 / baseline.total_ms.max(1) as f64,
                e2e as f64 / baseline.total_ms.max(1) as f64,
            );
            rows.push(json!({
                "memory_mib": size,
                "workload": workload.name(),
                "raw": {"total_ms": baseline.total_ms, "downtime_ms": baseline.downtime_ms, "bytes": baseline.bytes, "passes": baseline.passes},
                "herd": {"total_ms": ours.total_ms, "downtime_ms": ours.downtime_ms, "bytes": ours.bytes, "passes": ours.passes, "end_to_end_ms": e2e},
            }));
        }
    }
    println!(
        "raw: QEMU's own total time and downtime; herd: the same figures from herd's source \
         QEMU, and e2e from `herd vm migrate` to its end; B/RAM: bytes sent per byte of RAM; \
         /link: transfer time over the time the link needs for those bytes; x raw: herd's \
         transfer time over raw's"
    );
    if let Some(path) = args.json {
        std::fs::write(
            path,
            serde_json::to_vec_pretty(&json!({"link_mbit": args.link_mbit, "rows": rows}))?,
        )?;
    }
    Ok(())
}
