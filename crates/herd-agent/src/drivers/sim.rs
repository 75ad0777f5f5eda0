//! Simulated VMs, for tests and scale runs only (like Kubernetes' hollow nodes).
//!
//! A sim VM is a record with a state and, while it is between states, the time it
//! reaches the next one. Records live in one file in the agent's data dir, written
//! atomically on every change, so sim VMs outlive an agent restart exactly as real VMs
//! do, and the agent's re-adoption path is exercised for real.

use crate::driver::{Driver, DriverError, ObservedVm};
use crate::persist;
use async_trait::async_trait;
use herd_proto::wire::{HypervisorInfo, VmId, VmSpec, VmUsage};
use herd_proto::VmState;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

/// How long simulated operations take.
#[derive(Debug, Clone, Copy)]
pub struct SimConfig {
    pub boot_ms: u64,
    pub op_ms: u64,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            boot_ms: 300,
            op_ms: 100,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct SimVm {
    spec: VmSpec,
    state: VmState,
    /// The state the VM reaches at `settle_at_ms`, if it is between states.
    next: Option<(VmState, u64)>,
    /// Milliseconds spent running before the current run began.
    run_ms_before: u64,
    /// When the current run began, if running.
    running_since_ms: Option<u64>,
}

impl SimVm {
    fn settle(&mut self, now_ms: u64) {
        if let Some((next, at)) = self.next {
            if now_ms >= at {
                self.set_state(next, at);
                self.next = None;
            }
        }
    }

    fn set_state(&mut self, state: VmState, at_ms: u64) {
        if let Some(since) = self.running_since_ms.take() {
            self.run_ms_before += at_ms.saturating_sub(since);
        }
        if state == VmState::Running {
            self.running_since_ms = Some(at_ms);
        }
        self.state = state;
    }

    fn run_ms(&self, now_ms: u64) -> u64 {
        self.run_ms_before
            + self
                .running_since_ms
                .map(|since| now_ms.saturating_sub(since))
                .unwrap_or(0)
    }
}

pub struct SimDriver {
    config: SimConfig,
    path: PathBuf,
    vms: Mutex<BTreeMap<VmId, SimVm>>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl SimDriver {
    /// Opens the driver, re-adopting the VMs recorded in `dir`.
    pub fn open(dir: PathBuf, config: SimConfig) -> Result<SimDriver, DriverError> {
        std::fs::create_dir_all(&dir).map_err(DriverError::io("creating the sim dir"))?;
        let path = dir.join("vms.json");
        let vms = persist::load_json(&path)
            .map_err(|e| DriverError::Failed(format!("reading {}: {e}", path.display())))?
            .unwrap_or_default();
        Ok(SimDriver {
            config,
            path,
            vms: Mutex::new(vms),
        })
    }

    fn with_vms<T>(
        &self,
        f: impl FnOnce(&mut BTreeMap<VmId, SimVm>, u64) -> Result<T, DriverError>,
    ) -> Result<T, DriverError> {
        let now = now_ms();
        let mut vms = self
            .vms
            .lock()
            .map_err(|_| DriverError::Failed("sim driver lock poisoned".into()))?;
        for vm in vms.values_mut() {
            vm.settle(now);
        }
        let before = serde_json::to_vec(&*vms).unwrap_or_default();
        let out = f(&mut vms, now)?;
        let after = serde_json::to_vec(&*vms).unwrap_or_default();
        if before != after {
            persist::write_atomic(&self.path, &after).map_err(DriverError::io("saving sim VMs"))?;
        }
        Ok(out)
    }

    fn transition(
        &self,
        id: VmId,
        op: &'static str,
        from: &[VmState],
        via: VmState,
        to: VmState,
    ) -> Result<(), DriverError> {
        let op_ms = self.config.op_ms;
        self.with_vms(|vms, now| {
            let vm = vms.get_mut(&id).ok_or(DriverError::NoSuchVm(id))?;
            if vm.state == to || vm.next.map(|(next, _)| next) == Some(to) {
                return Ok(());
            }
            if !from.contains(&vm.state) || vm.next.is_some() {
                return Err(DriverError::WrongState {
                    op,
                    state: vm.state,
                });
            }
            vm.set_state(via, now);
            vm.next = Some((to, now + op_ms));
            Ok(())
        })
    }
}

#[async_trait]
impl Driver for SimDriver {
    fn kind(&self) -> &'static str {
        "sim"
    }

    async fn probe(&self) -> Result<HypervisorInfo, DriverError> {
        Ok(HypervisorInfo {
            kind: "sim".into(),
            detail: format!(
                "simulated VMs (boot {} ms, operations {} ms); for tests and scale runs",
                self.config.boot_ms, self.config.op_ms
            ),
        })
    }

    async fn list(&self) -> Result<Vec<ObservedVm>, DriverError> {
        self.with_vms(|vms, _| {
            Ok(vms
                .iter()
                .map(|(id, vm)| ObservedVm {
                    id: *id,
                    state: vm.state,
                })
                .collect())
        })
    }

