//! Simulated VMs, for tests and scale runs only (like Kubernetes' hollow nodes).
//!
//! A sim VM is a record with a state and, while it is between states, the time it
//! reaches the next one. [`SimDriver::open`] keeps the records in one file in the
//! agent's data dir, written atomically on every change, so sim VMs outlive an agent
//! restart exactly as real VMs do, and the agent's re-adoption path is exercised for
//! real.
//!
//! Scale runs (`herd sim`, thousands of agents in one process) cannot afford a synced
//! write per change: [`SimDriver::in_memory`] never touches the disk, and the harness
//! carries the VMs across runs itself with [`SimDriver::restore`] and
//! [`SimDriver::save_to`]. It also plays the guest: [`SimDriver::flip`] pauses or
//! resumes a VM behind the agent's back, and every record keeps when its state last
//! changed, so the harness can tell how long the change took to reach the server.

use crate::driver::{Capabilities, Driver, DriverError, ObservedVm};
use crate::persist;
use async_trait::async_trait;
use herd_proto::wire::{HypervisorInfo, VmId, VmSpec, VmUsage};
use herd_proto::VmState;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// How long simulated operations take, and whether VMs use anything.
#[derive(Debug, Clone, Copy)]
pub struct SimConfig {
    pub boot_ms: u64,
    pub op_ms: u64,
    /// Report simulated usage counters (CPU, memory, network). Scale runs turn this off
    /// when they measure state sync alone.
    pub usage: bool,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            boot_ms: 300,
            op_ms: 100,
            usage: true,
        }
    }
}

/// The part of a VM's spec a sim VM uses. Files written with the whole `VmSpec` read
/// back into it (unknown fields are ignored), and a million sim VMs in one process do
/// not carry a million copies of fields nobody reads.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SimSpec {
    name: String,
    vcpus: u32,
    memory_mib: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct SimVm {
    spec: SimSpec,
    state: VmState,
    /// The state the VM reaches at `settle_at_ms`, if it is between states.
    next: Option<(VmState, u64)>,
    /// Milliseconds spent running before the current run began.
    run_ms_before: u64,
    /// When the current run began, if running.
    running_since_ms: Option<u64>,
    /// When `state` last changed (unix ms).
    #[serde(default)]
    changed_at_ms: u64,
}

impl SimVm {
    /// Reaches the next state if its time has come; says whether it did.
    fn settle(&mut self, now_ms: u64) -> bool {
        match self.next {
            Some((next, at)) if now_ms >= at => {
                self.set_state(next, at);
                self.next = None;
                true
            }
            _ => false,
        }
    }

