//! VM placement: filter the hosts, then weigh them.
//!
//! Two implementations make the same decision:
//! - [`place`], a linear pass over a snapshot of hosts: the reference, short enough to
//!   check by eye;
//! - [`Scheduler`], an incremental index that holds the hosts and their capacity
//!   accounting and answers in time logarithmic in the number of hosts of each host
//!   shape (see `index/mod.rs` for how and why it is exact). Property tests compare
//!   the two.
//!
//! The server holds the scheduler in memory under one lock and counts each placement
//! before releasing the lock, so concurrent launches can never over-commit a host: the
//! scheduler itself needs no locking and is tested without a server.
//!
//! Scores are exact fractions, compared by cross-multiplication, not floats: two hosts
//! tie exactly when their free fractions are equal, and the lower host id wins a tie, so
//! a placement is deterministic and the index can agree with the reference bit for bit.

mod index;
mod tree;

pub use index::Scheduler;

use serde::{Deserialize, Serialize};
use std::cmp::Ordering;
use std::fmt;
use uuid::Uuid;

/// One host as the scheduler sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct HostSlot {
    pub id: Uuid,
    pub up: bool,
    pub hypervisors: Vec<String>,
    pub cpus: u32,
    pub memory_mib: u64,
    /// vCPUs and memory already promised to VMs placed here.
    pub used_vcpus: u64,
    pub used_memory_mib: u64,
}

/// What a VM needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Demand {
    pub hypervisor: String,
    pub vcpus: u32,
    pub memory_mib: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// Prefer the emptiest host: fewer VMs hurt when one host fails.
    #[default]
    Spread,
    /// Prefer the fullest host that fits: keeps whole hosts free for big VMs.
    Binpack,
}

/// How much may be promised per unit of real capacity, and how to choose.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SchedPolicy {
    pub cpu_overcommit: f64,
    pub memory_overcommit: f64,
    pub strategy: Strategy,
}

impl Default for SchedPolicy {
    fn default() -> Self {
        SchedPolicy {
            cpu_overcommit: 4.0,
            memory_overcommit: 1.0,
            strategy: Strategy::Spread,
        }
    }
}

impl SchedPolicy {
    pub fn vcpu_limit(&self, host: &HostSlot) -> u64 {
        (f64::from(host.cpus) * self.cpu_overcommit).floor() as u64
    }

    pub fn memory_limit_mib(&self, host: &HostSlot) -> u64 {
        (host.memory_mib as f64 * self.memory_overcommit).floor() as u64
    }
}

/// Why no host fits, counted per reason so the operator sees the whole picture.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NoFit {
    pub n_hosts: usize,
    pub n_down: usize,
    pub n_wrong_hypervisor: usize,
    pub n_short_of_cpu: usize,
    pub n_short_of_memory: usize,
}

impl fmt::Display for NoFit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.n_hosts == 0 {
            return f.write_str("no hosts have joined");
        }
        write!(f, "none of {} hosts fits", self.n_hosts)?;
        let reasons = [
            (self.n_down, "down"),
            (self.n_wrong_hypervisor, "without the hypervisor type"),
            (self.n_short_of_cpu, "short of vCPUs"),
            (self.n_short_of_memory, "short of memory"),
        ];
        let mut first = true;
        for (n, why) in reasons {
            if n > 0 {
                f.write_str(if first { ": " } else { ", " })?;
                write!(f, "{n} {why}")?;
                first = false;
            }
        }
        Ok(())
    }
}

/// A host's weight for a demand: the free fraction of its tighter resource after the
/// placement, `num / den`, exact. `num <= den < 2^64`, so products fit in a `u128`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Score {
    num: u128,
    den: u128,
}

impl Score {
    pub(crate) fn new(num: u128, den: u128) -> Score {
        Score { num, den }
    }

    fn cmp(self, other: Score) -> Ordering {
        if (self.den | other.den) >> 32 == 0 {
            // Numerators are at most their denominators, so 64-bit products suffice,
            // and they are cheaper: this runs once or twice for every host looked at.
            let (a, b) = (self.num as u64, self.den as u64);
            let (c, d) = (other.num as u64, other.den as u64);
            return (a * d).cmp(&(c * b));
        }
        (self.num * other.den).cmp(&(other.num * self.den))
    }
}

/// Why a host that is up and has the hypervisor type does not fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Short {
    OfCpu,
    OfMemory,
}

