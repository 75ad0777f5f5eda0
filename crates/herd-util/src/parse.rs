//! Pure readers of the kernel's text files. Each takes a file's contents and returns
//! the figures herd needs, or `None` when the text is not what the kernel writes; none
//! of them panics on any input (property-tested).

/// Busy and total jiffies of all CPUs, from the `cpu` line of /proc/stat. Idle and
/// iowait count as not busy.
pub fn cpu_jiffies(stat: &str) -> Option<(u64, u64)> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let fields: Vec<u64> = line
        .split_ascii_whitespace()
        .skip(1)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    if fields.len() < 4 {
        return None;
    }
    // Guest time is already counted in user time; only the first eight fields add up.
    let total: u64 = fields
        .iter()
        .take(8)
        .fold(0u64, |a, b| a.saturating_add(*b));
    let idle = fields[3].saturating_add(fields.get(4).copied().unwrap_or(0));
    Some((total.saturating_sub(idle), total))
}

/// A `Key:   N kB` figure of /proc/meminfo, in KiB.
pub fn meminfo_kib(meminfo: &str, key: &str) -> Option<u64> {
    meminfo
        .lines()
        .find_map(|line| line.strip_prefix(key)?.strip_prefix(':'))?
        .split_ascii_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Total and used (total minus available) memory, in KiB.
pub fn memory_kib(meminfo: &str) -> Option<(u64, u64)> {
    let total = meminfo_kib(meminfo, "MemTotal")?;
    let available = meminfo_kib(meminfo, "MemAvailable").unwrap_or(total);
    Some((total, total.saturating_sub(available)))
}

/// The 1-minute load average of /proc/loadavg, in hundredths.
pub fn load1_centi(loadavg: &str) -> Option<u32> {
    let first = loadavg.split_ascii_whitespace().next()?;
    let (whole, frac) = first.split_once('.').unwrap_or((first, "0"));
    let whole: u32 = whole.parse().ok()?;
    let frac: String = frac.chars().chain("00".chars()).take(2).collect();
    let frac: u32 = frac.parse().ok()?;
    whole.checked_mul(100)?.checked_add(frac)
}

/// Received and sent bytes per interface of /proc/net/dev, loopback left out.
pub fn net_dev(text: &str) -> Vec<(String, u64, u64)> {
    text.lines()
        .filter_map(|line| {
            let (name, rest) = line.split_once(':')?;
            let name = name.trim();
            if name.is_empty() || name == "lo" || name.contains(' ') {
                return None;
            }
            let fields: Vec<&str> = rest.split_ascii_whitespace().collect();
            let rx = fields.first()?.parse().ok()?;
            let tx = fields.get(8)?.parse().ok()?;
            Some((name.to_owned(), rx, tx))
        })
        .collect()
}

/// The name and bytes read and written of the device `major:minor` in /proc/diskstats.
pub fn diskstats(text: &str, major: u64, minor: u64) -> Option<(String, u64, u64)> {
    text.lines().find_map(|line| {
        let f: Vec<&str> = line.split_ascii_whitespace().collect();
        if f.len() < 10 || f[0].parse() != Ok(major) || f[1].parse() != Ok(minor) {
            return None;
        }
        // Sectors are 512 bytes whatever the device's own sector size.
        let read: u64 = f[5].parse().ok()?;
        let written: u64 = f[9].parse().ok()?;
        Some((
            f[2].to_owned(),
            read.saturating_mul(512),
            written.saturating_mul(512),
        ))
    })
}

/// What follows the command name of /proc/<pid>/stat (the name is in parentheses and
/// may itself hold spaces or parentheses).
fn after_comm(stat: &str) -> Option<&str> {
    stat.get(stat.rfind(')')? + 1..)
}

/// The state letter of /proc/<pid>/stat (`R`, `S`, `Z`, ...).
pub fn state_letter(stat: &str) -> Option<char> {
    after_comm(stat)?
        .split_ascii_whitespace()
        .next()?
        .chars()
        .next()
}

/// The command name of /proc/<pid>/stat.
pub fn comm(stat: &str) -> Option<&str> {
    stat.get(stat.find('(')? + 1..stat.rfind(')')?)
}

/// utime + stime of /proc/<pid>/stat, in clock ticks.
pub fn cpu_ticks(stat: &str) -> Option<u64> {
    let mut fields = after_comm(stat)?.split_ascii_whitespace();
    // After the name: state(0) ppid(1) ... utime(11) stime(12).
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime.saturating_add(stime))
}

