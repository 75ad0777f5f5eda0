//! Guest-wide counters from /proc, parsed by pure functions so they test without a VM.

/// Busy CPU time of all CPUs since boot, in milliseconds, from /proc/stat's `cpu` line.
pub fn cpu_ms(proc_stat: &str) -> u64 {
    let Some(line) = proc_stat.lines().find(|l| l.starts_with("cpu ")) else {
        return 0;
    };
    let fields: Vec<u64> = line
        .split_ascii_whitespace()
        .skip(1)
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    // user nice system idle iowait irq softirq steal: everything but idle and iowait.
    let busy: u64 = fields
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4 && *i < 8)
        .map(|(_, v)| *v)
        .sum();
    // USER_HZ is 100 on Linux x86_64.
    busy * 10
}

/// Number of CPUs, from the `cpuN` lines of /proc/stat (at least 1).
pub fn n_cpus(proc_stat: &str) -> u32 {
    let n = proc_stat
        .lines()
        .filter(|l| {
            l.strip_prefix("cpu")
                .is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_digit()))
        })
        .count();
    (n as u32).max(1)
}

/// Memory in use (MemTotal - MemAvailable), in KiB.
pub fn mem_kib(meminfo: &str) -> u64 {
    let field = |name: &str| {
        meminfo
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_ascii_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    field("MemTotal:").saturating_sub(field("MemAvailable:"))
}

/// Received and sent bytes over every interface but loopback.
pub fn net_bytes(net_dev: &str) -> (u64, u64) {
    let mut rx = 0u64;
    let mut tx = 0u64;
    for line in net_dev.lines().skip(2) {
        let Some((name, rest)) = line.split_once(':') else {
            continue;
        };
        if name.trim() == "lo" {
            continue;
        }
        let f: Vec<u64> = rest
            .split_ascii_whitespace()
            .map(|v| v.parse().unwrap_or(0))
            .collect();
        rx = rx.saturating_add(f.first().copied().unwrap_or(0));
        tx = tx.saturating_add(f.get(8).copied().unwrap_or(0));
    }
    (rx, tx)
}

/// Resident memory from /proc/<pid>/smaps_rollup (`Rss:`) or /proc/<pid>/status
/// (`VmRSS:`), in KiB.
pub fn rss_kib(status: &str) -> u64 {
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:") || l.starts_with("Rss:"))
        .and_then(|l| l.split_ascii_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_files() {
        assert_eq!(cpu_ms("cpu  10 1 5 1000 7 1 1 0 0 0\ncpu0 1 1 1 1"), 180);
        assert_eq!(
            mem_kib("MemTotal:  1000 kB\nMemFree: 1 kB\nMemAvailable:  400 kB\n"),
            600
        );
        let dev = "Inter-|   Receive\n face |bytes\n    lo: 5 1 0 0 0 0 0 0 5 1 0 0 0 0 0 0\n  eth0: 100 2 0 0 0 0 0 0 50 1 0 0 0 0 0 0\n";
        assert_eq!(net_bytes(dev), (100, 50));
        assert_eq!(n_cpus("cpu  1 2\ncpu0 1\ncpu1 1\nintr 5"), 2);
        assert_eq!(rss_kib("Name: x\nVmRSS:\t  1234 kB\n"), 1234);
        assert_eq!(
            rss_kib("55-66 ---p 0 00:00 0 [rollup]\nRss:  880 kB\n"),
            880
        );
    }
}
