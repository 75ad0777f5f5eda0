//! herd on the testbed: one `herd server` in the root namespace, listening on the
//! bridge, and one `herd agent` per namespace, each joined the way an operator joins a
//! host (the command `herd host join-token` prints, run on the host). Everything it
//! asks of herd goes through the CLI, so the harness tests what operators use.

use crate::net::Testbed;
use crate::TestbedError;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The port the server listens on; each testbed has a bridge address of its own.
const PORT: u16 = 7443;

#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// The `herd` binary.
    pub herd: PathBuf,
    /// Data dirs and logs go under it: `server/`, `host<i>/`, `server.log`, `host<i>.log`.
    pub root: PathBuf,
    /// `--drivers` for every agent (`sim`, `qemu`, `qemu,oci`).
    pub drivers: String,
    pub server_args: Vec<String>,
    pub agent_args: Vec<String>,
    /// More arguments for some agents: entry `i` goes to host `i`'s (e.g. a smaller
    /// `--memory-mib`, to make hosts of different sizes).
    pub host_args: Vec<Vec<String>>,
    /// Extra environment for every herd process (e.g. `HERD_GUEST_BINARY`).
    pub env: Vec<(String, PathBuf)>,
}

impl ClusterConfig {
    pub fn new(herd: &Path, root: &Path, drivers: &str) -> ClusterConfig {
        ClusterConfig {
            herd: herd.to_owned(),
            root: root.to_owned(),
            drivers: drivers.to_owned(),
            server_args: Vec::new(),
            agent_args: Vec::new(),
            host_args: Vec::new(),
            env: Vec::new(),
        }
    }
}

struct AgentProc {
    child: Option<Child>,
    /// Its arguments without the one-time `--join`/`--token`: a restart uses the
    /// credentials it saved.
    restart_args: Vec<String>,
}

pub struct Cluster {
    config: ClusterConfig,
    server: Option<Child>,
    agents: Vec<AgentProc>,
    pub url: String,
    pub token: String,
    pub ca: PathBuf,
    // Last, so that it is dropped after the processes are ended.
    pub bed: Testbed,
}

fn log_file(path: &Path) -> Result<std::fs::File, TestbedError> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|source| TestbedError::Io {
            what: format!("opening {}", path.display()),
            source,
        })
}

fn spawn(mut command: Command, log: &Path, what: &str) -> Result<Child, TestbedError> {
    command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_file(log)?)
        .env("HERD_LOG", "info")
        .spawn()
        .map_err(|source| TestbedError::Io {
            what: format!("starting {what}"),
            source,
        })
}

