//! A container's launch to its guest's hello, and its pause and resume, through a real
//! `herd up` (API, scheduler, agent, the oci driver) against a bare `runc` doing the
//! same to the same root: the image's root under a fresh overlay, the same
//! `config.json` the driver writes (`bundle::config`), herd-guest as PID 1 saying hello
//! on the same kind of socket. Alternating, so both see the same machine load.

use anyhow::{bail, Context, Result};
use clap::Parser;
use herd_agent::drivers::guest_config::{self, GuestIdentity};
use herd_agent::drivers::oci::bundle::{self, BundleSpec};
use herd_bench::herd_up::{bench_image, median, ms, Herd};
use herd_proto::guest::{FrameDecoder, GuestMsg};
use herd_proto::wire::VmSpec;
use serde_json::{json, Value};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

#[derive(Parser)]
struct Args {
    /// Launches per side.
    #[arg(long, default_value_t = 10)]
    runs: usize,
    #[arg(long)]
    json: Option<PathBuf>,
}

fn run(command: &mut Command) -> Result<()> {
    let out = command.output().with_context(|| format!("{command:?}"))?;
    if !out.status.success() {
        bail!(
            "{command:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// A bare runc container of the image, made and run by hand.
struct Bare {
    dir: PathBuf,
    runc_root: PathBuf,
    name: String,
}

impl Bare {
    /// Makes the bundle (overlay over `lower`, config, channel) and runs it to the
    /// guest's hello; returns the time from `runc run` to the hello.
    fn launch(dir: &Path, lower: &Path, n: usize) -> Result<(Bare, Duration)> {
        let id = uuid::Uuid::from_u128(0xba5e_0000 + n as u128);
        let dir = dir.join(id.to_string());
        let _ = std::fs::remove_dir_all(&dir);
        let (upper, work, rootfs, chan) = (
            dir.join("upper"),
            dir.join("work"),
            dir.join("bundle/rootfs"),
            dir.join("chan"),
        );
        for d in [&upper, &work, &rootfs, &chan] {
            std::fs::create_dir_all(d)?;
        }
        let started = Instant::now();
        run(Command::new("mount")
            .args(["-t", "overlay", "overlay", "-o"])
            .arg(format!(
                "lowerdir={},upperdir={},workdir={}",
                lower.display(),
                upper.display(),
                work.display()
            ))
            .arg(&rootfs))?;
        let spec = VmSpec {
            name: "bare".into(),
            hypervisor: "oci".into(),
            vcpus: 1,
            memory_mib: 128,
            image: "default".into(),
            command: vec!["sleep".into(), "3600".into()],
            policy: Default::default(),
            keep_running: false,
            disk_mib: 0,
            burst: Default::default(),
            seed: None,
        };
        let token = guest_config::new_token();
        let identity = GuestIdentity {
            id,
            spec: &spec,
            token: &token,
            born_unix_ms: None,
            now_unix_ms: herd_proto::clock::unix_ms(),
        };
        let line = format!(
            "{}{} herd.cpus=1\n",
            guest_config::identity(&identity),
            guest_config::clock_and_policy(&identity).map_err(anyhow::Error::msg)?
        );
        std::fs::write(chan.join("config"), line)?;
        let chan_text = chan.display().to_string();
        let cgroup = format!("/herd-bench/{id}");
        let config = bundle::config(&BundleSpec {
            name: "bare",
            vcpus: 1,
            memory_mib: 128,
            cgroup: &cgroup,
            channel_dir: &chan_text,
        });
        std::fs::write(dir.join("bundle/config.json"), serde_json::to_vec(&config)?)?;
        let listener = std::os::unix::net::UnixListener::bind(chan.join("guest.sock"))?;
        let runc_root = dir.join("runc");
        let name = format!("bench-{n}");
        let console = std::fs::File::create(dir.join("console.log"))?;
        run(Command::new("runc")
            .arg("--root")
            .arg(&runc_root)
            .args(["run", "--detach", "--bundle"])
            .arg(dir.join("bundle"))
            .arg(&name)
            .stdout(console.try_clone()?)
            .stderr(console))?;
        let bare = Bare {
            dir,
            runc_root,
            name,
        };
        let (mut socket, _) = listener.accept()?;
        socket.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut decoder = FrameDecoder::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = socket.read(&mut buf)?;
            if n == 0 {
                bail!("the bare container's guest closed its channel before its hello");
            }
            if decoder
                .feed::<GuestMsg>(&buf[..n])?
                .iter()
                .any(|m| matches!(m, GuestMsg::Hello { .. }))
            {
                return Ok((bare, started.elapsed()));
            }
        }
    }

    fn runc(&self, args: &[&str]) -> Result<Duration> {
        let started = Instant::now();
        run(Command::new("runc")
            .arg("--root")
            .arg(&self.runc_root)
            .args(args)
            .arg(&self.name))?;
        Ok(started.elapsed())
    }
}

impl Drop for Bare {
    fn drop(&mut self) {
        let _ = self.runc(&["delete", "--force"]);
        let _ = Command::new("umount")
            .arg(self.dir.join("bundle/rootfs"))
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

struct Api<'a>(&'a Herd);

impl Api<'_> {
    fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Result<Value> {
        self.0.call(method, path, body)
    }

    fn wait(&self, id: &str, state: &str) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let vm = self.call(reqwest::Method::GET, &format!("/v1/vms/{id}"), None)?;
            if vm["state"] == state {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("VM {id} is not {state}: {vm}");
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Launch to running (the guest's hello); returns the id and the time.
    fn launch(&self, n: usize) -> Result<(String, Duration)> {
        let started = Instant::now();
        let vm = self.call(
            reqwest::Method::POST,
            "/v1/vms",
            Some(
                json!({"name": format!("c{n}"), "hypervisor": "oci", "memory_mib": 128,
                        "command": ["sleep", "3600"]}),
            ),
        )?;
        let id = vm["id"].as_str().context("id")?.to_owned();
        self.wait(&id, "running")?;
        Ok((id, started.elapsed()))
    }

    fn act(&self, id: &str, action: &str, state: &str) -> Result<Duration> {
        let started = Instant::now();
        self.call(
            reqwest::Method::POST,
            &format!("/v1/vms/{id}/actions/{action}"),
            None,
        )?;
        self.wait(id, state)?;
        Ok(started.elapsed())
    }

    fn delete(&self, id: &str) -> Result<()> {
        self.call(reqwest::Method::DELETE, &format!("/v1/vms/{id}"), None)?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while self
            .0
            .http
            .get(format!("{}/v1/vms/{id}", self.0.url))
            .bearer_auth(&self.0.token)
            .send()?
            .status()
            .is_success()
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    let root = tempfile::tempdir()?;
    let image_dir = bench_image()?;
    let lower = herd_image::container_rootfs(&herd_image::image_dir(&image_dir, "default"))?;
    let herd = Herd::start(root.path(), &image_dir, "oci")?;
    let api = Api(&herd);
    let bare_dir = root.path().join("bare");
    let mut figures: [[Vec<Duration>; 2]; 3] = Default::default();
    for n in 0..args.runs + 1 {
        let (bare, launched) = Bare::launch(&bare_dir, &lower, n)?;
        let paused = bare.runc(&["pause"])?;
        let resumed = bare.runc(&["resume"])?;
        drop(bare);
        let (id, herd_launched) = api.launch(n)?;
        let herd_paused = api.act(&id, "pause", "paused")?;
        let herd_resumed = api.act(&id, "resume", "running")?;
        api.delete(&id)?;
        // The first round warms the caches and is not counted.
        if n == 0 {
            continue;
        }
        for (i, (bare, herd)) in [
            (launched, herd_launched),
            (paused, herd_paused),
            (resumed, herd_resumed),
        ]
        .into_iter()
        .enumerate()
        {
            figures[i][0].push(bare);
            figures[i][1].push(herd);
        }
        eprintln!(
            "run {n}: launch bare {:.0} ms herd {:.0} ms",
            launched.as_secs_f64() * 1000.0,
            herd_launched.as_secs_f64() * 1000.0
        );
    }
    println!(
        "containers under runc, {} runs each, median ms (herd: through herd up's API)",
        args.runs
    );
    println!(
        "{:<28} {:>9} {:>9} {:>8}",
        "", "bare ms", "herd ms", "x bare"
    );
    let mut out = serde_json::Map::new();
    for (i, what) in ["launch to guest hello", "pause", "resume"]
        .iter()
        .enumerate()
    {
        let (bare, herd) = (ms(&figures[i][0]), ms(&figures[i][1]));
        let (mb, mh) = (median(bare.clone()), median(herd.clone()));
        println!("{what:<28} {mb:>9.1} {mh:>9.1} {:>8.2}", mh / mb);
        out.insert(format!("{what} bare_ms"), json!(bare));
        out.insert(format!("{what} herd_ms"), json!(herd));
    }
    if let Some(path) = args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&out)?)?;
    }
    // The bare containers' cgroups went with them; their parent stays unless removed.
    for hierarchy in std::fs::read_dir("/sys/fs/cgroup")
        .into_iter()
        .flatten()
        .flatten()
    {
        let _ = std::fs::remove_dir(hierarchy.path().join("herd-bench"));
    }
    Ok(())
}
