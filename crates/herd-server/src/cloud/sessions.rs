//! Agent sessions: a host's hello, what each frame proves (it is alive, this session is
//! the current one), and its disconnection and return.

use super::{Cloud, CloudError, HostLive};
use herd_proto::node::NodeReport;
use herd_proto::wire::{HostId, HostUtil, HypervisorInfo};
use herd_sched::HostSlot;
use std::time::Instant;
use tracing::info;

impl Cloud {
    /// A host said hello: record it, mark it up, open a new session. Returns the
    /// session number.
    pub fn host_hello(
        &self,
        host: HostId,
        hostname: &str,
        hypervisors: &[HypervisorInfo],
        cpus: u32,
        memory_mib: u64,
        agent_version: &str,
    ) -> Result<u64, CloudError> {
        // A second live session for one host is either a stolen credential or a
        // confused agent; neither may take over the host's VMs. A session that has
        // gone quiet for a few intervals is presumed dead and may be replaced, so an
        // agent whose old connection broke without a close gets back in.
        let quiet_after = (self.config.sync_interval * 3).min(self.config.host_grace);
        if let Some(live) = self.live.lock().get_mut(&host) {
            if live.connected && live.last_seen.elapsed() < quiet_after {
                return Err(CloudError::Conflict {
                    code: "host_connected",
                    message: format!(
                        "host {host} already has a live agent session (seen {} ms ago)",
                        live.last_seen.elapsed().as_millis()
                    ),
                });
            }
            // The hello is a word from the host: no host-down mark may be queued
            // while the store records it up (see `GroupCommit::host_up`).
            live.last_seen = Instant::now();
        }
        self.commits.host_up(host);
        let came_back =
            self.store
                .host_hello(host, hostname, hypervisors, cpus, memory_mib, agent_version)?;
        {
            let mut placement = self.placement.lock();
            // Keep what the host holds; take its new size and hypervisors.
            let mut slot = placement.sched.host(host).cloned().unwrap_or(HostSlot {
                id: host,
                up: true,
                hypervisors: vec![],
                cpus: 0,
                memory_mib: 0,
                used_vcpus: 0,
                used_memory_mib: 0,
            });
            slot.up = true;
            slot.cpus = cpus;
            slot.memory_mib = memory_mib;
            slot.hypervisors = hypervisors.iter().map(|h| h.kind.clone()).collect();
            placement.sched.upsert_host(slot);
        }
        let session = {
            let mut live = self.live.lock();
            let entry = live.entry(host).or_insert_with(|| HostLive {
                last_seen: Instant::now(),
                util: HostUtil::default(),
                down: false,
                needs_resync: false,
                session: 0,
                connected: false,
                node: None,
            });
            entry.last_seen = Instant::now();
            entry.down = false;
            entry.needs_resync = false;
            entry.connected = true;
            // A new agent process may run other drivers: wait for its own word.
            entry.node = None;
            entry.session += 1;
            entry.session
        };
        if came_back {
            info!(%host, hostname, "host is up");
        }
        // Pending VMs may fit now.
        self.reconcile_now.notify_one();
        Ok(session)
    }

    /// Records a host's report and its utilization. Returns false if `session` was
    /// replaced by a newer connection, and whether the host must resync (it had been
    /// marked down).
    pub fn host_seen(&self, host: HostId, session: u64, util: HostUtil) -> (bool, bool) {
        let mut live = self.live.lock();
        let Some(entry) = live.get_mut(&host) else {
            return (false, false);
        };
        if entry.session != session {
            return (false, false);
        }
        entry.last_seen = Instant::now();
        entry.util = util;
        let resync = std::mem::take(&mut entry.needs_resync);
        (true, resync)
    }

    /// Keeps what a host said about itself; false if `session` was replaced.
    pub fn host_node(&self, host: HostId, session: u64, report: NodeReport) -> bool {
        let mut live = self.live.lock();
        match live.get_mut(&host) {
            Some(entry) if entry.session == session => {
                entry.last_seen = Instant::now();
                entry.node = Some((Instant::now(), report));
                true
            }
            _ => false,
        }
    }

    /// Records that a host was heard from, without taking its resync flag: for every
    /// message but a report (only a report's handler acts on the flag, by asking for a
    /// full one; any other that took it would leave a host marked down for good).
    pub fn host_heard(&self, host: HostId, session: u64) {
        if let Some(entry) = self.live.lock().get_mut(&host) {
            if entry.session == session {
                entry.last_seen = Instant::now();
            }
        }
    }

    /// Whether `session` is still the host's newest connection.
    pub fn session_current(&self, host: HostId, session: u64) -> bool {
        self.live
            .lock()
            .get(&host)
            .is_some_and(|entry| entry.session == session)
    }

    pub fn host_disconnected(&self, host: HostId, session: u64) {
        if let Some(entry) = self.live.lock().get_mut(&host) {
            if entry.session == session {
                entry.connected = false;
            }
        }
    }

    /// Marks the host up again after it had been marked down with its connection open.
    pub fn host_back(&self, host: HostId) -> Result<(), CloudError> {
        let Some(record) = self.store.host(host)? else {
            return Ok(());
        };
        self.commits.host_up(host);
        self.store.host_hello(
            host,
            &record.hostname,
            &record.hypervisors,
            record.cpus,
            record.memory_mib,
            record.agent_version.as_deref().unwrap_or(""),
        )?;
        self.placement.lock().sched.set_up(host, true);
        if let Some(entry) = self.live.lock().get_mut(&host) {
            entry.down = false;
        }
        Ok(())
    }
}
