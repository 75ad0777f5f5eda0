//! Turns two successive readings into one sample: counters become rates, CPU time
//! becomes a share of the host. Pure, so every edge (a first reading, a counter that
//! went back because a guest ended, a clock that did not move) is unit-tested.

use herd_proto::node::{DiskStats, DriverUse, NetStats, NodeStats};

/// What one pass over the kernel's files found, before any rate is known.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reading {
    pub at_ms: u64,
    /// Busy and total jiffies of all CPUs.
    pub cpu: Option<(u64, u64)>,
    /// Total and used memory, KiB.
    pub mem_kib: Option<(u64, u64)>,
    pub load1_centi: Option<u32>,
    pub disk: DiskReading,
    /// Interface, received and sent bytes.
    pub net: Vec<(String, u64, u64)>,
    pub drivers: Vec<DriverReading>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DiskReading {
    pub total_bytes: u64,
    pub free_bytes: u64,
    /// Device name, bytes read and written since boot.
    pub device: Option<(String, u64, u64)>,
}

/// One driver's guests as found now: each member (a QEMU's pid, or a container cgroup
/// taken as a whole) with its CPU time and resident memory.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DriverReading {
    pub kind: String,
    pub members: Vec<Member>,
    /// Guests counted (processes, or child cgroups).
    pub n: u32,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Member {
    pub id: u64,
    pub cpu_ns: u64,
    pub mem_bytes: u64,
}

/// The kernel's clock tick for /proc/stat and /proc/<pid>/stat times (USER_HZ, 100 on
/// every Linux herd runs on).
pub const NS_PER_JIFFY: u64 = 10_000_000;

const MIB: u64 = 1 << 20;

/// Keeps the previous reading, to turn counters into rates.
#[derive(Debug, Default)]
pub struct Sampler {
    interval_ms: u32,
    last: Option<Reading>,
}

impl Sampler {
    pub fn new(interval_ms: u32) -> Sampler {
        Sampler {
            interval_ms,
            last: None,
        }
    }

    pub fn sample(&mut self, now: Reading) -> NodeStats {
        let last = self.last.as_ref();
        let elapsed_ms = last.map(|l| now.at_ms.saturating_sub(l.at_ms)).unwrap_or(0);
        let per_s = |before: u64, after: u64| match elapsed_ms {
            0 => 0,
            ms => after.saturating_sub(before).saturating_mul(1000) / ms,
        };
        // Jiffies of all CPUs that passed: the denominator of every CPU share.
        let host_jiffies = match (last.and_then(|l| l.cpu), now.cpu) {
            (Some((_, before)), Some((_, after))) => after.saturating_sub(before),
            _ => 0,
        };
        let cpu_permille = match (last.and_then(|l| l.cpu), now.cpu) {
            (Some((busy0, _)), Some((busy1, _))) if host_jiffies > 0 => {
                permille(busy1.saturating_sub(busy0), host_jiffies)
            }
            _ => 0,
        };
        let (mem_total, mem_used) = now.mem_kib.unwrap_or((0, 0));
        let disk = DiskStats {
            total_mib: now.disk.total_bytes / MIB,
            free_mib: now.disk.free_bytes / MIB,
            device: now.disk.device.as_ref().map(|(name, _, _)| name.clone()),
            read_bytes_per_s: rate_of(last, &now, per_s, |d| d.1),
            write_bytes_per_s: rate_of(last, &now, per_s, |d| d.2),
        };
        let net = now
            .net
            .iter()
            .map(|(iface, rx, tx)| {
                let before = last.and_then(|l| l.net.iter().find(|(name, _, _)| name == iface));
                NetStats {
                    iface: iface.clone(),
                    rx_bytes: *rx,
                    tx_bytes: *tx,
                    rx_bytes_per_s: before.map(|b| per_s(b.1, *rx)).unwrap_or(0),
                    tx_bytes_per_s: before.map(|b| per_s(b.2, *tx)).unwrap_or(0),
                }
            })
            .collect();
        let drivers = now
            .drivers
            .iter()
            .map(|driver| {
                let before = last.and_then(|l| l.drivers.iter().find(|d| d.kind == driver.kind));
                // Only members seen both times: a guest that ended or began in between
                // must not count its whole life as this interval's.
                let cpu_ns: u64 = driver
                    .members
                    .iter()
                    .filter_map(|m| {
                        let b = before?.members.iter().find(|b| b.id == m.id)?;
                        Some(m.cpu_ns.saturating_sub(b.cpu_ns))
                    })
                    .fold(0, u64::saturating_add);
                let host_ns = host_jiffies.saturating_mul(NS_PER_JIFFY);
                DriverUse {
                    kind: driver.kind.clone(),
                    cpu_permille: if host_ns > 0 {
                        permille(cpu_ns, host_ns)
                    } else {
                        0
                    },
                    mem_mib: driver.members.iter().map(|m| m.mem_bytes).sum::<u64>() / MIB,
                    n: driver.n,
                }
            })
            .collect();
        let stats = NodeStats {
            sampled_at_ms: now.at_ms,
            interval_ms: self.interval_ms,
            cpu_permille,
            load1_centi: now.load1_centi.unwrap_or(0),
            mem_total_mib: mem_total / 1024,
            mem_used_mib: mem_used / 1024,
            disk,
            net,
            drivers,
        };
        self.last = Some(now);
        stats
    }
}

