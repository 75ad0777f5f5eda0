//! A harness that runs `herd server` and `herd agent` as real processes on loopback.
//!
//! Servers speak HTTPS (unless a test passes `--insecure-http`): the harness trusts
//! only the CA the server made in its data dir, and agents join pinning its
//! fingerprint, so every test runs the real TLS and mTLS path.

#![allow(dead_code)]

pub mod browser;
pub mod cluster;

use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn herd_bin() -> &'static str {
    env!("CARGO_BIN_EXE_herd")
}

/// Runs the CLI with its own config dir (a separate "machine") and these variables.
pub fn herd_cli(config: &Path, env: &[(&str, &str)], args: &[&str]) -> std::process::Output {
    let mut command = Command::new(herd_bin());
    command
        .args(args)
        .env("XDG_CONFIG_HOME", config)
        .env_remove("HERD_URL")
        .env_remove("HERD_TOKEN")
        .env_remove("HERD_CA");
    for (key, value) in env {
        command.env(key, value);
    }
    command.output().expect("run herd")
}

/// Logs the CLI with config dir `config` in to `server` as its admin.
pub fn login_admin(config: &Path, server: &Server) {
    ok(herd_cli(
        config,
        &[],
        &[
            "login",
            "--url",
            &server.url,
            "--token",
            &server.token,
            "--ca-fingerprint",
            &server.ca_fingerprint(),
        ],
    ));
}

/// Removes every container the agents with these data dirs made when the test ends,
/// passed or failed: containers outlive their agent, and busy ones left behind would
/// skew the next run.
pub struct Containers(pub Vec<PathBuf>);

impl Drop for Containers {
    fn drop(&mut self) {
        for dir in &self.0 {
            herd_testbed::end_containers(&dir.join("oci"));
        }
    }
}

