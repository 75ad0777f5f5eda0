//! Bills, from the metering record and the lifecycle event log. Pure: the caller reads
//! the store, this module only computes.
//!
//! Two sources, because they answer different questions:
//! - **time** (per hour, memory GiB-hours) accrues while a VM is running or paused,
//!   which the event log knows exactly: every observed state change is an event with
//!   its time. Usage samples cannot tell it: they are sent only when counters moved
//!   past a threshold, so a gap between two samples is not downtime.
//! - **usage** (CPU seconds, bytes transferred) is the difference of counters between
//!   consecutive samples. A sample is stored once per (VM, instant), so a retransmitted
//!   batch adds nothing.
//!
//! Prices come from `herd_policy::pricing`, the same code that prices a cost cap inside
//! the guest: exact integer arithmetic, one rounding per line.

use crate::store::{BurstRow, LedgerVm, UsageRow};
use herd_policy::{fine_to_micros, price_interval_fine, Sample, Workload};
use herd_proto::policy::{Rate, RateCard};
use herd_proto::VmState;

/// One VM's part of a bill.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BillLine {
    pub vm: LedgerVm,
    /// Time the VM was running or paused within the period.
    pub billed_ms: u64,
    pub cpu_ms: u64,
    pub net_bytes: u64,
    /// Memory held, in MiB-milliseconds.
    pub memory_mib_ms: u128,
    /// Everything, bursts included.
    pub cost_micros: u64,
    /// The VM's bursts within the period, each with its part of the cost.
    pub bursts: Vec<BurstCharge>,
}

/// One burst's part of a bill: its lease within the period, and what it added.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BurstCharge {
    pub burst: BurstRow,
    /// The lease's time within the period.
    pub billed_ms: u64,
    /// The extra memory at the memory price and the burst's vCPUs at the rate card's
    /// `burst_per_vcpu_hour` (its CPU use is priced with the VM's, per CPU-second).
    pub cost_micros: u64,
}

/// Prices one burst over `[from_ms, to_ms)`, at the rates of `rates`.
pub fn bill_burst(rates: &RateCard, burst: &BurstRow, from_ms: i64, to_ms: i64) -> (u64, u128) {
    let (start, end) = (burst.from_ms.max(from_ms), burst.to_ms.min(to_ms));
    if end <= start {
        return (0, 0);
    }
    let per_vcpu = rates.burst_per_vcpu_hour;
    let cpus = u64::from(burst.cpus);
    let card = RateCard {
        per_hour: Rate {
            peak: per_vcpu.peak.saturating_mul(cpus),
            off_peak: per_vcpu.off_peak.saturating_mul(cpus),
        },
        per_cpu_second: Rate::default(),
        per_gib_transferred: Rate::default(),
        ..*rates
    };
    let (a, b) = (start.max(0) as u64, end.max(0) as u64);
    let fine = price_interval_fine(&card, &sample(a, 0, 0), &sample(b, 0, 0), burst.memory_mib);
    (b - a, fine)
}

/// Whether the VM holds a running process (and its memory) in this state.
fn billable(state: VmState) -> bool {
    matches!(state, VmState::Running | VmState::Paused)
}

fn sample(at_ms: u64, cpu_ms: u64, net_bytes: u64) -> Sample {
    Sample {
        unix_ms: at_ms,
        cpu_ms,
        mem_kib: 0,
        net_bytes,
        workload: Workload::Running,
    }
}

fn time_only(rates: &RateCard) -> RateCard {
    RateCard {
        per_cpu_second: Rate::default(),
        per_gib_transferred: Rate::default(),
        ..*rates
    }
}

fn usage_only(rates: &RateCard) -> RateCard {
    RateCard {
        per_hour: Rate::default(),
        per_gib_hour_memory: Rate::default(),
        ..*rates
    }
}

/// Periods `[start, end)` within `[from_ms, to_ms)` during which the VM was billable.
pub fn billable_periods(history: &[(i64, VmState)], from_ms: i64, to_ms: i64) -> Vec<(i64, i64)> {
    let mut periods = Vec::new();
    for (idx, (at, state)) in history.iter().enumerate() {
        if !billable(*state) {
            continue;
        }
        let until = history.get(idx + 1).map(|(next, _)| *next).unwrap_or(to_ms);
        let (start, end) = ((*at).max(from_ms), until.min(to_ms));
        if end > start {
            periods.push((start, end));
        }
    }
    periods
}

