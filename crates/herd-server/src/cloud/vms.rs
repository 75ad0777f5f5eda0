//! The user's side of a VM: launch, read, list, act on and delete, each changing
//! only desired state; the reconciler carries it to the host.

use super::placement::Placement;
use super::{invalid, reported_by_host, valid_name, Cloud, CloudError, LaunchSpec};
use crate::store::{
    now_ms, EventRecord, EventScope, NewEvent, Observation, VmBrief, VmFilter, VmRecord,
};
use herd_proto::lifecycle::Action;
use herd_proto::wire::{HostId, VmId};
use herd_proto::VmState;
use uuid::Uuid;

impl Cloud {
    pub fn launch(&self, spec: LaunchSpec) -> Result<VmRecord, CloudError> {
        let mut launched = self.launch_batch(spec, None)?;
        launched
            .pop()
            .ok_or_else(|| invalid("count", "nothing launched"))
    }

    /// Most VMs one batch launch may create.
    pub const MAX_BATCH: u32 = 1000;

    /// Launches one VM, or with `count` that many alike, named `{name}-1` to
    /// `{name}-{count}`: validated, quota-checked, placed one by one (each an honest
    /// filter and weigh with its capacity counted) and inserted in one transaction, all
    /// or none.
    pub fn launch_batch(
        &self,
        spec: LaunchSpec,
        count: Option<u32>,
    ) -> Result<Vec<VmRecord>, CloudError> {
        let names: Vec<String> = match count {
            None => vec![spec.name.clone()],
            Some(n) if (1..=Self::MAX_BATCH).contains(&n) => {
                let names: Vec<String> = (1..=n).map(|i| format!("{}-{i}", spec.name)).collect();
                if names.iter().any(|name| !valid_name(name)) {
                    return Err(invalid(
                        "name",
                        format!(
                            "{:?} with a suffix up to -{n} must be at most 63 characters of \
                             a-z, 0-9 and '-'",
                            spec.name
                        ),
                    ));
                }
                names
            }
            Some(_) => {
                return Err(invalid(
                    "count",
                    format!("must be between 1 and {}", Self::MAX_BATCH),
                ))
            }
        };
        let (project, spec) = self.validate_launch(spec)?;
        let now = now_ms();
        let n = names.len() as u64;
        // Hold the placement lock across the quota check and the insert, so that the
        // capacity and quota counted here and the durable rows appear together.
        let mut placement = self.placement.lock();
        self.check_quota(&project, n, spec.vcpus, spec.memory_mib)?;
        let activation_pending = spec.policy.activation.is_some();
        let mut rows = Vec::with_capacity(names.len());
        for name in names {
            let id = Uuid::now_v7();
            let choice = if activation_pending {
                // Placed by the reconciler once its activation comes.
                Err("waiting for its activation".to_owned())
            } else {
                placement.choose(&spec).map_err(|e| e.to_string())
            };
            let (host, observed, message) = match choice {
                Ok(host) => (
                    Some(host),
                    VmState::Scheduled,
                    format!("launched; scheduled on host {host}"),
                ),
                Err(why) => (None, VmState::Pending, format!("launched; {why}")),
            };
            // Counted now, so the next VM of the batch sees this one's share.
            if let Some(host) = host {
                placement.add(id, host, spec.vcpus, spec.memory_mib);
            }
            let record = VmRecord {
                id,
                name,
                project: project.clone(),
                hypervisor: spec.hypervisor.clone(),
                vcpus: spec.vcpus,
                memory_mib: spec.memory_mib,
                image: spec.image.clone(),
                command: spec.command.clone(),
                policy: spec.policy,
                keep_running: spec.keep_running,
                disk_mib: spec.disk_mib,
                seed: None,
                host,
                desired: VmState::Running,
                generation: 1,
                issued_generation: 0,
                observed,
                observed_at_ms: now,
                last_error: None,
                deleting: false,
                created_at_ms: now,
                updated_at_ms: now,
            };
            let event = NewEvent {
                vm: Some(id),
                host,
                kind: "vm.launched",
                from: None,
                to: Some(observed),
                message,
            };
            rows.push((record, event));
        }
        if let Err(e) = self.store.insert_vms(&rows) {
            for (record, _) in &rows {
                placement.release(record.id);
            }
            return Err(e.into());
        }
        drop(placement);
        self.reconcile_now.notify_one();
        Ok(rows.into_iter().map(|(record, _)| record).collect())
    }

