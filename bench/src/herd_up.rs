//! A whole `herd up` (server and agent in one process, real drivers) for benchmarks that
//! measure herd end to end through its API.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn workspace_root() -> PathBuf {
    herd_image::workspace_root(env!("CARGO_MANIFEST_DIR"))
}

pub struct Herd {
    pub data: PathBuf,
    child: Child,
    pub url: String,
    pub token: String,
    pub http: reqwest::blocking::Client,
}

impl Drop for Herd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Herd {
    /// Starts `herd up` with these drivers under `root` and waits for its agent.
    pub fn start(root: &Path, image_dir: &Path, drivers: &str) -> Result<Herd> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| workspace_root().join("target"));
        let herd = target.join("release/herd");
        let data = root.join("herd");
        let child = Command::new(&herd)
            .args(["up", "--drivers", drivers, "--accel", "tcg", "--listen"])
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
            data,
            child,
            url,
            token,
            http,
        })
    }
}

/// The median of some figures (the mean of the middle two when they are even).
pub fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.total_cmp(b));
    let n = xs.len();
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
}

/// Builds the benchmarks' guest image (once per herd-guest build) and returns the
/// directory `herd up --image-dir` takes.
pub fn bench_image() -> Result<PathBuf> {
    let workspace = workspace_root();
    let image_dir = workspace.join("target/tmp/herd-bench-images");
    let guest = herd_image::guest_binary(&workspace, true)?;
    herd_image::build_image(&image_dir, "default", &guest, |m| eprintln!("image: {m}"))?;
    Ok(image_dir)
}

impl Herd {
    /// One API call as the admin; a status that is not a success is the error.
    pub fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<serde_json::Value> {
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(&self.token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send()?;
        let status = response.status();
        let body: serde_json::Value = response.json().unwrap_or(serde_json::Value::Null);
        if !status.is_success() {
            bail!("{path}: {status}: {body}");
        }
        Ok(body)
    }
}

/// Durations in milliseconds.
pub fn ms(xs: &[Duration]) -> Vec<f64> {
    xs.iter().map(|d| d.as_secs_f64() * 1000.0).collect()
}

/// Where the agent's runc keeps its containers' state.
pub fn runc_root(data: &Path) -> Result<PathBuf> {
    let mut stack = vec![data.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            if entry.file_name() == ".runc" {
                return Ok(entry.path());
            }
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(entry.path());
            }
        }
    }
    bail!("no runc state under {}", data.display())
}