    fn set_state(&mut self, state: VmState, at_ms: u64) {
        if let Some(since) = self.running_since_ms.take() {
            self.run_ms_before += at_ms.saturating_sub(since);
        }
        if state == VmState::Running {
            self.running_since_ms = Some(at_ms);
        }
        if state != self.state {
            self.changed_at_ms = at_ms;
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

/// The records, and whether they changed since they were last written.
#[derive(Default)]
struct Vms {
    map: BTreeMap<VmId, SimVm>,
    dirty: bool,
    /// No VM reaches its next state before this (unix ms); 0 when unknown. The harness
    /// flips thousands of VMs a second, each on some host's records: walking all of
    /// that host's VMs for each flip, to settle none, was most of the sim's work.
    settle_from_ms: u64,
}

impl Vms {
    fn new(map: BTreeMap<VmId, SimVm>) -> Vms {
        Vms {
            map,
            ..Vms::default()
        }
    }

    /// Moves every VM whose time has come to its next state.
    fn settle(&mut self, now_ms: u64) {
        if now_ms < self.settle_from_ms {
            return;
        }
        let mut next_due = u64::MAX;
        for vm in self.map.values_mut() {
            self.dirty |= vm.settle(now_ms);
            if let Some((_, at)) = vm.next {
                next_due = next_due.min(at);
            }
        }
        self.settle_from_ms = next_due;
    }

    /// Notes that a VM was put between states, reaching the next at `at_ms`.
    fn due_by(&mut self, at_ms: u64) {
        self.settle_from_ms = self.settle_from_ms.min(at_ms);
    }
}

pub struct SimDriver {
    config: SimConfig,
    /// Where the records are written on every change; `None` keeps them in memory.
    path: Option<PathBuf>,
    vms: Mutex<Vms>,
}

use herd_proto::clock::unix_ms;

/// The hypervisor type this driver serves.
pub const KIND: &str = "sim";

fn load(path: &Path) -> Result<BTreeMap<VmId, SimVm>, DriverError> {
    Ok(persist::load_json(path)
        .map_err(|e| DriverError::State(format!("reading {}: {e}", path.display())))?
        .unwrap_or_default())
}

impl SimDriver {
    /// Opens the driver, re-adopting the VMs recorded in `dir`.
    pub fn open(dir: PathBuf, config: SimConfig) -> Result<SimDriver, DriverError> {
        std::fs::create_dir_all(&dir).map_err(DriverError::io("creating the sim dir"))?;
        let path = dir.join("vms.json");
        let map = load(&path)?;
        Ok(SimDriver {
            config,
            path: Some(path),
            vms: Mutex::new(Vms::new(map)),
        })
    }

    /// A driver whose VMs live in memory only.
    pub fn in_memory(config: SimConfig) -> SimDriver {
        SimDriver {
            config,
            path: None,
            vms: Mutex::new(Vms::default()),
        }
    }

    /// An in-memory driver holding the VMs of a snapshot written by
    /// [`SimDriver::save_to`] (or of a file-backed driver's `vms.json`), if there is one.
    pub fn restore(path: &Path, config: SimConfig) -> Result<SimDriver, DriverError> {
        let driver = SimDriver::in_memory(config);
        *driver.vms.lock() = Vms::new(load(path)?);
        Ok(driver)
    }

    /// Writes a snapshot of the VMs to `path` (atomically, not synced).
    pub fn save_to(&self, path: &Path) -> Result<(), DriverError> {
        let bytes = {
            let vms = self.vms.lock();
            serde_json::to_vec(&vms.map).map_err(DriverError::encode("the sim VMs"))?
        };
        persist::write_unsynced(path, &bytes).map_err(DriverError::io("saving sim VMs"))
    }

    /// Pauses a running VM or resumes a paused one, as if its guest had done it.
    /// Returns the new state and when it changed (unix ms), or `None` if the VM is not
    /// here, is between states, or is neither running nor paused.
    pub fn flip(&self, id: VmId) -> Option<(VmState, u64)> {
        self.with_vms(|vms, now| {
            let Some(vm) = vms.map.get_mut(&id) else {
                return Ok(None);
            };
            let to = match vm.state {
                _ if vm.next.is_some() => return Ok(None),
                VmState::Running => VmState::Paused,
                VmState::Paused => VmState::Running,
                _ => return Ok(None),
            };
            vm.set_state(to, now);
            vms.dirty = true;
            Ok(Some((to, now)))
        })
        .ok()
        .flatten()
    }

    /// When the VM's state last changed (unix ms), if the VM is here.
    pub fn changed_at_ms(&self, id: VmId) -> Option<u64> {
        self.with_vms(|vms, _| Ok(vms.map.get(&id).map(|vm| vm.changed_at_ms)))
            .ok()
            .flatten()
    }

    /// Runs `f` on the records after every VM due has reached its next state, then
    /// writes them if they changed (`f` sets `dirty` when it changes anything).
    fn with_vms<T>(
        &self,
        f: impl FnOnce(&mut Vms, u64) -> Result<T, DriverError>,
    ) -> Result<T, DriverError> {
        let now = unix_ms();
        let mut vms = self.vms.lock();
        vms.settle(now);
        let out = f(&mut vms, now);
        if let Some(path) = &self.path {
            if vms.dirty {
                let bytes = serde_json::to_vec(&vms.map).unwrap_or_default();
                persist::write_atomic(path, &bytes).map_err(DriverError::io("saving sim VMs"))?;
                vms.dirty = false;
            }
        }
        out
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
            let vm = vms.map.get_mut(&id).ok_or(DriverError::NoSuchVm(id))?;
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
            vms.due_by(now + op_ms);
            vms.dirty = true;
            Ok(())
        })
    }
}

#[async_trait]
impl Driver for SimDriver {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            suspend_to_disk: true,
            resize: true,
            ..Capabilities::default()
        }
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
                .map
                .iter()
                .map(|(id, vm)| ObservedVm {
                    id: *id,
                    state: vm.state,
                })
                .collect())
        })
    }

    async fn state_of(&self, id: VmId) -> Result<Option<VmState>, DriverError> {
        self.with_vms(|vms, _| Ok(vms.map.get(&id).map(|vm| vm.state)))
    }

    async fn usage(&self) -> Result<Vec<VmUsage>, DriverError> {
        if !self.config.usage {
            return Ok(Vec::new());
        }
        self.with_vms(|vms, now| {
            Ok(vms
                .map
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

    async fn reshape(&self, id: VmId, spec: &VmSpec) -> Result<bool, DriverError> {
        self.with_vms(|vms, _| {
            let vm = vms.map.get_mut(&id).ok_or(DriverError::NoSuchVm(id))?;
            if (vm.spec.vcpus, vm.spec.memory_mib) == (spec.vcpus, spec.memory_mib) {
                return Ok(false);
            }
            vm.spec.vcpus = spec.vcpus;
            vm.spec.memory_mib = spec.memory_mib;
            vms.dirty = true;
            Ok(true)
        })
    }

    async fn create(&self, id: VmId, spec: &VmSpec) -> Result<(), DriverError> {
        let boot_ms = self.config.boot_ms;
        self.with_vms(|vms, now| {
            if vms.map.contains_key(&id) {
                return Ok(());
            }
            vms.map.insert(
                id,
                SimVm {
                    spec: SimSpec {
                        name: spec.name.clone(),
                        vcpus: spec.vcpus,
                        memory_mib: spec.memory_mib,
                    },
                    state: VmState::Booting,
                    next: Some((VmState::Running, now + boot_ms)),
                    run_ms_before: 0,
                    running_since_ms: None,
                    changed_at_ms: now,
                },
            );
            vms.due_by(now + boot_ms);
            vms.dirty = true;
            Ok(())
        })
    }

    async fn start(&self, id: VmId) -> Result<(), DriverError> {
        let boot_ms = self.config.boot_ms;
        self.with_vms(|vms, now| {
            let vm = vms.map.get_mut(&id).ok_or(DriverError::NoSuchVm(id))?;
            match vm.state {
                VmState::Running | VmState::Booting => Ok(()),
                VmState::Stopped | VmState::Error if vm.next.is_none() => {
                    vm.set_state(VmState::Booting, now);
                    vm.next = Some((VmState::Running, now + boot_ms));
                    vms.due_by(now + boot_ms);
                    vms.dirty = true;
                    Ok(())
                }
                state => Err(DriverError::WrongState { op: "start", state }),
            }
        })
    }

    async fn pause(&self, id: VmId) -> Result<(), DriverError> {
        self.with_vms(|vms, now| {
            let vm = vms.map.get_mut(&id).ok_or(DriverError::NoSuchVm(id))?;
            match vm.state {
                VmState::Paused => Ok(()),
                VmState::Running if vm.next.is_none() => {
                    vm.set_state(VmState::Paused, now);
                    vms.dirty = true;
                    Ok(())
                }
                state => Err(DriverError::WrongState { op: "pause", state }),
            }
        })
    }

    async fn resume(&self, id: VmId) -> Result<(), DriverError> {
        let op_ms = self.config.op_ms;
        self.with_vms(|vms, now| {
            let vm = vms.map.get_mut(&id).ok_or(DriverError::NoSuchVm(id))?;
            match vm.state {
                VmState::Running | VmState::Resuming => Ok(()),
                VmState::Paused if vm.next.is_none() => {
                    vm.set_state(VmState::Running, now);
                    vms.dirty = true;
                    Ok(())
                }
                VmState::Suspended if vm.next.is_none() => {
                    vm.set_state(VmState::Resuming, now);
                    vm.next = Some((VmState::Running, now + op_ms));
                    vms.due_by(now + op_ms);
                    vms.dirty = true;
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
            if vms.map.remove(&id).is_some() {
                vms.dirty = true;
            }
            Ok(())
        })
    }

    async fn console(&self, id: VmId, _max_bytes: usize) -> Result<Vec<u8>, DriverError> {
        self.with_vms(|vms, _| {
            let vm = vms.map.get(&id).ok_or(DriverError::NoSuchVm(id))?;
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
            disk_mib: 0,
            burst: Default::default(),
            seed: None,
        }
    }

    #[tokio::test]
    async fn vms_survive_reopen_and_settle_on_time() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = SimConfig {
            boot_ms: 0,
            op_ms: 0,
            ..SimConfig::default()
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

    #[tokio::test]
    async fn in_memory_flips_record_when_and_snapshots_carry_vms() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = SimConfig {
            boot_ms: 0,
            op_ms: 0,
            usage: false,
        };
        let driver = SimDriver::in_memory(config);
        let id = VmId::from_u128(9);
        assert_eq!(driver.flip(id), None);
        driver.create(id, &spec()).await.expect("create");
        assert_eq!(
            driver.state_of(id).await.expect("state"),
            Some(VmState::Running)
        );
        let (state, at) = driver.flip(id).expect("flip");
        assert_eq!(state, VmState::Paused);
        assert_eq!(driver.changed_at_ms(id), Some(at));
        assert_eq!(driver.list().await.expect("list")[0].state, VmState::Paused);
        assert_eq!(
            driver.flip(id).map(|(state, _)| state),
            Some(VmState::Running)
        );
        assert!(driver.usage().await.expect("usage").is_empty());
        // Nothing was written; a snapshot carries the VMs to a new driver.
        assert_eq!(std::fs::read_dir(dir.path()).expect("dir").count(), 0);
        let path = dir.path().join("vms.json");
        driver.save_to(&path).expect("save");
        let restored = SimDriver::restore(&path, config).expect("restore");
        assert_eq!(
            restored.state_of(id).await.expect("state"),
            Some(VmState::Running)
        );
        let empty = SimDriver::restore(&dir.path().join("absent.json"), config).expect("empty");
        assert!(empty.list().await.expect("list").is_empty());
    }

    /// Records settle only once something is due, and whatever is scheduled after a
    /// settling pass (a boot, a stop, a resume) still settles on time.
    #[test]
    fn settles_what_comes_due_and_skips_the_walk_otherwise() {
        let mut vms = Vms::default();
        let spec = SimSpec {
            name: "a".into(),
            vcpus: 1,
            memory_mib: 128,
        };
        let vm = |state, next| SimVm {
            spec: spec.clone(),
            state,
            next,
            run_ms_before: 0,
            running_since_ms: None,
            changed_at_ms: 0,
        };
        let (a, b) = (VmId::from_u128(1), VmId::from_u128(2));
        vms.map
            .insert(a, vm(VmState::Booting, Some((VmState::Running, 100))));
        vms.map.insert(b, vm(VmState::Running, None));
        vms.settle(50);
        assert_eq!(vms.settle_from_ms, 100);
        assert_eq!(vms.map[&a].state, VmState::Booting);
        vms.settle(100);
        assert_eq!(vms.map[&a].state, VmState::Running);
        assert_eq!(vms.settle_from_ms, u64::MAX, "nothing left between states");
        // Scheduled after the pass: the bound comes down with it.
        let b_vm = vms.map.get_mut(&b).expect("b");
        b_vm.set_state(VmState::Stopping, 150);
        b_vm.next = Some((VmState::Stopped, 200));
        vms.due_by(200);
        vms.settle(199);
        assert_eq!(vms.map[&b].state, VmState::Stopping);
        vms.settle(200);
        assert_eq!(vms.map[&b].state, VmState::Stopped);
        assert!(vms.dirty);
    }

    /// A file written when records held the whole spec still reads.
    #[test]
    fn reads_records_with_whole_specs() {
        let id = VmId::from_u128(3);
        let old = serde_json::json!({
            id.to_string(): {
                "spec": spec(),
                "state": "running",
                "next": null,
                "run_ms_before": 0,
                "running_since_ms": 5
            }
        });
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("vms.json");
        std::fs::write(&path, serde_json::to_vec(&old).expect("json")).expect("write");
        let driver = SimDriver::restore(&path, SimConfig::default()).expect("restore");
        let vms = driver.vms.lock();
        assert_eq!(vms.map[&id].spec.memory_mib, 128);
    }

    #[tokio::test]
    async fn passes_the_conformance_kit() {
        let driver = SimDriver::in_memory(SimConfig {
            boot_ms: 20,
            op_ms: 10,
            usage: true,
        });
        let passed = crate::conformance::check(
            &driver,
            VmId::from_u128(42),
            &spec(),
            std::time::Duration::from_secs(5),
        )
        .await
        .unwrap_or_else(|breach| panic!("{breach}"));
        assert!(passed.contains(&"suspend to disk and resume"), "{passed:?}");
    }
}
