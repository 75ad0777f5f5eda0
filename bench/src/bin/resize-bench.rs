//! Resize in place, from `POST /v1/vms/{id}/resize` to the resize being `done`, through
//! a real `herd up`: a container's (its cgroup limits change at once) against a bare
//! `runc update` of the same container, and a qemu VM's (a restart in its new shape, to
//! its guest's hello) against herd stopping and starting the same VM, in the same run.

use anyhow::{bail, Context, Result};
use clap::Parser;
use herd_bench::herd_up::{bench_image, median, ms, runc_root, Herd};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Parser)]
struct Args {
    /// Resizes of the container per side.
    #[arg(long, default_value_t = 20)]
    container_runs: usize,
    /// Resizes of the VM per side (each a boot).
    #[arg(long, default_value_t = 4)]
    vm_runs: usize,
    #[arg(long)]
    json: Option<PathBuf>,
}

impl Bench {
    fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Result<Value> {
        self.herd.call(method, path, body)
    }

    /// Polls a VM until `done` says so.
    fn wait(&self, id: &str, what: &str, done: impl Fn(&Value) -> bool) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let vm = self.call(reqwest::Method::GET, &format!("/v1/vms/{id}"), None)?;
            if done(&vm) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("VM {id} is not {what}: {vm}");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn launch(&self, name: &str, hypervisor: &str) -> Result<String> {
        let vm = self.call(
            reqwest::Method::POST,
            "/v1/vms",
            Some(
                json!({"name": name, "hypervisor": hypervisor, "memory_mib": 128,
                        "command": ["sleep", "3600"]}),
            ),
        )?;
        let id = vm["id"].as_str().context("id")?.to_owned();
        self.wait(&id, "running", |v| v["state"] == "running")?;
        Ok(id)
    }

    /// One resize through herd, to `done`.
    fn resize(&self, id: &str, memory_mib: u64) -> Result<Duration> {
        let started = Instant::now();
        let resize = self.call(
            reqwest::Method::POST,
            &format!("/v1/vms/{id}/resize"),
            Some(json!({"memory_mib": memory_mib, "restart": true})),
        )?;
        let rid = resize["id"].as_str().context("resize id")?.to_owned();
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let list = self.call(reqwest::Method::GET, &format!("/v1/vms/{id}/resizes"), None)?;
            let now = list["items"]
                .as_array()
                .and_then(|items| items.iter().find(|r| r["id"] == rid.as_str()))
                .cloned()
                .unwrap_or(Value::Null);
            match now["status"].as_str() {
                Some("done") => return Ok(started.elapsed()),
                Some("failed") => bail!("resize failed: {now}"),
                _ if Instant::now() > deadline => bail!("resize did not end: {now}"),
                _ => std::thread::sleep(Duration::from_millis(2)),
            }
        }
    }

    /// A stop and a start through herd, to the guest's hello.
    fn restart(&self, id: &str) -> Result<Duration> {
        let started = Instant::now();
        self.call(
            reqwest::Method::POST,
            &format!("/v1/vms/{id}/actions/stop"),
            None,
        )?;
        self.wait(id, "stopped", |v| v["state"] == "stopped")?;
        self.call(
            reqwest::Method::POST,
            &format!("/v1/vms/{id}/actions/start"),
            None,
        )?;
        self.wait(id, "running", |v| v["state"] == "running")?;
        Ok(started.elapsed())
    }
}

struct Bench {
    herd: Herd,
}

/// A bare `runc update` of the same container.
fn runc_update(root: &Path, name: &str, memory_mib: u64) -> Result<Duration> {
    let started = Instant::now();
    let out = std::process::Command::new("runc")
        .arg("--root")
        .arg(root)
        .args(["update", "--memory", &(memory_mib << 20).to_string(), name])
        .output()?;
    if !out.status.success() {
        bail!("runc update: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(started.elapsed())
}

fn main() -> Result<()> {
    let args = Args::parse();
    let root = tempfile::tempdir()?;
    let image_dir = bench_image()?;
    let bench = Bench {
        herd: Herd::start(root.path(), &image_dir, "qemu,oci")?,
    };
    let c1 = bench.launch("c1", "oci")?;
    let runc = runc_root(&bench.herd.data)?;
    let name = format!("herd-{c1}");
    let (mut herd_c, mut bare_c) = (Vec::new(), Vec::new());
    for n in 0..args.container_runs {
        let memory = if n % 2 == 0 { 192 } else { 128 };
        herd_c.push(bench.resize(&c1, memory)?);
        bare_c.push(runc_update(&runc, &name, memory)?);
    }
    let v1 = bench.launch("v1", "qemu")?;
    let (mut herd_v, mut restart_v) = (Vec::new(), Vec::new());
    for n in 0..args.vm_runs {
        herd_v.push(bench.resize(&v1, if n % 2 == 0 { 192 } else { 128 })?);
        restart_v.push(bench.restart(&v1)?);
        eprintln!(
            "vm run {n}: resize {:.0} ms, stop+start {:.0} ms",
            herd_v[n].as_secs_f64() * 1000.0,
            restart_v[n].as_secs_f64() * 1000.0
        );
    }
    let (hc, bc, hv, rv) = (ms(&herd_c), ms(&bare_c), ms(&herd_v), ms(&restart_v));
    let (mhc, mbc, mhv, mrv) = (
        median(hc.clone()),
        median(bc.clone()),
        median(hv.clone()),
        median(rv.clone()),
    );
    println!("resize in place, request to done, median of the runs (TCG for the VM)");
    println!(
        "{:<44} {:>10} {:>10} {:>8}",
        "", "herd ms", "base ms", "x base"
    );
    println!(
        "{:<44} {:>10.1} {:>10.1} {:>8.2}",
        format!("container, {} runs (base: bare runc update)", hc.len()),
        mhc,
        mbc,
        mhc / mbc
    );
    println!(
        "{:<44} {:>10.0} {:>10.0} {:>8.2}",
        format!("qemu VM, {} runs (base: herd stop + start)", hv.len()),
        mhv,
        mrv,
        mhv / mrv
    );
    if let Some(path) = args.json {
        std::fs::write(
            path,
            serde_json::to_vec_pretty(&json!({
                "container_herd_ms": hc, "container_runc_ms": bc,
                "vm_herd_ms": hv, "vm_restart_ms": rv,
            }))?,
        )?;
    }
    Ok(())
}
