//! Nothing is measured until every host is up, every VM runs and the server has caught
//! up: these phases bring the fleet there, each within `--setup-timeout`.

use super::fleet::{snapshot_path, Fleet, SimHost};
use super::probe::{HostProbe, HostSync};
use super::{Progress, Run};
use anyhow::{anyhow, bail, Context, Result};
use herd_agent::agent::unix_ms;
use herd_agent::drivers::sim::{SimConfig, SimDriver};
use herd_agent::{Agent, AgentConfig, Driver};
use herd_server::api::{BatchLaunchRequest, BatchLaunched, HostInfo, JoinTokenView, LaunchRequest};
use parking_lot::Mutex;
use reqwest::Method;
use serde::Deserialize;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{oneshot, Semaphore};
use tokio::task::JoinSet;

#[derive(Deserialize)]
struct AgentJson {
    host_id: uuid::Uuid,
}

impl Run<'_> {
    /// Joins the hosts that have not joined yet and starts every agent, a bounded
    /// number at a time, each until it has connected. Returns how many joined now.
    pub(super) async fn start_hosts(&self, fleet: &mut Fleet) -> Result<usize> {
        let args = self.args;
        let permits = Arc::new(Semaphore::new(args.concurrency.max(1)));
        let mut waiting: JoinSet<Result<()>> = JoinSet::new();
        let mut progress = Progress::new();
        let mut n_connected = 0;
        let mut n_joined = 0;
        let deadline = Instant::now() + self.setup_timeout;
        for index in 0..args.hosts {
            let permit = permits
                .clone()
                .acquire_owned()
                .await
                .map_err(|_| anyhow!("the start queue closed"))?;
            while let Some(done) = waiting.try_join_next() {
                done.map_err(|e| anyhow!("start task failed: {e}"))??;
                n_connected += 1;
            }
            if Instant::now() > deadline {
                bail!("starting the hosts took longer than --setup-timeout");
            }
            let (host, started, joined) = self.start_host(fleet, index).await?;
            n_joined += usize::from(joined);
            fleet.hosts.push(host);
            waiting.spawn(async move {
                let _permit = permit;
                match tokio::time::timeout(Duration::from_secs(120), started).await {
                    Ok(Ok(Ok(()))) => Ok(()),
                    Ok(Ok(Err(reason))) => Err(anyhow!("simulated host {index}: {reason}")),
                    Ok(Err(_)) => Err(anyhow!("simulated host {index}: its agent stopped")),
                    Err(_) => Err(anyhow!(
                        "simulated host {index} did not connect within 120 s (is the server overloaded?)"
                    )),
                }
            });
            progress.say(|| format!("started {n_connected}/{} hosts", args.hosts));
        }
        while let Some(done) = waiting.join_next().await {
            done.map_err(|e| anyhow!("start task failed: {e}"))??;
            n_connected += 1;
            progress.say(|| format!("started {n_connected}/{} hosts", args.hosts));
        }
        for host in &mut fleet.hosts {
            let path = host.dir.join("agent.json");
            let text =
                std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
            let creds: AgentJson = serde_json::from_slice(&text)
                .with_context(|| format!("{} is not an agent's credentials", path.display()))?;
            host.host_id = Some(creds.host_id);
        }
        fleet
            .shared
            .n_alive
            .store(fleet.hosts.len(), Ordering::Relaxed);
        Ok(n_joined)
    }

    /// Starts one host's agent; returns it, the signal of its first connection, and
    /// whether it joined now.
    async fn start_host(
        &self,
        fleet: &Fleet,
        index: usize,
    ) -> Result<(SimHost, oneshot::Receiver<Result<(), String>>, bool)> {
        let args = self.args;
        let dir = self.root.join("hosts").join(index.to_string());
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let join_token = if dir.join("agent.json").exists() {
            None
        } else {
            let view: JoinTokenView = self
                .api
                .call(
                    Method::POST,
                    "/v1/join-tokens",
                    Some(&serde_json::json!({ "ttl_seconds": 3600 })),
                )
                .await
                .context("creating a join token")?;
            Some(view.token)
        };
        let joined = join_token.is_some();
        let driver = Arc::new(
            SimDriver::restore(
                &snapshot_path(&dir),
                SimConfig {
                    boot_ms: args.boot_ms,
                    usage: args.usage,
                    ..SimConfig::default()
                },
            )
            .with_context(|| format!("simulated host {index}"))?,
        );
        let (started_tx, started_rx) = oneshot::channel();
        let probe = Arc::new(HostProbe {
            shared: fleet.shared.clone(),
            driver: driver.clone(),
            sync: Mutex::new(HostSync::default()),
            started: Mutex::new(Some(started_tx)),
        });
        let per_host = args.vms_per_host as u64;
        let agent = Agent::new(
            AgentConfig {
                server_url: Some(self.url.to_owned()),
                join_token,
                data_dir: dir.clone(),
                hostname: format!("sim-{index}"),
                // Room for the VMs asked for at 1 vCPU and 64 MiB each, twice over
                // (the server over-commits CPUs, not memory, by default).
                cpus: Some((2 * per_host).min(u64::from(u32::MAX)) as u32),
                memory_mib: Some(per_host * 64 * 2),
                ca_pem: self.ca_pem.map(str::to_owned),
                ca_fingerprint: None,
                transfer_port: 0,
                labels: Default::default(),
                round_trips: false,
            },
            vec![driver.clone() as Arc<dyn Driver>],
        )
        .with_ephemeral_state(true)
        .with_probe(probe.clone());
        let mut stop = fleet.stop.subscribe();
        let failed = probe.clone();
        let task = tokio::spawn(async move {
            let result = agent
                .run(async move {
                    let _ = stop.wait_for(|stop| *stop).await;
                })
                .await;
            if let Err(e) = &result {
                failed.start_failed(herd_agent::agent::error_chain(e));
            }
            result
        });
        Ok((
            SimHost {
                index,
                dir,
                host_id: None,
                driver,
                probe,
                task,
                killed: false,
            },
            started_rx,
            joined,
        ))
    }

    /// Waits until the server lists every simulated host as up and connected.
    pub(super) async fn wait_hosts_up(&self, fleet: &Fleet) -> Result<()> {
        let deadline = Instant::now() + self.setup_timeout;
        let mut progress = Progress::new();
        loop {
            fleet.check_agents()?;
            let listed: Vec<HostInfo> = self.api.get("/v1/hosts").await?;
            let up: HashMap<uuid::Uuid, bool> = listed
                .iter()
                .map(|h| (h.id, h.state == "up" && h.connected))
                .collect();
            let n_up = fleet
                .hosts
                .iter()
                .filter(|h| h.host_id.is_some_and(|id| up.get(&id) == Some(&true)))
                .count();
            if n_up == fleet.hosts.len() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "only {n_up} of {} hosts are up on the server after --setup-timeout",
                    fleet.hosts.len()
                );
            }
            progress.say(|| format!("{n_up}/{} hosts up on the server", fleet.hosts.len()));
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Launches `n` sim VMs in batches of up to 1,000 (a few batches at a time).
    pub(super) async fn launch(&self, n: usize) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        const BATCH: usize = 1000;
        const IN_PARALLEL: usize = 4;
        // Names only have to differ from earlier runs' in the same project.
        let run_tag = unix_ms() / 1000;
        let mut batches = (0..n.div_ceil(BATCH))
            .map(|b| (b + 1, BATCH.min(n - b * BATCH)))
            .peekable();
        let mut running: JoinSet<Result<usize>> = JoinSet::new();
        let mut n_launched = 0;
        let mut progress = Progress::new();
        let deadline = Instant::now() + self.setup_timeout;
        loop {
            while running.len() < IN_PARALLEL {
                let Some((batch_no, count)) = batches.next() else {
                    break;
                };
                let api = self.api.clone();
                let request = BatchLaunchRequest {
                    count: count as u32,
                    vm: LaunchRequest {
                        name: format!("sim-{run_tag}-b{batch_no}"),
                        project: Some("default".into()),
                        hypervisor: Some("sim".into()),
                        vcpus: Some(1),
                        memory_mib: Some(64),
                        image: None,
                        command: None,
                        policy: None,
                        keep_running: None,
                        disk_mib: None,
                    },
                };
                running.spawn(async move {
                    let launched: BatchLaunched = api
                        .call(Method::POST, "/v1/vms/batch", Some(&request))
                        .await
                        .with_context(|| format!("launching {} ({count} VMs)", request.vm.name))?;
                    Ok(launched.ids.len())
                });
            }
            let Some(done) = running.join_next().await else {
                return Ok(());
            };
            n_launched += done.map_err(|e| anyhow!("launch task failed: {e}"))??;
            if Instant::now() > deadline {
                bail!("launching took longer than --setup-timeout ({n_launched}/{n} launched)");
            }
            progress.say(|| format!("launched {n_launched}/{n} VMs"));
        }
    }

    /// Waits until the hosts hold `n_want` VMs running; returns how many they hold.
    pub(super) async fn wait_running(&self, fleet: &Fleet, n_want: usize) -> Result<usize> {
        let deadline = Instant::now() + self.setup_timeout;
        let mut progress = Progress::new();
        loop {
            fleet.check_agents()?;
            let (n_vms, n_running, _) = fleet.states().await;
            if n_running >= n_want {
                return Ok(n_vms);
            }
            if Instant::now() > deadline {
                bail!(
                    "only {n_running} of {n_want} VMs run on the simulated hosts after \
                     --setup-timeout (are there enough hosts for them? pending VMs wait for room)"
                );
            }
            progress.say(|| format!("{n_running}/{n_want} VMs running ({n_vms} on the hosts)"));
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Waits until the server has acked every report that changed anything.
    pub(super) async fn wait_caught_up(&self, fleet: &Fleet) -> Result<()> {
        let deadline = Instant::now() + self.setup_timeout;
        let mut progress = Progress::new();
        loop {
            fleet.check_agents()?;
            let n_caught_up = fleet.n_caught_up();
            if n_caught_up == fleet.hosts.len() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "the server had not acked every host's reports after --setup-timeout \
                     ({n_caught_up}/{} caught up)",
                    fleet.hosts.len()
                );
            }
            progress.say(|| {
                format!(
                    "waiting for the server to catch up: {n_caught_up}/{} hosts acked",
                    fleet.hosts.len()
                )
            });
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until the server has written behind everything its agents reported (its
    /// `herd_store_unwritten_states` gauge is zero), so that a churn phase measures
    /// the steady state and not the tail of the launch: the last boots of a million
    /// VMs are still being written when their agents have been acknowledged. Gives up
    /// (and says so) after a minute; a server without the gauge is not waited for.
    pub(super) async fn wait_server_settled(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut progress = Progress::new();
        loop {
            let (_, body) = self.api.call_status(Method::GET, "/metrics").await?;
            let text = String::from_utf8_lossy(&body);
            let Some(unwritten) = text.lines().find_map(|line| {
                line.strip_prefix("herd_store_unwritten_states ")
                    .and_then(|n| n.trim().parse::<u64>().ok())
            }) else {
                return Ok(());
            };
            if unwritten == 0 {
                return Ok(());
            }
            if Instant::now() > deadline {
                eprintln!(
                    "herd sim: the server still has {unwritten} states to write after 60 s; \
                     measuring anyway"
                );
                return Ok(());
            }
            progress.say(|| format!("waiting for the server to write {unwritten} states"));
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}
