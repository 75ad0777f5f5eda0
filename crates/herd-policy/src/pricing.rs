//! Pricing of usage with a [`RateCard`], exact in integer arithmetic.
//!
//! Every price is first computed in *fine units*: [`FINE_PER_MICRO`] fine units make one
//! micro-unit of money. The constant is the least common multiple of every denominator a
//! rate card needs (ms per hour, ms per second, MiB per GiB times ms per hour, bytes per
//! GiB), so the price of any interval is an exact integer of fine units and sums of
//! intervals are exact. A bill rounds down to the micro-unit once, at the end
//! ([`fine_to_micros`]); [`price_interval`] does that for a single interval.
//!
//! Peak and off-peak: the time-based components (`per_hour`, `per_gib_hour_memory`) are
//! split exactly at UTC hour boundaries. The usage-based components (`per_cpu_second`,
//! `per_gib_transferred`) are priced at the rate in force at the *start* of the interval,
//! because a counter delta carries no information about when inside the interval it was
//! used; with ~1 s samples that attributes at most one sample's usage to the neighbouring
//! period.

use crate::Sample;
use herd_proto::policy::{Rate, RateCard};

/// Fine units per micro-unit: 2^30 * 3^2 * 5^5.
pub const FINE_PER_MICRO: u128 = (1u128 << 30) * 9 * 3125;

const MS_PER_HOUR: u64 = 3_600_000;
const MS_PER_DAY: u64 = 24 * MS_PER_HOUR;
/// Fine units per (micro per hour x ms): FINE / 3_600_000.
const FINE_HOUR_MS: u128 = FINE_PER_MICRO / MS_PER_HOUR as u128;
/// Fine units per (micro per cpu-second x cpu-ms): FINE / 1000.
const FINE_CPU_MS: u128 = FINE_PER_MICRO / 1000;
/// Fine units per (micro per GiB-hour x MiB x ms): FINE / (1024 * 3_600_000).
const FINE_MIB_MS: u128 = FINE_PER_MICRO / (1024 * MS_PER_HOUR as u128);
/// Fine units per (micro per GiB x byte): FINE / 2^30.
const FINE_BYTE: u128 = FINE_PER_MICRO / (1u128 << 30);

// The denominators must divide FINE_PER_MICRO exactly, or prices would not be exact.
const _: () = assert!(FINE_HOUR_MS * MS_PER_HOUR as u128 == FINE_PER_MICRO);
const _: () = assert!(FINE_CPU_MS * 1000 == FINE_PER_MICRO);
const _: () = assert!(FINE_MIB_MS * 1024 * MS_PER_HOUR as u128 == FINE_PER_MICRO);
const _: () = assert!(FINE_BYTE * (1u128 << 30) == FINE_PER_MICRO);

/// Whole micro-units in an amount of fine units, rounded down.
pub fn fine_to_micros(fine: u128) -> u64 {
    u64::try_from(fine / FINE_PER_MICRO).unwrap_or(u64::MAX)
}

/// Whether UTC hour `hour` (0..24) is peak under `rates`. Equal start and end hours mean
/// there is no peak period; a start after the end wraps around midnight.
pub fn is_peak_hour(rates: &RateCard, hour: u64) -> bool {
    let (start, end) = (
        u64::from(rates.peak_start_hour),
        u64::from(rates.peak_end_hour),
    );
    match start.cmp(&end) {
        std::cmp::Ordering::Equal => false,
        std::cmp::Ordering::Less => start <= hour && hour < end,
        std::cmp::Ordering::Greater => hour >= start || hour < end,
    }
}

fn rate_at(rate: &Rate, peak: bool) -> u128 {
    u128::from(if peak { rate.peak } else { rate.off_peak })
}

/// Peak milliseconds in `[0, t)` (unix ms).
fn peak_ms_before(rates: &RateCard, t: u64) -> u64 {
    let per_day: u64 = (0..24).filter(|h| is_peak_hour(rates, *h)).count() as u64 * MS_PER_HOUR;
    let days = t / MS_PER_DAY;
    let rest = t % MS_PER_DAY;
    let mut partial = 0;
    for hour in 0..24u64 {
        let start = hour * MS_PER_HOUR;
        if start >= rest {
            break;
        }
        if is_peak_hour(rates, hour) {
            partial += (rest - start).min(MS_PER_HOUR);
        }
    }
    days * per_day + partial
}

/// Peak milliseconds in `[from_ms, to_ms)`.
pub fn peak_ms_between(rates: &RateCard, from_ms: u64, to_ms: u64) -> u64 {
    if to_ms <= from_ms {
        return 0;
    }
    peak_ms_before(rates, to_ms) - peak_ms_before(rates, from_ms)
}

/// A counter's growth between two readings; a counter that went down was reset (the VM
/// rebooted), and everything it shows now is new.
pub(crate) fn counter_delta(before: u64, after: u64) -> u64 {
    if after >= before {
        after - before
    } else {
        after
    }
}

/// The price of the interval `from..to` in fine units. `include_time` false prices only
/// the usage components (used for intervals the VM did not run through, see the
/// evaluator's gap rule).
pub(crate) fn price_fine(
    rates: &RateCard,
    from: &Sample,
    to: &Sample,
    memory_mib: u64,
    include_time: bool,
) -> u128 {
    let mut total: u128 = 0;
    if include_time {
        let dt = to.unix_ms.saturating_sub(from.unix_ms);
        let peak_ms = peak_ms_between(rates, from.unix_ms, to.unix_ms);
        let off_ms = dt - peak_ms;
        for (ms, peak) in [(peak_ms, true), (off_ms, false)] {
            let ms = u128::from(ms);
            total = total.saturating_add(
                rate_at(&rates.per_hour, peak)
                    .saturating_mul(ms)
                    .saturating_mul(FINE_HOUR_MS),
            );
            total = total.saturating_add(
                rate_at(&rates.per_gib_hour_memory, peak)
                    .saturating_mul(u128::from(memory_mib))
                    .saturating_mul(ms)
                    .saturating_mul(FINE_MIB_MS),
            );
        }
    }
    let start_peak = is_peak_hour(rates, (from.unix_ms % MS_PER_DAY) / MS_PER_HOUR);
    let cpu_ms = u128::from(counter_delta(from.cpu_ms, to.cpu_ms));
    let net = u128::from(counter_delta(from.net_bytes, to.net_bytes));
    total = total.saturating_add(
        rate_at(&rates.per_cpu_second, start_peak)
            .saturating_mul(cpu_ms)
            .saturating_mul(FINE_CPU_MS),
    );
    total.saturating_add(
        rate_at(&rates.per_gib_transferred, start_peak)
            .saturating_mul(net)
            .saturating_mul(FINE_BYTE),
    )
}

/// The exact price of the usage between two samples of one VM with `memory_mib`
/// allocated, in fine units (see the module docs). Sum these and round once with
/// [`fine_to_micros`].
pub fn price_interval_fine(rates: &RateCard, from: &Sample, to: &Sample, memory_mib: u64) -> u128 {
    price_fine(rates, from, to, memory_mib, true)
}

/// The price of the usage between two samples of one VM with `memory_mib` allocated, in
/// micro-units, rounded down. Time components are split at UTC hour boundaries; CPU and
/// network are priced at the rate in force at `from` (see the module docs).
pub fn price_interval(rates: &RateCard, from: &Sample, to: &Sample, memory_mib: u64) -> u64 {
    fine_to_micros(price_interval_fine(rates, from, to, memory_mib))
}
