//! Live migration with QEMU's own pre-copy: the source QEMU writes its stream into a
//! unix socket the agent relays to the target host, where a QEMU started with
//! `-incoming unix:` loads it and runs the guest the moment it has it all.
//!
//! The guest does not notice: its memory (herd-guest and its policy clocks included)
//! continues on the target, and its channel reconnects to the target agent, which
//! knows the guest's credential from the source's handoff and so takes its next hello
//! as the same boot's.

use super::launch::VmPaths;
use super::ops::StartFrom;
use super::vm::{Phase, Vm, VmRecord};
use super::{procfs, Inner};
use crate::driver::{DriverError, ProgressSink, Sent};
use herd_proto::migration::TransferProgress;
use herd_proto::wire::{VmId, VmSpec};
use herd_proto::VmState;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// A transfer whose byte count does not move for this long is given up.
const STALL: Duration = Duration::from_secs(20);

/// How long a received VM may take to run once the stream has ended.
const ARRIVAL: Duration = Duration::from_secs(60);

/// QEMU's own bandwidth cap defaults to 32 MiB/s; the link is the limit here.
const MAX_BANDWIDTH_BYTES: u64 = 10 << 30;

/// What the source's driver hands the target's with the stream.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Handoff {
    token: String,
    accel: super::launch::Accel,
    born_unix_ms: Option<u64>,
    exit_code: Option<i32>,
    policy_reported: bool,
}

fn number(info: &Value, path: &[&str]) -> u64 {
    let mut at = info;
    for key in path {
        at = &at[*key];
    }
    at.as_u64().unwrap_or(0)
}

/// The progress figures of a `query-migrate` answer: memory and, when the VM has a
/// disk, the disk's blocks, which travel in the same stream.
fn progress_of(info: &Value) -> TransferProgress {
    let both = |field: &str| number(info, &["ram", field]) + number(info, &["disk", field]);
    TransferProgress {
        transferred_bytes: both("transferred"),
        remaining_bytes: both("remaining"),
        total_bytes: both("total"),
        pass: number(info, &["ram", "dirty-sync-count"]),
        expected_downtime_ms: info["expected-downtime"].as_u64(),
    }
}

impl Inner {
    pub(super) fn handoff(&self, id: VmId) -> Result<Vec<u8>, DriverError> {
        self.with_vm(id, |vm| {
            serde_json::to_vec(&Handoff {
                token: vm.record.token.clone(),
                accel: vm.record.accel,
                born_unix_ms: vm.record.born_unix_ms,
                exit_code: vm.record.exit_code,
                policy_reported: vm.record.policy_reported,
            })
            .map_err(DriverError::encode("the migration handoff"))
        })
    }

    pub(super) async fn do_migrate_out(
        self: Arc<Self>,
        id: VmId,
        to: PathBuf,
        max_downtime_ms: u64,
        progress: ProgressSink,
    ) -> Result<Sent, DriverError> {
        self.with_vm(id, |vm| match vm.observe() {
            VmState::Running => {
                vm.busy = Some(VmState::Migrating);
                Ok(())
            }
            state => Err(DriverError::WrongState {
                op: "migrate",
                state,
            }),
        })?;
        let uri = format!("unix:{}", to.display());
        let poll = Duration::from_millis(50);
        let result = self
            .send_state(id, &uri, max_downtime_ms, &progress, poll)
            .await;
        self.with_vm(id, |vm| {
            vm.busy = None;
            if result.is_ok() {
                // Stopped here, and shown as migrating until the server says who won.
                vm.record.migrated_out = true;
                vm.save()?;
            }
            Ok(())
        })?;
        result
    }

