//! Resizes: a VM gets new vCPUs and memory where it is if its host has
//! room, else on a host of its type that has, moving there first (a live migration
//! that holds the new size on the target), else it waits for room if asked to, or is
//! refused with the reason and nothing changes. `plan` decides where; this module
//! carries it out and follows it to the end.
//!
//! The new shape reaches the host as the VM's next command (its spec carries the
//! shape), so a resize is as durable as any command and its answer (`CommandDone`)
//! finishes it. A container's limits change at once; QEMU fixes a guest's shape at
//! boot, so a running qemu VM restarts, which the caller must accept beforehand.

pub mod book;
pub mod plan;

use crate::cloud::{invalid, Cloud, CloudError};
use crate::migration::HostRef;
use crate::store::{NewEvent, VmRecord};
use herd_proto::VmState;
use plan::{Resize, Route, Size, Status};
use std::sync::Arc;
use std::time::Duration;
use tracing::{info, warn};

/// The types whose VMs take a new shape while they run.
const LIVE: &[&str] = &["oci", "sim"];

/// How often waiting resizes are looked at again.
const DRIVE_EVERY: Duration = Duration::from_secs(2);

/// What a caller asks of a resize; absent sizes stay as they are.
#[derive(Debug, Clone, Default)]
pub struct ResizeSpec {
    pub vcpus: Option<u32>,
    pub memory_mib: Option<u64>,
    /// The caller accepts that the VM restarts (QEMU, running).
    pub restart: bool,
    /// With no room anywhere now, wait for it instead of refusing.
    pub wait_for_room: bool,
}

fn conflict(code: &'static str, message: String) -> CloudError {
    CloudError::Conflict { code, message }
}

fn size_of(vm: &VmRecord) -> Size {
    Size {
        vcpus: vm.vcpus,
        memory_mib: vm.memory_mib,
    }
}

impl Cloud {
    /// Resizes a VM, or says why not. Returns the resize as it starts; a move or a
    /// restart goes on in the background.
    pub fn resize(&self, id: &str, ask: ResizeSpec) -> Result<Resize, CloudError> {
        let _step = self.resizes.steps.lock();
        let vm = self.vm(id)?;
        let from = size_of(&vm);
        let to = Size {
            vcpus: ask.vcpus.unwrap_or(from.vcpus),
            memory_mib: ask.memory_mib.unwrap_or(from.memory_mib),
        };
        crate::cloud::validate::check_shape(to.vcpus, to.memory_mib)?;
        if to == from {
            return Err(invalid(
                "vcpus",
                format!("VM {} has {from} already: nothing to change", vm.name),
            ));
        }
        if vm.deleting {
            return Err(conflict(
                "vm_deleting",
                format!("VM {} is being deleted", vm.name),
            ));
        }
        if vm.host.is_none() {
            return Err(conflict(
                "not_placed",
                format!("VM {} is not on a host yet", vm.name),
            ));
        }
        self.refuse_while_migrating(&vm)?;
        if let Some(open) = self.store.resize(vm.id)?.filter(Resize::is_open) {
            return Err(conflict(
                "resize_in_progress",
                format!(
                    "VM {} is being resized to {} ({}); wait for it to end",
                    vm.name,
                    open.to,
                    open.status.as_str()
                ),
            ));
        }
        match vm.observed {
            VmState::Running | VmState::Paused | VmState::Stopped | VmState::Error => {}
            VmState::Suspended => {
                return Err(conflict(
                    "invalid_transition",
                    format!(
                        "cannot resize VM {}: it is suspended, and its saved memory holds \
                         the old shape; resume or stop it first",
                        vm.name
                    ),
                ))
            }
            state => {
                return Err(conflict(
                    "invalid_transition",
                    format!(
                        "cannot resize VM {}: it is {state}; try again when it settles",
                        vm.name
                    ),
                ))
            }
        }
        let restart = !LIVE.contains(&vm.hypervisor.as_str())
            && matches!(vm.observed, VmState::Running | VmState::Paused);
        if restart && !ask.restart {
            return Err(conflict(
                "restart_needed",
                format!(
                    "resizing VM {} restarts it: a {} guest's vCPUs and memory are fixed at \
                     boot. Ask again with --restart (\"restart\": true) to go ahead",
                    vm.name, vm.hypervisor
                ),
            ));
        }
        let grow_vcpus = u64::from(to.vcpus.saturating_sub(from.vcpus));
        let grow_memory = to.memory_mib.saturating_sub(from.memory_mib);
        if grow_vcpus > 0 || grow_memory > 0 {
            self.check_quota_adding(&vm.project, 0, grow_vcpus, grow_memory)?;
        }
        let now = crate::store::now_ms();
        let mut resize = Resize {
            id: uuid::Uuid::now_v7(),
            vm: vm.id,
            from,
            to,
            status: Status::Proposed,
            reason: "proposed".into(),
            restart,
            wait_for_room: ask.wait_for_room,
            migration: None,
            generation: None,
            created_at_ms: now,
            updated_at_ms: now,
        };
        self.advance(&vm, &mut resize, true)?;
        info!(vm = %vm.id, from = %from, to = %to, status = resize.status.as_str(), "resize");
        Ok(resize)
    }