/// The capacity filter and the weigh for one host: its score if the demand fits within
/// the (overcommitted) limits, else which resource is short (vCPUs checked first).
pub(crate) fn fit_score(
    vcpu_limit: u64,
    memory_limit_mib: u64,
    used_vcpus: u64,
    used_memory_mib: u64,
    demand: &Demand,
) -> Result<Score, Short> {
    let vcpus_after = u128::from(used_vcpus) + u128::from(demand.vcpus);
    let memory_after = u128::from(used_memory_mib) + u128::from(demand.memory_mib);
    if vcpus_after > u128::from(vcpu_limit) {
        return Err(Short::OfCpu);
    }
    if memory_after > u128::from(memory_limit_mib) {
        return Err(Short::OfMemory);
    }
    // A zero limit counts as one, so an empty demand on an empty zero-sized host scores
    // "all free" rather than dividing by zero.
    let cpu_den = u128::from(vcpu_limit.max(1));
    let memory_den = u128::from(memory_limit_mib.max(1));
    let free_cpu = Score::new(cpu_den - vcpus_after, cpu_den);
    let free_memory = Score::new(memory_den - memory_after, memory_den);
    Ok(if free_cpu.cmp(free_memory) == Ordering::Less {
        free_cpu
    } else {
        free_memory
    })
}

/// Whether host `a` is a better choice than host `b`: spread prefers the higher score,
/// binpack the lower; ties go to the lower host id, so placement is deterministic.
pub(crate) fn better(strategy: Strategy, a: (Score, Uuid), b: (Score, Uuid)) -> bool {
    match (strategy, a.0.cmp(b.0)) {
        (_, Ordering::Equal) => a.1 < b.1,
        (Strategy::Spread, order) => order == Ordering::Greater,
        (Strategy::Binpack, order) => order == Ordering::Less,
    }
}

/// Filters then weighs; returns the index of the chosen host in `hosts`.
///
/// The reference implementation: one pass over every host. [`Scheduler::place`] makes
/// the same decision without looking at every host.
pub fn place(hosts: &[HostSlot], demand: &Demand, policy: &SchedPolicy) -> Result<usize, NoFit> {
    let mut no_fit = NoFit {
        n_hosts: hosts.len(),
        ..NoFit::default()
    };
    let mut best: Option<(Score, Uuid, usize)> = None;
    for (idx, host) in hosts.iter().enumerate() {
        if !host.up {
            no_fit.n_down += 1;
            continue;
        }
        if !host.hypervisors.contains(&demand.hypervisor) {
            no_fit.n_wrong_hypervisor += 1;
            continue;
        }
        let score = match fit_score(
            policy.vcpu_limit(host),
            policy.memory_limit_mib(host),
            host.used_vcpus,
            host.used_memory_mib,
            demand,
        ) {
            Ok(score) => score,
            Err(Short::OfCpu) => {
                no_fit.n_short_of_cpu += 1;
                continue;
            }
            Err(Short::OfMemory) => {
                no_fit.n_short_of_memory += 1;
                continue;
            }
        };
        let is_better = match best {
            None => true,
            Some((best_score, best_id, _)) => {
                better(policy.strategy, (score, host.id), (best_score, best_id))
            }
        };
        if is_better {
            best = Some((score, host.id, idx));
        }
    }
    best.map(|(_, _, idx)| idx).ok_or(no_fit)
}

#[cfg(test)]
mod tests {
    use super::{place, Demand, HostSlot, SchedPolicy, Strategy, Uuid};
    use proptest::prelude::{any, prop_assert, prop_assert_eq, proptest};

    fn host(n: u128, cpus: u32, memory_mib: u64) -> HostSlot {
        HostSlot {
            id: Uuid::from_u128(n),
            up: true,
            hypervisors: vec!["sim".into()],
            cpus,
            memory_mib,
            used_vcpus: 0,
            used_memory_mib: 0,
        }
    }

    fn demand(vcpus: u32, memory_mib: u64) -> Demand {
        Demand {
            hypervisor: "sim".into(),
            vcpus,
            memory_mib,
        }
    }

    #[test]
    fn spread_prefers_emptiest_and_binpack_fullest() {
        let mut hosts = vec![host(1, 4, 4096), host(2, 4, 4096)];
        hosts[0].used_vcpus = 8;
        hosts[0].used_memory_mib = 2048;
        let spread = SchedPolicy::default();
        assert_eq!(place(&hosts, &demand(1, 512), &spread), Ok(1));
        let binpack = SchedPolicy {
            strategy: Strategy::Binpack,
            ..spread
        };
        assert_eq!(place(&hosts, &demand(1, 512), &binpack), Ok(0));
    }

