//! Which VMs are in which observed state, and on which host with what share, in memory.
//!
//! An SQL index on the observed state costs every reported change two random leaf pages
//! per index (the old key out, the new key in). At a million VMs those leaves are not
//! in any cache, and a state index plus a project-and-state index were four of the
//! seven pages each change dirtied: the store writer, not the network, set the pace of
//! the ingest. The facts those indexes answered (a page of VMs in a state, how many are
//! in each state, which VMs a host runs) fit in about a hundred bytes a VM, so the
//! store keeps them here instead, changed by the same writes that change the rows,
//! under the writer's lock, after each commit. It also keeps each VM's vCPUs and
//! memory, so that a restart rebuilds the scheduler's accounting from the same single
//! pass over the rows that builds the index (a second pass cost a second).
//!
//! Pure data: the store loads it at open and keeps it in step; nothing here does I/O.

use herd_proto::wire::{HostId, VmId};
use herd_proto::VmState;
use std::collections::{BTreeMap, BTreeSet, HashMap};

#[derive(Debug, Clone, Copy)]
struct Entry {
    state: VmState,
    project: u32,
    host: Option<HostId>,
    /// The hypervisor type, by number (see `kind_names`).
    kind: u8,
    vcpus: u32,
    memory_mib: u64,
}

/// One VM as the index learns it at load or on insert.
#[derive(Debug, Clone, Copy)]
pub struct IndexedVm<'a> {
    pub id: VmId,
    pub project: &'a str,
    pub host: Option<HostId>,
    pub hypervisor: &'a str,
    pub state: VmState,
    pub vcpus: u32,
    pub memory_mib: u64,
}

/// What the VMs of one project and one hypervisor type hold on one host (or, with no
/// host, wait for).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allocation {
    pub host: Option<HostId>,
    pub project: String,
    pub hypervisor: String,
    pub n_vms: u64,
    pub vcpus: u64,
    pub memory_mib: u64,
}

#[derive(Debug, Default)]
pub struct VmIndex {
    vms: HashMap<VmId, Entry>,
    /// Project numbers by name: keys of a million VMs hold a number, not a name.
    project_numbers: HashMap<String, u32>,
    /// Hypervisor types by number: there are a handful, and a million VMs hold a byte.
    kind_names: Vec<String>,
    by_state: BTreeSet<(VmState, VmId)>,
    by_project_state: BTreeSet<(u32, VmState, VmId)>,
    by_host: HashMap<HostId, Vec<VmId>>,
    counts: BTreeMap<VmState, u64>,
}

/// Builds the index from every VM at once, as a store's open reads them: sorted bulk
/// loads, not a million inserts.
#[derive(Default)]
pub struct Builder {
    index: VmIndex,
    by_state: Vec<(VmState, VmId)>,
    by_project_state: Vec<(u32, VmState, VmId)>,
}

impl Entry {
    fn of(vm: &IndexedVm<'_>, project: u32, kind: u8) -> Entry {
        Entry {
            state: vm.state,
            project,
            host: vm.host,
            kind,
            vcpus: vm.vcpus,
            memory_mib: vm.memory_mib,
        }
    }
}

impl Builder {
    pub fn with_capacity(vms: usize) -> Builder {
        Builder {
            index: VmIndex {
                vms: HashMap::with_capacity(vms),
                ..VmIndex::default()
            },
            by_state: Vec::with_capacity(vms),
            by_project_state: Vec::with_capacity(vms),
        }
    }

    /// One VM; a second with the same id is ignored.
    pub fn add(&mut self, vm: IndexedVm<'_>) {
        if let Some(project) = self.index.enter(&vm) {
            self.by_state.push((vm.state, vm.id));
            self.by_project_state.push((project, vm.state, vm.id));
        }
    }

    pub fn finish(self) -> VmIndex {
        let mut index = self.index;
        index.by_state = self.by_state.into_iter().collect();
        index.by_project_state = self.by_project_state.into_iter().collect();
        index
    }
}

