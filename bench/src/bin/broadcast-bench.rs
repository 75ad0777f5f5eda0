//! Broadcast of a VM's snapshot to every host of the netns testbed, each host with one
//! shaped link (400 Mbit/s each way by default), against the physical limit measured
//! in the same run: one plain TCP stream of the same size over one such link, which is
//! S/B. However the snapshot is spread, every host must receive S bytes over a link of
//! rate B, so no broadcast ends before S/B.
//!
//! The same container (its writable layer holding S bytes of random data) is broadcast
//! three ways through herd: a chain (herd's default, `--fanout 1`: every host uploads
//! one copy, the chunks pipelined down it), a binary tree (`--fanout 2`: interior hosts
//! upload two copies) and a star from the source (`--fanout N`: the source uploads
//! N copies). Figures: time to the first and the last host (from the snapshot's
//! capture), the last as a ratio to S/B, and the most any one host uploaded, in copies
//! of S (counted on its link).

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use herd_testbed::{Cluster, ClusterConfig, Shape, Testbed};
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Parser)]
struct Args {
    #[command(subcommand)]
    helper: Option<Helper>,
    /// Runs as HOSTS:MIB, each on a testbed of its own: HOSTS receivers and the source.
    #[arg(long, value_delimiter = ',', default_values_t = ["16:256".to_string()])]
    runs: Vec<String>,
    /// Each host's link rate, both ways, in Mbit/s.
    #[arg(long, default_value_t = 400)]
    link_mbit: u64,
    /// The herd binary.
    #[arg(long, default_value = "target/release/herd")]
    herd: PathBuf,
    #[arg(long)]
    json: Option<PathBuf>,
    /// One row per run and shape, for the report's plot.
    #[arg(long)]
    csv: Option<PathBuf>,
}

/// The baseline's two ends, run inside the testbed's namespaces.
#[derive(Subcommand)]
enum Helper {
    /// Accepts one connection, reads BYTES from it, prints the seconds it took.
    Sink { port: u16, bytes: u64 },
    /// Sends BYTES to ADDR.
    Send { addr: String, bytes: u64 },
}

fn helper(helper: Helper) -> Result<()> {
    let mut buf = vec![0u8; 1 << 20];
    match helper {
        Helper::Sink { port, bytes } => {
            let listener = std::net::TcpListener::bind(("0.0.0.0", port))?;
            println!("listening");
            std::io::stdout().flush()?;
            let (mut stream, _) = listener.accept()?;
            let started = Instant::now();
            let mut got = 0u64;
            while got < bytes {
                let n = stream.read(&mut buf)?;
                if n == 0 {
                    bail!("the sender stopped after {got} of {bytes} bytes");
                }
                got += n as u64;
            }
            println!("{:.6}", started.elapsed().as_secs_f64());
        }
        Helper::Send { addr, bytes } => {
            let mut stream = std::net::TcpStream::connect(&addr)?;
            let mut sent = 0u64;
            while sent < bytes {
                let n = buf.len().min((bytes - sent) as usize);
                stream.write_all(&buf[..n])?;
                sent += n as u64;
            }
        }
    }
    Ok(())
}