/// Prices one VM over `[from_ms, to_ms)`. Usage between two samples is counted when the
/// later sample falls in the period; the first sample counts from zero (counters start
/// at boot). A counter that went down was reset (a new process) and counts from zero.
pub fn bill_vm(
    rates: &RateCard,
    vm: &LedgerVm,
    history: &[(i64, VmState)],
    samples: &[UsageRow],
    from_ms: i64,
    to_ms: i64,
) -> BillLine {
    let mut fine: u128 = 0;
    let mut billed_ms = 0u64;
    let mut memory_mib_ms = 0u128;
    let time_rates = time_only(rates);
    for (start, end) in billable_periods(history, from_ms, to_ms) {
        billed_ms = billed_ms.saturating_add((end - start).max(0) as u64);
        // A resize within the period splits it: each part at the memory it held.
        let mut cuts: Vec<i64> = vm
            .resized
            .iter()
            .map(|(at, _)| *at)
            .filter(|at| *at > start && *at < end)
            .collect();
        cuts.push(end);
        let mut from = start;
        for until in cuts {
            let memory_mib = vm.memory_at(from);
            let (a, b) = (from.max(0) as u64, until.max(0) as u64);
            memory_mib_ms =
                memory_mib_ms.saturating_add(u128::from(memory_mib) * u128::from(b - a));
            fine = fine.saturating_add(price_interval_fine(
                &time_rates,
                &sample(a, 0, 0),
                &sample(b, 0, 0),
                memory_mib,
            ));
            from = until;
        }
    }
    let usage_rates = usage_only(rates);
    let mut cpu_ms = 0u64;
    let mut net_bytes = 0u64;
    let mut prev: Option<&UsageRow> = None;
    for row in samples {
        let at = row.sampled_at_ms;
        if at > from_ms && at <= to_ms {
            let (base_cpu, base_net, base_at) = match prev {
                Some(p) if row.cpu_ms >= p.cpu_ms && row.net_bytes >= p.net_bytes => {
                    (p.cpu_ms, p.net_bytes, p.sampled_at_ms)
                }
                // First sample, or counters reset: count from zero.
                _ => (0, 0, at),
            };
            // Counters come from agents: a reset after a huge value must not wrap the sum.
            cpu_ms = cpu_ms.saturating_add(row.cpu_ms - base_cpu);
            net_bytes = net_bytes.saturating_add(row.net_bytes - base_net);
            fine = fine.saturating_add(price_interval_fine(
                &usage_rates,
                &sample(base_at.max(0) as u64, base_cpu, base_net),
                &sample(at.max(0) as u64, row.cpu_ms, row.net_bytes),
                vm.memory_mib,
            ));
        }
        prev = Some(row);
    }
    let mut bursts = Vec::new();
    for burst in &vm.bursts {
        let (burst_ms, burst_fine) = bill_burst(rates, burst, from_ms, to_ms);
        if burst_ms > 0 {
            fine = fine.saturating_add(burst_fine);
            bursts.push(BurstCharge {
                burst: *burst,
                billed_ms: burst_ms,
                cost_micros: fine_to_micros(burst_fine),
            });
        }
    }
    BillLine {
        vm: vm.clone(),
        billed_ms,
        cpu_ms,
        net_bytes,
        memory_mib_ms,
        cost_micros: fine_to_micros(fine),
        bursts,
    }
}

