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

mod channel;
pub mod launch;
pub mod procfs;
pub mod qmp;

use crate::driver::{Capabilities, Driver, DriverError, ObservedVm};
use crate::persist;
use async_trait::async_trait;
use herd_proto::guest::{GuestMsg, HostMsg};
use herd_proto::wire::{HypervisorInfo, VmId, VmSpec, VmUsage};
use herd_proto::VmState;
use launch::{Accel, LaunchSpec, VmPaths};
use nix::sys::signal::Signal;
use parking_lot::Mutex;
use qmp::Qmp;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, OnceCell};
use tracing::{debug, info, warn};

/// The hypervisor type this driver serves.
pub const KIND: &str = "qemu";

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
    pub accel: AccelChoice,
    /// The host TSC frequency passed to guests; `None` reads it from /proc/cpuinfo.
    pub tsc_khz: Option<u64>,
    /// How long a guest gets to power off before QEMU is ended.
    pub stop_timeout: Duration,
    /// How long a KVM probe guest gets to reach userspace.
    pub kvm_probe_timeout: Duration,
    pub qmp_timeout: Duration,
}

impl QemuConfig {
    pub fn new(images_dir: PathBuf) -> QemuConfig {
        QemuConfig {
            images_dir,
            qemu_binary: PathBuf::from("qemu-system-x86_64"),
            accel: AccelChoice::Auto,
            tsc_khz: None,
            stop_timeout: Duration::from_secs(10),
            kvm_probe_timeout: Duration::from_secs(8),
            qmp_timeout: Duration::from_secs(10),
        }
    }
}