fn end(child: &mut Option<Child>) {
    if let Some(mut child) = child.take() {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// `herd server` on the bridge, with its data in `<root>/server`.
fn spawn_server(config: &ClusterConfig, bed: &Testbed) -> Result<Child, TestbedError> {
    let mut command = Command::new(&config.herd);
    command
        .arg("server")
        .arg("--data-dir")
        .arg(config.root.join("server"))
        .arg("--listen")
        .arg(format!("{}:{PORT}", bed.gateway()))
        .args(&config.server_args);
    for (key, value) in &config.env {
        command.env(key, value);
    }
    spawn(command, &config.root.join("server.log"), "herd server")
}

impl Cluster {
    /// Starts the server and every agent and waits until every host is up.
    pub fn start(bed: Testbed, config: ClusterConfig) -> Result<Cluster, TestbedError> {
        let server_dir = config.root.join("server");
        let url = format!("https://{}:{PORT}", bed.gateway());
        let server = spawn_server(&config, &bed)?;
        let mut cluster = Cluster {
            agents: Vec::new(),
            server: Some(server),
            url,
            token: String::new(),
            ca: server_dir.join("ca.pem"),
            bed,
            config,
        };
        cluster.wait_server(&server_dir)?;
        for i in 0..cluster.bed.len() {
            cluster.join(i)?;
        }
        let n = cluster.bed.len();
        cluster.wait_hosts(Duration::from_secs(120), |hosts| {
            hosts.len() == n && hosts.iter().all(|h| h["state"] == "up")
        })?;
        Ok(cluster)
    }

    /// Kills the server with SIGKILL (agents and guests keep running).
    pub fn kill_server(&mut self) {
        end(&mut self.server);
    }

    /// Starts the server again on its data dir and waits until it answers.
    pub fn restart_server(&mut self) -> Result<(), TestbedError> {
        end(&mut self.server);
        self.server = Some(spawn_server(&self.config, &self.bed)?);
        let server_dir = self.config.root.join("server");
        self.wait_server(&server_dir)
    }

    fn wait_server(&mut self, server_dir: &Path) -> Result<(), TestbedError> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(server) = self.server.as_mut() {
                if let Ok(Some(status)) = server.try_wait() {
                    return Err(
                        self.failed(&format!("herd server exited ({status})"), "server.log")
                    );
                }
            }
            if self.token.is_empty() {
                if let Ok(token) = std::fs::read_to_string(server_dir.join("admin.token")) {
                    self.token = token.trim().to_owned();
                }
            }
            if !self.token.is_empty() && self.ca.exists() && self.cli(&["whoami"]).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(self.failed("herd server did not answer within 60 s", "server.log"));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// An error that carries the end of a log.
    fn failed(&self, what: &str, log: &str) -> TestbedError {
        let text = std::fs::read_to_string(self.config.root.join(log)).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(20).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        TestbedError::Herd(format!("{what}; the end of {log}:\n{}", tail.join("\n")))
    }

    /// Joins host `i` with a fresh one-time token.
    fn join(&mut self, i: usize) -> Result<(), TestbedError> {
        let printed = self.cli(&["host", "join-token", "--ttl", "600"])?;
        let words: Vec<String> = printed
            .lines()
            .find_map(|l| l.trim().strip_prefix("herd agent "))
            .ok_or_else(|| TestbedError::Herd(format!("no join command in: {printed}")))?
            .split_whitespace()
            .map(str::to_owned)
            .collect();
        let name = format!("host{i}");
        let own = vec![
            "--data-dir".to_owned(),
            self.config.root.join(&name).display().to_string(),
            "--hostname".into(),
            name.clone(),
            "--drivers".into(),
            self.config.drivers.clone(),
        ];
        let mut restart_args = vec!["agent".to_owned()];
        let mut skip = false;
        for word in &words {
            if std::mem::take(&mut skip) {
                continue;
            }
            if word == "--join" || word == "--token" {
                skip = true;
                continue;
            }
            restart_args.push(word.clone());
        }
        let extra = self.config.host_args.get(i).cloned().unwrap_or_default();
        restart_args.extend(own.iter().cloned());
        restart_args.extend(self.config.agent_args.iter().cloned());
        restart_args.extend(extra.iter().cloned());
        let mut args = vec!["agent".to_owned()];
        args.extend(words);
        args.extend(own);
        args.extend(self.config.agent_args.iter().cloned());
        args.extend(extra);
        let child = self.spawn_agent(i, &args)?;
        let agent = AgentProc {
            child: Some(child),
            restart_args,
        };
        match self.agents.get_mut(i) {
            Some(slot) => *slot = agent,
            None => self.agents.push(agent),
        }
        Ok(())
    }

    fn spawn_agent(&self, i: usize, args: &[String]) -> Result<Child, TestbedError> {
        let mut command = self.bed.command(i, &self.config.herd)?;
        command.args(args);
        for (key, value) in &self.config.env {
            command.env(key, value);
        }
        spawn(
            command,
            &self.config.root.join(format!("host{i}.log")),
            &format!("the agent of host{i}"),
        )
    }

    fn agent(&mut self, i: usize) -> Result<&mut AgentProc, TestbedError> {
        self.agents
            .get_mut(i)
            .ok_or_else(|| TestbedError::Plan(format!("host {i}: no such agent")))
    }

    /// Kills host `i`'s agent with SIGKILL (its guests keep running).
    pub fn kill_agent(&mut self, i: usize) -> Result<(), TestbedError> {
        end(&mut self.agent(i)?.child);
        Ok(())
    }

    /// Starts host `i`'s agent again, with the credentials it saved.
    pub fn restart_agent(&mut self, i: usize) -> Result<(), TestbedError> {
        self.kill_agent(i)?;
        let args = self.agent(i)?.restart_args.clone();
        let child = self.spawn_agent(i, &args)?;
        self.agent(i)?.child = Some(child);
        Ok(())
    }

    pub fn agent_pid(&self, i: usize) -> Option<u32> {
        self.agents.get(i)?.child.as_ref().map(Child::id)
    }

    /// Runs the herd CLI against this cluster (its own config dir, the cluster's URL,
    /// admin token and CA); stdout on success, stderr as the error.
    pub fn cli(&self, args: &[&str]) -> Result<String, TestbedError> {
        let out = Command::new(&self.config.herd)
            .args(args)
            .env("XDG_CONFIG_HOME", self.config.root.join("cli"))
            .env("HERD_URL", &self.url)
            .env("HERD_TOKEN", &self.token)
            .env("HERD_CA", &self.ca)
            .output()
            .map_err(|source| TestbedError::Io {
                what: "running the herd CLI".into(),
                source,
            })?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(TestbedError::Herd(format!(
                "herd {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            )))
        }
    }

    /// `herd <args> -o json`, parsed.
    pub fn cli_json(&self, args: &[&str]) -> Result<serde_json::Value, TestbedError> {
        let mut all = args.to_vec();
        all.extend(["-o", "json"]);
        let out = self.cli(&all)?;
        serde_json::from_str(&out)
            .map_err(|e| TestbedError::Herd(format!("herd {}: not JSON: {e}", args.join(" "))))
    }

    /// Polls `herd host ls` until `done` holds.
    pub fn wait_hosts(
        &self,
        timeout: Duration,
        done: impl Fn(&[serde_json::Value]) -> bool,
    ) -> Result<Vec<serde_json::Value>, TestbedError> {
        let deadline = Instant::now() + timeout;
        loop {
            let hosts = self.cli_json(&["host", "ls"])?;
            let hosts = hosts.as_array().cloned().unwrap_or_default();
            if done(&hosts) {
                return Ok(hosts);
            }
            if Instant::now() > deadline {
                let mut what = format!(
                    "hosts not as awaited after {timeout:?}: {}",
                    serde_json::Value::Array(hosts)
                );
                for i in 0..self.bed.len() {
                    what = self.failed(&what, &format!("host{i}.log")).to_string();
                }
                return Err(TestbedError::Herd(what));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn root(&self) -> &Path {
        &self.config.root
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for agent in &mut self.agents {
            end(&mut agent.child);
        }
        end(&mut self.server);
        for i in 0..self.agents.len() {
            crate::guests::end_containers(&self.config.root.join(format!("host{i}/oci")));
        }
    }
}
