//! Real VMs under QEMU (`-M microvm`), driven through QMP, with herd-guest inside.
//!
//! Each VM is one daemonized QEMU process and one directory, `<state_dir>/<vm-id>/`,
//! holding everything about it: `spec.json`, `state.json` (what the driver decided last:
//! launched, suspended, stopped, failed; paused; whether the guest said hello), the pid
//! file, the QMP and guest-channel sockets, the serial console log and the suspend image.
//! Because the files are the truth and QEMU is not our child, a restarted agent re-adopts
//! its VMs by reading the directories and checking the pids, without touching the guests.
//!
//! States come from three sources, in this order: an operation in flight (suspending,
//! stopping), the persisted decision, and the live process (gone without a clean power-off
//! is an error). A launched VM is `booting` until herd-guest says hello over the guest
//! channel with the VM's token, then `running`; a VM restored from a suspend image is
//! `resuming` until that hello.
//!
//! Slow operations (suspend, stop, resume from disk) run in their own task and the caller
//! awaits it: if the caller's future is dropped (the agent aborts a superseded command)
//! the operation still finishes, instead of leaving a VM stopped half-way through a save.

mod accel;
pub mod launch;
mod migrate;
mod ops;
mod snapshot;
/// Kept at its old path: the process checks are shared with the oci driver now.
pub use crate::drivers::procfs;
pub mod qmp;
mod vm;

use crate::driver::{
    same_shape, Capabilities, Driver, DriverError, ObservedVm, ProgressSink, Sent, Snapshot,
};
use crate::drivers::channel::Guests;
use crate::drivers::{console, guest_config, images};
use crate::persist;
use async_trait::async_trait;
use herd_proto::guest::GuestMsg;
use herd_proto::wire::{HypervisorInfo, VmId, VmSpec, VmUsage};
use herd_proto::VmState;
use launch::{Accel, VmPaths};
use nix::sys::signal::Signal;
use parking_lot::Mutex;
use qmp::{Qmp, QmpError};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, OnceCell};
use tracing::{debug, info, warn};
use vm::{Phase, Vm, VmRecord};

/// The hypervisor type this driver serves.
pub const KIND: &str = "qemu";

/// How long a health check waits for one QEMU's QMP.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// How the driver picks its accelerator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccelChoice {
    /// KVM if a probe guest boots under it in time, else TCG.
    Auto,
    Force(Accel),
}

/// Operator settings of the qemu driver.
#[derive(Debug, Clone)]
pub struct QemuConfig {
    /// Where images live: `<images_dir>/<name>/{vmlinuz,initrd}` (see herd-image).
    pub images_dir: PathBuf,
    pub qemu_binary: PathBuf,
    /// Makes VMs' data disks.
    pub qemu_img: PathBuf,
    pub accel: AccelChoice,
    /// The host TSC frequency passed to guests; `None` reads it from /proc/cpuinfo.
    pub tsc_khz: Option<u64>,
    /// How long a guest gets to power off before QEMU is ended.
    pub stop_timeout: Duration,
    /// How long a KVM probe guest gets to reach userspace.
    pub kvm_probe_timeout: Duration,
    /// Probe KVM again even if the kept verdict still holds for this host.
    pub reprobe: bool,
    pub qmp_timeout: Duration,
}

impl QemuConfig {
    pub fn new(images_dir: PathBuf) -> QemuConfig {
        QemuConfig {
            images_dir,
            qemu_binary: PathBuf::from("qemu-system-x86_64"),
            qemu_img: PathBuf::from("qemu-img"),
            accel: AccelChoice::Auto,
            tsc_khz: None,
            stop_timeout: Duration::from_secs(10),
            kvm_probe_timeout: Duration::from_secs(8),
            reprobe: false,
            qmp_timeout: Duration::from_secs(10),
        }
    }
}

pub(crate) struct Inner {
    state_dir: PathBuf,
    config: QemuConfig,
    tsc_khz: Option<u64>,
    events: crate::agent::GuestEventSender,
    vms: Mutex<BTreeMap<VmId, Vm>>,
    op_locks: crate::drivers::op_locks::OpLocks,
    accel: OnceCell<(Accel, String)>,
}

