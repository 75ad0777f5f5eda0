//! VM placement as a pure function: a snapshot of hosts in, a chosen host (or the
//! reasons none fits) out.
//!
//! The server holds the snapshot in memory under one lock and applies each placement to
//! it before releasing the lock, so concurrent launches can never over-commit a host:
//! the scheduler itself needs no locking and is tested without a server.

use serde::{Deserialize, Serialize};
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

/// Filters then weighs; returns the index of the chosen host in `hosts`.
pub fn place(hosts: &[HostSlot], demand: &Demand, policy: &SchedPolicy) -> Result<usize, NoFit> {
    let mut no_fit = NoFit {
        n_hosts: hosts.len(),
        ..NoFit::default()
    };
    let mut best: Option<(f64, usize)> = None;
    for (idx, host) in hosts.iter().enumerate() {
        if !host.up {
            no_fit.n_down += 1;
            continue;
        }
        if !host.hypervisors.contains(&demand.hypervisor) {
            no_fit.n_wrong_hypervisor += 1;
            continue;
        }
        let vcpu_limit = policy.vcpu_limit(host);
        let memory_limit = policy.memory_limit_mib(host);
        let vcpus_after = host.used_vcpus + u64::from(demand.vcpus);
        let memory_after = host.used_memory_mib + demand.memory_mib;
        if vcpus_after > vcpu_limit {
            no_fit.n_short_of_cpu += 1;
            continue;
        }
        if memory_after > memory_limit {
            no_fit.n_short_of_memory += 1;
            continue;
        }
        // The host's tighter resource after placement decides its score.
        let free_cpu = 1.0 - vcpus_after as f64 / vcpu_limit.max(1) as f64;
        let free_memory = 1.0 - memory_after as f64 / memory_limit.max(1) as f64;
        let free = free_cpu.min(free_memory);
        let score = match policy.strategy {
            Strategy::Spread => free,
            Strategy::Binpack => -free,
        };
        // Ties go to the lower host id, so placement is deterministic.
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
    best.map(|(_, idx)| idx).ok_or(no_fit)
}

#[cfg(test)]
mod tests {
    use super::{place, Demand, HostSlot, SchedPolicy, Strategy, Uuid};
    use proptest::prelude::{any, prop_assert, proptest};

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

    proptest! {
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
