//! Broadcasts: a VM's snapshot spread to many hosts down a proximity tree, and copies
//! started from it where asked.
//!
//! The coordinator here plans (the hosts that match, the tree from `herd-topology`
//! rooted at the VM's host), keeps each broadcast's record (`plan`, in memory and in
//! the store), repeats each phase's orders until they are answered and makes the
//! copies; the bytes go between the hosts. The tree is a chain by default: each host
//! then uploads the snapshot once, so the broadcast runs at one link's rate whatever
//! the number of hosts, the chunks pipelined down it; a wider fan-out makes the tree
//! shallower and each interior host's uplink carry as many copies as it has children.

pub mod book;
pub mod plan;
pub mod targets;

use crate::cloud::{invalid, Cloud, CloudError};
use crate::store::{NewEvent, VmRecord};
use herd_proto::broadcast::{BroadcastId, BroadcastUpdate, TreeHost};
use herd_proto::wire::{HostId, ServerMsg};
use herd_proto::VmState;
use herd_topology::{Member, Place};
use plan::{Broadcast, Effect};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tracing::warn;
use uuid::Uuid;

/// The types whose VMs can be broadcast: a qemu VM's snapshot is its memory and disk
/// (copies continue from that instant), a container's its writable layer (copies start
/// afresh with its files).
pub const BROADCASTABLE: &[&str] = &["qemu", "oci"];
/// How often active broadcasts are looked at.
const DRIVE_EVERY: Duration = Duration::from_millis(500);
/// The widest fan-out a broadcast takes.
pub const MAX_FANOUT: usize = 64;

/// What a user asks.
#[derive(Debug, Clone)]
pub struct BroadcastAsk {
    /// `None` is every other host of the VM's type; `Some((key, value))` those with
    /// that label.
    pub to: Option<(String, String)>,
    pub start: bool,
    pub fanout: usize,
    /// At most this many hosts, the nearest with room for a copy (a job's duplicates).
    pub limit: Option<usize>,
}

impl Cloud {
    /// Loads the broadcasts a previous run left active.
    pub(crate) fn restore_broadcasts(&self) -> Result<(), CloudError> {
        let mut active = self.broadcasts.active.lock();
        for b in self.store.active_broadcasts()? {
            active.insert(b.id, b);
        }
        Ok(())
    }

    /// Starts broadcasting `vm`'s snapshot to the hosts `ask` names.
    pub fn broadcast(&self, vm: &VmRecord, ask: &BroadcastAsk) -> Result<Broadcast, CloudError> {
        if !(1..=MAX_FANOUT).contains(&ask.fanout) {
            return Err(invalid(
                "fanout",
                format!("must be between 1 and {MAX_FANOUT}"),
            ));
        }
        let conflict = |code: &'static str, message: String| CloudError::Conflict { code, message };
        if !BROADCASTABLE.contains(&vm.hypervisor.as_str()) {
            return Err(conflict(
                "unsupported",
                format!(
                    "a {} VM cannot be broadcast yet; {} VMs can",
                    vm.hypervisor,
                    BROADCASTABLE.join(", ")
                ),
            ));
        }
        if !matches!(vm.observed, VmState::Running | VmState::Paused) {
            return Err(conflict(
                "invalid_state",
                format!(
                    "{} is {}; a broadcast takes a running or paused VM",
                    vm.name, vm.observed
                ),
            ));
        }
        self.refuse_while_migrating(vm)?;
        let Some(source) = vm.host else {
            return Err(conflict(
                "invalid_state",
                format!("{} is on no host", vm.name),
            ));
        };
        if self
            .broadcasts
            .active
            .lock()
            .values()
            .any(|b| b.vm == vm.id && b.phase <= plan::Phase::Spreading)
        {
            return Err(conflict(
                "broadcasting",
                format!("{} is being broadcast already", vm.name),
            ));
        }
        let hosts: Vec<_> = self.hosts()?.into_iter().map(|h| h.record).collect();
        let source_record = hosts.iter().find(|h| h.id == source).ok_or_else(|| {
            conflict(
                "invalid_state",
                format!("the host of {} is unknown", vm.name),
            )
        })?;
        let source_addr = self.topology.transfer_addr(source).ok_or_else(|| {
            conflict(
                "host_unreachable",
                format!("host {} takes no transfers", source_record.hostname),
            )
        })?;
        let mut targets =
            targets::receivers(&hosts, source, &vm.hypervisor, ask.to.as_ref(), |h| {
                self.topology.transfer_addr(h)
            })
            .map_err(|why| conflict("no_hosts", why))?;
        let mut members = vec![Member {
            id: source,
            place: Place::of(&source_record.labels),
        }];
        members.extend(targets.iter().map(|(h, _)| Member {
            id: h.id,
            place: Place::of(&h.labels),
        }));
        let rtts = self.topology.rtts();
        if let Some(limit) = ask.limit {
            // The nearest hosts with room: the first of a chain from the source.
            members.retain(|m| m.id == source || self.copy_fits(m.id, vm).is_ok());
            if members.len() == 1 {
                return Err(CloudError::Conflict {
                    code: "no_capacity",
                    message: format!(
                        "no other host that runs {} VMs has room for a copy of {}",
                        vm.hypervisor, vm.name
                    ),
                });
            }
            let chain = herd_topology::build(&members, &rtts, source, 1)
                .map_err(|e| invalid("fanout", e.to_string()))?;
            let nearest: Vec<HostId> = chain.order.into_iter().take(limit + 1).collect();
            members.retain(|m| nearest.contains(&m.id));
            targets.retain(|(h, _)| nearest.contains(&h.id));
        }
        if ask.start {
            self.check_quota(&vm.project, targets.len() as u64, vm.vcpus, vm.memory_mib)?;
        }
        let tree = herd_topology::build(&members, &rtts, source, ask.fanout)
            .map_err(|e| invalid("fanout", e.to_string()))?;
        let addr_of: HashMap<HostId, String> = targets
            .iter()
            .map(|(h, addr)| (h.id, addr.to_string()))
            .chain([(source, source_addr.to_string())])
            .collect();
        let tree_hosts: Vec<TreeHost> = tree
            .order
            .iter()
            .map(|h| TreeHost {
                host: *h,
                addr: addr_of.get(h).cloned().unwrap_or_default(),
                parent: tree.parent.get(h).copied(),
            })
            .collect();
        let now = crate::store::now_ms();
        let b = Broadcast::new(
            Uuid::now_v7(),
            vm.id,
            vm.project.clone(),
            source,
            tree_hosts,
            ask.start,
            now,
        );
        let _step = self.broadcasts.steps.lock();
        self.store.save_broadcast(&b)?;
        self.note(
            vm.id,
            Some(source),
            format!(
                "broadcast {} started to {} hosts{}",
                b.id,
                b.hosts.len(),
                if ask.start {
                    ", each to start a copy"
                } else {
                    ""
                }
            ),
        );
        self.broadcasts.active.lock().insert(b.id, b.clone());
        Ok(b)
    }