/// The qemu driver. Dropping it leaves every VM running; a new driver on the same state
/// dir adopts them.
pub struct QemuDriver {
    inner: Arc<Inner>,
}

impl Drop for QemuDriver {
    fn drop(&mut self) {
        // Channel tasks hold connections to the guests; end them so the next driver can
        // connect (QEMU serves one client per socket).
        for vm in self.inner.vms.lock().values_mut() {
            if let Some((handle, _)) = vm.channel.take() {
                handle.abort();
            }
        }
    }
}

impl Inner {
    fn with_vm<T>(
        &self,
        id: VmId,
        f: impl FnOnce(&mut Vm) -> Result<T, DriverError>,
    ) -> Result<T, DriverError> {
        let mut vms = self.vms.lock();
        let vm = vms.get_mut(&id).ok_or(DriverError::NoSuchVm(id))?;
        f(vm)
    }

    /// Makes a new VM's directory with its `spec.json`.
    fn vm_dir_with_spec(&self, id: VmId, spec: &VmSpec) -> Result<VmPaths, DriverError> {
        let paths = VmPaths::new(&self.state_dir, id);
        std::fs::create_dir_all(&paths.dir).map_err(DriverError::io("creating the VM dir"))?;
        crate::drivers::save_spec(&paths.spec(), spec)?;
        Ok(paths)
    }

    fn image(&self, name: &str) -> Result<(PathBuf, PathBuf), DriverError> {
        let dir = images::find(&self.config.images_dir, name, &["vmlinuz", "initrd"])?;
        Ok((dir.join("vmlinuz"), dir.join("initrd")))
    }
}

/// What the guest channel asks of the driver (see `drivers::channel`).
impl Guests for Inner {
    fn wanted(&self, id: VmId, generation: u64) -> bool {
        self.vms.lock().get(&id).is_some_and(|vm| {
            vm.generation == generation && vm.record.phase == Phase::Launched && vm.alive()
        })
    }

    fn check_hello(&self, id: VmId, generation: u64, vm_id: VmId, token: &str) -> bool {
        let mut vms = self.vms.lock();
        let Some(vm) = vms.get_mut(&id) else {
            return false;
        };
        if vm.generation != generation || vm_id != id || token != vm.record.token {
            return false;
        }
        if !vm.record.hello_seen || vm.record.restored {
            vm.record.hello_seen = true;
            vm.record.restored = false;
            if let Err(e) = vm.save() {
                warn!("{e}");
            }
        }
        true
    }

    fn policy(&self, id: VmId) -> herd_proto::policy::PolicySpec {
        self.with_vm(id, |vm| Ok(vm.spec.policy))
            .unwrap_or_default()
    }

    fn deliver(&self, id: VmId, generation: u64, msg: GuestMsg) {
        if let Some(vm) = self
            .vms
            .lock()
            .get_mut(&id)
            .filter(|vm| vm.generation == generation)
        {
            // Saved only on a change: the save syncs to disk under the driver's lock,
            // and a guest repeating itself must not stall every other VM with it.
            match &msg {
                GuestMsg::PolicyAction { .. } if !vm.record.policy_reported => {
                    vm.record.policy_reported = true;
                    if let Err(e) = vm.save() {
                        warn!("{e}");
                    }
                }
                GuestMsg::WorkloadExit { code } if vm.record.exit_code != Some(*code) => {
                    vm.record.exit_code = Some(*code);
                    if let Err(e) = vm.save() {
                        warn!("{e}");
                    }
                }
                GuestMsg::Usage { net_rx, net_tx, .. } => vm.guest_net = (*net_rx, *net_tx),
                _ => {}
            }
        }
        // Full means nobody drains the queue (no server): a guest's chatter is dropped
        // here rather than held without bound.
        if self.events.try_send((id, msg)).is_err() {
            debug!(%id, "guest message dropped: the agent's queue is full");
        }
    }
}

