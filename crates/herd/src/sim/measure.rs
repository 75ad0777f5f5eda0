//! The measured phases: churn, the resync after the server restarts, and how long the
//! server takes to notice killed hosts, each on a fleet already set up.

use super::fleet::Fleet;
use super::report::Kill;
use super::stats::Window;
use super::{Progress, Run};
use anyhow::{anyhow, bail, Result};
use herd_agent::agent::unix_ms;
use herd_agent::Driver;
use herd_proto::wire::VmId;
use herd_server::api::HostInfo;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

impl Run<'_> {
    /// Flips `churn` percent of all VMs per interval for `--duration`, spread evenly
    /// over the interval and uniformly over the VMs, then waits until the flips are
    /// acked. Returns the number of flips and what the window saw.
    pub(super) async fn churn(
        &self,
        fleet: &Fleet,
        interval_ms: u64,
        churn: f64,
    ) -> Result<(u64, Window)> {
        let shared = &fleet.shared;
        // Every VM once, indexed: the k-th VM overall is in the host whose prefix
        // count passes k.
        let mut vms: Vec<(usize, Vec<VmId>)> = Vec::new();
        let mut prefix = Vec::new();
        let mut n_total = 0;
        for (at, host) in fleet.hosts.iter().enumerate() {
            let held: Vec<VmId> = host
                .driver
                .list()
                .await
                .map_err(|e| anyhow!("listing sim VMs: {e}"))?
                .into_iter()
                .map(|v| v.id)
                .collect();
            n_total += held.len();
            prefix.push(n_total);
            vms.push((at, held));
        }
        let slice = Duration::from_millis((interval_ms / 10).max(10));
        let per_ms = n_total as f64 * churn / 100.0 / interval_ms as f64;
        let mut rng = rand::rngs::StdRng::from_entropy();
        let mut tick = tokio::time::interval(slice);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut progress = Progress::new();

        eprintln!(
            "herd sim: measuring for {:.0} s: {:.1}% of {n_total} VMs flipped per {interval_ms} ms interval",
            self.duration.as_secs_f64(),
            churn
        );
        let from = Window::start(shared);
        let started = Instant::now();
        let mut n_flips: u64 = 0;
        let mut n_busy: u64 = 0;
        while started.elapsed() < self.duration {
            tick.tick().await;
            fleet.check_agents()?;
            let owed = (started.elapsed().as_millis() as f64 * per_ms) as u64;
            let mut attempts = 0;
            while n_flips < owed && n_total > 0 && attempts < 4 * (owed - n_flips) + 16 {
                attempts += 1;
                let k = rng.gen_range(0..n_total);
                let at = prefix.partition_point(|&end| end <= k);
                let (host_at, held) = &vms[at];
                let first = if at == 0 { 0 } else { prefix[at - 1] };
                let vm = held[k - first];
                if fleet.hosts[*host_at].probe.flip(vm) {
                    n_flips += 1;
                } else {
                    n_busy += 1;
                }
            }
            progress.say(|| {
                format!(
                    "{:.0} s: {n_flips} changes made, {} acked, {} hosts connected",
                    started.elapsed().as_secs_f64(),
                    shared.n_lags(),
                    shared.n_connected.load(Ordering::Relaxed)
                )
            });
        }
        let window = from.end(shared);
        if n_busy > 0 {
            tracing::debug!(
                n_busy,
                "picks skipped: the VM's last flip was not reported yet"
            );
        }
        // Flips after this are not measured; the sleep keeps them out of the window's
        // last millisecond.
        shared.window_to_ms.store(unix_ms() + 1, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(5)).await;
        self.wait_quiet(fleet, interval_ms, "the last changes to be acked")
            .await;
        Ok((n_flips, window))
    }

    /// Waits (a bounded time) until no change is in flight or unacked on any host.
    pub(super) async fn wait_quiet(&self, fleet: &Fleet, interval_ms: u64, what: &str) {
        let limit = Duration::from_millis(20 * interval_ms).max(Duration::from_secs(20));
        let deadline = Instant::now() + limit;
        while !fleet.quiet() {
            if Instant::now() > deadline {
                eprintln!("herd sim: gave up waiting for {what} after {limit:?}");
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub(super) async fn wait_resync(&self, fleet: &Fleet) -> Result<()> {
        let n_before = fleet.shared.resync.lock().completed.len();
        eprintln!(
            "herd sim: waiting up to {:.0} s for every host to lose its server and resync \
             (restart the server now)",
            self.resync_timeout.as_secs_f64()
        );
        let deadline = Instant::now() + self.resync_timeout;
        let mut progress = Progress::new();
        loop {
            {
                let tracker = fleet.shared.resync.lock();
                if tracker.completed[n_before..].iter().any(|r| r.all_hosts) {
                    return Ok(());
                }
            }
            fleet.check_agents()?;
            if Instant::now() > deadline {
                bail!("no full resync within --resync-timeout: did every host lose its server?");
            }
            progress.say(|| {
                let tracker = fleet.shared.resync.lock();
                match &tracker.current {
                    Some(r) => format!(
                        "resync: {} hosts lost their server, {} back",
                        r.n_lost, r.n_back
                    ),
                    None => format!(
                        "waiting for the server to go away ({} hosts connected)",
                        fleet.shared.n_connected.load(Ordering::Relaxed)
                    ),
                }
            });
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Aborts `--kill-hosts` agents (their sockets drop without a word) and polls the
    /// server until it marks each host down.
    pub(super) async fn kill_hosts(&self, fleet: &mut Fleet) -> Result<Vec<Kill>> {
        let n_kill = self.args.kill_hosts;
        if n_kill == 0 {
            return Ok(Vec::new());
        }
        let n_hosts = fleet.hosts.len();
        let mut victims = Vec::new();
        for k in 0..n_kill {
            let host = &mut fleet.hosts[k * n_hosts / n_kill];
            host.probe.sync.lock().killed = true;
            host.killed = true;
            host.task.abort();
            if let Some(id) = host.host_id {
                victims.push(id);
            }
        }
        let killed_at = Instant::now();
        fleet.shared.n_alive.fetch_sub(n_kill, Ordering::Relaxed);
        eprintln!("herd sim: killed {n_kill} agents; waiting for the server to notice");
        let mut detected: HashMap<uuid::Uuid, u64> = HashMap::new();
        let deadline = killed_at + self.setup_timeout;
        while detected.len() < victims.len() && Instant::now() < deadline {
            let polls =
                victims
                    .iter()
                    .filter(|id| !detected.contains_key(id))
                    .map(|id| async move {
                        let view: Result<HostInfo> = self.api.get(&format!("/v1/hosts/{id}")).await;
                        (*id, view)
                    });
            for (id, view) in futures_util::future::join_all(polls).await {
                if view?.state == "down" {
                    detected.insert(id, killed_at.elapsed().as_millis() as u64);
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(victims
            .into_iter()
            .map(|host| Kill {
                host,
                detect_ms: detected.get(&host).copied(),
            })
            .collect())
    }
}
