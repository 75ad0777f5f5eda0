//! Raw measurements become figures here: nearest-rank percentiles of the lags, and
//! what the counters and this process's CPU time grew by over a measuring window.

use super::probe::Shared;
use herd_agent::agent::unix_ms;
use serde::Serialize;
use std::sync::atomic::Ordering;
use std::time::Instant;

#[derive(Debug, Serialize)]
pub(super) struct Percentiles {
    pub(super) p50: f64,
    pub(super) p90: f64,
    pub(super) p99: f64,
    pub(super) max: f64,
}

impl Percentiles {
    pub(super) fn of(sorted: &[u32], scale: f64) -> Option<Percentiles> {
        let at = |q: f64| {
            let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
            f64::from(sorted[rank - 1]) * scale
        };
        let max = *sorted.last()?;
        Some(Percentiles {
            p50: at(0.50),
            p90: at(0.90),
            p99: at(0.99),
            max: f64::from(max) * scale,
        })
    }
}

/// RSS, peak RSS (MiB) and CPU time (s) of this process, from /proc.
pub(super) fn process_stats() -> (f64, f64, f64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command (which may hold spaces): utime and stime are the 14th
    // and 15th fields overall, in clock ticks (100 per second on Linux).
    let after = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |n: usize| fields.get(n).and_then(|v| v.parse::<f64>().ok());
    let cpu_s = ticks(11).unwrap_or(0.0) / 100.0 + ticks(12).unwrap_or(0.0) / 100.0;
    (kib("VmRSS:") / 1024.0, kib("VmHWM:") / 1024.0, cpu_s)
}

/// Counters at the start of the measuring window, and their growth over it.
pub(super) struct Window {
    pub(super) seconds: f64,
    pub(super) reports: u64,
    pub(super) report_bytes: u64,
    pub(super) acks: u64,
    pub(super) cpu_s: f64,
}

pub(super) struct WindowStart {
    at: Instant,
    reports: u64,
    report_bytes: u64,
    acks: u64,
    cpu_s: f64,
}

impl Window {
    pub(super) fn start(shared: &Shared) -> WindowStart {
        // Open-ended until `churn` closes it; an earlier phase may have closed it.
        shared.window_to_ms.store(u64::MAX, Ordering::Relaxed);
        shared.window_from_ms.store(unix_ms(), Ordering::Relaxed);
        WindowStart {
            at: Instant::now(),
            reports: shared.n_reports.load(Ordering::Relaxed),
            report_bytes: shared.n_report_bytes.load(Ordering::Relaxed),
            acks: shared.n_acks.load(Ordering::Relaxed),
            cpu_s: process_stats().2,
        }
    }
}

impl WindowStart {
    pub(super) fn end(self, shared: &Shared) -> Window {
        Window {
            seconds: self.at.elapsed().as_secs_f64(),
            reports: shared.n_reports.load(Ordering::Relaxed) - self.reports,
            report_bytes: shared.n_report_bytes.load(Ordering::Relaxed) - self.report_bytes,
            acks: shared.n_acks.load(Ordering::Relaxed) - self.acks,
            cpu_s: process_stats().2 - self.cpu_s,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_take_the_nearest_rank() {
        let lags: Vec<u32> = (1..=100).collect();
        let p = Percentiles::of(&lags, 1.0).expect("some");
        assert_eq!((p.p50, p.p90, p.p99, p.max), (50.0, 90.0, 99.0, 100.0));
        assert!(Percentiles::of(&[], 1.0).is_none());
        let one = Percentiles::of(&[7], 0.5).expect("one");
        assert_eq!((one.p50, one.max), (3.5, 3.5));
    }
}
