//! The scale run: one real `herd server` process, measured alone, against
//! `herd sim` running thousands of simulated agents (the real agent code and wire
//! protocol, the sim driver) in another process.
//!
//! The run: start the server; start the sim (it joins its hosts, launches the VMs in
//! batches, waits for all to run, then churns them at the rate asked for and measures
//! the lag of every change); meanwhile sample the server's resident memory against the
//! number of VMs it holds, and time `GET /v1/vms` with filters while the sim churns;
//! then kill the server with SIGKILL, start it again and let the sim time the full
//! resync of every host; last, the sim kills a few agents and times how long the server
//! takes to mark their hosts down. The server's figures come from here, the agents'
//! from the sim's JSON; both go into one JSON document and two CSVs for the plots.

use anyhow::{anyhow, bail, Context, Result};
use clap::Parser;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 10_000)]
    hosts: u32,
    #[arg(long, default_value_t = 100)]
    vms_per_host: u32,
    /// Churn, in percent of all VMs per sync interval.
    #[arg(long, default_value_t = 1.0)]
    churn: f64,
    /// More churn rates, each measured for --phase-seconds after the first.
    #[arg(long, value_delimiter = ',', default_values_t = [0.25, 0.5])]
    churn_steps: Vec<f64>,
    /// Seconds of the churn phase.
    #[arg(long, default_value_t = 30)]
    phase_seconds: u64,
    /// Agents the sim kills at the end, to time dead-host detection.
    #[arg(long, default_value_t = 5)]
    kill_hosts: u32,
    /// `GET /v1/vms` requests per filter.
    #[arg(long, default_value_t = 200)]
    list_requests: usize,
    /// The herd binary (default: target/release/herd next to this one).
    #[arg(long)]
    herd: Option<PathBuf>,
    /// Where server and sim keep their data (default: a fresh temporary dir).
    #[arg(long)]
    work_dir: Option<PathBuf>,
    #[arg(long, default_value = "127.0.0.1:7391")]
    listen: String,
    #[arg(long)]
    json: Option<PathBuf>,
    /// Where the CSVs for the plots go.
    #[arg(long, default_value = "bench/out")]
    out_dir: PathBuf,
}

/// A child process that is killed and reaped when dropped, so that a run failing
/// half-way leaves neither server nor sim behind.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Fails if the sim has ended: it runs until the whole measurement is done.
fn sim_still_running(sim: &mut Reaped, log: &Path) -> Result<()> {
    match sim.0.try_wait()? {
        Some(status) => bail!("herd sim ended early ({status}); see {}", log.display()),
        None => Ok(()),
    }
}

/// The server process and how to reach it.
struct Server {
    child: Reaped,
    url: String,
    token: String,
    http: reqwest::blocking::Client,
}

fn herd_binary(args: &Args) -> Result<PathBuf> {
    if let Some(path) = &args.herd {
        return Ok(path.clone());
    }
    let me = std::env::current_exe().context("locating this binary")?;
    let path = me.with_file_name("herd");
    if !path.exists() {
        bail!(
            "{} not found: build it with `cargo build --release -p herd`",
            path.display()
        );
    }
    Ok(path)
}