/// The rate of one of the data dir device's counters, if the device is the same as last
/// time.
fn rate_of(
    last: Option<&Reading>,
    now: &Reading,
    per_s: impl Fn(u64, u64) -> u64,
    counter: impl Fn(&(String, u64, u64)) -> u64,
) -> u64 {
    match (last.and_then(|l| l.disk.device.as_ref()), &now.disk.device) {
        (Some(before), Some(after)) if before.0 == after.0 => {
            per_s(counter(before), counter(after))
        }
        _ => 0,
    }
}

fn permille(part: u64, whole: u64) -> u16 {
    (u128::from(part) * 1000 / u128::from(whole.max(1))).min(1000) as u16
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    fn reading(at_ms: u64, busy: u64, total: u64, qemu: &[(u64, u64)]) -> Reading {
        Reading {
            at_ms,
            cpu: Some((busy, total)),
            mem_kib: Some((8 << 20, 2 << 20)),
            load1_centi: Some(75),
            disk: DiskReading {
                total_bytes: 100 * MIB,
                free_bytes: 40 * MIB,
                device: Some(("sda1".into(), at_ms * 10, at_ms * 20)),
            },
            net: vec![("eth0".into(), at_ms * 3, at_ms)],
            drivers: vec![DriverReading {
                kind: "qemu".into(),
                members: qemu
                    .iter()
                    .map(|&(id, cpu_ns)| Member {
                        id,
                        cpu_ns,
                        mem_bytes: 150 * MIB,
                    })
                    .collect(),
                n: qemu.len() as u32,
            }],
        }
    }

    #[test]
    fn the_first_sample_has_levels_but_no_rates() {
        let mut sampler = Sampler::new(1000);
        let first = sampler.sample(reading(1_000, 100, 1_000, &[(7, 5)]));
        assert_eq!(first.cpu_permille, 0);
        assert_eq!(first.mem_total_mib, 8 * 1024);
        assert_eq!(first.mem_used_mib, 2 * 1024);
        assert_eq!(first.load1_centi, 75);
        assert_eq!((first.disk.total_mib, first.disk.free_mib), (100, 40));
        assert_eq!(first.disk.read_bytes_per_s, 0);
        assert_eq!(first.net[0].rx_bytes_per_s, 0);
        assert_eq!(first.drivers[0].mem_mib, 150);
        assert_eq!(first.drivers[0].cpu_permille, 0);
    }

    #[test]
    fn rates_and_shares_over_the_interval() {
        let mut sampler = Sampler::new(1000);
        sampler.sample(reading(1_000, 100, 1_000, &[(7, 0)]));
        // 200 jiffies of 2 CPUs passed (1 s); 50 were busy; the QEMU used 0.25 s of
        // the 2 s the CPUs had.
        let s = sampler.sample(reading(2_000, 150, 1_200, &[(7, 250_000_000)]));
        assert_eq!(s.cpu_permille, 250);
        assert_eq!(s.drivers[0].cpu_permille, 125);
        assert_eq!(s.disk.read_bytes_per_s, 10_000);
        assert_eq!(s.disk.write_bytes_per_s, 20_000);
        assert_eq!(
            (s.net[0].rx_bytes_per_s, s.net[0].tx_bytes_per_s),
            (3_000, 1_000)
        );
    }

    #[test]
    fn a_guest_that_came_or_went_costs_nothing_this_interval() {
        let mut sampler = Sampler::new(1000);
        sampler.sample(reading(1_000, 0, 1_000, &[(7, 900_000_000)]));
        // 7 ended, 8 began with a long life already behind it (an adopted QEMU).
        let s = sampler.sample(reading(2_000, 0, 1_200, &[(8, 5_000_000_000)]));
        assert_eq!(s.drivers[0].cpu_permille, 0);
    }

    #[test]
    fn a_clock_that_did_not_move_gives_no_rates() {
        let mut sampler = Sampler::new(1000);
        sampler.sample(reading(1_000, 0, 1_000, &[]));
        let s = sampler.sample(reading(1_000, 0, 1_000, &[]));
        assert_eq!((s.cpu_permille, s.disk.read_bytes_per_s), (0, 0));
    }

    proptest! {
        #[test]
        fn shares_stay_within_the_host(
            readings in proptest::collection::vec(
                (0u64..10_000, 0u64..1 << 40, 0u64..1 << 40, 0u64..1 << 50), 1..8),
        ) {
            let mut sampler = Sampler::new(1000);
            for (at, busy, total, qemu_ns) in readings {
                let s = sampler.sample(reading(at, busy, total, &[(1, qemu_ns)]));
                prop_assert!(s.cpu_permille <= 1000);
                prop_assert!(s.drivers[0].cpu_permille <= 1000);
            }
        }
    }
}
