//! Live migration, coordinated: the server picks and holds a target, tells the two
//! agents their parts, and moves the VM's record once the target runs it. The decisions
//! are [`plan`]'s; this module carries them out (orders to agents, the store, capacity)
//! and drives every active migration on a timer, so lost messages, reconnecting agents
//! and a restarted server all end in the same place: the phase's order is repeated
//! until it is answered.
//!
//! **Architecture Invariant:** a VM's record names one host at every moment, and moves
//! only in [`crate::store::Store::commit_migration`], after the target said it runs the
//! VM. Reports of the VM from any other host are dropped (the ingest checks the
//! placement, and a write that reaches the disk after the commit is fenced by the host
//! it came from), so a late report from the old host never overwrites the new one's.

pub mod book;
pub mod plan;

pub use book::Migrations;

use crate::cloud::{Cloud, CloudError};
use crate::resize::plan::Size;
use crate::store::NewEvent;
use herd_proto::migration::{MigrationId, MigrationUpdate};
use herd_proto::wire::{HostId, ServerMsg, VmId};
use herd_proto::VmState;
use plan::{Effect, Migration, Phase};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// How often the orders of active migrations are repeated and their timeouts checked.
const DRIVE_EVERY: Duration = Duration::from_secs(2);

/// How long a phase that waits for an agent may go without any answer before the
/// attempt is given up (progress counts as an answer while transferring).
const PHASE_TIMEOUT_MS: i64 = 60_000;

/// The hypervisor types whose VMs move, and how: qemu live (pre-copy), containers
/// cold (stopped, their writable layer sent, started on the target) until CRIU works.
const MIGRATABLE: &[(&str, &str)] = &[("qemu", "live"), ("oci", "cold")];

/// A migration's target as the caller names it.
#[derive(Debug, Clone, Copy)]
pub(crate) enum HostRef<'a> {
    Id(HostId),
    /// A host id or hostname, as a user typed it.
    Named(&'a str),
}

fn conflict(code: &'static str, message: String) -> CloudError {
    CloudError::Conflict { code, message }
}

impl Cloud {
    /// Starts moving a running VM to `to` (a host id or hostname), or to the best host
    /// of its type with room. Returns the migration as it starts; it goes on in the
    /// background.
    pub fn migrate(&self, id: &str, to: Option<&str>) -> Result<Migration, CloudError> {
        self.start_migration(id, to.map(HostRef::Named), None)
    }

    /// [`Cloud::migrate`], holding `hold` on the target instead of the VM's own shape
    /// (a resize that moves the VM).
    pub(crate) fn start_migration(
        &self,
        id: &str,
        to: Option<HostRef<'_>>,
        hold: Option<Size>,
    ) -> Result<Migration, CloudError> {
        // One step like any other: two requests for one VM cannot both start.
        let _step = self.migrations.steps.lock();
        let vm = self.vm(id)?;
        let Some(source) = vm.host else {
            return Err(conflict(
                "not_placed",
                format!("VM {} is not on a host yet", vm.name),
            ));
        };
        if vm.deleting {
            return Err(conflict(
                "vm_deleting",
                format!("VM {} is being deleted", vm.name),
            ));
        }
        if let Some(m) = self.migrations.of_vm(vm.id) {
            return Err(conflict(
                "vm_migrating",
                format!(
                    "VM {} is already migrating to host {} ({}, migration {})",
                    vm.name,
                    m.target,
                    m.phase.as_str(),
                    m.id
                ),
            ));
        }
        if !MIGRATABLE.iter().any(|(kind, _)| *kind == vm.hypervisor) {
            let kinds: Vec<&str> = MIGRATABLE.iter().map(|(kind, _)| *kind).collect();
            return Err(conflict(
                "unsupported",
                format!(
                    "migration of {} VMs is not supported (only {})",
                    vm.hypervisor,
                    kinds.join(", ")
                ),
            ));
        }
        if self.config.insecure_http {
            return Err(conflict(
                "unsupported",
                "live migration needs agents joined over HTTPS: their certificates \
                 authenticate the transfer between hosts"
                    .into(),
            ));
        }
        if vm.observed != VmState::Running {
            return Err(conflict(
                "invalid_transition",
                format!(
                    "cannot migrate VM {}: it is {}; only a running VM moves live",
                    vm.name, vm.observed
                ),
            ));
        }
        let to = match to {
            None => None,
            Some(HostRef::Id(id)) => Some(id),
            Some(HostRef::Named(to)) => Some(self.resolve_host(to)?),
        };
        if let Some(to) = to {
            if to == source {
                return Err(crate::cloud::invalid(
                    "to",
                    format!("VM {} is already on host {to}", vm.name),
                ));
            }
            let host = self.store.host(to)?.ok_or_else(|| CloudError::NotFound {
                kind: "host",
                id: to.to_string(),
            })?;
            if !host.hypervisors.iter().any(|h| h.kind == vm.hypervisor) {
                let offers: Vec<&str> = host.hypervisors.iter().map(|h| h.kind.as_str()).collect();
                return Err(crate::cloud::invalid(
                    "to",
                    format!(
                        "host {} ({}) has no {} driver (it offers {}): a VM moves only to a \
                         host of its own hypervisor type",
                        host.hostname,
                        to,
                        vm.hypervisor,
                        if offers.is_empty() {
                            "none".into()
                        } else {
                            offers.join(", ")
                        }
                    ),
                ));
            }
        }
        let spec = self.spec_of(&vm);
        let mut held = spec.clone();
        if let Some(size) = hold {
            held.vcpus = size.vcpus;
            held.memory_mib = size.memory_mib;
        }
        let target = self
            .reserve_target(&held, to, &[source])
            .map_err(|no_fit| {
                conflict(
                    "no_capacity",
                    match to {
                        Some(to) => format!("host {to} cannot take VM {}: {no_fit}", vm.name),
                        None => format!(
                            "no other host can take VM {} ({} vCPUs, {} MiB): {no_fit}",
                            vm.name, held.vcpus, held.memory_mib
                        ),
                    },
                )
            })?;
        let now = crate::store::now_ms();
        let mut migration = Migration::new(
            uuid::Uuid::now_v7(),
            vm.id,
            spec.clone(),
            source,
            target,
            to.is_some(),
            now,
        );
        migration.hold = hold;
        let event = self.migration_event(
            &migration,
            format!(
                "migration {} to host {target} requested{}",
                migration.id,
                if to.is_some() {
                    ""
                } else {
                    " (chosen by the scheduler)"
                }
            ),
        );
        if let Err(e) = self.store.save_migration(&migration, &[event]) {
            self.release_target(target, &held);
            return Err(e.into());
        }
        info!(vm = %vm.id, %source, %target, migration = %migration.id, "migration started");
        let order = migration.order();
        self.migrations
            .active
            .lock()
            .insert(migration.id, migration.clone());
        if let Some((host, order)) = order {
            self.send_to_agent(host, ServerMsg::Migration(Box::new(order)));
        }
        migration.updated_at_ms = now;
        Ok(migration)
    }