    /// Sends the VM's stream to `uri` (QEMU's: `unix:` a socket, `exec:` a command),
    /// reading its progress every `poll` until it is complete.
    pub(super) async fn send_state(
        &self,
        id: VmId,
        uri: &str,
        max_downtime_ms: u64,
        progress: &ProgressSink,
        poll: Duration,
    ) -> Result<Sent, DriverError> {
        let has_disk = self.with_vm(id, |vm| Ok(vm.spec.disk_mib > 0))?;
        let mut qmp = self.qmp(id).await?;
        let fail = |doing: &str| {
            let doing = doing.to_owned();
            move |e: super::qmp::QmpError| DriverError::Operation {
                vm: id,
                doing,
                source: Box::new(e),
            }
        };
        qmp.execute(
            "migrate-set-capabilities",
            // The disk goes in the migration stream itself (QEMU's block migration):
            // its blocks first, then memory, with writes made meanwhile sent again;
            // zero blocks travel as markers.
            Some(json!({ "capabilities": [
                { "capability": "auto-converge", "state": true },
                { "capability": "block", "state": has_disk },
                { "capability": "zero-blocks", "state": has_disk },
            ] })),
        )
        .await
        .map_err(fail("setting migration capabilities"))?;
        qmp.execute(
            "migrate-set-parameters",
            Some(
                json!({ "downtime-limit": max_downtime_ms, "max-bandwidth": MAX_BANDWIDTH_BYTES }),
            ),
        )
        .await
        .map_err(fail("setting migration parameters"))?;
        qmp.execute("migrate", Some(json!({ "uri": uri })))
            .await
            .map_err(fail("starting the migration"))?;
        let started = Instant::now();
        let mut last_moved = (0u64, Instant::now());
        loop {
            let info = qmp
                .execute("query-migrate", None)
                .await
                .map_err(fail("asking how the migration goes"))?;
            let now = progress_of(&info);
            progress.send_replace(now);
            match info["status"].as_str().unwrap_or("") {
                "completed" => {
                    let sent = Sent {
                        downtime_ms: info["downtime"].as_u64(),
                        total_ms: info["total-time"]
                            .as_u64()
                            .unwrap_or(started.elapsed().as_millis() as u64),
                        transferred_bytes: now.transferred_bytes,
                    };
                    info!(%id, ?sent, "VM sent");
                    return Ok(sent);
                }
                "failed" | "cancelled" => {
                    return Err(DriverError::Hypervisor {
                        vm: id,
                        reason: format!(
                            "the migration {}: {}",
                            info["status"].as_str().unwrap_or(""),
                            info["error-desc"].as_str().unwrap_or("no reason given")
                        ),
                    });
                }
                _ => {}
            }
            if now.transferred_bytes != last_moved.0 {
                last_moved = (now.transferred_bytes, Instant::now());
            } else if last_moved.1.elapsed() > STALL {
                let _ = qmp.execute("migrate_cancel", None).await;
                return Err(DriverError::Timeout {
                    vm: id,
                    doing: "sending (no byte moved)",
                    after: STALL,
                });
            }
            tokio::time::sleep(poll).await;
        }
    }

    /// Runs a VM again whose migration did not happen.
    pub(super) async fn do_migrate_out_undo(self: Arc<Self>, id: VmId) -> Result<(), DriverError> {
        let sent_away = self.with_vm(id, |vm| Ok(vm.record.migrated_out))?;
        if !sent_away {
            return match self.with_vm(id, |vm| Ok(vm.observe()))? {
                VmState::Running | VmState::Paused | VmState::Booting => Ok(()),
                state => Err(DriverError::WrongState {
                    op: "resume after a migration",
                    state,
                }),
            };
        }
        self.qmp_run(id, "cont", None).await?;
        self.with_vm(id, |vm| {
            vm.record.migrated_out = false;
            vm.save()
        })?;
        info!(%id, "VM runs here again: its migration was rolled back");
        Ok(())
    }

