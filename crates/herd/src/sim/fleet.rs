//! The run deals with its simulated hosts as one fleet: it asks all of them at once
//! whether they are alive, quiet or caught up, and stops them together.

use super::probe::{HostProbe, Shared};
use anyhow::{bail, Result};
use herd_agent::drivers::sim::SimDriver;
use herd_agent::{AgentError, Driver};
use herd_proto::VmState;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub(super) struct SimHost {
    pub(super) index: usize,
    pub(super) dir: PathBuf,
    pub(super) host_id: Option<uuid::Uuid>,
    pub(super) driver: Arc<SimDriver>,
    pub(super) probe: Arc<HostProbe>,
    pub(super) task: JoinHandle<Result<(), AgentError>>,
    pub(super) killed: bool,
}

/// Where a host keeps its sim VMs between runs.
pub(super) fn snapshot_path(dir: &Path) -> PathBuf {
    dir.join("sim-vms.json")
}

pub(super) struct Fleet {
    pub(super) hosts: Vec<SimHost>,
    pub(super) shared: Arc<Shared>,
    pub(super) stop: watch::Sender<bool>,
}

impl Fleet {
    fn alive(&self) -> impl Iterator<Item = &SimHost> {
        self.hosts.iter().filter(|h| !h.killed)
    }

    /// An agent that ended although nobody stopped it means the run is broken.
    pub(super) fn check_agents(&self) -> Result<()> {
        match self.alive().find(|h| h.task.is_finished()) {
            Some(host) => bail!("the agent of simulated host {} stopped", host.index),
            None => Ok(()),
        }
    }

    pub(super) async fn states(&self) -> (usize, usize, usize) {
        let (mut n_vms, mut n_running, mut n_paused) = (0, 0, 0);
        for host in self.alive() {
            if let Ok(vms) = host.driver.list().await {
                n_vms += vms.len();
                n_running += vms.iter().filter(|v| v.state == VmState::Running).count();
                n_paused += vms.iter().filter(|v| v.state == VmState::Paused).count();
            }
        }
        (n_vms, n_running, n_paused)
    }

    /// Resumes every paused VM (left by the churn), as if by its guest; returns how many.
    pub(super) async fn resume_paused(&self) -> usize {
        let mut n = 0;
        for host in self.alive() {
            let Ok(vms) = host.driver.list().await else {
                continue;
            };
            for vm in vms.iter().filter(|v| v.state == VmState::Paused) {
                if host.probe.flip(vm.id) {
                    n += 1;
                }
            }
        }
        n
    }

    pub(super) fn quiet(&self) -> bool {
        self.alive().all(|h| h.probe.quiet())
    }

    pub(super) fn n_caught_up(&self) -> usize {
        self.alive().filter(|h| h.probe.caught_up()).count()
    }

    /// Stops every agent (cleanly, so each writes its state) and saves the sim VMs.
    pub(super) async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        for host in &mut self.hosts {
            if host.task.is_finished() {
                continue;
            }
            if tokio::time::timeout_at(deadline, &mut host.task)
                .await
                .is_err()
            {
                host.task.abort();
            }
        }
        let n_hosts = self.hosts.len();
        let saved = tokio::task::spawn_blocking(move || {
            let mut failed = 0;
            for host in &self.hosts {
                if let Err(e) = host.driver.save_to(&snapshot_path(&host.dir)) {
                    failed += 1;
                    if failed == 1 {
                        eprintln!("herd sim: cannot save the VMs of host {}: {e}", host.index);
                    }
                }
            }
            failed
        })
        .await;
        if let Ok(failed) = saved {
            if failed > 0 {
                eprintln!("herd sim: {failed} of {n_hosts} hosts' VMs were not saved");
            }
        }
    }
}
