//! The flags of `herd sim`, and the one parser they need beyond clap's: the rest of the
//! sim takes its settings from here already checked.

use crate::Output;
use anyhow::{anyhow, Result};
use std::path::PathBuf;
use std::time::Duration;

#[derive(clap::Args)]
pub struct SimArgs {
    /// Simulated hosts (agents) to run in this process.
    #[arg(long, default_value_t = 10)]
    pub hosts: usize,
    /// VMs per host; the sim launches what is missing to reach hosts x this.
    #[arg(long, default_value_t = 10)]
    pub vms_per_host: usize,
    /// Percent of all VMs flipped (paused or resumed, as if by their guests) per sync
    /// interval while measuring.
    #[arg(long, default_value_t = 1.0)]
    pub churn: f64,
    /// More churn rates to measure after the first, each for --duration on the same
    /// VMs: sync lag against churn, in one launch.
    #[arg(long, value_delimiter = ',')]
    pub churn_steps: Vec<f64>,
    /// How long to measure: seconds, or a duration like `90s`, `5m`.
    #[arg(long, default_value = "30")]
    pub duration: String,
    #[arg(short, long, value_enum, default_value = "table")]
    pub output: Output,
    /// Where the simulated hosts keep their credentials and VMs, reused across runs
    /// (default: herd's data dir, `sim/`).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// At the end, stop this many agents abruptly and time how long the server takes
    /// to mark their hosts down.
    #[arg(long, default_value_t = 0)]
    pub kill_hosts: usize,
    /// After measuring, keep running until every agent has lost its server and resynced
    /// in full (restart the server meanwhile).
    #[arg(long)]
    pub wait_resync: bool,
    /// How long --wait-resync waits.
    #[arg(long, default_value = "300")]
    pub resync_timeout: String,
    /// Hosts joining or connecting at the same time.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// How long each setup phase (start, launch, boot, the server catching up) may take.
    #[arg(long, default_value = "600")]
    pub setup_timeout: String,
    /// Boot time of simulated VMs.
    #[arg(long, default_value_t = 300)]
    pub boot_ms: u64,
    /// Let simulated VMs report usage counters too (off: only state sync is measured).
    #[arg(long)]
    pub usage: bool,
}

/// Seconds (`30`, `1.5`) or a humantime duration (`90s`, `5m`).
pub(super) fn parse_duration(what: &str, text: &str) -> Result<Duration> {
    if let Ok(seconds) = text.parse::<f64>() {
        if seconds.is_finite() && seconds >= 0.0 {
            return Ok(Duration::from_secs_f64(seconds));
        }
    }
    humantime::parse_duration(text).map_err(|e| {
        anyhow!("--{what}: {text:?} is not a duration (seconds, or e.g. 90s, 5m): {e}")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_seconds_or_humantime() {
        assert_eq!(parse_duration("d", "5").expect("5"), Duration::from_secs(5));
        assert_eq!(
            parse_duration("d", "2m").expect("2m"),
            Duration::from_secs(120)
        );
        assert!(parse_duration("d", "soon").is_err());
    }
}