    #[test]
    fn reasons_are_counted() {
        let mut hosts = vec![host(1, 1, 1024), host(2, 1, 1024), host(3, 1, 1024)];
        hosts[0].up = false;
        hosts[1].hypervisors = vec!["qemu".into()];
        let err =
            place(&hosts, &demand(1, 4096), &SchedPolicy::default()).expect_err("must not fit");
        assert_eq!(err.n_down, 1);
        assert_eq!(err.n_wrong_hypervisor, 1);
        assert_eq!(err.n_short_of_memory, 1);
        assert_eq!(
            err.to_string(),
            "none of 3 hosts fits: 1 down, 1 without the hypervisor type, 1 short of memory"
        );
    }

    /// The weigh as it was first written, in floats; kept to show that exact fractions
    /// choose the same host wherever floats can tell the scores apart.
    fn place_float(hosts: &[HostSlot], demand: &Demand, policy: &SchedPolicy) -> Option<usize> {
        let mut best: Option<(f64, usize)> = None;
        for (idx, host) in hosts.iter().enumerate() {
            if !host.up || !host.hypervisors.contains(&demand.hypervisor) {
                continue;
            }
            let vcpu_limit = policy.vcpu_limit(host);
            let memory_limit = policy.memory_limit_mib(host);
            let vcpus_after = host.used_vcpus + u64::from(demand.vcpus);
            let memory_after = host.used_memory_mib + demand.memory_mib;
            if vcpus_after > vcpu_limit || memory_after > memory_limit {
                continue;
            }
            let free_cpu = 1.0 - vcpus_after as f64 / vcpu_limit.max(1) as f64;
            let free_memory = 1.0 - memory_after as f64 / memory_limit.max(1) as f64;
            let free = free_cpu.min(free_memory);
            let score = match policy.strategy {
                Strategy::Spread => free,
                Strategy::Binpack => -free,
            };
            let better = match best {
                None => true,
                Some((best_score, best_idx)) => {
                    score > best_score || (score == best_score && host.id < hosts[best_idx].id)
                }
            };
            if better {
                best = Some((score, idx));
            }
        }
        best.map(|(_, idx)| idx)
    }

    proptest! {
        /// With limits below 2^24 (16 TiB, 16M vCPUs) two different scores differ by more
        /// than floats round away, so the exact weigh and the float one agree.
        #[test]
        fn exact_weigh_matches_the_float_one(
            hosts in proptest::collection::vec(
                (1u32..256, 1u64..(1 << 22), 0u64..1024, 0u64..(1 << 22), 0u8..4), 1..40),
            demands in proptest::collection::vec((0u32..64, 0u64..(1 << 20)), 1..20),
            binpack in any::<bool>(),
            cpu_overcommit in 1u32..8,
        ) {
            let hosts: Vec<HostSlot> = hosts.iter().enumerate()
                .map(|(n, (cpus, mem, used_vcpus, used_mem, same))| HostSlot {
                    // Repeated sizes and usage make exact ties common.
                    used_vcpus: if *same > 0 { 0 } else { *used_vcpus },
                    used_memory_mib: if *same > 0 { 0 } else { *used_mem },
                    memory_mib: if *same > 0 { 4096 * u64::from(*same) } else { *mem },
                    cpus: if *same > 0 { 4 * u32::from(*same) } else { *cpus },
                    ..host((n as u128 * 37) % 41, 1, 1)
                })
                .collect();
            let policy = SchedPolicy {
                cpu_overcommit: f64::from(cpu_overcommit) / 2.0,
                memory_overcommit: 1.0,
                strategy: if binpack { Strategy::Binpack } else { Strategy::Spread },
            };
            for (vcpus, mem) in demands {
                let d = demand(vcpus, mem);
                prop_assert_eq!(place(&hosts, &d, &policy).ok(), place_float(&hosts, &d, &policy));
            }
        }

        /// Placing until nothing fits never puts a host over its limits.
        #[test]
        fn never_over_commits(
            caps in proptest::collection::vec((1u32..16, 512u64..8192), 1..8),
            demands in proptest::collection::vec((1u32..4, 64u64..2048), 1..100),
            binpack in any::<bool>(),
        ) {
            let mut hosts: Vec<HostSlot> = caps.iter().enumerate()
                .map(|(n, (cpus, mem))| host(n as u128, *cpus, *mem)).collect();
            let policy = SchedPolicy {
                strategy: if binpack { Strategy::Binpack } else { Strategy::Spread },
                ..SchedPolicy::default()
            };
            for (vcpus, mem) in demands {
                if let Ok(idx) = place(&hosts, &demand(vcpus, mem), &policy) {
                    hosts[idx].used_vcpus += u64::from(vcpus);
                    hosts[idx].used_memory_mib += mem;
                }
            }
            for host in &hosts {
                prop_assert!(host.used_vcpus <= policy.vcpu_limit(host));
                prop_assert!(host.used_memory_mib <= policy.memory_limit_mib(host));
            }
        }
    }
}