/// What the driver decided last about a VM; persisted in `state.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Phase {
    /// A QEMU process should be alive.
    Launched,
    /// Memory saved to the suspend image; no process.
    Suspended,
    /// Powered off (cleanly, or by a stop).
    Stopped,
    Failed {
        reason: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct VmRecord {
    token: String,
    phase: Phase,
    accel: Accel,
    paused: bool,
    /// The current QEMU's guest said hello with the right token.
    hello_seen: bool,
    /// The current QEMU was restored from a suspend image.
    restored: bool,
    /// The workload's exit code, as the guest reported it.
    exit_code: Option<i32>,
    /// When the VM was created (unix ms); the guest's lifespan counts from it.
    #[serde(default)]
    born_unix_ms: Option<u64>,
    /// The guest's policy action of the current run reached the agent.
    #[serde(default)]
    policy_reported: bool,
}

struct Vm {
    paths: VmPaths,
    spec: VmSpec,
    record: VmRecord,
    pid: Option<i32>,
    /// An operation in flight and the state it shows meanwhile.
    busy: Option<VmState>,
    guest_net: (u64, u64),
    /// Bumped on every launch, so a channel task of an old QEMU knows it is obsolete.
    generation: u64,
    channel: Option<(tokio::task::AbortHandle, mpsc::UnboundedSender<HostMsg>)>,
    /// A policy action the guest took with nobody listening, read back from its console.
    unreported: Option<GuestMsg>,
}

impl Vm {
    fn save(&self) -> Result<(), DriverError> {
        let bytes = serde_json::to_vec_pretty(&self.record)
            .map_err(DriverError::encode("the VM's state"))?;
        persist::write_atomic(&self.paths.state(), &bytes).map_err(DriverError::io(format!(
            "saving {}",
            self.paths.state().display()
        )))
    }

    fn alive(&self) -> bool {
        self.pid
            .is_some_and(|pid| procfs::is_our_qemu(pid, &self.paths.dir))
    }

    /// Settles the persisted phase against the process and returns the state to show.
    fn observe(&mut self) -> VmState {
        if let Some(busy) = self.busy {
            return busy;
        }
        match &self.record.phase {
            Phase::Suspended => VmState::Suspended,
            Phase::Stopped => VmState::Stopped,
            Phase::Failed { .. } => VmState::Error,
            Phase::Launched if self.alive() => {
                if self.record.paused {
                    VmState::Paused
                } else if self.record.hello_seen {
                    VmState::Running
                } else if self.record.restored {
                    VmState::Resuming
                } else {
                    VmState::Booting
                }
            }
            Phase::Launched => {
                // The process is gone without us ending it. A guest that reported its
                // workload's exit powered itself off: that is a stop, not a failure.
                // So did one whose policy (enforced by herd-guest) stopped it; its console
                // says so even when no host was connected to hear the report.
                self.record.phase = match self.record.exit_code {
                    Some(_) => Phase::Stopped,
                    None if policy_powered_off(&self.paths.console()) => {
                        if !self.record.policy_reported {
                            // The console is the guest's to write: believe only an action
                            // its policy names.
                            self.unreported = policy_action_from_console(&self.paths.console())
                                .filter(|msg| channel::policy_allows(&self.spec.policy, msg))
                                .map(channel::clamp);
                            self.record.policy_reported = true;
                        }
                        Phase::Stopped
                    }
                    None => Phase::Failed {
                        reason: format!(
                            "qemu exited unexpectedly; console ends with: {}",
                            console_tail(&self.paths.console())
                        ),
                    },
                };
                self.record.paused = false;
                self.pid = None;
                if let Some((handle, _)) = self.channel.take() {
                    handle.abort();
                }
                if let Err(e) = self.save() {
                    warn!("{e}");
                }
                self.observe()
            }
        }
    }
}

/// herd-guest powered the VM off for a Stop or Terminate policy action: it logs that to
/// the console right before the kernel's power-down lines.
fn policy_powered_off(path: &Path) -> bool {
    let text = console_text(path);
    text.lines().rev().take(20).any(|l| {
        l.contains("herd-guest: policy action Stop")
            || l.contains("herd-guest: policy action Terminate")
    })
}

/// The policy action herd-guest logged last, as the report it could not deliver.
fn policy_action_from_console(path: &Path) -> Option<GuestMsg> {
    let text = console_text(path);
    let line = text
        .lines()
        .rev()
        .take(20)
        .find(|l| l.contains("herd-guest: policy action "))?;
    let rest = line.split("herd-guest: policy action ").nth(1)?;
    let (action, rest) = rest.split_once(' ')?;
    let action = match action {
        "Stop" => herd_proto::policy::PolicyAction::Stop,
        "Terminate" => herd_proto::policy::PolicyAction::Terminate,
        "Suspend" => herd_proto::policy::PolicyAction::Suspend,
        _ => herd_proto::policy::PolicyAction::Notify,
    };
    let rest = rest.strip_prefix('(')?;
    let (rule, reason) = rest.split_once("): ")?;
    Some(GuestMsg::PolicyAction {
        rule: rule.to_owned(),
        action,
        reason: format!(
            "{} (read from the console: no host was connected)",
            reason.trim()
        ),
    })
}

/// The end of the console log as text. Only the end: the guest writes the log, as much
/// as it likes, and the agent must not read all of it into memory.
fn console_text(path: &Path) -> String {
    String::from_utf8_lossy(&read_tail(path, 64 * 1024).unwrap_or_default()).into_owned()
}

/// The last `max_bytes` of a file.
fn read_tail(path: &Path, max_bytes: u64) -> std::io::Result<Vec<u8>> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = std::fs::File::open(path)?;
    let len = file.metadata()?.len();
    file.seek(SeekFrom::Start(len.saturating_sub(max_bytes)))?;
    let mut bytes = Vec::with_capacity(len.min(max_bytes) as usize);
    file.take(max_bytes).read_to_end(&mut bytes)?;
    Ok(bytes)
}

fn console_tail(path: &Path) -> String {
    let text = console_text(path);
    text.lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("(empty)")
        .chars()
        .take(200)
        .collect()
}

pub(crate) struct Inner {
    state_dir: PathBuf,
    config: QemuConfig,
    tsc_khz: Option<u64>,
    events: crate::agent::GuestEventSender,
    vms: Mutex<BTreeMap<VmId, Vm>>,
    op_locks: Mutex<HashMap<VmId, Arc<tokio::sync::Mutex<()>>>>,
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

    fn op_lock(&self, id: VmId) -> Result<Arc<tokio::sync::Mutex<()>>, DriverError> {
        let mut locks = self.op_locks.lock();
        Ok(locks.entry(id).or_default().clone())
    }