    /// A broadcast's copy of `source` on `host`, made from the snapshot held there:
    /// counted against the project's quota and the host's room like any launch, under
    /// the same lock, and named `name`.
    /// Whether `host` has room for a copy of `source`, or why not.
    pub(crate) fn copy_fits(&self, host: HostId, source: &VmRecord) -> Result<(), String> {
        Self::fits_in(&self.placement.lock(), host, source)
    }

    fn fits_in(placement: &Placement, host: HostId, source: &VmRecord) -> Result<(), String> {
        let demand = herd_sched::Demand {
            hypervisor: source.hypervisor.clone(),
            vcpus: source.vcpus,
            memory_mib: source.memory_mib,
        };
        match placement.sched.host(host).cloned() {
            Some(slot) => herd_sched::place(&[slot], &demand, placement.sched.policy())
                .map(|_| ())
                .map_err(|why| why.to_string()),
            None => Err("the host is unknown to placement".into()),
        }
    }

    pub(crate) fn launch_copy(
        &self,
        source: &VmRecord,
        host: HostId,
        name: String,
        seed: uuid::Uuid,
    ) -> Result<VmRecord, CloudError> {
        if !valid_name(&name) {
            return Err(invalid("name", format!("{name:?} is not a valid VM name")));
        }
        let mut placement = self.placement.lock();
        self.check_quota(&source.project, 1, source.vcpus, source.memory_mib)?;
        if let Err(why) = Self::fits_in(&placement, host, source) {
            return Err(CloudError::Conflict {
                code: "no_capacity",
                message: format!(
                    "no room for a copy of {} on host {host}: {why}",
                    source.name
                ),
            });
        }
        let now = now_ms();
        let id = Uuid::now_v7();
        placement.add(id, host, source.vcpus, source.memory_mib);
        let record = VmRecord {
            id,
            name,
            host: Some(host),
            seed: Some(seed),
            // A copy is a duplicate already: it is not duplicated again.
            policy: herd_proto::policy::PolicySpec {
                deadline: None,
                ..source.policy
            },
            desired: VmState::Running,
            generation: 1,
            issued_generation: 0,
            observed: VmState::Scheduled,
            observed_at_ms: now,
            last_error: None,
            deleting: false,
            created_at_ms: now,
            updated_at_ms: now,
            ..source.clone()
        };
        let event = NewEvent {
            vm: Some(id),
            host: Some(host),
            kind: "vm.launched",
            from: None,
            to: Some(VmState::Scheduled),
            message: format!(
                "launched as a copy of {} from broadcast {seed}",
                source.name
            ),
        };
        if let Err(e) = self.store.insert_vms(&[(record.clone(), event)]) {
            placement.release(id);
            return Err(e.into());
        }
        drop(placement);
        self.reconcile_now.notify_one();
        Ok(record)
    }

    pub fn vm(&self, id: &str) -> Result<VmRecord, CloudError> {
        let not_found = || CloudError::NotFound {
            kind: "VM",
            id: id.to_owned(),
        };
        let uuid: Uuid = id.parse().map_err(|_| not_found())?;
        let vm = self.store.vm(uuid)?.ok_or_else(not_found)?;
        Ok(self.current(vm))
    }

    /// A page of VMs. Each shows its newest observed state; a filter on the state
    /// matches what the store holds, which trails the newest reports by the
    /// write-behind's backlog (normally well under a second).
    pub fn list_vms(&self, filter: &VmFilter) -> Result<Vec<VmRecord>, CloudError> {
        let page = self.store.list_vms(filter)?;
        Ok(page.into_iter().map(|vm| self.current(vm)).collect())
    }

    /// Why the VM's host cannot suspend it, if the host's driver said so when it joined
    /// (a container host without working CRIU), for a request to suspend.
    fn cannot_suspend(&self, vm: &VmRecord, target: VmState) -> Option<String> {
        if target != VmState::Suspended {
            return None;
        }
        let host = self.store.host(vm.host?).ok().flatten()?;
        let info = host.hypervisors.iter().find(|h| h.kind == vm.hypervisor)?;
        info.suspend_unsupported().map(str::to_owned)
    }

    /// A VM on its way between hosts takes no other change until the move ends.
    pub(crate) fn refuse_while_migrating(&self, vm: &VmRecord) -> Result<(), CloudError> {
        match self.migrations.of_vm(vm.id) {
            Some(m) => Err(CloudError::Conflict {
                code: "vm_migrating",
                message: format!(
                    "VM {} is migrating to host {} ({}); try again when it ends",
                    vm.name,
                    m.target,
                    m.phase.as_str()
                ),
            }),
            None => Ok(()),
        }
    }