/// Resident pages of /proc/<pid>/statm.
pub fn resident_pages(statm: &str) -> Option<u64> {
    statm.split_ascii_whitespace().nth(1)?.parse().ok()
}

/// `VmRSS` of /proc/<pid>/status, in KiB.
pub fn status_rss_kib(status: &str) -> Option<u64> {
    meminfo_kib(status, "VmRSS")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn reads_the_kernels_files() {
        let stat = "cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 50 0 25 400 25 0 0 0 0 0\n";
        assert_eq!(cpu_jiffies(stat), Some((150, 1000)));
        let meminfo = "MemTotal:       24000000 kB\nMemFree:  1 kB\nMemAvailable:   20000000 kB\n";
        assert_eq!(memory_kib(meminfo), Some((24_000_000, 4_000_000)));
        assert_eq!(meminfo_kib(meminfo, "MemFree"), Some(1));
        assert_eq!(load1_centi("1.57 0.80 0.41 2/300 1234\n"), Some(157));
        assert_eq!(load1_centi("12.5 0 0"), Some(1250));
        let dev = "Inter-|   Receive\n face |bytes packets\n    lo: 5 1 0 0 0 0 0 0 5 1 0 0 0 0 0 0\n  eth0: 1000 10 0 0 0 0 0 0 2000 20 0 0 0 0 0 0\n";
        assert_eq!(net_dev(dev), vec![("eth0".to_owned(), 1000, 2000)]);
        let disks = "   8       0 sda 10 0 100 5 20 0 200 7 0 9 12\n   8       1 sda1 1 0 8 0 2 0 16 0 0 0 0\n";
        assert_eq!(
            diskstats(disks, 8, 1),
            Some(("sda1".into(), 8 * 512, 16 * 512))
        );
        assert_eq!(diskstats(disks, 9, 0), None);
        let pid = "123 (qemu (x) y) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0";
        assert_eq!(state_letter(pid), Some('S'));
        assert_eq!(comm(pid), Some("qemu (x) y"));
        assert_eq!(cpu_ticks(pid), Some(300));
        assert_eq!(resident_pages("1000 250 30 1 0 100 0\n"), Some(250));
        assert_eq!(status_rss_kib("Name: x\nVmRSS:\t  1234 kB\n"), Some(1234));
    }

    #[test]
    fn odd_text_is_none_not_a_panic() {
        assert_eq!(cpu_jiffies("cpu  1 2\n"), None);
        assert_eq!(cpu_jiffies("cpu  a b c d\n"), None);
        assert_eq!(load1_centi(""), None);
        assert_eq!(cpu_ticks("1 (x"), None);
        assert_eq!(comm(")("), None);
    }

    proptest! {
        #[test]
        fn no_input_panics(text in "\\PC{0,300}", major in 0u64..300, minor in 0u64..300) {
            let _ = cpu_jiffies(&text);
            let _ = memory_kib(&text);
            let _ = load1_centi(&text);
            let _ = net_dev(&text);
            let _ = diskstats(&text, major, minor);
            let _ = state_letter(&text);
            let _ = comm(&text);
            let _ = cpu_ticks(&text);
            let _ = resident_pages(&text);
        }

        #[test]
        fn busy_never_exceeds_total(fields in proptest::collection::vec(0u64..1 << 40, 4..10)) {
            let line = format!("cpu  {}\n", fields.iter().map(u64::to_string).collect::<Vec<_>>().join(" "));
            let (busy, total) = cpu_jiffies(&line).unwrap();
            prop_assert!(busy <= total);
        }
    }
}