/// What a CLI run that must succeed printed.
pub fn ok(out: std::process::Output) -> String {
    assert!(
        out.status.success(),
        "herd failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Why a CLI run that must fail failed.
pub fn err(out: std::process::Output) -> String {
    assert!(!out.status.success(), "herd should have failed");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A child process killed (SIGKILL) and reaped on drop.
pub struct Proc {
    pub child: Child,
    pub name: String,
}

impl Proc {
    pub fn spawn(name: &str, args: &[&str], log: &Path) -> Proc {
        Proc::spawn_env(name, args, log, &[])
    }

    pub fn spawn_env(name: &str, args: &[&str], log: &Path, env: &[(&str, &Path)]) -> Proc {
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("log file");
        let mut command = Command::new(herd_bin());
        for (key, value) in env {
            command.env(key, value);
        }
        let child = command
            .args(args)
            .env("HERD_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .expect("spawn herd");
        Proc {
            child,
            name: name.to_owned(),
        }
    }

    /// The exit status, if the process has ended.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub struct Server {
    pub proc: Proc,
    pub url: String,
    pub token: String,
    pub data_dir: PathBuf,
    pub port: u16,
    /// The server's CA (PEM); `None` with `--insecure-http`.
    pub ca_pem: Option<String>,
    extra: Vec<String>,
}

/// A reqwest client that trusts only `ca_pem` (or plain, for http URLs).
pub fn pinned_client(ca_pem: Option<&str>) -> reqwest::Client {
    match ca_pem {
        Some(ca_pem) => reqwest::Client::builder()
            .use_preconfigured_tls(herd_tls::client_config(ca_pem, None).expect("CA config"))
            .build()
            .expect("https client"),
        None => reqwest::Client::new(),
    }
}

/// Waits for the server to write its CA (before it listens) and returns it.
pub async fn wait_ca(proc: &mut Proc, data_dir: &Path, log: &Path, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(pem) = std::fs::read_to_string(data_dir.join("ca.pem")) {
            if pem.contains("END CERTIFICATE") {
                return pem;
            }
        }
        if let Some(status) = proc.exited() {
            panic!(
                "{} exited ({status}): {}",
                proc.name,
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        assert!(
            Instant::now() < deadline,
            "no CA in {}: {}",
            data_dir.display(),
            std::fs::read_to_string(log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn server_args(data_dir: &Path, port: u16, extra: &[String]) -> Vec<String> {
    let mut args = vec![
        "server".to_owned(),
        "--data-dir".into(),
        data_dir.display().to_string(),
        "--listen".into(),
        format!("127.0.0.1:{port}"),
        "--default-hypervisor".into(),
        "sim".into(),
    ];
    args.extend(extra.iter().cloned());
    args
}

impl Server {
    pub async fn start(root: &Path, extra: &[&str]) -> Server {
        let data_dir = root.join("server");
        let port = free_port();
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let args = server_args(&data_dir, port, &extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let log = root.join("server.log");
        let mut proc = Proc::spawn("server", &args, &log);
        let insecure = extra.iter().any(|a| a == "--insecure-http");
        let (url, ca_pem) = if insecure {
            (format!("http://127.0.0.1:{port}"), None)
        } else {
            let ca_pem = wait_ca(&mut proc, &data_dir, &log, Duration::from_secs(30)).await;
            (format!("https://127.0.0.1:{port}"), Some(ca_pem))
        };
        wait_healthy(&pinned_client(ca_pem.as_deref()), &url).await;
        let token = std::fs::read_to_string(data_dir.join("admin.token"))
            .expect("admin token written")
            .trim()
            .to_owned();
        Server {
            proc,
            url,
            token,
            data_dir,
            port,
            ca_pem,
            extra,
        }
    }

    /// The SHA-256 fingerprint of the server's CA.
    pub fn ca_fingerprint(&self) -> String {
        herd_tls::fingerprint_of_pem(self.ca_pem.as_deref().expect("an HTTPS server"))
            .expect("CA fingerprint")
    }

    /// Kills the server with SIGKILL and starts it again on the same port and data.
    pub async fn kill9_and_restart(&mut self, root: &Path) {
        self.proc.kill9();
        let args = server_args(&self.data_dir, self.port, &self.extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.proc = Proc::spawn("server", &args, &root.join("server.log"));
        wait_healthy(&pinned_client(self.ca_pem.as_deref()), &self.url).await;
    }

    pub fn client(&self) -> Api {
        Api {
            url: self.url.clone(),
            token: self.token.clone(),
            http: pinned_client(self.ca_pem.as_deref()),
        }
    }

    pub async fn join_token(&self) -> String {
        let body = self
            .client()
            .post("/v1/join-tokens", json!({}))
            .await
            .expect("join token");
        body["token"].as_str().expect("token").to_owned()
    }

    pub async fn start_agent(&self, root: &Path, name: &str, extra: &[&str]) -> Agent {
        self.start_agent_env(root, name, extra, &[]).await
    }

    /// Like [`Server::start_agent`], with these variables in the agent's environment.
    pub async fn start_agent_env(
        &self,
        root: &Path,
        name: &str,
        extra: &[&str],
        env: &[(&str, &Path)],
    ) -> Agent {
        let token = self.join_token().await;
        let data_dir = root.join(name);
        let mut args: Vec<String> = vec![
            "agent".into(),
            "--join".into(),
            self.url.clone(),
            "--token".into(),
            token,
            "--data-dir".into(),
            data_dir.display().to_string(),
            "--hostname".into(),
            name.into(),
            "--drivers".into(),
            "sim".into(),
        ];
        if self.ca_pem.is_some() {
            // The first join pins the CA by fingerprint, as `herd host join-token` says.
            args.extend(["--ca-fingerprint".into(), self.ca_fingerprint()]);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let proc = Proc::spawn_env(name, &refs, &root.join(format!("{name}.log")), env);
        Agent {
            proc,
            args,
            log: root.join(format!("{name}.log")),
            data_dir,
        }
    }
}

pub struct Agent {
    pub proc: Proc,
    args: Vec<String>,
    log: PathBuf,
    pub data_dir: PathBuf,
}

impl Agent {
    /// Starts the agent again with its saved credentials (no join token).
    pub fn restart(&mut self) {
        self.proc.kill9();
        let mut args = Vec::new();
        let mut skip = false;
        for arg in &self.args {
            if skip {
                skip = false;
                continue;
            }
            if arg == "--token" || arg == "--join" {
                skip = true;
                continue;
            }
            args.push(arg.as_str());
        }
        self.proc = Proc::spawn(&self.proc.name.clone(), &args, &self.log);
    }
}

pub async fn wait_healthy(http: &reqwest::Client, url: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(response) = http.get(format!("{url}/healthz")).send().await {
            if response.status().is_success() {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "server at {url} did not become healthy"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[derive(Clone)]
pub struct Api {
    pub url: String,
    pub token: String,
    pub http: reqwest::Client,
}

impl Api {
    pub async fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<(u16, Value), reqwest::Error> {
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(&self.token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await?;
        let status = response.status().as_u16();
        let bytes = response.bytes().await?;
        let value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Ok((status, value))
    }

    pub async fn get(&self, path: &str) -> Value {
        let (status, body) = self
            .request(reqwest::Method::GET, path, None)
            .await
            .expect("GET");
        assert_eq!(status, 200, "GET {path}: {body}");
        body
    }

    pub async fn post(&self, path: &str, body: Value) -> Result<Value, String> {
        let (status, body) = self
            .request(reqwest::Method::POST, path, Some(body))
            .await
            .map_err(|e| e.to_string())?;
        if (200..300).contains(&status) {
            Ok(body)
        } else {
            Err(format!("{status}: {body}"))
        }
    }

    /// Every VM, following pagination.
    pub async fn vms(&self) -> Vec<Value> {
        let mut all = Vec::new();
        let mut cursor = String::new();
        loop {
            let page = self.get(&format!("/v1/vms?limit=1000{cursor}")).await;
            all.extend(page["items"].as_array().cloned().unwrap_or_default());
            match page["next_cursor"].as_str() {
                Some(next) => cursor = format!("&cursor={next}"),
                None => return all,
            }
        }
    }

    pub async fn hosts(&self) -> Vec<Value> {
        self.get("/v1/hosts")
            .await
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// Polls until `done` holds for the VM list, or panics after `timeout`.
    pub async fn wait_vms(
        &self,
        what: &str,
        timeout: Duration,
        done: impl Fn(&[Value]) -> bool,
    ) -> Vec<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let vms = self.vms().await;
            if done(&vms) {
                return vms;
            }
            if Instant::now() > deadline {
                let states: Vec<String> = vms
                    .iter()
                    .map(|v| format!("{}={}", v["name"], v["state"]))
                    .collect();
                panic!("timed out waiting for {what}: {}", states.join(" "));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn wait_hosts(
        &self,
        what: &str,
        timeout: Duration,
        done: impl Fn(&[Value]) -> bool,
    ) -> Vec<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let hosts = self.hosts().await;
            if done(&hosts) {
                return hosts;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: {hosts:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

pub fn all_in(vms: &[Value], state: &str) -> bool {
    vms.iter().all(|v| v["state"] == state)
}

/// Whether containers can run here (runc, as root); says so when they cannot.
pub fn runc_usable() -> bool {
    let present = std::process::Command::new("runc")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    let root = nix::unistd::geteuid().is_root();
    if !present || !root {
        eprintln!("NOTE: no containers in this run: they need runc and root");
    }
    present && root
}

pub fn qemu_present() -> bool {
    let ok = std::process::Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("SKIPPED: qemu-system-x86_64 is not installed (scripts/test installs it)");
    }
    ok
}

/// A whole `herd up` (server and agent) as one process, with real QEMU guests.
pub struct Up {
    pub proc: Proc,
    args: Vec<String>,
    log: PathBuf,
    pub data_dir: PathBuf,
    pub api: Api,
}

impl Up {
    pub async fn start(root: &Path) -> Up {
        Up::start_drivers(root, "qemu").await
    }

    /// `herd up` with these drivers (`qemu`, `qemu,oci`), under TCG.
    pub async fn start_drivers(root: &Path, drivers: &str) -> Up {
        Up::start_with(root, drivers, &["--accel", "tcg"]).await
    }

    /// `herd up` with these drivers and these arguments besides.
    pub async fn start_with(root: &Path, drivers: &str, extra: &[&str]) -> Up {
        let data_dir = root.join("data");
        let port = free_port();
        // Images are shared by every test run (built once, under a lock).
        let image_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("herd-e2e-images");
        let args: Vec<String> = [
            "up".to_owned(),
            "--data-dir".into(),
            data_dir.display().to_string(),
            "--listen".into(),
            format!("127.0.0.1:{port}"),
            "--drivers".into(),
            drivers.into(),
            "--image-dir".into(),
            image_dir.display().to_string(),
        ]
        .into_iter()
        .chain(extra.iter().map(|a| a.to_string()))
        .collect();
        let log = root.join("up.log");
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut proc =
            Proc::spawn_env("up", &refs, &log, &[("HERD_GUEST_BINARY", &guest_binary())]);
        // `herd up` serves HTTPS on loopback with the CA in its server dir; it may
        // first build the guest image.
        let ca_pem = wait_ca(
            &mut proc,
            &data_dir.join("server"),
            &log,
            Duration::from_secs(300),
        )
        .await;
        let http = pinned_client(Some(&ca_pem));
        let url = format!("https://127.0.0.1:{port}");
        wait_healthy_long(&mut proc, &http, &url, &log).await;
        let token = std::fs::read_to_string(data_dir.join("admin.token"))
            .expect("admin token")
            .trim()
            .to_owned();
        Up {
            proc,
            args,
            log,
            data_dir,
            api: Api { url, token, http },
        }
    }

    /// Starts `herd up` again on the same port and data (after a kill -9).
    pub async fn restart(&mut self) {
        let refs: Vec<&str> = self.args.iter().map(String::as_str).collect();
        self.proc = Proc::spawn_env(
            "up",
            &refs,
            &self.log,
            &[("HERD_GUEST_BINARY", &guest_binary())],
        );
        wait_healthy_long(&mut self.proc, &self.api.http, &self.api.url, &self.log).await;
    }

    pub fn qemu_pid(&self, vm: &str) -> Option<i32> {
        std::fs::read_to_string(self.data_dir.join("agent/qemu").join(vm).join("qemu.pid"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
    }

    /// QEMU processes whose command line names this test's data dir.
    pub fn qemu_processes(&self) -> Vec<i32> {
        self.processes("qemu-system")
    }

    /// Live processes of `program` whose command line names this test's data dir.
    pub fn processes(&self, program: &str) -> Vec<i32> {
        processes(program, &self.data_dir.display().to_string())
    }
}

/// Ends herd, then the QEMU guests and containers under its data dir. Both outlive
/// herd (a restarted agent adopts its guests), so a test that ends, or fails, with a
/// VM running would leave its guest running on the machine.
fn end_with_guests(proc: &mut Proc, data_dir: &Path, oci_dir: &Path) {
    proc.kill9();
    for pid in processes("qemu-system", &data_dir.display().to_string()) {
        let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
    }
    herd_testbed::end_containers(oci_dir);
}

impl Drop for Up {
    fn drop(&mut self) {
        let oci = self.data_dir.join("agent/oci");
        end_with_guests(&mut self.proc, &self.data_dir, &oci);
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let oci = self.data_dir.join("oci");
        end_with_guests(&mut self.proc, &self.data_dir, &oci);
    }
}

/// Live (not zombie) processes whose first argument contains `program` and whose
/// command line contains `needle`.
pub fn processes(program: &str, needle: &str) -> Vec<i32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let state = stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .chars()
            .next();
        if matches!(state, Some('Z') | Some('X')) {
            continue;
        }
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline);
        // The program is the first argument: herd-util's own arguments name
        // qemu-system too.
        let argv0 = cmdline.split('\0').next().unwrap_or("");
        if argv0.contains(program) && cmdline.contains(needle) {
            pids.push(pid);
        }
    }
    pids
}

/// The static herd-guest, built from this tree (wherever the target dir is).
pub fn guest_binary() -> PathBuf {
    let root = herd_image::workspace_root(env!("CARGO_MANIFEST_DIR"));
    herd_image::guest_binary(&root, true).expect("building herd-guest")
}

/// `herd up` may first build the guest image; allow for it.
async fn wait_healthy_long(proc: &mut Proc, http: &reqwest::Client, url: &str, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        if let Some(status) = proc.exited() {
            panic!(
                "herd up exited ({status}): {}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        if let Ok(response) = http.get(format!("{url}/healthz")).send().await {
            if response.status().is_success() {
                return wait_healthy(http, url).await;
            }
        }
        assert!(
            Instant::now() < deadline,
            "herd up did not come up: {}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
