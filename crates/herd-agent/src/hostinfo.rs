//! Capacity and utilization of this host, read from /proc.

use herd_proto::wire::Capacity;

/// CPUs and memory of the host.
pub fn capacity() -> Capacity {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1);
    let memory_mib = meminfo_kib("MemTotal:").unwrap_or(0) / 1024;
    Capacity { cpus, memory_mib }
}

/// Memory in use, in MiB (total minus available).
pub fn mem_used_mib() -> u64 {
    let total = meminfo_kib("MemTotal:").unwrap_or(0);
    let available = meminfo_kib("MemAvailable:").unwrap_or(total);
    total.saturating_sub(available) / 1024
}

fn meminfo_kib(key: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    text.lines()
        .find(|line| line.starts_with(key))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Busy and total jiffies of all CPUs, from the first line of /proc/stat.
fn cpu_jiffies() -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    let line = text.lines().next()?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    let total: u64 = fields.iter().sum();
    // idle and iowait are the 4th and 5th fields.
    let idle = fields.get(3).copied().unwrap_or(0) + fields.get(4).copied().unwrap_or(0);
    Some((total - idle, total))
}

/// Host CPU busy between successive calls, in thousandths.
#[derive(Debug, Default)]
pub struct CpuMeter {
    last: Option<(u64, u64)>,
}

impl CpuMeter {
    pub fn sample(&mut self) -> u16 {
        let Some(now) = cpu_jiffies() else { return 0 };
        let permille = match self.last {
            Some((busy, total)) if now.1 > total => {
                ((now.0.saturating_sub(busy)) * 1000 / (now.1 - total)).min(1000) as u16
            }
            _ => 0,
        };
        self.last = Some(now);
        permille
    }
}