    /// A VM's migrations, newest first (the last 20): one in progress is first, as it
    /// stands now.
    pub fn vm_migrations(&self, vm: VmId) -> Result<Vec<Migration>, CloudError> {
        let mut items = self.store.migrations_of(vm, 20)?;
        for item in &mut items {
            if let Some(live) = self.migrations.active.lock().get(&item.id) {
                *item = live.clone();
            }
        }
        Ok(items)
    }

    fn resolve_host(&self, to: &str) -> Result<HostId, CloudError> {
        if let Ok(id) = to.parse::<HostId>() {
            return Ok(id);
        }
        let hosts = self.store.hosts()?;
        let mut named = hosts.iter().filter(|h| h.hostname == to);
        match (named.next(), named.next()) {
            (Some(host), None) => Ok(host.id),
            (Some(_), Some(_)) => Err(crate::cloud::invalid(
                "to",
                format!("several hosts are named {to:?}: name the host by its id"),
            )),
            (None, _) => Err(CloudError::NotFound {
                kind: "host",
                id: to.to_owned(),
            }),
        }
    }

    fn migration_event(&self, m: &Migration, message: String) -> NewEvent {
        NewEvent {
            vm: Some(m.vm),
            host: Some(m.source),
            kind: "vm.migration",
            from: None,
            to: None,
            message,
        }
    }

    /// An agent's answer about a migration. Answers about unknown migrations, or from
    /// hosts without a part in one, change nothing.
    pub fn migration_update(
        &self,
        host: HostId,
        migration: MigrationId,
        attempt: u32,
        vm: VmId,
        update: MigrationUpdate,
    ) -> Result<(), CloudError> {
        let _step = self.migrations.steps.lock();
        let Some(mut m) = self.migrations.active.lock().get(&migration).cloned() else {
            return Ok(());
        };
        if m.vm != vm {
            warn!(%host, %migration, "migration update names another VM; dropped");
            return Ok(());
        }
        let now = crate::store::now_ms();
        let mut effects = match &update {
            MigrationUpdate::Expecting { port } if host == m.target && attempt == m.attempt => {
                match self.topology.ip(host) {
                    Some(ip) => {
                        m.expecting_at(std::net::SocketAddr::new(ip, *port).to_string(), now)
                    }
                    None => Vec::new(),
                }
            }
            _ => Vec::new(),
        };
        effects.extend(m.on_update(host, attempt, update, now));
        self.carry_out(m, effects)
    }

    /// Gives up the current phase of a migration that waited too long; `false` if the
    /// phase waits as long as it takes (or the migration moved on meanwhile).
    fn time_out(&self, id: MigrationId, waited_ms: i64) -> Result<bool, CloudError> {
        let _step = self.migrations.steps.lock();
        let Some(mut m) = self.migrations.active.lock().get(&id).cloned() else {
            return Ok(false);
        };
        let effects = m.timed_out(waited_ms, crate::store::now_ms());
        if effects.is_empty() {
            return Ok(false);
        }
        self.carry_out(m, effects)?;
        Ok(true)
    }