fn start_server(herd: &Path, data_dir: &Path, listen: &str) -> Result<Server> {
    let log =
        std::fs::File::create(data_dir.with_extension("log")).context("creating the server log")?;
    let child = Command::new(herd)
        .args(["server", "--data-dir"])
        .arg(data_dir)
        .args(["--listen", listen, "--default-hypervisor", "sim"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .context("starting herd server")?;
    let child = Reaped(child);
    let url = format!("https://{listen}");
    let deadline = Instant::now() + Duration::from_secs(300);
    // The CA and the admin token appear in the data dir at first start.
    loop {
        if Instant::now() > deadline {
            bail!("the server did not come up in 300 s; see its log");
        }
        let (Ok(ca), Ok(token)) = (
            std::fs::read_to_string(data_dir.join("ca.pem")),
            std::fs::read_to_string(data_dir.join("admin.token")),
        ) else {
            std::thread::sleep(Duration::from_millis(100));
            continue;
        };
        let http = reqwest::blocking::Client::builder()
            .add_root_certificate(
                reqwest::Certificate::from_pem(ca.as_bytes()).context("the server's CA")?,
            )
            .tls_built_in_root_certs(false)
            .timeout(Duration::from_secs(60))
            .build()
            .context("HTTPS client")?;
        if http
            .get(format!("{url}/healthz"))
            .send()
            .is_ok_and(|r| r.status().is_success())
        {
            return Ok(Server {
                child,
                url,
                token: token.trim().to_owned(),
                http,
            });
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

impl Server {
    fn get(&self, path: &str) -> Result<reqwest::blocking::Response> {
        let response = self
            .http
            .get(format!("{}{path}", self.url))
            .bearer_auth(&self.token)
            .send()
            .with_context(|| format!("GET {path}"))?;
        if !response.status().is_success() {
            bail!("GET {path}: {}", response.status());
        }
        Ok(response)
    }

    /// VMs the server holds, by observed state, from /metrics.
    fn vm_counts(&self) -> Result<Vec<(String, u64)>> {
        let text = self.get("/metrics")?.text()?;
        Ok(text
            .lines()
            .filter_map(|line| line.strip_prefix("herd_vms{state=\""))
            .filter_map(|rest| {
                let (state, n) = rest.split_once("\"} ")?;
                Some((state.to_owned(), n.trim().parse().ok()?))
            })
            .collect())
    }

    fn rss_kib(&self) -> Result<u64> {
        rss_kib(self.child.0.id())
    }
}

fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| anyhow!("no VmRSS for pid {pid}"))
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

/// Times `GET /v1/vms` pages with each kind of filter, on the live server.
fn time_listings(server: &Server, n: usize, host: Option<&str>) -> Result<Value> {
    let mut queries = vec![
        (
            "first page, no filter".to_owned(),
            "/v1/vms?limit=100".to_owned(),
        ),
        (
            "state=running".to_owned(),
            "/v1/vms?state=running&limit=100".to_owned(),
        ),
        (
            "project=default&state=paused".to_owned(),
            "/v1/vms?project=default&state=paused&limit=100".to_owned(),
        ),
        (
            "state=error (rare)".to_owned(),
            "/v1/vms?state=error&limit=100".to_owned(),
        ),
        (
            "name=<exact, no match>".to_owned(),
            "/v1/vms?name=sim-none&limit=100".to_owned(),
        ),
    ];
    if let Some(host) = host {
        queries.push((
            "host=<one host>".to_owned(),
            format!("/v1/vms?host={host}&limit=100"),
        ));
    }
    let mut results = Vec::new();
    let mut all = Vec::new();
    for (label, query) in &queries {
        let mut times = Vec::with_capacity(n);
        // Walk pages with the cursor, so deep pages are timed too.
        let mut cursor: Option<String> = None;
        for _ in 0..n {
            let path = match &cursor {
                Some(c) => format!("{query}&cursor={c}"),
                None => query.clone(),
            };
            let started = Instant::now();
            let page: Value = server.get(&path)?.json()?;
            times.push(started.elapsed().as_secs_f64() * 1000.0);
            cursor = page["next_cursor"].as_str().map(str::to_owned);
        }
        times.sort_by(f64::total_cmp);
        all.extend_from_slice(&times);
        results.push(json!({
            "filter": label,
            "requests": n,
            "p50_ms": percentile(&times, 0.5),
            "p99_ms": percentile(&times, 0.99),
            "max_ms": percentile(&times, 1.0),
        }));
    }
    all.sort_by(f64::total_cmp);
    Ok(json!({
        "by_filter": results,
        "p50_ms": percentile(&all, 0.5),
        "p99_ms": percentile(&all, 0.99),
        "max_ms": percentile(&all, 1.0),
    }))
}

fn main() -> Result<()> {
    let args = Args::parse();
    let herd = herd_binary(&args)?;
    let scratch = tempfile::tempdir().context("temporary dir")?;
    let work = args
        .work_dir
        .clone()
        .unwrap_or_else(|| scratch.path().to_owned());
    std::fs::create_dir_all(&work)?;
    std::fs::create_dir_all(&args.out_dir)?;
    let data_dir = work.join("server");
    let sim_dir = work.join("sim");
    let total_vms = u64::from(args.hosts) * u64::from(args.vms_per_host);
    eprintln!(
        "scale run: {} hosts x {} VMs = {total_vms} VMs, churn {} %, {} s",
        args.hosts, args.vms_per_host, args.churn, args.phase_seconds
    );

    let server = start_server(&herd, &data_dir, &args.listen)?;
    let started = Instant::now();
    let churn = args.churn.to_string();
    let churn_steps = args
        .churn_steps
        .iter()
        .map(f64::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let sim_log = work.join("sim.log");
    let mut sim = Command::new(&herd)
        .args(["sim", "-o", "json", "--wait-resync", "--dir"])
        .arg(&sim_dir)
        .args(["--hosts", &args.hosts.to_string()])
        .args(["--vms-per-host", &args.vms_per_host.to_string()])
        .args(["--churn", &churn])
        .args(["--duration", &args.phase_seconds.to_string()])
        .args(["--kill-hosts", &args.kill_hosts.to_string()])
        // Launching a million VMs through one server on two cores takes minutes.
        .args(["--setup-timeout", "3600s"])
        .args(if churn_steps.is_empty() {
            vec![]
        } else {
            vec!["--churn-steps".to_owned(), churn_steps.clone()]
        })
        .env("HERD_URL", &server.url)
        .env("HERD_TOKEN", &server.token)
        .env("HERD_CA", data_dir.join("ca.pem"))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting herd sim")?;
    let sim_pid = sim.id();
    // The sim's progress goes to the terminal and its log.
    let sim_err = sim.stderr.take().context("sim stderr")?;
    let log = Arc::new(Mutex::new(std::fs::File::create(&sim_log)?));
    let log_writer = log.clone();
    // The sim says when it has measured and waits for the server to go away.
    let measured = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let measured_seen = measured.clone();
    // And when it starts churning: listings are timed under that load.
    let churning = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let churning_seen = churning.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(sim_err).lines().map_while(Result::ok) {
            if line.contains("lose its server and resync") {
                measured_seen.store(true, std::sync::atomic::Ordering::Relaxed);
            }
            if line.contains("measuring for") {
                churning_seen.store(true, std::sync::atomic::Ordering::Relaxed);
            }
            eprintln!("  sim: {line}");
            if let Ok(mut file) = log_writer.lock() {
                let _ = writeln!(file, "{line}");
            }
        }
    });
    let sim_out = sim.stdout.take().context("sim stdout")?;
    let mut sim = Reaped(sim);
    let sim_json = std::thread::spawn(move || -> String {
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut BufReader::new(sim_out), &mut text);
        text
    });

    // Ramp: server memory against the VMs it holds, until all run.
    let mut memory_rows = Vec::new();
    let mut peak_sim_rss = 0u64;
    loop {
        sim_still_running(&mut sim, &sim_log)?;
        let counts = server.vm_counts()?;
        let held: u64 = counts.iter().map(|(_, n)| n).sum();
        // The sim starts churning (pausing and resuming VMs) as soon as it has seen
        // every VM run, so paused ones count as up here.
        let running: u64 = counts
            .iter()
            .filter(|(state, _)| state == "running" || state == "paused")
            .map(|(_, n)| n)
            .sum();
        let rss = server.rss_kib()?;
        peak_sim_rss = peak_sim_rss.max(rss_kib(sim_pid).unwrap_or(0));
        memory_rows.push((held, rss));
        eprintln!(
            "  [{:>5.0} s] server holds {held} VMs ({running} running), RSS {} MiB",
            started.elapsed().as_secs_f64(),
            rss / 1024
        );
        if running >= total_vms {
            break;
        }
        std::thread::sleep(Duration::from_secs(5));
    }
    let ramp_s = started.elapsed().as_secs_f64();

    // Churn phases: memory, and listings timed under load, in the first phase.
    while !churning.load(std::sync::atomic::Ordering::Relaxed) {
        sim_still_running(&mut sim, &sim_log)?;
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(3));
    let host_for_filter: Option<String> = server
        .get("/v1/hosts")?
        .json::<Value>()?
        .as_array()
        .and_then(|hosts| hosts.first())
        .and_then(|host| host["id"].as_str().map(str::to_owned));
    let listings = time_listings(&server, args.list_requests, host_for_filter.as_deref())?;
    eprintln!(
        "  GET /v1/vms at {total_vms} VMs: p50 {:.1} ms, p99 {:.1} ms",
        listings["p50_ms"].as_f64().unwrap_or(f64::NAN),
        listings["p99_ms"].as_f64().unwrap_or(f64::NAN)
    );
    let mut peak_rss = memory_rows.iter().map(|(_, rss)| *rss).max().unwrap_or(0);
    while !measured.load(std::sync::atomic::Ordering::Relaxed) {
        sim_still_running(&mut sim, &sim_log)?;
        let rss = server.rss_kib()?;
        peak_rss = peak_rss.max(rss);
        peak_sim_rss = peak_sim_rss.max(rss_kib(sim_pid).unwrap_or(0));
        std::thread::sleep(Duration::from_secs(1));
    }
    let steady_rss = server.rss_kib()?;
    memory_rows.push((total_vms, steady_rss));

    // Crash and restart: the sim times the full resync of every host.
    eprintln!("  killing the server (SIGKILL) and starting it again");
    // SIGKILL, as a crash would.
    drop(server);
    let restarted_at = Instant::now();
    let server = start_server(&herd, &data_dir, &args.listen)?;
    let serving_s = restarted_at.elapsed().as_secs_f64();
    eprintln!("  server serving again after {serving_s:.1} s; the sim waits for resync");
    let mut restarted_peak_rss = 0u64;
    let status = loop {
        if let Some(status) = sim.0.try_wait()? {
            break status;
        }
        restarted_peak_rss = restarted_peak_rss.max(server.rss_kib().unwrap_or(0));
        std::thread::sleep(Duration::from_millis(500));
    };
    let sim_text = sim_json.join().map_err(|_| anyhow!("sim output reader"))?;
    if !status.success() {
        bail!("herd sim failed ({status}); see {}", sim_log.display());
    }
    let sim_figures: Value = serde_json::from_str(sim_text.trim())
        .with_context(|| format!("herd sim printed no JSON: {sim_text:?}"))?;
    let after_restart_rss = server.rss_kib()?;
    drop(server);

    let mut memory_csv = String::from("vms,server_rss_mib\n");
    for (vms, rss) in &memory_rows {
        memory_csv.push_str(&format!("{vms},{:.1}\n", *rss as f64 / 1024.0));
    }
    std::fs::write(args.out_dir.join("scale-memory.csv"), memory_csv)?;
    let mut lag_csv = String::from("churn_pct,lag_p50_ms,lag_p99_ms,interval_ms\n");
    let mut steps = sim_figures["churn_steps"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    steps.push(sim_figures.clone());
    // In order of churn, for the plot's line.
    steps.sort_by(|a, b| {
        let pct = |v: &Value| v["churn_pct"].as_f64().unwrap_or(0.0);
        pct(a).total_cmp(&pct(b))
    });
    for step in &steps {
        lag_csv.push_str(&format!(
            "{},{},{},{}\n",
            step["churn_pct"],
            step["lag_ms"]["p50"],
            step["lag_ms"]["p99"],
            sim_figures["interval_ms"]
        ));
    }
    std::fs::write(args.out_dir.join("scale-lag.csv"), lag_csv)?;

    let figures = json!({
        "hosts": args.hosts,
        "vms": total_vms,
        "ramp_s": ramp_s,
        "server_rss_mib": {
            "peak": peak_rss as f64 / 1024.0,
            "steady_at_all_vms": steady_rss as f64 / 1024.0,
            "after_restart_and_resync": after_restart_rss as f64 / 1024.0,
            "peak_after_restart": restarted_peak_rss as f64 / 1024.0,
        },
        "sim_rss_mib_peak": peak_sim_rss as f64 / 1024.0,
        "restart_to_serving_s": serving_s,
        "list_vms": listings,
        "sim": sim_figures,
    });
    println!("{}", serde_json::to_string_pretty(&figures)?);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&figures)?)?;
    }
    Ok(())
}