    /// The socket a channel task of `generation` should connect to, or `None` if the task
    /// is obsolete (VM gone, relaunched, or its QEMU dead).
    fn channel_target(&self, id: VmId, generation: u64) -> Option<PathBuf> {
        let vms = self.vms.lock();
        let vm = vms.get(&id)?;
        (vm.generation == generation && vm.record.phase == Phase::Launched && vm.alive())
            .then(|| vm.paths.guest())
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

    /// The VM's self-management policy (none if the VM is gone).
    fn guest_policy(&self, id: VmId) -> herd_proto::policy::PolicySpec {
        self.with_vm(id, |vm| Ok(vm.spec.policy))
            .unwrap_or_default()
    }

    fn guest_message(&self, id: VmId, generation: u64, msg: GuestMsg) {
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

    async fn accel(&self) -> (Accel, String) {
        self.accel
            .get_or_init(|| async {
                match self.config.accel {
                    AccelChoice::Force(a) => (a, format!("{} (configured)", a.as_str())),
                    AccelChoice::Auto => self.probe_kvm().await,
                }
            })
            .await
            .clone()
    }

    /// Boots a throwaway guest under KVM and keeps KVM only if it reaches userspace in
    /// time: on nested hosts an openable /dev/kvm can be far slower than TCG
    /// (measured here: a guest under nested KVM had not booted after 100 s; under TCG it
    /// boots in seconds).
    async fn probe_kvm(&self) -> (Accel, String) {
        let tcg = |why: String| (Accel::Tcg, format!("tcg ({why})"));
        if std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_err()
        {
            return tcg("/dev/kvm is not usable".into());
        }
        let Some((kernel, initrd)) = self.any_image() else {
            return tcg("no image to probe KVM with".into());
        };
        let paths = VmPaths {
            dir: self.state_dir.join(".kvm-probe"),
        };
        let _ = std::fs::remove_dir_all(&paths.dir);
        if std::fs::create_dir_all(&paths.dir).is_err() {
            return tcg("cannot create the probe dir".into());
        }
        let spec = VmSpec {
            name: "kvm-probe".into(),
            hypervisor: "qemu".into(),
            vcpus: 1,
            memory_mib: 128,
            image: String::new(),
            command: vec!["/bin/true".into()],
            policy: Default::default(),
            keep_running: false,
        };
        let launch = LaunchSpec {
            id: VmId::nil(),
            spec: &spec,
            token: "probe",
            kernel: &kernel,
            initrd: &initrd,
            accel: Accel::Kvm,
            tsc_khz: self.tsc_khz,
            incoming: None,
            foreground: true,
            born_unix_ms: None,
            now_unix_ms: herd_proto::clock::unix_ms(),
        };
        let Ok(args) = launch::qemu_args(&paths, &launch) else {
            return tcg("cannot build the probe command line".into());
        };
        let started = std::time::Instant::now();
        let child = tokio::process::Command::new(&self.config.qemu_binary)
            .args(&args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn();
        let Ok(mut child) = child else {
            return tcg("cannot start the probe guest".into());
        };
        let deadline = self.config.kvm_probe_timeout;
        let mut reached = false;
        while started.elapsed() < deadline {
            let console = std::fs::read_to_string(paths.console()).unwrap_or_default();
            if console.contains("herd-guest: ") {
                reached = true;
                break;
            }
            if let Ok(Some(_)) = child.try_wait() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let _ = child.kill().await;
        let _ = std::fs::remove_dir_all(&paths.dir);
        if reached {
            (
                Accel::Kvm,
                format!(
                    "kvm (a probe guest reached userspace in {} ms)",
                    started.elapsed().as_millis()
                ),
            )
        } else {
            tcg(format!(
                "a KVM probe guest did not reach userspace within {} s; nested or slow KVM",
                deadline.as_secs()
            ))
        }
    }

    fn any_image(&self) -> Option<(PathBuf, PathBuf)> {
        let mut names: Vec<String> = std::fs::read_dir(&self.config.images_dir)
            .ok()?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort_by_key(|n| (n != "default", n.clone()));
        names.into_iter().find_map(|n| self.image(&n).ok())
    }

    fn image(&self, name: &str) -> Result<(PathBuf, PathBuf), DriverError> {
        if name.is_empty() || name.contains('/') || name.starts_with('.') {
            return Err(DriverError::Invalid(format!("invalid image name {name:?}")));
        }
        let dir = self.config.images_dir.join(name);
        let (kernel, initrd) = (dir.join("vmlinuz"), dir.join("initrd"));
        if kernel.exists() && initrd.exists() {
            Ok((kernel, initrd))
        } else {
            Err(DriverError::Invalid(format!(
                "image {name:?} not found in {} (build it with herd-image)",
                self.config.images_dir.display()
            )))
        }
    }

    /// Starts a QEMU for the VM (booting, or restoring from `incoming`) and its channel
    /// task. The VM's record must already say what this launch is.
    async fn launch(self: &Arc<Self>, id: VmId, incoming: bool) -> Result<(), DriverError> {
        let (accel, _) = self.accel().await;
        let (paths, spec, token, image_accel, born_unix_ms) = self.with_vm(id, |vm| {
            Ok((
                vm.paths.clone(),
                vm.spec.clone(),
                vm.record.token.clone(),
                vm.record.accel,
                vm.record.born_unix_ms,
            ))
        })?;
        // A restored guest must run on the accelerator it was saved under.
        let accel = if incoming { image_accel } else { accel };
        let (kernel, initrd) = self.image(&spec.image)?;
        let suspend_image = paths.suspend_image();
        let launch = LaunchSpec {
            id,
            spec: &spec,
            token: &token,
            kernel: &kernel,
            initrd: &initrd,
            accel,
            tsc_khz: self.tsc_khz,
            incoming: incoming.then_some(suspend_image.as_path()),
            foreground: false,
            born_unix_ms,
            now_unix_ms: herd_proto::clock::unix_ms(),
        };
        let args = launch::qemu_args(&paths, &launch).map_err(|e| DriverError::Operation {
            vm: id,
            doing: "building the QEMU command line".into(),
            source: Box::new(e),
        })?;
        for stale in [paths.pid_file(), paths.qmp(), paths.guest()] {
            let _ = std::fs::remove_file(stale);
        }
        // The parent QEMU exits once the daemon is set up; its exit status says whether
        // the VM started, and waiting for it means it never lingers as our zombie.
        let output = tokio::time::timeout(
            Duration::from_secs(30),
            tokio::process::Command::new(&self.config.qemu_binary)
                .args(&args)
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .kill_on_drop(true)
                .output(),
        )
        .await
        .map_err(|_| DriverError::Timeout {
            vm: id,
            doing: "starting QEMU",
            after: Duration::from_secs(30),
        })?
        .map_err(DriverError::io(format!(
            "starting {}",
            self.config.qemu_binary.display()
        )))?;
        if !output.status.success() {
            return Err(DriverError::Hypervisor {
                vm: id,
                reason: format!(
                    "qemu failed to start: {}",
                    String::from_utf8_lossy(&output.stderr).trim()
                ),
            });
        }
        let pid =
            procfs::read_pid_file(&paths.pid_file()).ok_or_else(|| DriverError::Hypervisor {
                vm: id,
                reason: format!("qemu wrote no pid to {}", paths.pid_file().display()),
            })?;
        info!(%id, pid, accel = accel.as_str(), incoming, "qemu started");
        let generation = self.with_vm(id, |vm| {
            vm.pid = Some(pid);
            vm.generation += 1;
            vm.record.accel = accel;
            vm.save()?;
            Ok(vm.generation)
        })?;
        self.spawn_channel(id, generation);
        Ok(())
    }

    fn spawn_channel(self: &Arc<Self>, id: VmId, generation: u64) {
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(channel::run(self.clone(), id, generation, rx));
        if let Some(vm) = self.vms.lock().get_mut(&id) {
            if let Some((old, _)) = vm.channel.replace((task.abort_handle(), tx)) {
                old.abort();
            }
            return;
        }
        task.abort();
    }

    async fn qmp(&self, id: VmId) -> Result<Qmp, DriverError> {
        let path = self.with_vm(id, |vm| Ok(vm.paths.qmp()))?;
        Qmp::connect(&path, self.config.qmp_timeout)
            .await
            .map_err(|e| DriverError::Operation {
                vm: id,
                doing: "connecting to QMP".into(),
                source: Box::new(e),
            })
    }

    async fn qmp_run(
        &self,
        id: VmId,
        command: &str,
        args: Option<serde_json::Value>,
    ) -> Result<serde_json::Value, DriverError> {
        let mut qmp = self.qmp(id).await?;
        qmp.execute(command, args)
            .await
            .map_err(|e| DriverError::Operation {
                vm: id,
                doing: format!("QMP command {command}"),
                source: Box::new(e),
            })
    }

    /// Waits until the VM's QEMU is gone; ends it with SIGKILL after `grace`.
    async fn wait_gone(&self, id: VmId, grace: Duration) -> Result<(), DriverError> {
        let (pid, dir) = self.with_vm(id, |vm| Ok((vm.pid, vm.paths.dir.clone())))?;
        let Some(pid) = pid else { return Ok(()) };
        let started = std::time::Instant::now();
        let mut killed = false;
        while procfs::is_our_qemu(pid, &dir) {
            if !killed && started.elapsed() >= grace {
                procfs::signal(pid, Signal::SIGKILL);
                killed = true;
            }
            if started.elapsed() >= grace + Duration::from_secs(10) {
                return Err(DriverError::Hypervisor {
                    vm: id,
                    reason: format!("qemu {pid} does not die"),
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // It may still be exiting (its cmdline goes first): wait until it is gone.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while procfs::is_running(pid) && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.with_vm(id, |vm| {
            vm.pid = None;
            if let Some((handle, _)) = vm.channel.take() {
                handle.abort();
            }
            Ok(())
        })
    }

    async fn do_suspend(self: Arc<Self>, id: VmId) -> Result<(), DriverError> {
        let was_paused = self.with_vm(id, |vm| {
            let state = vm.observe();
            if !matches!(state, VmState::Running | VmState::Paused | VmState::Booting) {
                return Err(DriverError::WrongState {
                    op: "suspend",
                    state,
                });
            }
            vm.busy = Some(VmState::Suspending);
            Ok(vm.record.paused)
        })?;
        let result = self.save_to_disk(id).await;
        match result {
            Ok(()) => {
                self.wait_gone(id, Duration::from_secs(5)).await?;
                self.with_vm(id, |vm| {
                    vm.busy = None;
                    Ok(())
                })
            }
            Err(e) => {
                if !was_paused {
                    let _ = self.qmp_run(id, "cont", None).await;
                }
                self.with_vm(id, |vm| {
                    vm.busy = None;
                    vm.record.paused = was_paused;
                    vm.save()
                })?;
                Err(e)
            }
        }
    }

    async fn save_to_disk(&self, id: VmId) -> Result<(), DriverError> {
        let image = self.with_vm(id, |vm| Ok(vm.paths.suspend_image()))?;
        let tmp = image.with_extension("img.tmp");
        let mut qmp = self.qmp(id).await?;
        let fail = |e: qmp::QmpError| DriverError::Operation {
            vm: id,
            doing: "suspending".into(),
            source: Box::new(e),
        };
        qmp.execute("stop", None).await.map_err(fail)?;
        // Recorded before the save, so a crash mid-save shows a paused VM, which it is.
        self.with_vm(id, |vm| {
            vm.record.paused = true;
            vm.save()
        })?;
        let uri = format!(
            "exec:cat > {}",
            launch::shell_quote(&tmp.display().to_string())
        );
        qmp.execute("migrate", Some(serde_json::json!({ "uri": uri })))
            .await
            .map_err(fail)?;
        let started = std::time::Instant::now();
        loop {
            let info = qmp.execute("query-migrate", None).await.map_err(fail)?;
            match info.get("status").and_then(|s| s.as_str()).unwrap_or("") {
                "completed" => break,
                "failed" | "cancelled" => {
                    return Err(DriverError::Hypervisor {
                        vm: id,
                        reason: format!(
                            "saving to disk failed: {}",
                            info.get("error-desc")
                                .and_then(|s| s.as_str())
                                .unwrap_or("unknown")
                        ),
                    });
                }
                _ if started.elapsed() > Duration::from_secs(120) => {
                    let _ = qmp.execute("migrate_cancel", None).await;
                    return Err(DriverError::Timeout {
                        vm: id,
                        doing: "saving to disk",
                        after: Duration::from_secs(120),
                    });
                }
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
        std::fs::rename(&tmp, &image).map_err(DriverError::io("installing the suspend image"))?;
        self.with_vm(id, |vm| {
            vm.record.phase = Phase::Suspended;
            vm.record.paused = false;
            vm.record.hello_seen = false;
            vm.save()
        })?;
        info!(%id, ms = started.elapsed().as_millis() as u64, "VM saved to disk");
        let _ = qmp.execute("quit", None).await;
        Ok(())
    }

    async fn do_restore(self: Arc<Self>, id: VmId) -> Result<(), DriverError> {
        self.with_vm(id, |vm| {
            vm.record.phase = Phase::Launched;
            vm.record.restored = true;
            vm.record.hello_seen = false;
            vm.record.paused = false;
            vm.busy = Some(VmState::Resuming);
            vm.save()
        })?;
        let result = async {
            self.launch(id, true).await?;
            let mut qmp = self.qmp(id).await?;
            let fail = |e: qmp::QmpError| DriverError::Operation {
                vm: id,
                doing: "restoring".into(),
                source: Box::new(e),
            };
            let started = std::time::Instant::now();
            loop {
                let status = qmp.status().await.map_err(fail)?;
                if status != "inmigrate" {
                    break;
                }
                if started.elapsed() > Duration::from_secs(120) {
                    return Err(DriverError::Timeout {
                        vm: id,
                        doing: "restoring",
                        after: Duration::from_secs(120),
                    });
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            qmp.execute("cont", None).await.map_err(fail)?;
            Ok(())
        }
        .await;
        match result {
            Ok(()) => {
                self.with_vm(id, |vm| {
                    vm.busy = None;
                    let _ = std::fs::remove_file(vm.paths.suspend_image());
                    Ok(())
                })?;
                Ok(())
            }
            Err(e) => {
                // Back to suspended: the image is intact, the operator can try again.
                if let Some(pid) = self.with_vm(id, |vm| Ok(vm.pid))? {
                    procfs::signal(pid, Signal::SIGKILL);
                }
                let _ = self.wait_gone(id, Duration::ZERO).await;
                self.with_vm(id, |vm| {
                    vm.busy = None;
                    vm.record.phase = Phase::Suspended;
                    vm.record.restored = false;
                    vm.save()
                })?;
                Err(e)
            }
        }
    }

    async fn do_stop(self: Arc<Self>, id: VmId) -> Result<(), DriverError> {
        let (paused, sender) = self.with_vm(id, |vm| {
            let state = vm.observe();
            if !matches!(
                state,
                VmState::Running | VmState::Paused | VmState::Booting | VmState::Resuming
            ) {
                return Err(DriverError::WrongState { op: "stop", state });
            }
            vm.busy = Some(VmState::Stopping);
            Ok((
                vm.record.paused,
                vm.channel.as_ref().map(|(_, tx)| tx.clone()),
            ))
        })?;
        if paused {
            let _ = self.qmp_run(id, "cont", None).await;
        }
        // herd-guest powers off on request; an ACPI power button alone does nothing in a
        // guest without acpid, so it is only the second try.
        if let Some(tx) = sender {
            let _ = tx.send(HostMsg::PowerOff);
        }
        let _ = self.qmp_run(id, "system_powerdown", None).await;
        let grace = self.config.stop_timeout;
        let (pid, dir) = self.with_vm(id, |vm| Ok((vm.pid, vm.paths.dir.clone())))?;
        let started = std::time::Instant::now();
        while pid.is_some_and(|p| procfs::is_our_qemu(p, &dir)) && started.elapsed() < grace {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if pid.is_some_and(|p| procfs::is_our_qemu(p, &dir)) {
            warn!(%id, "guest did not power off in {grace:?}; ending qemu");
            let _ = self.qmp_run(id, "quit", None).await;
        }
        let result = self.wait_gone(id, Duration::from_secs(3)).await;
        self.with_vm(id, |vm| {
            vm.busy = None;
            vm.record.phase = Phase::Stopped;
            vm.record.paused = false;
            vm.record.hello_seen = false;
            vm.save()
        })?;
        result
    }

    /// Runs an operation in its own task under the VM's operation lock, so it finishes
    /// even if the caller gives up on it.
    async fn run_op<F, Fut>(self: &Arc<Self>, id: VmId, op: F) -> Result<(), DriverError>
    where
        F: FnOnce(Arc<Inner>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<(), DriverError>> + Send + 'static,
    {
        let lock = self.op_lock(id)?;
        let inner = self.clone();
        tokio::spawn(async move {
            let _guard = lock.lock_owned().await;
            op(inner).await
        })
        .await
        .map_err(|e| DriverError::Operation {
            vm: id,
            doing: "an operation".into(),
            source: Box::new(e),
        })?
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
            op_locks: Mutex::new(HashMap::new()),
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

fn new_token() -> String {
    use rand::Rng;
    let bytes: [u8; 16] = rand::thread_rng().gen();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[async_trait]
impl Driver for QemuDriver {
    async fn console(&self, id: VmId, max_bytes: usize) -> Result<Vec<u8>, DriverError> {
        let path = self.vm_dir(id).join("console.log");
        if !self.vm_dir(id).is_dir() {
            return Err(DriverError::NoSuchVm(id));
        }
        match read_tail(&path, max_bytes as u64) {
            Ok(bytes) => Ok(bytes),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(DriverError::io("reading the console log")(e)),
        }
    }

    fn kind(&self) -> &'static str {
        KIND
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            suspend_to_disk: true,
            ..Capabilities::default()
        }
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
        let images: Vec<String> = std::fs::read_dir(&self.inner.config.images_dir)
            .map(|rd| {
                rd.flatten()
                    .filter(|e| e.path().join("initrd").exists())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        if images.is_empty() {
            return Err(DriverError::Unavailable {
                kind: "qemu",
                reason: format!(
                    "no guest image in {} (build one with herd-image)",
                    self.inner.config.images_dir.display()
                ),
            });
        }
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
                    // No block devices: images are initramfs-only.
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
                let paths = VmPaths::new(&inner.state_dir, id);
                std::fs::create_dir_all(&paths.dir)
                    .map_err(DriverError::io("creating the VM dir"))?;
                let spec_json = serde_json::to_vec_pretty(&spec)
                    .map_err(DriverError::encode("the VM's spec"))?;
                persist::write_atomic(&paths.spec(), &spec_json)
                    .map_err(DriverError::io("saving spec.json"))?;
                let vm = Vm {
                    paths: paths.clone(),
                    spec,
                    record: VmRecord {
                        token: new_token(),
                        phase: Phase::Launched,
                        accel,
                        paused: false,
                        hello_seen: false,
                        restored: false,
                        exit_code: None,
                        born_unix_ms: Some(herd_proto::clock::unix_ms()),
                        policy_reported: false,
                    },
                    pid: None,
                    busy: Some(VmState::Booting),
                    guest_net: (0, 0),
                    generation: 0,
                    channel: None,
                    unreported: None,
                };
                vm.save()?;
                inner.vms.lock().insert(id, vm);
                let result = inner.launch(id, false).await;
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
                let result = inner.launch(id, false).await;
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
        self.inner.op_locks.lock().remove(&id);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use herd_proto::policy::{Enforcement, Lifespan, PolicyAction, PolicySpec};

    #[test]
    fn only_the_end_of_a_guest_flooded_console_is_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("console.log");
        let mut text = "x".repeat(1 << 20);
        text.push_str("\nherd-guest: policy action Terminate (lifespan): forged\n");
        std::fs::write(&path, text).expect("write");
        assert_eq!(read_tail(&path, 10).expect("tail"), b"): forged\n");
        assert!(console_text(&path).len() <= 64 * 1024);
        assert!(policy_powered_off(&path));

        // The console is the guest's to write: a Terminate its policy does not name is
        // not believed; the one it names is.
        let claimed = policy_action_from_console(&path).expect("parsed");
        let stop_policy = PolicySpec {
            lifespan: Some(Lifespan {
                max_seconds: Some(1),
                end_at: None,
                enforce: Enforcement {
                    action: PolicyAction::Stop,
                    warn: None,
                },
            }),
            ..PolicySpec::default()
        };
        assert!(!channel::policy_allows(&stop_policy, &claimed));
        assert!(!channel::policy_allows(&PolicySpec::default(), &claimed));
        let mut terminate_policy = stop_policy;
        if let Some(lifespan) = terminate_policy.lifespan.as_mut() {
            lifespan.enforce.action = PolicyAction::Terminate;
        }
        assert!(channel::policy_allows(&terminate_policy, &claimed));
    }
}