    /// Carries out a step's effects and saves the migration's new record; the caller
    /// holds the step lock.
    fn carry_out(&self, mut m: Migration, effects: Vec<Effect>) -> Result<(), CloudError> {
        let mut queue: std::collections::VecDeque<Effect> = effects.into();
        let mut events = Vec::new();
        let mut orders = Vec::new();
        let mut commit = false;
        while let Some(effect) = queue.pop_front() {
            match effect {
                Effect::Order(host, order) => orders.push((host, order)),
                Effect::Event(message) => events.push(self.migration_event(&m, message)),
                Effect::ReleaseTarget(host) => self.release_target(host, &m.held_spec()),
                Effect::Commit => commit = true,
                Effect::Retry => {
                    let now = crate::store::now_ms();
                    let more = if !m.may_retry() {
                        let why = if m.pinned {
                            "the target was named, so no other host is tried".to_owned()
                        } else {
                            format!("{} attempts failed", m.attempt)
                        };
                        m.fail(&why, now)
                    } else {
                        let mut exclude = m.tried.clone();
                        exclude.push(m.source);
                        match self.reserve_target(&m.held_spec(), None, &exclude) {
                            Ok(target) => m.retry(target, now),
                            Err(no_fit) if no_fit.n_hosts == 0 => m.fail(
                                &format!("no {} host is left to try", m.spec.hypervisor),
                                now,
                            ),
                            Err(no_fit) => {
                                m.fail(&format!("no other host can take it: {no_fit}"), now)
                            }
                        }
                    };
                    queue.extend(more);
                }
            }
        }
        if commit {
            if self.store.commit_migration(&m, &events)? {
                let held = m.held_spec();
                self.move_share(m.vm, m.target, held.vcpus, held.memory_mib);
                self.forget_host_facts(m.vm);
                info!(vm = %m.vm, source = %m.source, target = %m.target, "migration committed");
            } else {
                warn!(vm = %m.vm, "the VM left its source during the migration; not committed");
                m.reason = Some("the VM left its source host during the migration".into());
                m.phase = Phase::RollingBack;
                orders = m.orders();
                self.store.save_migration(&m, &events)?;
            }
        } else {
            self.store.save_migration(&m, &events)?;
        }
        {
            let mut active = self.migrations.active.lock();
            if m.is_active() {
                active.insert(m.id, m.clone());
            } else {
                active.remove(&m.id);
            }
        }
        for (host, order) in orders {
            self.send_to_agent(host, ServerMsg::Migration(Box::new(order)));
        }
        Ok(())
    }

    /// Loads the migrations a stopped server left in progress and holds their targets'
    /// capacity again; [`Cloud::drive_migrations`] carries them on.
    pub(crate) fn restore_migrations(&self) -> Result<(), CloudError> {
        let active = self.store.active_migrations()?;
        let mut map = self.migrations.active.lock();
        for m in active {
            if m.phase.holds_target() {
                if let Err(no_fit) = self.reserve_target(&m.held_spec(), Some(m.target), &[]) {
                    warn!(migration = %m.id, "target's capacity cannot be held again: {no_fit}");
                }
            }
            map.insert(m.id, m);
        }
        Ok(())
    }

    /// Repeats the orders of every active migration and gives up attempts that wait
    /// too long, until the process ends.
    pub async fn drive_migrations(self: Arc<Self>) {
        let mut seen: HashMap<MigrationId, (i64, Instant)> = HashMap::new();
        loop {
            tokio::time::sleep(DRIVE_EVERY).await;
            let active: Vec<Migration> = self.migrations.active.lock().values().cloned().collect();
            seen.retain(|id, _| active.iter().any(|m| m.id == *id));
            for m in active {
                // Timeouts count from when this process last saw the record move, so a
                // restarted server gives agents a full period to answer.
                let (_, since) = *seen
                    .entry(m.id)
                    .and_modify(|(stamp, since)| {
                        if *stamp != m.updated_at_ms {
                            *stamp = m.updated_at_ms;
                            *since = Instant::now();
                        }
                    })
                    .or_insert((m.updated_at_ms, Instant::now()));
                let waited = since.elapsed().as_millis() as i64;
                if waited > PHASE_TIMEOUT_MS {
                    let cloud = self.clone();
                    let stepped = crate::blocking(move || cloud.time_out(m.id, waited));
                    match stepped {
                        Ok(true) => continue,
                        Ok(false) => {}
                        Err(e) => warn!("migration step failed: {e}"),
                    }
                }
                for (host, order) in m.orders() {
                    self.send_to_agent(host, ServerMsg::Migration(Box::new(order)));
                }
            }
        }
    }
}