    async fn usage(&self) -> Result<Vec<VmUsage>, DriverError> {
        self.with_vms(|vms, now| {
            Ok(vms
                .iter()
                .map(|(id, vm)| {
                    // A VM's simulated load is fixed by its id: 0..100% of its vCPUs.
                    let load_pct = (id.as_u128() % 101) as u64;
                    let run_ms = vm.run_ms(now);
                    VmUsage {
                        vm: *id,
                        cpu_ms: run_ms * u64::from(vm.spec.vcpus) * load_pct / 100,
                        mem_kib: if vm.state == VmState::Running {
                            vm.spec.memory_mib * 1024 / 2
                        } else {
                            0
                        },
                        net_rx_bytes: run_ms * load_pct,
                        net_tx_bytes: run_ms * load_pct / 2,
                        disk_read_bytes: 0,
                        disk_write_bytes: 0,
                    }
                })
                .collect())
        })
    }

    async fn create(&self, id: VmId, spec: &VmSpec) -> Result<(), DriverError> {
        let boot_ms = self.config.boot_ms;
        self.with_vms(|vms, now| {
            if vms.contains_key(&id) {
                return Ok(());
            }
            vms.insert(
                id,
                SimVm {
                    spec: spec.clone(),
                    state: VmState::Booting,
                    next: Some((VmState::Running, now + boot_ms)),
                    run_ms_before: 0,
                    running_since_ms: None,
                },
            );
            Ok(())
        })
    }

    async fn start(&self, id: VmId) -> Result<(), DriverError> {
        let boot_ms = self.config.boot_ms;
        self.with_vms(|vms, now| {
            let vm = vms.get_mut(&id).ok_or(DriverError::NoSuchVm(id))?;
            match vm.state {
                VmState::Running | VmState::Booting => Ok(()),
                VmState::Stopped | VmState::Error if vm.next.is_none() => {
                    vm.set_state(VmState::Booting, now);
                    vm.next = Some((VmState::Running, now + boot_ms));
                    Ok(())
                }
                state => Err(DriverError::WrongState { op: "start", state }),
            }
        })
    }

    async fn pause(&self, id: VmId) -> Result<(), DriverError> {
        self.with_vms(|vms, now| {
            let vm = vms.get_mut(&id).ok_or(DriverError::NoSuchVm(id))?;
            match vm.state {
                VmState::Paused => Ok(()),
                VmState::Running if vm.next.is_none() => {
                    vm.set_state(VmState::Paused, now);
                    Ok(())
                }
                state => Err(DriverError::WrongState { op: "pause", state }),
            }
        })
    }

    async fn resume(&self, id: VmId) -> Result<(), DriverError> {
        let op_ms = self.config.op_ms;
        self.with_vms(|vms, now| {
            let vm = vms.get_mut(&id).ok_or(DriverError::NoSuchVm(id))?;
            match vm.state {
                VmState::Running | VmState::Resuming => Ok(()),
                VmState::Paused if vm.next.is_none() => {
                    vm.set_state(VmState::Running, now);
                    Ok(())
                }
                VmState::Suspended if vm.next.is_none() => {
                    vm.set_state(VmState::Resuming, now);
                    vm.next = Some((VmState::Running, now + op_ms));
                    Ok(())
                }
                state => Err(DriverError::WrongState {
                    op: "resume",
                    state,
                }),
            }
        })
    }

    async fn suspend(&self, id: VmId) -> Result<(), DriverError> {
        self.transition(
            id,
            "suspend",
            &[VmState::Running, VmState::Paused],
            VmState::Suspending,
            VmState::Suspended,
        )
    }

    async fn stop(&self, id: VmId) -> Result<(), DriverError> {
        self.transition(
            id,
            "stop",
            &[VmState::Running, VmState::Paused, VmState::Booting],
            VmState::Stopping,
            VmState::Stopped,
        )
    }

    async fn terminate(&self, id: VmId) -> Result<(), DriverError> {
        self.with_vms(|vms, _| {
            vms.remove(&id);
            Ok(())
        })
    }

    async fn console(&self, id: VmId, _max_bytes: usize) -> Result<Vec<u8>, DriverError> {
        self.with_vms(|vms, _| {
            let vm = vms.get(&id).ok_or(DriverError::NoSuchVm(id))?;
            Ok(format!(
                "[simulated VM {}: {}; it has no serial console]\n",
                vm.spec.name, vm.state
            )
            .into_bytes())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> VmSpec {
        VmSpec {
            name: "a".into(),
            hypervisor: "sim".into(),
            vcpus: 1,
            memory_mib: 128,
            image: "default".into(),
            command: vec![],
            policy: Default::default(),
            keep_running: false,
        }
    }

    #[tokio::test]
    async fn vms_survive_reopen_and_settle_on_time() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = SimConfig {
            boot_ms: 0,
            op_ms: 0,
        };
        let id = VmId::from_u128(7);
        {
            let driver = SimDriver::open(dir.path().into(), config).expect("open");
            driver.create(id, &spec()).await.expect("create");
            let listed = driver.list().await.expect("list");
            assert_eq!(listed[0].state, VmState::Running);
            driver.pause(id).await.expect("pause");
        }
        let driver = SimDriver::open(dir.path().into(), config).expect("reopen");
        assert_eq!(driver.list().await.expect("list")[0].state, VmState::Paused);
        driver.suspend(id).await.expect("suspend");
        assert_eq!(
            driver.list().await.expect("list")[0].state,
            VmState::Suspended
        );
        assert!(matches!(
            driver.pause(id).await,
            Err(DriverError::WrongState { .. })
        ));
        driver.terminate(id).await.expect("terminate");
        driver.terminate(id).await.expect("terminate twice");
        assert!(driver.list().await.expect("list").is_empty());
    }
}