    /// The VM's latest resize, if it had one.
    pub fn vm_resize(&self, vm: uuid::Uuid) -> Result<Option<Resize>, CloudError> {
        Ok(self.store.resize(vm)?)
    }

    /// Decides where the resize goes and takes the step. On the first ask, no room
    /// (without waiting) and no host big enough are errors and nothing is stored.
    fn advance(&self, vm: &VmRecord, r: &mut Resize, first: bool) -> Result<(), CloudError> {
        let Some(here) = vm.host else {
            return self.finish(r, Status::Failed, "the VM is not on a host".into());
        };
        let (current, wanted) = (size_of(vm), r.to);
        let policy = self.config.sched;
        let route = self.reshape_share(vm.id, |hosts| {
            let route = plan::route(&vm.hypervisor, here, current, wanted, hosts, &policy);
            let apply = (route == Route::InPlace).then_some((wanted.vcpus, wanted.memory_mib));
            (route, apply)
        });
        match route {
            Route::InPlace => {
                let sent = self.send_size(vm, r);
                if sent.is_err() {
                    // Give the share back: the shape did not change.
                    self.reshape_share(vm.id, |_| ((), Some((current.vcpus, current.memory_mib))));
                }
                sent
            }
            Route::Move(target) => {
                if !matches!(vm.hypervisor.as_str(), "qemu" | "oci")
                    || vm.observed != VmState::Running
                {
                    let why = format!(
                        "VM {} needs a host with room for {wanted}, and only a running qemu \
                         or oci VM moves (it is a {} VM, {})",
                        vm.name, vm.hypervisor, vm.observed
                    );
                    return if first {
                        Err(conflict("no_capacity", why))
                    } else {
                        self.finish(r, Status::Failed, why)
                    };
                }
                let m = self.start_migration(
                    &vm.id.to_string(),
                    Some(HostRef::Id(target)),
                    Some(wanted),
                )?;
                r.migration = Some(m.id);
                self.step(
                    r,
                    Status::Moving,
                    format!(
                        "its host has no room for {wanted}: moving to host {target} first \
                         (migration {})",
                        m.id
                    ),
                )
            }
            Route::NoRoomNow(why) if r.wait_for_room => {
                if r.status == Status::Deferred && r.reason == why {
                    return Ok(());
                }
                self.step(r, Status::Deferred, why)
            }
            Route::NoRoomNow(why) if first => Err(conflict("no_capacity", why)),
            Route::Infeasible(why) if first => Err(conflict("infeasible", why)),
            Route::NoRoomNow(why) | Route::Infeasible(why) => self.finish(r, Status::Failed, why),
        }
    }

    /// Writes the new shape to the VM's record (its host gets it as a command); the
    /// host's answer finishes the resize.
    fn send_size(&self, vm: &VmRecord, r: &mut Resize) -> Result<(), CloudError> {
        r.status = Status::InProgress;
        let keep_stopped = vm.observed == VmState::Stopped;
        r.reason = if r.restart {
            format!("sent to its host: the VM restarts with {}", r.to)
        } else if keep_stopped {
            format!(
                "sent to its host: {} from its next start; it stays stopped",
                r.to
            )
        } else {
            format!("sent to its host: {} at once", r.to)
        };
        r.updated_at_ms = crate::store::now_ms();
        let event = self.resize_event(r, format!("resize {} -> {}: {}", r.from, r.to, r.reason));
        let Some(generation) = self.store.apply_size(r, keep_stopped, &[event])? else {
            return Err(CloudError::NotFound {
                kind: "VM",
                id: vm.id.to_string(),
            });
        };
        self.resizes.applying.lock().insert(vm.id, generation);
        self.reconcile_now.notify_one();
        Ok(())
    }

