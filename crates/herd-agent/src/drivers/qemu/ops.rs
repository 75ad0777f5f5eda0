//! The slow operations on a VM's QEMU process: launching it (booting or restoring),
//! talking QMP, saving it to disk, stopping it and waiting for it to go. Each runs in
//! its own task (`run_op`), so a caller that gives up does not leave a VM half-saved.

use super::launch::{self, Incoming, LaunchSpec, VmPaths};
use super::qmp::{self, Qmp};
use super::vm::Phase;
use super::{procfs, Inner};
use crate::driver::DriverError;
use crate::drivers::channel;
use herd_proto::guest::HostMsg;
use herd_proto::wire::VmId;
use herd_proto::VmState;
use nix::sys::signal::Signal;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tracing::{info, warn};

/// What a new QEMU process starts from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum StartFrom {
    /// A fresh boot.
    Boot,
    /// The VM's suspend image.
    SuspendImage,
    /// A live migration's stream, from the VM's migration socket.
    Migration,
}

impl Inner {
    /// Starts a QEMU for the VM (booting, restoring its suspend image, or receiving a
    /// migration) and its channel task. The VM's record must already say what this
    /// launch is.
    pub(super) async fn launch(
        self: &Arc<Self>,
        id: VmId,
        from: StartFrom,
    ) -> Result<(), DriverError> {
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
        // A restored or received guest must run on the accelerator it was saved under.
        let accel = if from == StartFrom::Boot {
            accel
        } else {
            image_accel
        };
        let (kernel, initrd) = self.image(&spec.image)?;
        if spec.disk_mib > 0 {
            self.ensure_disk(id, &paths, spec.disk_mib, from).await?;
        }
        let suspend_image = paths.suspend_image();
        let migration_socket = paths.migration_socket();
        let launch = LaunchSpec {
            id,
            spec: &spec,
            token: &token,
            kernel: &kernel,
            initrd: &initrd,
            accel,
            tsc_khz: self.tsc_khz,
            incoming: match from {
                StartFrom::Boot => None,
                StartFrom::SuspendImage => Some(Incoming::Image(&suspend_image)),
                StartFrom::Migration => Some(Incoming::Socket(&migration_socket)),
            },
            foreground: false,
            born_unix_ms,
            now_unix_ms: herd_proto::clock::unix_ms(),
        };
        let args = launch::qemu_args(&paths, &launch).map_err(|e| DriverError::Operation {
            vm: id,
            doing: "building the QEMU command line".into(),
            source: Box::new(e),
        })?;
        for stale in [
            paths.pid_file(),
            paths.qmp(),
            paths.guest(),
            paths.migration_socket(),
        ] {
            let _ = std::fs::remove_file(stale);
        }
        // The parent QEMU exits once the daemon is set up; its exit status says whether
        // the VM started, and waiting for it means it never lingers as our zombie.
        run_tool(
            id,
            &self.config.qemu_binary,
            &args,
            "starting QEMU",
            "qemu failed to start",
        )
        .await?;
        let pid =
            procfs::read_pid_file(&paths.pid_file()).ok_or_else(|| DriverError::Hypervisor {
                vm: id,
                reason: format!("qemu wrote no pid to {}", paths.pid_file().display()),
            })?;
        info!(%id, pid, accel = accel.as_str(), ?from, "qemu started");
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

    /// Makes the VM's data disk the first time it is needed: at its first boot here,
    /// or on a migration's target, where the stream fills it. A disk that was made and
    /// is gone is an error: booting with an empty one would lose the data unseen.
    async fn ensure_disk(
        &self,
        id: VmId,
        paths: &VmPaths,
        disk_mib: u64,
        from: StartFrom,
    ) -> Result<(), DriverError> {
        let disk = paths.disk();
        let made = self.with_vm(id, |vm| Ok(vm.record.disk_made))?;
        if disk.exists() {
            return Ok(());
        }
        if made || from == StartFrom::SuspendImage {
            return Err(DriverError::Hypervisor {
                vm: id,
                reason: format!(
                    "the VM's disk {} is gone; it is not replaced by an empty one",
                    disk.display()
                ),
            });
        }
        let partial = paths.dir.join("disk.qcow2.partial");
        let args = [
            "create".to_owned(),
            "-q".to_owned(),
            "-f".to_owned(),
            "qcow2".to_owned(),
            partial.display().to_string(),
            format!("{disk_mib}M"),
        ];
        let made = run_tool(
            id,
            &self.config.qemu_img,
            &args,
            "making the VM's disk (is qemu-utils installed?)",
            "qemu-img could not make the disk",
        )
        .await;
        if let Err(e) = made {
            let _ = std::fs::remove_file(&partial);
            return Err(e);
        }
        std::fs::rename(&partial, &disk)
            .map_err(DriverError::io(format!("placing {}", disk.display())))?;
        info!(%id, disk_mib, "disk made");
        self.with_vm(id, |vm| {
            vm.record.disk_made = true;
            vm.save()
        })
    }

    pub(super) fn spawn_channel(self: &Arc<Self>, id: VmId, generation: u64) {
        let (tx, rx) = mpsc::unbounded_channel();
        let guest = channel::Guest {
            guests: self.clone(),
            id,
            generation,
        };
        let socket = VmPaths::new(&self.state_dir, id).guest();
        let task = tokio::spawn(channel::run(guest, channel::Dial(socket), id, rx));
        if let Some(vm) = self.vms.lock().get_mut(&id) {
            if let Some((old, _)) = vm.channel.replace((task.abort_handle(), tx)) {
                old.abort();
            }
            return;
        }
        task.abort();
    }

    pub(super) async fn qmp(&self, id: VmId) -> Result<Qmp, DriverError> {
        let path = self.with_vm(id, |vm| Ok(vm.paths.qmp()))?;
        Qmp::connect(&path, self.config.qmp_timeout)
            .await
            .map_err(|e| DriverError::Operation {
                vm: id,
                doing: "connecting to QMP".into(),
                source: Box::new(e),
            })
    }

    pub(super) async fn qmp_run(
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
    pub(super) async fn wait_gone(&self, id: VmId, grace: Duration) -> Result<(), DriverError> {
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

    pub(super) async fn do_suspend(self: Arc<Self>, id: VmId) -> Result<(), DriverError> {
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

    pub(super) async fn save_to_disk(&self, id: VmId) -> Result<(), DriverError> {
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

    pub(super) async fn do_restore(self: Arc<Self>, id: VmId) -> Result<(), DriverError> {
        self.with_vm(id, |vm| {
            vm.record.phase = Phase::Launched;
            vm.record.restored = true;
            vm.record.hello_seen = false;
            vm.record.paused = false;
            vm.busy = Some(VmState::Resuming);
            vm.save()
        })?;
        let result = async {
            self.launch(id, StartFrom::SuspendImage).await?;
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

    /// A new shape. QEMU fixes a guest's vCPUs and memory at launch, so a live VM is
    /// stopped (the server said so to the user before asking) and boots again with
    /// the new shape when the converge that asked starts it. A suspended VM's memory
    /// image holds the old shape: it is refused.
    pub(super) async fn do_reshape(
        self: Arc<Self>,
        id: VmId,
        vcpus: u32,
        memory_mib: u64,
    ) -> Result<(), DriverError> {
        match self.with_vm(id, |vm| Ok(vm.observe()))? {
            VmState::Suspended => {
                return Err(DriverError::Invalid(
                    "a suspended VM keeps the shape its memory image was saved with: \
                     resume or stop it first"
                        .into(),
                ))
            }
            VmState::Running | VmState::Paused | VmState::Booting | VmState::Resuming => {
                self.clone().do_stop(id).await?;
            }
            _ => {}
        }
        self.with_vm(id, |vm| {
            crate::drivers::reshape_spec(&mut vm.spec, &vm.paths.spec(), vcpus, memory_mib)
        })?;
        info!(%id, vcpus, memory_mib, "VM reshaped; it boots with the new shape");
        Ok(())
    }

    pub(super) async fn do_stop(self: Arc<Self>, id: VmId) -> Result<(), DriverError> {
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

    /// Runs an operation under the VM's operation lock (see `drivers::op_locks`).
    pub(super) async fn run_op<T, F, Fut>(
        self: &Arc<Self>,
        id: VmId,
        op: F,
    ) -> Result<T, DriverError>
    where
        T: Send + 'static,
        F: FnOnce(Arc<Inner>) -> Fut,
        Fut: std::future::Future<Output = Result<T, DriverError>> + Send + 'static,
    {
        self.op_locks.run(id, op(self.clone())).await
    }
}

/// Runs a short-lived tool to its end (30 s at most) and waits for it, so it never
/// lingers as our zombie; a failure carries what it printed on stderr.
async fn run_tool(
    id: VmId,
    program: &std::path::Path,
    args: &[String],
    doing: &'static str,
    failed: &str,
) -> Result<(), DriverError> {
    const LIMIT: Duration = Duration::from_secs(30);
    let output = tokio::time::timeout(
        LIMIT,
        tokio::process::Command::new(program)
            .args(args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .map_err(|_| DriverError::Timeout {
        vm: id,
        doing,
        after: LIMIT,
    })?
    .map_err(DriverError::io(format!(
        "{doing}: running {}",
        program.display()
    )))?;
    if !output.status.success() {
        return Err(DriverError::Hypervisor {
            vm: id,
            reason: format!(
                "{failed}: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            ),
        });
    }
    Ok(())
}