    fn note(&self, vm: Uuid, host: Option<HostId>, message: String) {
        let event = NewEvent {
            vm: Some(vm),
            host,
            kind: "vm.broadcast",
            message,
            ..NewEvent::default()
        };
        if let Err(e) = self.store.append_event(&event) {
            warn!(%vm, "recording a broadcast event: {e}");
        }
    }

    pub fn broadcasts_of(&self, vm: Uuid) -> Result<Vec<Broadcast>, CloudError> {
        let mut out = self.store.broadcasts_of(vm, 20)?;
        let active = self.broadcasts.active.lock();
        for b in out.iter_mut() {
            if let Some(live) = active.get(&b.id) {
                *b = live.clone();
            }
        }
        Ok(out)
    }

    /// One broadcast as it stands: the live record while it is active.
    pub(crate) fn broadcast_by_id(&self, id: BroadcastId) -> Result<Option<Broadcast>, CloudError> {
        if let Some(live) = self.broadcasts.active.lock().get(&id) {
            return Ok(Some(live.clone()));
        }
        Ok(self.store.broadcast_record(id)?)
    }

    /// A host's answer about a broadcast; only hosts in its tree are heard.
    pub fn broadcast_update(&self, host: HostId, id: BroadcastId, update: BroadcastUpdate) {
        let _step = self.broadcasts.steps.lock();
        let Some(mut b) = self.broadcasts.active.lock().get(&id).cloned() else {
            return;
        };
        if !b.tree.iter().any(|h| h.host == host) {
            warn!(%host, broadcast = %id, "an answer about a broadcast from a host outside its tree; dropped");
            return;
        }
        let effects = b.on_update(host, update, crate::store::now_ms());
        self.carry_out_broadcast(b, effects);
    }

    fn carry_out_broadcast(&self, mut b: Broadcast, effects: Vec<Effect>) {
        for effect in effects {
            match effect {
                Effect::Send(host, order) => {
                    self.send_to_agent(host, ServerMsg::Broadcast(Box::new(order)));
                }
                Effect::Event(message) => self.note(b.vm, None, message),
                Effect::MakeCopy(host) => {
                    let made = self.make_copy(&b, host);
                    if let Some(part) = b.hosts.get_mut(&host) {
                        match made {
                            Ok(copy) => part.copy = Some(copy),
                            Err(e) => {
                                part.reason = Some(format!("no copy started: {e}"));
                                self.note(
                                    b.vm,
                                    Some(host),
                                    format!("broadcast: no copy on host {host}: {e}"),
                                );
                                // Nothing to wait for: the snapshot can go in time.
                                part.copy = Some(Uuid::nil());
                            }
                        }
                    }
                }
            }
        }
        if let Err(e) = self.store.save_broadcast(&b) {
            warn!(broadcast = %b.id, "saving a broadcast: {e}");
        }
        let mut active = self.broadcasts.active.lock();
        if b.is_active() {
            active.insert(b.id, b);
        } else {
            active.remove(&b.id);
        }
    }

    fn make_copy(&self, b: &Broadcast, host: HostId) -> Result<Uuid, CloudError> {
        let source = self.store.vm(b.vm)?.ok_or_else(|| CloudError::NotFound {
            kind: "vm",
            id: b.vm.to_string(),
        })?;
        let hostname = self.host(&host.to_string())?.record.hostname;
        let mut name = format!("{}-{}", source.name, hostname.to_lowercase());
        name.retain(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        name.truncate(63);
        let copy = self.launch_copy(&source, host, name, b.id)?;
        Ok(copy.id)
    }

    /// Steps every active broadcast on the clock, until the process ends.
    pub async fn drive_broadcasts(self: Arc<Self>) {
        loop {
            tokio::time::sleep(DRIVE_EVERY).await;
            let ids: Vec<BroadcastId> = self.broadcasts.active.lock().keys().copied().collect();
            for id in ids {
                let cloud = self.clone();
                crate::blocking(move || {
                    let _step = cloud.broadcasts.steps.lock();
                    let Some(mut b) = cloud.broadcasts.active.lock().get(&id).cloned() else {
                        return;
                    };
                    let before = b.clone();
                    let down = |h: HostId| cloud.host_down_now(h);
                    let effects = b.tick(crate::store::now_ms(), &down);
                    if effects.is_empty() && b == before {
                        return;
                    }
                    cloud.carry_out_broadcast(b, effects);
                });
            }
        }
    }
}