impl VmIndex {
    #[cfg(test)]
    pub fn build<'a>(rows: impl IntoIterator<Item = IndexedVm<'a>>) -> VmIndex {
        let mut builder = Builder::default();
        for vm in rows {
            builder.add(vm);
        }
        builder.finish()
    }

    /// The number of a hypervisor type; past 255 types (there are three) the last
    /// number is shared, which only blurs the resource map.
    fn kind_number(&mut self, name: &str) -> u8 {
        if let Some(n) = self.kind_names.iter().position(|k| k == name) {
            return n as u8;
        }
        if self.kind_names.len() < usize::from(u8::MAX) {
            self.kind_names.push(name.to_owned());
        }
        (self.kind_names.len() - 1) as u8
    }

    /// What every project's VMs of every type hold, per host, in one pass: the VMs
    /// that hold capacity (placed, not terminated) and the ones still waiting for a host
    /// (`host: None`). `project` keeps only one project's.
    pub fn allocations(&self, project: Option<&str>) -> Vec<Allocation> {
        type AllocKey = (Option<HostId>, u32, u8);
        let only = match project {
            Some(name) => match self.project_numbers.get(name) {
                Some(n) => Some(*n),
                None => return Vec::new(),
            },
            None => None,
        };
        // (host, project number, kind number) -> (VMs, vCPUs, MiB)
        let mut sums: HashMap<AllocKey, (u64, u64, u64)> = HashMap::new();
        for entry in self.vms.values() {
            if only.is_some_and(|p| p != entry.project)
                || matches!(entry.state, VmState::Terminated | VmState::Purged)
            {
                continue;
            }
            let sum = sums
                .entry((entry.host, entry.project, entry.kind))
                .or_default();
            sum.0 += 1;
            sum.1 += u64::from(entry.vcpus);
            sum.2 += entry.memory_mib;
        }
        let project_names: HashMap<u32, &str> = self
            .project_numbers
            .iter()
            .map(|(name, n)| (*n, name.as_str()))
            .collect();
        let mut rows: Vec<Allocation> = sums
            .into_iter()
            .map(
                |((host, project, kind), (n_vms, vcpus, memory_mib))| Allocation {
                    host,
                    project: project_names
                        .get(&project)
                        .copied()
                        .unwrap_or("")
                        .to_owned(),
                    hypervisor: self
                        .kind_names
                        .get(usize::from(kind))
                        .cloned()
                        .unwrap_or_default(),
                    n_vms,
                    vcpus,
                    memory_mib,
                },
            )
            .collect();
        rows.sort_by(|a, b| {
            (a.host, &a.project, &a.hypervisor).cmp(&(b.host, &b.project, &b.hypervisor))
        });
        rows
    }

    fn project_number(&mut self, name: &str) -> u32 {
        if let Some(number) = self.project_numbers.get(name) {
            return *number;
        }
        let number = self.project_numbers.len() as u32;
        self.project_numbers.insert(name.to_owned(), number);
        number
    }

    /// Records a VM not yet indexed in everything but the ordered sets, and returns
    /// its project's number for those; `None` if it is indexed already.
    fn enter(&mut self, vm: &IndexedVm<'_>) -> Option<u32> {
        if self.vms.contains_key(&vm.id) {
            return None;
        }
        let project = self.project_number(vm.project);
        let kind = self.kind_number(vm.hypervisor);
        self.vms.insert(vm.id, Entry::of(vm, project, kind));
        if let Some(host) = vm.host {
            self.by_host.entry(host).or_default().push(vm.id);
        }
        *self.counts.entry(vm.state).or_default() += 1;
        Some(project)
    }

    /// A new VM; one already indexed is left as it is (the store's insert would have
    /// failed on its primary key).
    pub fn insert(&mut self, vm: IndexedVm<'_>) {
        if let Some(project) = self.enter(&vm) {
            self.by_state.insert((vm.state, vm.id));
            self.by_project_state.insert((project, vm.state, vm.id));
        }
    }

    /// A new observed state; a VM not indexed (deleted meanwhile) is ignored, as the
    /// store's update of its row changed nothing.
    pub fn set_state(&mut self, vm: VmId, state: VmState) {
        let Some(entry) = self.vms.get_mut(&vm) else {
            return;
        };
        let before = std::mem::replace(&mut entry.state, state);
        if before == state {
            return;
        }
        let project = entry.project;
        self.by_state.remove(&(before, vm));
        self.by_state.insert((state, vm));
        self.by_project_state.remove(&(project, before, vm));
        self.by_project_state.insert((project, state, vm));
        self.uncount(before);
        *self.counts.entry(state).or_default() += 1;
    }

    /// The VM was placed: it has a host now, and is `scheduled`.
    pub fn place(&mut self, vm: VmId, host: HostId) {
        let Some(entry) = self.vms.get_mut(&vm) else {
            return;
        };
        if entry.host.is_some() {
            return;
        }
        entry.host = Some(host);
        self.by_host.entry(host).or_default().push(vm);
        self.set_state(vm, VmState::Scheduled);
    }

    /// The VM has a new shape (a resize).
    pub fn resize(&mut self, vm: VmId, vcpus: u32, memory_mib: u64) {
        if let Some(entry) = self.vms.get_mut(&vm) {
            entry.vcpus = vcpus;
            entry.memory_mib = memory_mib;
        }
    }

    /// The VM moved to another host (a committed migration).
    pub fn move_host(&mut self, vm: VmId, host: HostId) {
        let Some(entry) = self.vms.get_mut(&vm) else {
            return;
        };
        if let Some(old) = entry.host.replace(host) {
            if let Some(vms) = self.by_host.get_mut(&old) {
                vms.retain(|other| *other != vm);
                if vms.is_empty() {
                    self.by_host.remove(&old);
                }
            }
        }
        self.by_host.entry(host).or_default().push(vm);
    }

    pub fn remove(&mut self, vm: VmId) {
        let Some(entry) = self.vms.remove(&vm) else {
            return;
        };
        self.by_state.remove(&(entry.state, vm));
        self.by_project_state
            .remove(&(entry.project, entry.state, vm));
        if let Some(host) = entry.host {
            if let Some(vms) = self.by_host.get_mut(&host) {
                vms.retain(|other| *other != vm);
                if vms.is_empty() {
                    self.by_host.remove(&host);
                }
            }
        }
        self.uncount(entry.state);
    }

    fn uncount(&mut self, state: VmState) {
        if let Some(n) = self.counts.get_mut(&state) {
            *n -= 1;
            if *n == 0 {
                self.counts.remove(&state);
            }
        }
    }

    /// Up to `limit` VMs in `state`, in id order after `after`, of `project` if given,
    /// and within `scope` if given (`None` is every project).
    pub fn page(
        &self,
        state: VmState,
        project: Option<&str>,
        scope: Option<&[String]>,
        after: Option<VmId>,
        limit: usize,
    ) -> Vec<VmId> {
        use std::ops::Bound::{Excluded, Included, Unbounded};
        let from = match after {
            Some(after) => Excluded(after),
            None => Included(VmId::nil()),
        };
        let allowed: Option<Vec<u32>> = match (project, scope) {
            (None, None) => None,
            (Some(one), scope) => Some(
                scope
                    .is_none_or(|scope| scope.iter().any(|p| p == one))
                    .then(|| self.project_numbers.get(one).copied())
                    .flatten()
                    .into_iter()
                    .collect(),
            ),
            (None, Some(scope)) => Some(
                scope
                    .iter()
                    .filter_map(|p| self.project_numbers.get(p).copied())
                    .collect(),
            ),
        };
        let Some(allowed) = allowed else {
            return self
                .by_state
                .range((from.map(|id| (state, id)), Unbounded))
                .take_while(|(s, _)| *s == state)
                .take(limit)
                .map(|(_, id)| *id)
                .collect();
        };
        let mut ids: Vec<VmId> = Vec::new();
        for project in allowed {
            ids.extend(
                self.by_project_state
                    .range((from.map(|id| (project, state, id)), Unbounded))
                    .take_while(|(p, s, _)| *p == project && *s == state)
                    .take(limit)
                    .map(|(_, _, id)| *id),
            );
        }
        ids.sort_unstable();
        ids.dedup();
        ids.truncate(limit);
        ids
    }

    /// The host's VMs with their observed states.
    pub fn on_host(&self, host: HostId) -> Vec<(VmId, VmState)> {
        self.by_host.get(&host).map_or_else(Vec::new, |vms| {
            vms.iter()
                .filter_map(|vm| Some((*vm, self.vms.get(vm)?.state)))
                .collect()
        })
    }

    /// What each VM that holds capacity holds, and where: (VM, host, vCPUs, MiB). A VM
    /// holds its share from placement until it is terminated.
    pub fn placed_shares(&self) -> Vec<(VmId, HostId, u32, u64)> {
        self.vms
            .iter()
            .filter(|(_, entry)| !matches!(entry.state, VmState::Terminated | VmState::Purged))
            .filter_map(|(vm, entry)| Some((*vm, entry.host?, entry.vcpus, entry.memory_mib)))
            .collect()
    }

    /// How many VMs are in each state; states with none are left out.
    pub fn counts(&self) -> impl Iterator<Item = (VmState, u64)> + '_ {
        self.counts.iter().map(|(state, n)| (*state, *n))
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.vms.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const STATES: [VmState; 5] = [
        VmState::Pending,
        VmState::Running,
        VmState::Paused,
        VmState::Unknown,
        VmState::Terminated,
    ];

    fn vm(n: u8, project: &str, host: Option<u8>, state: VmState) -> IndexedVm<'_> {
        IndexedVm {
            id: id(n),
            project,
            host: host.map(|h| HostId::from_bytes([h; 16])),
            hypervisor: "qemu",
            state,
            vcpus: u32::from(n),
            memory_mib: 64,
        }
    }

    fn id(n: u8) -> VmId {
        VmId::from_bytes([n; 16])
    }

    #[test]
    fn pages_by_state_and_project_in_id_order() {
        let index = VmIndex::build([
            vm(5, "a", Some(1), VmState::Running),
            vm(1, "b", Some(1), VmState::Running),
            vm(3, "a", Some(2), VmState::Running),
            vm(2, "a", None, VmState::Pending),
        ]);
        let running = |project, scope: Option<&[String]>, after, limit| {
            index.page(VmState::Running, project, scope, after, limit)
        };
        assert_eq!(running(None, None, None, 10), vec![id(1), id(3), id(5)]);
        assert_eq!(running(None, None, Some(id(1)), 1), vec![id(3)]);
        assert_eq!(running(Some("a"), None, None, 10), vec![id(3), id(5)]);
        let scope = ["b".to_owned()];
        assert_eq!(running(None, Some(&scope), None, 10), vec![id(1)]);
        assert!(
            running(Some("a"), Some(&scope), None, 10).is_empty(),
            "a project outside the caller's scope shows nothing"
        );
        assert!(running(Some("nope"), None, None, 10).is_empty());
        assert_eq!(
            index.counts().collect::<Vec<_>>(),
            vec![(VmState::Pending, 1), (VmState::Running, 3)]
        );
    }

    #[test]
    fn follows_placement_state_changes_and_removal() {
        let mut index = VmIndex::build([vm(1, "a", None, VmState::Pending)]);
        let host = HostId::from_bytes([9; 16]);
        index.place(id(1), host);
        assert_eq!(index.on_host(host), vec![(id(1), VmState::Scheduled)]);
        index.set_state(id(1), VmState::Running);
        assert_eq!(index.on_host(host), vec![(id(1), VmState::Running)]);
        index.set_state(id(7), VmState::Running);
        assert_eq!(index.len(), 1, "a state for a VM not indexed adds none");
        index.remove(id(1));
        assert!(index.on_host(host).is_empty());
        assert_eq!(index.counts().count(), 0);
        assert!(index
            .page(VmState::Running, None, None, None, 10)
            .is_empty());
    }

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u8, u8, Option<u8>, usize),
        Set(u8, usize),
        Place(u8, u8),
        Remove(u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (
                0u8..20,
                0u8..3,
                proptest::option::of(0u8..4),
                0..STATES.len()
            )
                .prop_map(|(v, p, h, s)| Op::Insert(v, p, h, s)),
            (0u8..20, 0..STATES.len()).prop_map(|(v, s)| Op::Set(v, s)),
            (0u8..20, 0u8..4).prop_map(|(v, h)| Op::Place(v, h)),
            (0u8..20).prop_map(Op::Remove),
        ]
    }

    proptest! {
        /// Any sequence of changes leaves the index answering as a scan of a plain map
        /// of the same VMs would.
        #[test]
        fn answers_as_a_scan_would(ops in proptest::collection::vec(op(), 0..60),
                                   after in proptest::option::of(0u8..20),
                                   limit in 1usize..8) {
            let mut index = VmIndex::default();
            let mut model: BTreeMap<VmId, (String, Option<HostId>, VmState)> = BTreeMap::new();
            for op in ops {
                match op {
                    Op::Insert(v, p, h, s) => {
                        let project = format!("p{p}");
                        let new = vm(v, &project, h, STATES[s]);
                        model.entry(new.id).or_insert((project.clone(), new.host, new.state));
                        index.insert(new);
                    }
                    Op::Set(v, s) => {
                        if let Some(entry) = model.get_mut(&id(v)) {
                            entry.2 = STATES[s];
                        }
                        index.set_state(id(v), STATES[s]);
                    }
                    Op::Place(v, h) => {
                        let host = HostId::from_bytes([h; 16]);
                        if let Some(entry) = model.get_mut(&id(v)) {
                            if entry.1.is_none() {
                                entry.1 = Some(host);
                                entry.2 = VmState::Scheduled;
                            }
                        }
                        index.place(id(v), host);
                    }
                    Op::Remove(v) => {
                        model.remove(&id(v));
                        index.remove(id(v));
                    }
                }
            }
            let after = after.map(id);
            let scope = ["p0".to_owned(), "p2".to_owned()];
            for state in STATES.into_iter().chain([VmState::Scheduled]) {
                for (project, scope) in [(None, None), (Some("p1"), None),
                                         (None, Some(&scope[..])), (Some("p2"), Some(&scope[..]))] {
                    let expected: Vec<VmId> = model
                        .iter()
                        .filter(|(vm, (p, _, s))| *s == state
                            && project.is_none_or(|one| one == p)
                            && scope.is_none_or(|scope| scope.contains(p))
                            && after.is_none_or(|after| **vm > after))
                        .map(|(vm, _)| *vm)
                        .take(limit)
                        .collect();
                    prop_assert_eq!(index.page(state, project, scope, after, limit), expected);
                }
                let n = model.values().filter(|(_, _, s)| *s == state).count() as u64;
                let counted = index.counts().find(|(s, _)| *s == state).map_or(0, |(_, n)| n);
                prop_assert_eq!(counted, n);
            }
            for h in 0..4u8 {
                let host = HostId::from_bytes([h; 16]);
                let mut got = index.on_host(host);
                got.sort();
                let expected: Vec<(VmId, VmState)> = model
                    .iter()
                    .filter(|(_, (_, on, _))| *on == Some(host))
                    .map(|(vm, (_, _, s))| (*vm, *s))
                    .collect();
                prop_assert_eq!(got, expected);
            }
            let mut shares = index.placed_shares();
            shares.sort();
            let expected: Vec<(VmId, HostId, u32, u64)> = model
                .iter()
                .filter(|(_, (_, _, s))| *s != VmState::Terminated)
                .filter_map(|(vm, (_, on, _))| Some((*vm, (*on)?, u32::from(vm.as_bytes()[0]), 64)))
                .collect();
            prop_assert_eq!(shares, expected);
            prop_assert_eq!(index.len(), model.len());
        }
    }
}