    pub(super) async fn do_migrate_in(
        self: Arc<Self>,
        id: VmId,
        spec: VmSpec,
        handoff: Vec<u8>,
    ) -> Result<PathBuf, DriverError> {
        let paths = VmPaths::new(&self.state_dir, id);
        if let Some(vm) = self.vms.lock().get(&id) {
            if vm.busy == Some(VmState::Migrating) {
                return Ok(paths.migration_socket());
            }
            return Err(DriverError::Invalid(format!(
                "VM {id} is already on this host"
            )));
        }
        let handoff: Handoff = serde_json::from_slice(&handoff)
            .map_err(|e| DriverError::Invalid(format!("the source's handoff: {e}")))?;
        self.image(&spec.image)?;
        let paths = self.vm_dir_with_spec(id, &spec)?;
        let record = VmRecord {
            token: handoff.token,
            phase: Phase::Launched,
            accel: handoff.accel,
            paused: false,
            // The guest greeted its host at boot; it greets this one as the same.
            hello_seen: true,
            restored: false,
            exit_code: handoff.exit_code,
            born_unix_ms: handoff.born_unix_ms,
            policy_reported: handoff.policy_reported,
            migrated_out: false,
            disk_made: false,
        };
        let socket = paths.migration_socket();
        let vm = Vm::new(paths, spec, record, VmState::Migrating);
        vm.save()?;
        self.vms.lock().insert(id, vm);
        if let Err(e) = self.launch(id, StartFrom::Migration).await {
            self.with_vm(id, |vm| {
                vm.busy = None;
                vm.record.phase = Phase::Failed {
                    reason: e.to_string(),
                };
                vm.save()
            })?;
            return Err(e);
        }
        Ok(socket)
    }

    pub(super) async fn do_migrate_in_finish(self: Arc<Self>, id: VmId) -> Result<(), DriverError> {
        let started = Instant::now();
        loop {
            let (alive, dir) = self.with_vm(id, |vm| Ok((vm.alive(), vm.paths.dir.clone())))?;
            if !alive {
                let reason = format!(
                    "the receiving qemu exited; console ends with: {}",
                    crate::drivers::console::console_tail(&dir.join("console.log"))
                );
                self.with_vm(id, |vm| {
                    vm.busy = None;
                    vm.record.phase = Phase::Failed {
                        reason: reason.clone(),
                    };
                    vm.save()
                })?;
                return Err(DriverError::Hypervisor { vm: id, reason });
            }
            let status = match self.qmp(id).await {
                Ok(mut qmp) => qmp.status().await.ok(),
                Err(_) => None,
            };
            match status.as_deref() {
                Some("running") => {
                    self.with_vm(id, |vm| {
                        vm.busy = None;
                        vm.save()
                    })?;
                    info!(%id, ms = started.elapsed().as_millis() as u64, "received VM runs");
                    return Ok(());
                }
                Some("inmigrate") | None => {}
                // Loaded from a stream taken while the guest was paused (a broadcast
                // of a paused VM): it runs as the copy it is asked to be.
                Some("paused") => {
                    self.qmp_run(id, "cont", None).await?;
                }
                Some(other) => warn!(%id, "received VM is {other}; waiting"),
            }
            if started.elapsed() > ARRIVAL {
                if let Some(pid) = self.with_vm(id, |vm| Ok(vm.pid))? {
                    procfs::signal(pid, nix::sys::signal::Signal::SIGKILL);
                }
                return Err(DriverError::Timeout {
                    vm: id,
                    doing: "running the received VM",
                    after: ARRIVAL,
                });
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_reads_qemus_counters() {
        let info = json!({
            "status": "active",
            "expected-downtime": 12,
            "ram": { "transferred": 1000, "remaining": 24, "total": 4096, "dirty-sync-count": 2 }
        });
        assert_eq!(
            progress_of(&info),
            TransferProgress {
                transferred_bytes: 1000,
                remaining_bytes: 24,
                total_bytes: 4096,
                pass: 2,
                expected_downtime_ms: Some(12),
            }
        );
        assert_eq!(progress_of(&json!({})), TransferProgress::default());
        let with_disk = json!({
            "ram": { "transferred": 1000, "remaining": 24, "total": 4096 },
            "disk": { "transferred": 500, "remaining": 100, "total": 2048 }
        });
        let p = progress_of(&with_disk);
        assert_eq!(
            (p.transferred_bytes, p.remaining_bytes, p.total_bytes),
            (1500, 124, 6144)
        );
    }
}
