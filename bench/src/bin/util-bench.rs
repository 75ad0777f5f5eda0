//! What the per-node utility module costs its host: CPU time and peak resident memory
//! of a real `herd-util` over a fixed run, at its default interval and at ten times
//! that rate, against a baseline measured in the same run: a shell loop that only
//! reads the same /proc files each interval (what a script-based node monitor does
//! before it parses anything).

use anyhow::{bail, Context, Result};
use clap::Parser;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

#[derive(Parser)]
struct Args {
    /// Seconds each side runs.
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// The herd-util binary (default: next to this one).
    #[arg(long)]
    util: Option<PathBuf>,
}

struct Cost {
    cpu_ms: f64,
    peak_rss_kib: u64,
}

/// utime+stime and VmHWM of a live process.
fn cost_of(pid: u32) -> Result<Cost> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .context("no ')' in stat")?
        .1
        .split_whitespace()
        .collect();
    // After the command: state is field 3, utime 14, stime 15, cutime 16, cstime 17.
    let ticks: u64 = fields
        .get(11..15)
        .context("short stat")?
        .iter()
        .map(|f| f.parse::<u64>().unwrap_or(0))
        .sum();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let peak_rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    // USER_HZ is 100 on Linux.
    Ok(Cost {
        cpu_ms: ticks as f64 * 10.0,
        peak_rss_kib,
    })
}

/// Runs `child` for `seconds`, then reads its cost while it is still alive.
fn measure(mut child: Child, seconds: u64) -> Result<Cost> {
    std::thread::sleep(Duration::from_secs(seconds));
    if let Some(status) = child.try_wait()? {
        bail!("the measured process ended early: {status}");
    }
    let cost = cost_of(child.id());
    let _ = child.kill();
    let _ = child.wait();
    cost
}

fn util_run(util: &Path, data_dir: &Path, interval_ms: u64, seconds: u64) -> Result<Cost> {
    let child = Command::new(util)
        .arg("--data-dir")
        .arg(data_dir)
        .arg("--interval-ms")
        .arg(interval_ms.to_string())
        .stdout(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", util.display()))?;
    measure(child, seconds)
}

fn shell_run(interval_ms: u64, seconds: u64) -> Result<Cost> {
    let script = format!(
        "while :; do cat /proc/stat /proc/meminfo /proc/loadavg /proc/diskstats \
         /proc/net/dev >/dev/null; sleep {}; done",
        interval_ms as f64 / 1000.0
    );
    let child = Command::new("sh").arg("-c").arg(script).spawn()?;
    measure(child, seconds)
}

fn main() -> Result<()> {
    let args = Args::parse();
    let util = match args.util {
        Some(path) => path,
        None => std::env::current_exe()?
            .parent()
            .context("no parent dir")?
            .join("herd-util"),
    };
    let data_dir = tempfile::tempdir()?;
    println!(
        "herd-util vs a shell loop reading the same /proc files, {} s each; CPU is user+sys",
        args.seconds
    );
    println!(
        "{:>10} {:>14} {:>12} {:>14} {:>12} {:>10}",
        "interval", "util CPU ms", "util RSS", "shell CPU ms", "shell RSS", "CPU ratio"
    );
    for interval_ms in [1000, 100] {
        let util_cost = util_run(&util, data_dir.path(), interval_ms, args.seconds)?;
        let shell_cost = shell_run(interval_ms, args.seconds)?;
        let ratio = if util_cost.cpu_ms > 0.0 {
            format!("{:.1}x", shell_cost.cpu_ms / util_cost.cpu_ms)
        } else {
            "util<1tick".into()
        };
        println!(
            "{:>8}ms {:>14.0} {:>9} KiB {:>14.0} {:>9} KiB {:>10}",
            interval_ms,
            util_cost.cpu_ms,
            util_cost.peak_rss_kib,
            shell_cost.cpu_ms,
            shell_cost.peak_rss_kib,
            ratio
        );
    }
    println!("CPU ratio: the shell loop's CPU over herd-util's (higher: herd-util is cheaper)");
    Ok(())
}