/// Micro-units as money with two decimals, rounded half up to the cent.
pub fn format_money(micros: u64) -> String {
    let cents = micros.saturating_add(5_000) / 10_000;
    format!("{}.{:02}", cents / 100, cents % 100)
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    fn vm(memory_mib: u64) -> LedgerVm {
        LedgerVm {
            vm: Uuid::from_u128(1),
            name: "a".into(),
            project: "p".into(),
            vcpus: 2,
            memory_mib,
            resized: Vec::new(),
            bursts: Vec::new(),
        }
    }

    fn row(at: i64, cpu_ms: u64, net_bytes: u64) -> UsageRow {
        UsageRow {
            sampled_at_ms: at,
            cpu_ms,
            mem_kib: 0,
            net_bytes,
            disk_bytes: 0,
        }
    }

    /// 2024-01-01T00:00:00Z, a whole hour, so peak windows are easy to place.
    const T0: i64 = 1_704_067_200_000;
    const HOUR: i64 = 3_600_000;

    /// A run priced by hand: 90 minutes running (2 GiB), then paused 30 minutes, then
    /// stopped; 1,500 CPU-seconds; 3 GiB transferred. Off-peak all day.
    #[test]
    fn bill_matches_a_hand_calculation_to_the_cent() {
        let rates = RateCard {
            per_hour: Rate {
                peak: 0,
                off_peak: 12_000,
            }, // 0.012 / hour
            per_cpu_second: Rate {
                peak: 0,
                off_peak: 25,
            }, // 0.000025 / CPU-s
            per_gib_hour_memory: Rate {
                peak: 0,
                off_peak: 4_000,
            }, // 0.004 / GiB-hour
            per_gib_transferred: Rate {
                peak: 0,
                off_peak: 90_000,
            }, // 0.09 / GiB
            peak_start_hour: 0,
            peak_end_hour: 0,
            burst_per_vcpu_hour: Default::default(),
        };
        let history = vec![
            (T0 - 5_000, VmState::Scheduled),
            (T0, VmState::Running),
            (T0 + 90 * 60_000, VmState::Paused),
            (T0 + 2 * HOUR, VmState::Stopped),
        ];
        let gib = 1u64 << 30;
        let samples = vec![
            row(T0 + 30 * 60_000, 500_000, gib),
            row(T0 + 60 * 60_000, 1_000_000, 2 * gib),
            row(T0 + 90 * 60_000, 1_500_000, 3 * gib),
        ];
        let line = bill_vm(
            &rates,
            &vm(2048),
            &history,
            &samples,
            T0 - HOUR,
            T0 + 3 * HOUR,
        );
        // Hand calculation, in micro-units:
        //   time:    2 h x 12,000                   =  24,000
        //   memory:  2 GiB x 2 h x 4,000            =  16,000
        //   cpu:     1,500 s x 25                   =  37,500
        //   network: 3 GiB x 90,000                 = 270,000
        //   total                                   = 347,500 = 0.3475 -> 0.35
        assert_eq!(line.billed_ms, 2 * HOUR as u64);
        assert_eq!(line.cpu_ms, 1_500_000);
        assert_eq!(line.net_bytes, 3 * gib);
        assert_eq!(line.cost_micros, 347_500);
        assert_eq!(format_money(line.cost_micros), "0.35");
    }

    /// Memory is billed at the size the VM held: 1 GiB for an hour, then 4 GiB for an
    /// hour after a resize, then paused at 4 GiB for half an hour.
    #[test]
    fn a_resize_bills_the_new_memory_from_when_it_was_sent() {
        let rates = RateCard {
            per_gib_hour_memory: Rate {
                peak: 0,
                off_peak: 10_000,
            },
            peak_start_hour: 0,
            peak_end_hour: 0,
            ..RateCard::default()
        };
        let history = vec![
            (T0, VmState::Running),
            (T0 + 2 * HOUR, VmState::Paused),
            (T0 + 5 * HOUR / 2, VmState::Stopped),
        ];
        let mut resized = vm(1024);
        resized.resized = vec![(T0 + HOUR, 4096)];
        let line = bill_vm(&rates, &resized, &history, &[], T0, T0 + 3 * HOUR);
        // 1 GiB-hour + 4 GiB-hours + 2 GiB-hours, at 10,000 each.
        assert_eq!(line.cost_micros, 70_000);
        assert_eq!(
            line.memory_mib_ms,
            (1024 + 4096 + 2048) as u128 * HOUR as u128
        );
        assert_eq!(line.billed_ms, 5 * HOUR as u64 / 2);
        assert_eq!(resized.memory_at(T0 - 1), 1024);
        assert_eq!(resized.memory_at(T0 + HOUR), 4096);
    }

    /// A burst of +2 vCPUs and +1 GiB for half an hour, then cut by the period's end:
    /// its memory at the memory price, its vCPUs at the burst price, priced by hand.
    #[test]
    fn a_burst_adds_its_memory_and_its_vcpus_for_its_lease() {
        let rates = RateCard {
            per_gib_hour_memory: Rate {
                peak: 0,
                off_peak: 10_000,
            },
            burst_per_vcpu_hour: Rate {
                peak: 0,
                off_peak: 6_000,
            },
            peak_start_hour: 0,
            peak_end_hour: 0,
            ..RateCard::default()
        };
        let history = vec![(T0, VmState::Running)];
        let mut burst = vm(1024);
        burst.bursts = vec![
            BurstRow {
                cpus: 2,
                memory_mib: 1024,
                from_ms: T0 + HOUR,
                to_ms: T0 + 3 * HOUR / 2,
            },
            BurstRow {
                cpus: 1,
                memory_mib: 0,
                from_ms: T0 + 5 * HOUR / 2,
                to_ms: T0 + 4 * HOUR,
            },
        ];
        let line = bill_vm(&rates, &burst, &history, &[], T0, T0 + 3 * HOUR);
        // The VM: 1 GiB for 3 hours = 30,000. The first burst: 1 GiB and 2 vCPUs for
        // half an hour = 5,000 + 6,000. The second, cut to half an hour: 3,000.
        assert_eq!(line.bursts.len(), 2);
        assert_eq!(line.bursts[0].cost_micros, 11_000);
        assert_eq!(line.bursts[1].billed_ms, HOUR as u64 / 2);
        assert_eq!(line.bursts[1].cost_micros, 3_000);
        assert_eq!(line.cost_micros, 30_000 + 11_000 + 3_000);
        // Outside the period, a burst costs nothing.
        let before = bill_vm(&rates, &burst, &history, &[], T0, T0 + HOUR);
        assert!(before.bursts.is_empty());
        assert_eq!(before.cost_micros, 10_000);
    }

    #[test]
    fn peak_hours_are_priced_at_peak() {
        let rates = RateCard {
            per_hour: Rate {
                peak: 100_000,
                off_peak: 10_000,
            },
            peak_start_hour: 1,
            peak_end_hour: 2,
            ..RateCard::default()
        };
        // Running 00:30 to 01:30: half an hour off-peak, half an hour at peak.
        let history = vec![
            (T0 + HOUR / 2, VmState::Running),
            (T0 + 3 * HOUR / 2, VmState::Stopped),
        ];
        let line = bill_vm(&rates, &vm(0), &history, &[], T0, T0 + 4 * HOUR);
        assert_eq!(line.cost_micros, 5_000 + 50_000);
    }

    #[test]
    fn counter_reset_counts_from_zero_and_window_clips() {
        let rates = RateCard {
            per_cpu_second: Rate {
                peak: 1_000,
                off_peak: 1_000,
            },
            ..RateCard::default()
        };
        let samples = vec![
            row(T0 + 1_000, 10_000, 0),
            row(T0 + 2_000, 4_000, 0),
            row(T0 + 3_000, 6_000, 0),
        ];
        // A new process after the first sample: 10 s, then 4 s from zero, then 2 s.
        let all = bill_vm(&rates, &vm(0), &[], &samples, T0, T0 + 10_000);
        assert_eq!(all.cpu_ms, 16_000);
        assert_eq!(all.cost_micros, 16_000);
        // Only the last interval falls after T0 + 2,500.
        let tail = bill_vm(&rates, &vm(0), &[], &samples, T0 + 2_500, T0 + 10_000);
        assert_eq!(tail.cpu_ms, 2_000);
    }

    /// Agents report the counters; one that claims u64::MAX and then resets must not
    /// wrap the bill (a panic in debug builds, a tiny bill in release).
    #[test]
    fn hostile_counters_saturate_instead_of_wrapping() {
        let rates = RateCard {
            per_cpu_second: Rate {
                peak: u64::MAX,
                off_peak: u64::MAX,
            },
            ..RateCard::default()
        };
        let samples = vec![
            row(T0 + 1_000, u64::MAX, u64::MAX),
            row(T0 + 2_000, 1, 1),
            row(T0 + 3_000, u64::MAX, u64::MAX),
        ];
        let line = bill_vm(&rates, &vm(u64::MAX), &[], &samples, T0, T0 + 10_000);
        assert_eq!(line.cpu_ms, u64::MAX);
        assert_eq!(line.net_bytes, u64::MAX);
        assert_eq!(line.cost_micros, u64::MAX);
        assert_eq!(
            format_money(u64::MAX),
            format!("{}.{:02}", u64::MAX / 1_000_000, 55)
        );
    }

    #[test]
    fn money_rounds_half_up_to_the_cent() {
        assert_eq!(format_money(0), "0.00");
        assert_eq!(format_money(4_999), "0.00");
        assert_eq!(format_money(5_000), "0.01");
        assert_eq!(format_money(12_345_678), "12.35");
    }
}
