//! What a run reports, as JSON or as a table: the one place that lists every figure a
//! run must fill in, and how each is printed.

use super::probe::ResyncDone;
use super::stats::Percentiles;
use serde::Serialize;

#[derive(Debug, Serialize)]
pub(super) struct Kill {
    pub(super) host: uuid::Uuid,
    pub(super) detect_ms: Option<u64>,
}

/// Lag measured at one of `--churn-steps`.
#[derive(Debug, Serialize)]
pub(super) struct ChurnStep {
    pub(super) churn_pct: f64,
    pub(super) changes_made: u64,
    pub(super) changes_acked: usize,
    pub(super) lag_ms: Option<Percentiles>,
}

#[derive(Debug, Serialize)]
pub(super) struct SimReport {
    pub(super) hosts: usize,
    pub(super) vms_per_host: usize,
    /// Sim VMs held by the hosts when measuring began.
    pub(super) vms: usize,
    pub(super) churn_pct: f64,
    pub(super) interval_ms: u64,
    pub(super) duration_s: f64,
    pub(super) hosts_joined: usize,
    pub(super) start_s: f64,
    pub(super) vms_launched: usize,
    pub(super) launch_s: f64,
    pub(super) boot_s: f64,
    /// Until the server had acked every report before measuring began.
    pub(super) settle_s: f64,
    pub(super) changes_made: u64,
    pub(super) changes_acked: usize,
    pub(super) lag_ms: Option<Percentiles>,
    pub(super) lag_intervals: Option<Percentiles>,
    /// Further churn rates, measured after the first (`--churn-steps`).
    pub(super) churn_steps: Vec<ChurnStep>,
    pub(super) reports_per_s: f64,
    pub(super) report_bytes_per_s: f64,
    pub(super) acks_per_s: f64,
    /// Reports and acks.
    pub(super) messages_per_s: f64,
    pub(super) disconnects: u64,
    /// The last resync after every host lost its server.
    pub(super) resync: Option<ResyncDone>,
    pub(super) resync_ms: Option<u64>,
    pub(super) partial_resyncs: usize,
    pub(super) kills: Vec<Kill>,
    pub(super) kill_detect_max_ms: Option<u64>,
    pub(super) kill_detect_mean_ms: Option<f64>,
    pub(super) rss_mib: f64,
    pub(super) peak_rss_mib: f64,
    pub(super) cpu_s: f64,
    /// CPU of this process while measuring, in percent of one core.
    pub(super) cpu_pct_measuring: f64,
}

pub(super) fn print_report(r: &SimReport) {
    println!(
        "hosts           {} ({} joined this run, all up in {:.1} s)",
        r.hosts, r.hosts_joined, r.start_s
    );
    println!(
        "VMs             {} ({} launched in {:.1} s, all running {:.1} s later, acked {:.1} s later)",
        r.vms, r.vms_launched, r.launch_s, r.boot_s, r.settle_s
    );
    println!(
        "churn           {}% per {} ms interval for {:.1} s",
        r.churn_pct, r.interval_ms, r.duration_s
    );
    println!(
        "changes         {} made, {} acked",
        r.changes_made, r.changes_acked
    );
    match (&r.lag_ms, &r.lag_intervals) {
        (Some(ms), Some(iv)) => println!(
            "sync lag (ms)   p50 {:.0}  p90 {:.0}  p99 {:.0}  max {:.0}  ({:.2} / {:.2} / {:.2} / {:.2} intervals)",
            ms.p50, ms.p90, ms.p99, ms.max, iv.p50, iv.p90, iv.p99, iv.max
        ),
        _ => println!("sync lag        no changes measured"),
    }
    for step in &r.churn_steps {
        match &step.lag_ms {
            Some(ms) => println!(
                "  at {:>5}%     p50 {:.0}  p99 {:.0}  max {:.0} ms ({} made, {} acked)",
                step.churn_pct, ms.p50, ms.p99, ms.max, step.changes_made, step.changes_acked
            ),
            None => println!("  at {:>5}%     no changes measured", step.churn_pct),
        }
    }
    println!(
        "traffic         {:.0} reports/s ({:.0} B/s), {:.0} acks/s",
        r.reports_per_s, r.report_bytes_per_s, r.acks_per_s
    );
    println!("disconnects     {}", r.disconnects);
    match &r.resync {
        Some(resync) => println!(
            "resync          {} hosts in {} ms ({} ms from the first reconnect); {} partial",
            resync.hosts,
            resync.resync_ms,
            resync
                .from_first_reconnect_ms
                .map(|ms| ms.to_string())
                .unwrap_or_else(|| "-".into()),
            r.partial_resyncs
        ),
        None if r.partial_resyncs > 0 => {
            println!(
                "resync          {} partial, none of every host",
                r.partial_resyncs
            )
        }
        None => {}
    }
    if !r.kills.is_empty() {
        let missed = r.kills.iter().filter(|k| k.detect_ms.is_none()).count();
        println!(
            "killed hosts    {} marked down after max {} ms, mean {} ms{}",
            r.kills.len(),
            r.kill_detect_max_ms
                .map(|ms| ms.to_string())
                .unwrap_or_else(|| "-".into()),
            r.kill_detect_mean_ms
                .map(|ms| format!("{ms:.0}"))
                .unwrap_or_else(|| "-".into()),
            if missed > 0 {
                format!(" ({missed} never)")
            } else {
                String::new()
            }
        );
    }
    println!(
        "this process    RSS {:.0} MiB (peak {:.0}), CPU {:.1} s, {:.0}% of a core while measuring",
        r.rss_mib, r.peak_rss_mib, r.cpu_s, r.cpu_pct_measuring
    );
}
