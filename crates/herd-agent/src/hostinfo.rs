//! Capacity and utilization of this host, read from /proc.
//!
//! Readings are shared by every agent in the process for a short while: `herd sim` runs
//! thousands of agents in one process, and each reading /proc/stat and /proc/meminfo
//! every interval would cost more than the rest of their sync loops. One agent per
//! process (the normal case) reports once a second and always reads afresh.

use herd_proto::wire::Capacity;
use parking_lot::Mutex;
use std::time::{Duration, Instant};

/// How long one reading of /proc serves every agent in the process.
const READING_TTL: Duration = Duration::from_millis(200);

type Reading<T> = Mutex<Option<(Instant, T)>>;

static CPU_JIFFIES: Reading<Option<(u64, u64)>> = Mutex::new(None);
static MEM_USED_MIB: Reading<u64> = Mutex::new(None);

/// The value read within the last [`READING_TTL`], or a new reading.
fn shared<T: Copy>(cell: &Reading<T>, read: impl FnOnce() -> T) -> T {
    let mut slot = cell.lock();
    if let Some((at, value)) = *slot {
        if at.elapsed() < READING_TTL {
            return value;
        }
    }
    let value = read();
    *slot = Some((Instant::now(), value));
    value
}

/// CPUs and memory of the host.
pub fn capacity() -> Capacity {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1);
    let memory_mib = meminfo_kib(&read_meminfo(), "MemTotal:").unwrap_or(0) / 1024;
    Capacity { cpus, memory_mib }
}

/// Memory in use, in MiB (total minus available).
pub fn mem_used_mib() -> u64 {
    shared(&MEM_USED_MIB, || {
        let text = read_meminfo();
        let total = meminfo_kib(&text, "MemTotal:").unwrap_or(0);
        let available = meminfo_kib(&text, "MemAvailable:").unwrap_or(total);
        total.saturating_sub(available) / 1024
    })
}

fn read_meminfo() -> String {
    std::fs::read_to_string("/proc/meminfo").unwrap_or_default()
}

fn meminfo_kib(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find(|line| line.starts_with(key))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Busy and total jiffies of all CPUs, from the first line of /proc/stat.
fn cpu_jiffies() -> Option<(u64, u64)> {
    shared(&CPU_JIFFIES, || {
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
        Some((total.saturating_sub(idle), total))
    })
}

/// Host CPU busy between successive calls, in thousandths.
#[derive(Debug, Default)]
pub struct CpuMeter {
    last: Option<(u64, u64)>,
    last_permille: u16,
}

impl CpuMeter {
    pub fn sample(&mut self) -> u16 {
        let Some(now) = cpu_jiffies() else { return 0 };
        match self.last {
            Some((busy, total)) if now.1 > total => {
                self.last_permille =
                    ((now.0.saturating_sub(busy)) * 1000 / (now.1 - total)).min(1000) as u16;
            }
            // The same shared reading as last time: nothing new to say.
            Some(last) if last == now => return self.last_permille,
            _ => self.last_permille = 0,
        }
        self.last = Some(now);
        self.last_permille
    }
}