    fn step(&self, r: &mut Resize, status: Status, reason: String) -> Result<(), CloudError> {
        r.status = status;
        r.reason = reason;
        r.updated_at_ms = crate::store::now_ms();
        let event = self.resize_event(r, format!("resize {} -> {}: {}", r.from, r.to, r.reason));
        self.store.save_resize(r, &[event])?;
        Ok(())
    }

    fn finish(&self, r: &mut Resize, status: Status, reason: String) -> Result<(), CloudError> {
        self.resizes.applying.lock().remove(&r.vm);
        self.step(r, status, reason)
    }

    fn resize_event(&self, r: &Resize, message: String) -> NewEvent {
        NewEvent {
            vm: Some(r.vm),
            kind: "vm.resize",
            message,
            ..NewEvent::default()
        }
    }

    /// A host answered the command that carried a new shape.
    pub fn resize_applied(&self, vm: uuid::Uuid, generation: u64, error: Option<&str>) {
        if !self.resizes.awaits(vm, generation) {
            return;
        }
        let _step = self.resizes.steps.lock();
        let result = (|| -> Result<(), CloudError> {
            let Some(mut r) = self.store.resize(vm)? else {
                return Ok(());
            };
            if r.status != Status::InProgress || r.generation != Some(generation) {
                return Ok(());
            }
            match error {
                None => {
                    let done = format!("applied: the VM has {}", r.to);
                    self.finish(&mut r, Status::Done, done)
                }
                Some(e) => self.finish(
                    &mut r,
                    Status::Failed,
                    format!("its host could not apply it: {e}"),
                ),
            }
        })();
        if let Err(e) = result {
            warn!(%vm, "resize step failed: {e}");
        }
    }

    /// Loads the resizes a stopped server left sent and unanswered.
    pub(crate) fn restore_resizes(&self) -> Result<(), CloudError> {
        let mut applying = self.resizes.applying.lock();
        for r in self.store.open_resizes()? {
            if let (Status::InProgress, Some(generation)) = (r.status, r.generation) {
                applying.insert(r.vm, generation);
            }
        }
        Ok(())
    }

    /// Carries waiting resizes on (room appeared, a move ended), until the process ends.
    pub async fn drive_resizes(self: Arc<Self>) {
        loop {
            tokio::time::sleep(DRIVE_EVERY).await;
            let cloud = self.clone();
            if let Err(e) = crate::blocking(move || cloud.drive_resizes_once()) {
                warn!("resize step failed: {e}");
            }
        }
    }

    fn drive_resizes_once(&self) -> Result<(), CloudError> {
        let _step = self.resizes.steps.lock();
        for mut r in self.store.open_resizes()? {
            let Some(vm) = self.store.vm(r.vm)? else {
                self.finish(&mut r, Status::Failed, "the VM is gone".into())?;
                continue;
            };
            match r.status {
                Status::Proposed | Status::Deferred => self.advance(&vm, &mut r, false)?,
                Status::Moving => self.after_move(&vm, &mut r)?,
                Status::InProgress => {
                    // The answer may have come before this server knew to wait for it.
                    let sent = r.generation.unwrap_or(u64::MAX);
                    if vm.issued_generation >= sent && vm.last_error.is_some() {
                        let why = vm.last_error.clone().unwrap_or_default();
                        self.finish(
                            &mut r,
                            Status::Failed,
                            format!("its host could not apply it: {why}"),
                        )?;
                    }
                }
                Status::Done | Status::Failed => {}
            }
        }
        Ok(())
    }

    /// A resize that moved its VM: once the move is committed, the new shape is sent
    /// to the new host (its share there holds it already); a failed move fails it.
    fn after_move(&self, vm: &VmRecord, r: &mut Resize) -> Result<(), CloudError> {
        let Some(id) = r.migration else {
            return self.finish(r, Status::Failed, "its move was lost".into());
        };
        let m = self.vm_migrations(vm.id)?.into_iter().find(|m| m.id == id);
        match m.map(|m| (m.phase, m.reason)) {
            Some((
                crate::migration::plan::Phase::Committed | crate::migration::plan::Phase::Done,
                _,
            )) => self.send_size(vm, r),
            Some((crate::migration::plan::Phase::Failed, reason)) => self.finish(
                r,
                Status::Failed,
                format!(
                    "the move to a host with room failed: {}",
                    reason.unwrap_or_else(|| "no reason given".into())
                ),
            ),
            Some(_) => Ok(()),
            None => self.finish(r, Status::Failed, "its move was lost".into()),
        }
    }
}