/// Plain TCP streams of `bytes` from host i to host i + 1 for every i below `hops`, all
/// at once: every link busy both ways, as in a chain, with nothing but the kernel's
/// work. One hop is the link's own time; all of them, what the machine carries.
fn baseline(bed: &Testbed, bytes: u64, hops: usize) -> Result<Duration> {
    let exe = std::env::current_exe()?;
    let port = "7900";
    let mut sinks = Vec::new();
    for i in 1..=hops {
        let mut sink = bed
            .command(i, &exe)?
            .args(["sink", port, &bytes.to_string()])
            .stdout(std::process::Stdio::piped())
            .spawn()?;
        let mut out = sink.stdout.take().context("the sink's stdout")?;
        let mut said = [0u8; 10];
        out.read_exact(&mut said)?;
        sinks.push((sink, out));
    }
    let mut senders = Vec::new();
    for i in 0..hops {
        let to = format!("{}:{port}", bed.addr(i + 1)?);
        senders.push(
            bed.command(i, &exe)?
                .args(["send", &to, &bytes.to_string()])
                .spawn()?,
        );
    }
    let mut slowest = Duration::ZERO;
    for mut sender in senders {
        let status = sender.wait()?;
        if !status.success() {
            bail!("a baseline sender failed: {status}");
        }
    }
    for (mut sink, mut out) in sinks {
        let mut rest = String::new();
        out.read_to_string(&mut rest)?;
        let status = sink.wait()?;
        if !status.success() {
            bail!("a baseline sink failed: {status}");
        }
        slowest = slowest.max(Duration::from_secs_f64(rest.trim().parse()?));
    }
    Ok(slowest)
}

/// What each host's link carried out of it so far, in bytes.
fn uploaded(bed: &Testbed) -> Result<Vec<u64>> {
    bed.plan()
        .hosts
        .iter()
        .map(|h| {
            // The root end of the host's veth receives what the host sends.
            let path = format!("/sys/class/net/{}/statistics/rx_bytes", h.veth_root);
            Ok(std::fs::read_to_string(&path)
                .with_context(|| path.clone())?
                .trim()
                .parse()?)
        })
        .collect()
}

/// The machine's CPU time so far, busy and all, in clock ticks (from /proc/stat).
fn cpu_ticks() -> Result<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat.lines().next().context("/proc/stat is empty")?;
    let ticks: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|t| t.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal ...: idle and iowait are not busy.
    let all: u64 = ticks.iter().take(8).sum();
    let idle = ticks.get(3).copied().unwrap_or(0) + ticks.get(4).copied().unwrap_or(0);
    Ok((all - idle, all))
}

struct Spread {
    shape: &'static str,
    first: Duration,
    last: Duration,
    /// The most any host uploaded, in copies of the snapshot.
    max_copies: f64,
    source_copies: f64,
    refetched: u64,
    /// How busy the machine's cores were meanwhile, 0 to 1.
    cpu_busy: f64,
}

fn spread(cluster: &Cluster, shape: &'static str, fanout: usize, size: u64) -> Result<Spread> {
    let before = uploaded(&cluster.bed)?;
    let cpu_before = cpu_ticks()?;
    let b = cluster.cli_json(&["vm", "broadcast", "big", "--fanout", &fanout.to_string()])?;
    let id = b["id"].as_str().context("a broadcast id")?.to_owned();
    let deadline = Instant::now() + Duration::from_secs(900);
    let b = loop {
        let list = cluster.cli_json(&["vm", "broadcasts", "big"])?;
        let found = list["items"]
            .as_array()
            .and_then(|items| items.iter().find(|b| b["id"] == id.as_str()))
            .cloned()
            .unwrap_or(Value::Null);
        match found["phase"].as_str() {
            Some("ended") => break found,
            Some("failed") => bail!("the {shape} broadcast failed: {found}"),
            _ if Instant::now() > deadline => bail!("the {shape} broadcast did not end: {found}"),
            _ => std::thread::sleep(Duration::from_millis(100)),
        }
    };
    let after = uploaded(&cluster.bed)?;
    let cpu_after = cpu_ticks()?;
    let cpu_busy = (cpu_after.0 - cpu_before.0) as f64 / (cpu_after.1 - cpu_before.1).max(1) as f64;
    let hosts = b["hosts"].as_array().context("hosts")?;
    if hosts.iter().any(|h| h["phase"] != "done") {
        bail!("the {shape} broadcast did not reach every host: {b}");
    }
    let times: Vec<i64> = hosts
        .iter()
        .filter_map(|h| h["ms_after_capture"].as_i64())
        .collect();
    let ms = |x: Option<&i64>| Duration::from_millis(x.copied().unwrap_or(0).max(0) as u64);
    let copies: Vec<f64> = before
        .iter()
        .zip(&after)
        .map(|(b, a)| a.saturating_sub(*b) as f64 / size as f64)
        .collect();
    let source = b["source"].as_str().unwrap_or_default();
    let hostnames = cluster.cli_json(&["host", "ls"])?;
    let source_index = hostnames
        .as_array()
        .and_then(|hs| hs.iter().find(|h| h["id"] == source))
        .and_then(|h| h["hostname"].as_str())
        .and_then(|name| name.rsplit(|c: char| !c.is_ascii_digit()).next())
        .and_then(|digits| digits.parse::<usize>().ok());
    Ok(Spread {
        shape,
        first: ms(times.iter().min()),
        last: ms(times.iter().max()),
        max_copies: copies.iter().copied().fold(0.0, f64::max),
        source_copies: source_index
            .and_then(|i| copies.get(i).copied())
            .unwrap_or(f64::NAN),
        refetched: hosts.iter().filter_map(|h| h["refetched"].as_u64()).sum(),
        cpu_busy,
    })
}