    pub fn act(&self, id: &str, action: Action) -> Result<VmRecord, CloudError> {
        let vm = self.vm(id)?;
        if vm.deleting {
            return Err(CloudError::Conflict {
                code: "vm_deleting",
                message: format!("VM {} is being deleted", vm.name),
            });
        }
        self.refuse_while_migrating(&vm)?;
        let target = action.target();
        if vm.desired == target {
            return Ok(vm);
        }
        if !action.allowed_in(vm.observed) {
            return Err(CloudError::Conflict {
                code: "invalid_transition",
                message: format!(
                    "cannot {action} VM {}: it is {} (see the lifecycle state flow)",
                    vm.name, vm.observed
                ),
            });
        }
        if let Some(why) = self.cannot_suspend(&vm, target) {
            return Err(CloudError::Conflict {
                code: "unsupported",
                message: format!(
                    "cannot suspend VM {}: its host's {} driver says {why}",
                    vm.name, vm.hypervisor
                ),
            });
        }
        self.store.set_desired(
            vm.id,
            target,
            false,
            &NewEvent {
                vm: Some(vm.id),
                host: vm.host,
                kind: "vm.action",
                message: format!("{action} requested: desired state {target}"),
                ..NewEvent::default()
            },
        )?;
        self.reconcile_now.notify_one();
        self.vm(id)
    }

    /// Deletes a VM: terminates it on its host, then drops the record. Returns `None`
    /// when the record is gone already (the VM was never on a host).
    pub fn delete(&self, id: &str) -> Result<Option<VmRecord>, CloudError> {
        let vm = self.vm(id)?;
        self.refuse_while_migrating(&vm)?;
        if vm.host.is_none() || vm.observed.is_final() {
            self.store.observe(&[Observation {
                vm: vm.id,
                state: VmState::Purged,
                purge: true,
                host: None,
                events: vec![NewEvent {
                    vm: Some(vm.id),
                    host: vm.host,
                    kind: "vm.purged",
                    from: Some(vm.observed),
                    to: Some(VmState::Purged),
                    message: "deleted".into(),
                }],
            }])?;
            self.placement.lock().release(vm.id);
            return Ok(None);
        }
        self.store.set_desired(
            vm.id,
            VmState::Terminated,
            true,
            &NewEvent {
                vm: Some(vm.id),
                host: vm.host,
                kind: "vm.action",
                message: "delete requested: terminate, then purge".into(),
                ..NewEvent::default()
            },
        )?;
        self.reconcile_now.notify_one();
        Ok(Some(self.vm(id)?))
    }

    /// What the ingest checks a reported VM against, with a reported state that is
    /// still on its way to the store laid over it.
    pub fn vm_brief(&self, vm: VmId) -> Result<Option<VmBrief>, CloudError> {
        let Some(mut brief) = self.store.vm_brief(vm)? else {
            return Ok(None);
        };
        if let Some(observed) = self.commits.observed(vm) {
            brief.observed = observed;
        }
        Ok(Some(brief))
    }

    /// Lays what is still on its way to the store over a record read from it, so the
    /// API shows what the server knows now: a newer reported state, or `unknown` for a
    /// VM whose host was just marked down (as the store will say once the mark is
    /// written).
    pub fn current(&self, mut vm: VmRecord) -> VmRecord {
        if let Some(observed) = self.commits.observed(vm.id) {
            vm.observed = observed;
        }
        let host_down = vm
            .host
            .is_some_and(|host| self.live.lock().get(&host).is_some_and(|live| live.down));
        if host_down && reported_by_host(vm.observed) {
            vm.observed = VmState::Unknown;
        }
        vm
    }

    /// A page of the event log in `scope`, after event id `after`.
    pub fn events(
        &self,
        scope: &EventScope,
        after: i64,
        limit: usize,
    ) -> Result<Vec<EventRecord>, CloudError> {
        Ok(self.store.events(scope, after, limit)?)
    }

    /// How many VMs are in each state, from memory.
    pub fn vm_state_counts(&self) -> Vec<(VmState, u64)> {
        self.store.vm_state_counts()
    }

    /// How many VMs of these projects are in each state.
    pub fn vm_state_counts_in(
        &self,
        projects: &[String],
    ) -> Result<Vec<(VmState, u64)>, CloudError> {
        Ok(self.store.vm_state_counts_in(projects)?)
    }

    /// A VM's newest `limit` events, oldest first.
    pub fn latest_events(&self, vm: VmId, limit: usize) -> Result<Vec<EventRecord>, CloudError> {
        Ok(self.store.latest_events(vm, limit)?)
    }
}