impl QemuDriver {
    /// Opens the driver and re-adopts the VMs in `state_dir`. QEMU processes that are
    /// still alive are left untouched; the channel to their guests is reopened.
    pub fn open(
        state_dir: PathBuf,
        config: QemuConfig,
        guest_events: crate::agent::GuestEventSender,
    ) -> Result<QemuDriver, DriverError> {
        std::fs::create_dir_all(&state_dir)
            .map_err(DriverError::io("creating the qemu state dir"))?;
        let tsc_khz = config.tsc_khz.or_else(launch::host_tsc_khz);
        let mut vms = BTreeMap::new();
        let entries =
            std::fs::read_dir(&state_dir).map_err(DriverError::io("listing the qemu state dir"))?;
        for entry in entries.flatten() {
            let Ok(id) = entry.file_name().to_string_lossy().parse::<VmId>() else {
                continue;
            };
            let paths = VmPaths::new(&state_dir, id);
            let spec: Option<VmSpec> =
                persist::load_json(&paths.spec()).map_err(DriverError::State)?;
            let record: Option<VmRecord> =
                persist::load_json(&paths.state()).map_err(DriverError::State)?;
            let (Some(spec), Some(record)) = (spec, record) else {
                // A create that died before writing its files: nothing to adopt.
                warn!(%id, "incomplete VM dir; removing it");
                let _ = std::fs::remove_dir_all(&paths.dir);
                continue;
            };
            let pid = procfs::read_pid_file(&paths.pid_file())
                .filter(|pid| procfs::is_our_qemu(*pid, &paths.dir));
            if let (Some(pid), false) = (pid, record.phase == Phase::Launched) {
                // Killed between saving its memory and quitting: the image is the truth.
                procfs::signal(pid, Signal::SIGKILL);
            }
            info!(%id, ?pid, phase = ?record.phase, "adopting VM");
            vms.insert(
                id,
                Vm {
                    paths,
                    spec,
                    record,
                    pid,
                    busy: None,
                    guest_net: (0, 0),
                    generation: 0,
                    channel: None,
                    unreported: None,
                },
            );
        }
        let inner = Arc::new(Inner {
            state_dir,
            config,
            tsc_khz,
            events: guest_events,
            vms: Mutex::new(vms),
            op_locks: Default::default(),
            accel: OnceCell::new(),
        });
        let live: Vec<VmId> = inner
            .vms
            .lock()
            .iter()
            .filter(|(_, vm)| vm.record.phase == Phase::Launched && vm.pid.is_some())
            .map(|(id, _)| *id)
            .collect();
        for id in live {
            inner.spawn_channel(id, 0);
        }
        Ok(QemuDriver { inner })
    }

    /// The pid of a VM's QEMU, if it has one (for tests and diagnostics).
    pub fn pid(&self, id: VmId) -> Option<i32> {
        self.inner.with_vm(id, |vm| Ok(vm.pid)).ok().flatten()
    }

    /// The directory holding a VM's files.
    pub fn vm_dir(&self, id: VmId) -> PathBuf {
        VmPaths::new(&self.inner.state_dir, id).dir
    }

    /// The workload exit code the guest reported, if any.
    pub fn exit_code(&self, id: VmId) -> Option<i32> {
        self.inner
            .with_vm(id, |vm| Ok(vm.record.exit_code))
            .ok()
            .flatten()
    }

    /// Why a VM is in `error`, if it is.
    pub fn failure(&self, id: VmId) -> Option<String> {
        self.inner
            .with_vm(id, |vm| match &vm.record.phase {
                Phase::Failed { reason } => Ok(Some(reason.clone())),
                _ => Ok(None),
            })
            .ok()
            .flatten()
    }
}

#[async_trait]
impl Driver for QemuDriver {
    async fn console(&self, id: VmId, max_bytes: usize) -> Result<Vec<u8>, DriverError> {
        console::of_vm(&self.vm_dir(id), id, max_bytes)
    }