fn run(args: &Args, work: &Path, images: &Path, receivers: usize, mib: u64) -> Result<Value> {
    let size = mib << 20;
    let bed = Testbed::create(receivers + 1)?;
    let link = Shape {
        rate_kbit: args.link_mbit * 1000,
        ..Shape::default()
    };
    let root = work.join(format!("cluster-{receivers}"));
    let mut config = ClusterConfig::new(&args.herd, &root, "oci");
    config.server_args = ["--default-hypervisor", "oci"].map(str::to_owned).to_vec();
    config.agent_args = vec![
        "--image-dir".into(),
        images.display().to_string(),
        "--util-interval-ms".into(),
        "0".into(),
    ];
    let guest = herd_image::guest_binary(
        &herd_image::workspace_root(env!("CARGO_MANIFEST_DIR")),
        true,
    )?;
    config.env = vec![("HERD_GUEST_BINARY".into(), guest)];
    std::fs::create_dir_all(&config.root)?;
    let cluster = Cluster::start(bed, config)?;
    let result = measure(&cluster, args, link, receivers, mib, size);
    // Its drop ends the containers too.
    drop(cluster);
    let _ = std::fs::remove_dir_all(&root);
    result
}

fn measure(
    cluster: &Cluster,
    args: &Args,
    link: Shape,
    receivers: usize,
    mib: u64,
    size: u64,
) -> Result<Value> {
    cluster.wait_hosts(Duration::from_secs(600), |hosts| {
        hosts.len() == receivers + 1 && hosts.iter().all(|h| h["state"] == "up")
    })?;
    for i in 0..=receivers {
        cluster.bed.shape(i, link)?;
    }
    let raw = baseline(&cluster.bed, size, 1)?;
    let all_links = baseline(&cluster.bed, size, receivers)?;
    let nominal = Duration::from_secs_f64(size as f64 * 8.0 / (args.link_mbit as f64 * 1e6));
    let fill =
        format!("head -c {size} /dev/urandom > /big && echo ready; while :; do sleep 1; done");
    cluster.cli(&[
        "vm", "launch", "big", "--memory", "256", "--", "sh", "-c", &fill,
    ])?;
    let deadline = Instant::now() + Duration::from_secs(300);
    while !cluster
        .cli(&["vm", "console", "big"])
        .unwrap_or_default()
        .contains("ready")
    {
        if Instant::now() > deadline {
            bail!("the container did not write its {mib} MiB");
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    println!(
        "{mib} MiB to {receivers} hosts, each link {} Mbit/s: S/B {:.2} s nominal, one plain TCP \
         stream {:.2} s, {receivers} at once (a chain of plain streams) {:.2} s",
        args.link_mbit,
        nominal.as_secs_f64(),
        raw.as_secs_f64(),
        all_links.as_secs_f64()
    );
    println!(
        "{:<12} {:>8} {:>8} {:>8} {:>9} {:>10} {:>10} {:>9} {:>6}",
        "shape",
        "first s",
        "last s",
        "x S/B",
        "x stream",
        "max up",
        "source up",
        "refetched",
        "cpu"
    );
    let mut rows = Vec::new();
    for (shape, fanout) in [("chain", 1), ("binary tree", 2), ("star", receivers)] {
        let s = spread(cluster, shape, fanout, size)?;
        println!(
            "{:<12} {:>8.2} {:>8.2} {:>8.2} {:>9.2} {:>9.2}x {:>9.2}x {:>9} {:>5.0}%",
            s.shape,
            s.first.as_secs_f64(),
            s.last.as_secs_f64(),
            s.last.as_secs_f64() / nominal.as_secs_f64(),
            s.last.as_secs_f64() / raw.as_secs_f64(),
            s.max_copies,
            s.source_copies,
            s.refetched,
            s.cpu_busy * 100.0,
        );
        rows.push(json!({
            "shape": s.shape, "fanout": fanout,
            "first_s": s.first.as_secs_f64(), "last_s": s.last.as_secs_f64(),
            "x_nominal": s.last.as_secs_f64() / nominal.as_secs_f64(),
            "x_stream": s.last.as_secs_f64() / raw.as_secs_f64(),
            "max_upload_copies": s.max_copies, "source_upload_copies": s.source_copies,
            "cpu_busy": s.cpu_busy,
        }));
    }
    Ok(json!({
        "receivers": receivers, "mib": mib, "link_mbit": args.link_mbit,
        "nominal_s": nominal.as_secs_f64(), "stream_s": raw.as_secs_f64(),
        "streams_at_once_s": all_links.as_secs_f64(), "rows": rows,
    }))
}

fn main() -> Result<()> {
    let args = Args::parse();
    if let Some(h) = args.helper {
        return helper(h);
    }
    let root = herd_image::workspace_root(env!("CARGO_MANIFEST_DIR"));
    let guest = herd_image::guest_binary(&root, true).context("herd-guest")?;
    let work = tempfile::tempdir()?;
    let images = work.path().join("images-root");
    herd_image::build_image(&images, "default", &guest, |_| {})?;
    let mut results = Vec::new();
    for run_spec in &args.runs {
        let (hosts, mib) = run_spec
            .split_once(':')
            .and_then(|(h, m)| Some((h.parse::<usize>().ok()?, m.parse::<u64>().ok()?)))
            .with_context(|| format!("--runs {run_spec}: HOSTS:MIB"))?;
        results.push(run(&args, work.path(), &images, hosts, mib)?);
        println!();
    }
    println!(
        "first/last: from the snapshot's capture to the first and last host holding it whole \
         (chunks checked); x S/B: the last over the link's nominal time for S; x stream: over \
         one plain TCP stream of S bytes on the same links, this run; max up / source up: \
         bytes a host sent on its link, in copies of S; cpu: how busy the machine's cores \
         were meanwhile (every host shares them)"
    );
    if let Some(path) = &args.csv {
        let mut csv = String::from("receivers,mib,shape,last_s,x_stream,x_nominal\n");
        for run in &results {
            for row in run["rows"].as_array().into_iter().flatten() {
                csv.push_str(&format!(
                    "{},{},{},{:.3},{:.3},{:.3}\n",
                    run["receivers"],
                    run["mib"],
                    row["shape"].as_str().unwrap_or_default(),
                    row["last_s"].as_f64().unwrap_or(0.0),
                    row["x_stream"].as_f64().unwrap_or(0.0),
                    row["x_nominal"].as_f64().unwrap_or(0.0),
                ));
            }
        }
        std::fs::write(path, csv)?;
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&json!({"runs": results}))?)?;
    }
    Ok(())
}
