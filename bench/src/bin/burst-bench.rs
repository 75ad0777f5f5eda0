//! Bursts through a real `herd up` on a real container: the grant's latency, from
//! `POST /v1/vms/{id}/bursts` to its answer (the quota is applied before the host
//! answers), against a bare `runc update --cpu-quota` of the same container in the same
//! run; and how late the agent takes a lease back after its expiry, watched on the
//! container's cgroup every millisecond.

use anyhow::{bail, Context, Result};
use clap::Parser;
use herd_bench::herd_up::{bench_image, median, ms, runc_root, Herd};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

#[derive(Parser)]
struct Args {
    /// Grants (each then waited out to its expiry) and bare updates.
    #[arg(long, default_value_t = 20)]
    runs: usize,
    /// Each lease's length, in seconds.
    #[arg(long, default_value_t = 1)]
    lease_s: u32,
    #[arg(long)]
    json: Option<PathBuf>,
}

fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The container's CPU quota in µs per period (cgroup v1 here, v2 elsewhere).
fn quota_us(vm: &str) -> Option<i64> {
    let v1 = Path::new("/sys/fs/cgroup/cpu/herd")
        .join(vm)
        .join("cpu.cfs_quota_us");
    if let Ok(text) = std::fs::read_to_string(&v1) {
        return text.trim().parse().ok();
    }
    let v2 =
        std::fs::read_to_string(Path::new("/sys/fs/cgroup/herd").join(vm).join("cpu.max")).ok()?;
    v2.split_whitespace().next()?.parse().ok()
}

/// A bare `runc update` of the container's CPU quota.
fn runc_update(root: &Path, name: &str, quota: i64) -> Result<Duration> {
    let started = Instant::now();
    let out = std::process::Command::new("runc")
        .arg("--root")
        .arg(root)
        .args(["update", "--cpu-quota", &quota.to_string(), name])
        .output()?;
    if !out.status.success() {
        bail!("runc update: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(started.elapsed())
}

fn percentile(mut xs: Vec<f64>, p: f64) -> f64 {
    xs.sort_by(f64::total_cmp);
    let i = ((xs.len() as f64 - 1.0) * p).round() as usize;
    xs.get(i).copied().unwrap_or(f64::NAN)
}

fn main() -> Result<()> {
    let args = Args::parse();
    let root = tempfile::tempdir()?;
    let image_dir = bench_image()?;
    let herd = Herd::start(root.path(), &image_dir, "oci")?;
    let vm = herd.call(
        reqwest::Method::POST,
        "/v1/vms",
        Some(
            json!({"name": "c1", "hypervisor": "oci", "vcpus": 1, "memory_mib": 64,
                    "command": ["sleep", "3600"]}),
        ),
    )?;
    let id = vm["id"].as_str().context("id")?.to_owned();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let vm = herd.call(reqwest::Method::GET, &format!("/v1/vms/{id}"), None)?;
        if vm["state"] == "running" {
            break;
        }
        if Instant::now() > deadline {
            bail!("the container never ran: {vm}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let shape = quota_us(&id).context("the container's quota")?;
    let runc = runc_root(&herd.data)?;
    let name = format!("herd-{id}");
    let (mut grants, mut bare, mut late) = (Vec::new(), Vec::new(), Vec::new());
    for n in 0..args.runs {
        let started = Instant::now();
        let lease: Value = herd.call(
            reqwest::Method::POST,
            &format!("/v1/vms/{id}/bursts"),
            Some(json!({"cpus": 1, "seconds": args.lease_s})),
        )?;
        grants.push(started.elapsed());
        if quota_us(&id) != Some(shape * 2) {
            bail!(
                "run {n}: granted but the quota is {:?}: {lease}",
                quota_us(&id)
            );
        }
        let expires = humantime::parse_rfc3339(lease["expires_at"].as_str().context("expiry")?)?
            .duration_since(UNIX_EPOCH)?
            .as_millis() as i64;
        let deadline = Instant::now() + Duration::from_secs(u64::from(args.lease_s) + 10);
        while quota_us(&id) != Some(shape) {
            if Instant::now() > deadline {
                bail!("run {n}: the lease was never taken back");
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        late.push((unix_ms() - expires) as f64);
        // The same change by hand, and back, on the same container.
        bare.push(runc_update(&runc, &name, shape * 2)?);
        runc_update(&runc, &name, shape)?;
        // The host takes one ask a second after three at once.
        std::thread::sleep(Duration::from_millis(1000));
    }
    let (g, b) = (ms(&grants), ms(&bare));
    let (mg, mb) = (median(g.clone()), median(b.clone()));
    println!(
        "bursts of a container, {} runs of a {} s lease",
        g.len(),
        args.lease_s
    );
    println!("{:<46} {:>9} {:>9} {:>9}", "", "p50 ms", "p99 ms", "x base");
    println!(
        "{:<46} {:>9.1} {:>9.1} {:>9.2}",
        "grant, request to answer (applied)",
        mg,
        percentile(g.clone(), 0.99),
        mg / mb
    );
    println!(
        "{:<46} {:>9.1} {:>9.1} {:>9}",
        "base: bare runc update --cpu-quota",
        mb,
        percentile(b.clone(), 0.99),
        "1.00"
    );
    println!(
        "{:<46} {:>9.1} {:>9.1} {:>9}",
        "revoke, expiry to quota back (late by)",
        percentile(late.clone(), 0.5),
        percentile(late.clone(), 0.99),
        "-"
    );
    if let Some(path) = args.json {
        std::fs::write(
            path,
            serde_json::to_vec_pretty(&json!({
                "grant_ms": g, "runc_update_ms": b, "revoke_late_ms": late,
            }))?,
        )?;
    }
    Ok(())
}