    fn kind(&self) -> &'static str {
        KIND
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            suspend_to_disk: true,
            live_migrate: true,
            ..Capabilities::default()
        }
    }

    fn footprint(&self) -> Option<herd_util::Footprint> {
        Some(herd_util::Footprint::Pidfiles {
            dir: self.inner.state_dir.clone(),
            file: launch::PID_FILE.into(),
            // The kernel keeps 15 characters of `qemu-system-x86_64`.
            comm: "qemu-system".into(),
        })
    }

    /// Asks the QMP of every live QEMU that no operation holds for its status, all at
    /// once: a QEMU that is stopped, wedged or cut from its socket shows here, where
    /// `list` (which reads only records and /proc) would not notice.
    async fn check(&self) -> Result<(), DriverError> {
        let idle: Vec<(VmId, PathBuf)> = self
            .inner
            .vms
            .lock()
            .iter()
            .filter(|(_, vm)| vm.busy.is_none() && vm.alive())
            .map(|(id, vm)| (*id, vm.paths.qmp()))
            .collect();
        let checks = idle.into_iter().map(|(vm, path)| async move {
            let answer = async { Qmp::connect(&path, CHECK_TIMEOUT).await?.status().await };
            match answer.await {
                Ok(_) => Ok(()),
                Err(QmpError::Timeout(after)) => Err(DriverError::Timeout {
                    vm,
                    doing: "answering QMP",
                    after,
                }),
                Err(e) => Err(DriverError::Operation {
                    vm,
                    doing: "checking QMP".into(),
                    source: Box::new(e),
                }),
            }
        });
        futures_util::future::join_all(checks)
            .await
            .into_iter()
            .collect()
    }

    async fn probe(&self) -> Result<HypervisorInfo, DriverError> {
        let out = tokio::process::Command::new(&self.inner.config.qemu_binary)
            .arg("--version")
            .output()
            .await
            .map_err(|e| DriverError::Unavailable {
                kind: "qemu",
                reason: format!(
                    "cannot run {}: {e} (apt-get install qemu-system-x86)",
                    self.inner.config.qemu_binary.display()
                ),
            })?;
        let version = String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .unwrap_or("")
            .trim_start_matches("QEMU emulator version ")
            .to_string();
        let images = images::available(&self.inner.config.images_dir, KIND)?;
        let (_, accel_detail) = self.inner.accel().await;
        Ok(HypervisorInfo {
            kind: "qemu".into(),
            detail: format!(
                "qemu {version}, microvm, accel {accel_detail}, tsc {} kHz, images: {}",
                self.inner
                    .tsc_khz
                    .map(|k| k.to_string())
                    .unwrap_or_else(|| "unknown".into()),
                images.join(",")
            ),
        })
    }

    async fn list(&self) -> Result<Vec<ObservedVm>, DriverError> {
        let mut vms = self.inner.vms.lock();
        let mut observed = Vec::with_capacity(vms.len());
        for (id, vm) in vms.iter_mut() {
            let state = vm.observe();
            if let Some(msg) = vm.unreported.take() {
                if let Err(mpsc::error::TrySendError::Full((_, msg))) =
                    self.inner.events.try_send((*id, msg))
                {
                    // Kept for the next look: it says why the VM ended.
                    vm.unreported = Some(msg);
                }
            }
            observed.push(ObservedVm { id: *id, state });
        }
        Ok(observed)
    }

    async fn usage(&self) -> Result<Vec<VmUsage>, DriverError> {
        let vms = self.inner.vms.lock();
        Ok(vms
            .iter()
            .filter_map(|(id, vm)| {
                let (cpu_ms, mem_kib) = procfs::usage(vm.pid?)?;
                Some(VmUsage {
                    vm: *id,
                    cpu_ms,
                    mem_kib,
                    net_rx_bytes: vm.guest_net.0,
                    net_tx_bytes: vm.guest_net.1,
                    // Data disks are not read yet: QEMU keeps their counters (query-blockstats).
                    disk_read_bytes: 0,
                    disk_write_bytes: 0,
                })
            })
            .collect())
    }

    async fn create(&self, id: VmId, spec: &VmSpec) -> Result<(), DriverError> {
        let spec = spec.clone();
        self.inner
            .run_op(id, move |inner| async move {
                if inner.vms.lock().contains_key(&id) {
                    return Ok(());
                }
                inner.image(&spec.image)?;
                let (accel, _) = inner.accel().await;
                let paths = inner.vm_dir_with_spec(id, &spec)?;
                let record = VmRecord {
                    token: guest_config::new_token(),
                    phase: Phase::Launched,
                    accel,
                    paused: false,
                    hello_seen: false,
                    restored: false,
                    exit_code: None,
                    born_unix_ms: Some(herd_proto::clock::unix_ms()),
                    policy_reported: false,
                    migrated_out: false,
                    disk_made: false,
                };
                let vm = Vm::new(paths, spec, record, VmState::Booting);
                vm.save()?;
                inner.vms.lock().insert(id, vm);
                let result = inner.launch(id, ops::StartFrom::Boot).await;
                inner.with_vm(id, |vm| {
                    vm.busy = None;
                    if let Err(e) = &result {
                        vm.record.phase = Phase::Failed {
                            reason: e.to_string(),
                        };
                        vm.save()?;
                    }
                    Ok(())
                })?;
                result
            })
            .await
    }

    async fn start(&self, id: VmId) -> Result<(), DriverError> {
        self.inner
            .run_op(id, move |inner| async move {
                let state = inner.with_vm(id, |vm| Ok(vm.observe()))?;
                match state {
                    VmState::Running | VmState::Booting => return Ok(()),
                    VmState::Stopped | VmState::Error => {}
                    state => return Err(DriverError::WrongState { op: "start", state }),
                }
                inner.with_vm(id, |vm| {
                    vm.record.phase = Phase::Launched;
                    vm.record.paused = false;
                    vm.record.hello_seen = false;
                    vm.record.restored = false;
                    vm.record.exit_code = None;
                    vm.record.policy_reported = false;
                    vm.busy = Some(VmState::Booting);
                    vm.save()
                })?;
                let result = inner.launch(id, ops::StartFrom::Boot).await;
                inner.with_vm(id, |vm| {
                    vm.busy = None;
                    if let Err(e) = &result {
                        vm.record.phase = Phase::Failed {
                            reason: e.to_string(),
                        };
                        vm.save()?;
                    }
                    Ok(())
                })?;
                result
            })
            .await
    }

    async fn pause(&self, id: VmId) -> Result<(), DriverError> {
        self.inner
            .run_op(id, move |inner| async move {
                let state = inner.with_vm(id, |vm| Ok(vm.observe()))?;
                match state {
                    VmState::Paused => return Ok(()),
                    VmState::Running | VmState::Booting | VmState::Resuming => {}
                    state => return Err(DriverError::WrongState { op: "pause", state }),
                }
                inner.qmp_run(id, "stop", None).await?;
                inner.with_vm(id, |vm| {
                    vm.record.paused = true;
                    vm.save()
                })
            })
            .await
    }

    async fn resume(&self, id: VmId) -> Result<(), DriverError> {
        self.inner
            .run_op(id, move |inner| async move {
                let state = inner.with_vm(id, |vm| Ok(vm.observe()))?;
                match state {
                    VmState::Running | VmState::Resuming | VmState::Booting => Ok(()),
                    VmState::Paused => {
                        inner.qmp_run(id, "cont", None).await?;
                        inner.with_vm(id, |vm| {
                            vm.record.paused = false;
                            vm.save()
                        })
                    }
                    VmState::Suspended => inner.do_restore(id).await,
                    state => Err(DriverError::WrongState {
                        op: "resume",
                        state,
                    }),
                }
            })
            .await
    }

    async fn suspend(&self, id: VmId) -> Result<(), DriverError> {
        self.inner
            .run_op(id, move |inner| async move {
                let state = inner.with_vm(id, |vm| Ok(vm.observe()))?;
                if state == VmState::Suspended {
                    return Ok(());
                }
                inner.do_suspend(id).await
            })
            .await
    }

    async fn stop(&self, id: VmId) -> Result<(), DriverError> {
        self.inner
            .run_op(id, move |inner| async move {
                let state = inner.with_vm(id, |vm| Ok(vm.observe()))?;
                match state {
                    VmState::Stopped => Ok(()),
                    // A suspended VM has no process; dropping its image stops it.
                    VmState::Suspended => inner.with_vm(id, |vm| {
                        let _ = std::fs::remove_file(vm.paths.suspend_image());
                        vm.record.phase = Phase::Stopped;
                        vm.save()
                    }),
                    _ => inner.do_stop(id).await,
                }
            })
            .await
    }

    async fn migration_handoff(&self, id: VmId) -> Result<Vec<u8>, DriverError> {
        self.inner.handoff(id)
    }

    async fn migrate_out(
        &self,
        id: VmId,
        to: &std::path::Path,
        max_downtime_ms: u64,
        progress: ProgressSink,
    ) -> Result<Sent, DriverError> {
        let to = to.to_owned();
        self.inner
            .run_op(id, move |inner| {
                inner.do_migrate_out(id, to, max_downtime_ms, progress)
            })
            .await
    }

    async fn migrate_out_undo(&self, id: VmId) -> Result<(), DriverError> {
        self.inner
            .run_op(id, move |inner| inner.do_migrate_out_undo(id))
            .await
    }

    async fn reshape(&self, id: VmId, spec: &VmSpec) -> Result<bool, DriverError> {
        if self
            .inner
            .with_vm(id, |vm| Ok(same_shape(&vm.spec, spec)))?
        {
            return Ok(false);
        }
        let (vcpus, memory_mib) = (spec.vcpus, spec.memory_mib);
        self.inner
            .run_op(id, move |inner| inner.do_reshape(id, vcpus, memory_mib))
            .await?;
        Ok(true)
    }

    async fn migrate_in(
        &self,
        id: VmId,
        spec: &VmSpec,
        handoff: &[u8],
    ) -> Result<PathBuf, DriverError> {
        let (spec, handoff) = (spec.clone(), handoff.to_vec());
        self.inner
            .run_op(id, move |inner| inner.do_migrate_in(id, spec, handoff))
            .await
    }

    async fn snapshot(&self, id: VmId, dir: &std::path::Path) -> Result<Snapshot, DriverError> {
        let dir = dir.to_owned();
        self.inner
            .run_op(id, move |inner| inner.do_snapshot(id, dir))
            .await
    }

    async fn create_from(
        &self,
        id: VmId,
        spec: &VmSpec,
        dir: &std::path::Path,
        handoff: &[u8],
    ) -> Result<(), DriverError> {
        let socket = self.migrate_in(id, spec, handoff).await?;
        if let Err(e) = self.inner.feed_copy(id, &socket, dir).await {
            let _ = self.terminate(id).await;
            return Err(e);
        }
        self.migrate_in_finish(id).await
    }

    async fn migrate_in_finish(&self, id: VmId) -> Result<(), DriverError> {
        self.inner
            .run_op(id, move |inner| inner.do_migrate_in_finish(id))
            .await
    }

    async fn terminate(&self, id: VmId) -> Result<(), DriverError> {
        self.inner
            .run_op(id, move |inner| async move {
                let found = inner
                    .vms
                    .lock()
                    .get(&id)
                    .map(|vm| (vm.pid, vm.paths.dir.clone()));
                let Some((pid, dir)) = found else {
                    // Not known, but files may be left by a crash mid-create.
                    let dir = VmPaths::new(&inner.state_dir, id).dir;
                    if dir.exists() {
                        std::fs::remove_dir_all(&dir)
                            .map_err(DriverError::io("removing the VM dir"))?;
                    }
                    return Ok(());
                };
                if let Some(pid) = pid {
                    procfs::signal(pid, Signal::SIGKILL);
                }
                inner.wait_gone(id, Duration::ZERO).await?;
                if let Some(vm) = inner.vms.lock().remove(&id) {
                    if let Some((handle, _)) = vm.channel {
                        handle.abort();
                    }
                }
                if dir.exists() {
                    std::fs::remove_dir_all(&dir)
                        .map_err(DriverError::io("removing the VM dir"))?;
                }
                Ok(())
            })
            .await?;
        self.inner.op_locks.forget(id);
        Ok(())
    }
}
