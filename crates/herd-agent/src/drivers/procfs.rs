//! What /proc says about a guest's host process (a QEMU, a container's init): whether
//! a pid is still alive and ours, and its usage.
//!
//! A pid file can outlive its process and the pid can be reused, so a pid only counts as
//! a VM's QEMU if /proc/<pid>/cmdline names that VM's own directory. Zombies count as
//! gone: a daemonized QEMU is PID 1's child, and PID 1 here reaps only every ~2 s.

use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag};
use nix::unistd::Pid;
use std::path::Path;

/// The state letter of /proc/<pid>/stat (`R`, `S`, `Z`, ...).
fn state_letter(stat: &str) -> Option<char> {
    // The command name is in parentheses and may itself contain spaces or parentheses.
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_ascii_whitespace().next()?.chars().next()
}

/// utime + stime of /proc/<pid>/stat, in clock ticks.
fn cpu_ticks(stat: &str) -> Option<u64> {
    let after = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after.split_ascii_whitespace().collect();
    // After the name: state(0) ppid(1) ... utime(11) stime(12).
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// Reaps `pid` if it happens to be our child (it is not, normally: QEMU is daemonized; but
/// an agent that made itself a child subreaper inherits it). Harmless otherwise.
pub fn reap(pid: i32) {
    let _ = waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG));
}

/// True if `pid` is a live (not zombie) QEMU whose command line mentions `vm_dir`.
pub fn is_our_qemu(pid: i32, vm_dir: &Path) -> bool {
    if pid <= 1 {
        return false;
    }
    reap(pid);
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    if matches!(state_letter(&stat), Some('Z') | Some('X') | None) {
        return false;
    }
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let cmdline = String::from_utf8_lossy(&cmdline);
    cmdline.contains("qemu") && cmdline.contains(&*vm_dir.to_string_lossy())
}

/// Whether the process exists and is not a zombie, whatever it runs. A process being
/// torn down after SIGKILL loses its cmdline before it is gone, so "no longer our QEMU"
/// is not yet "dead".
pub fn is_running(pid: i32) -> bool {
    if pid <= 1 {
        return false;
    }
    reap(pid);
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| !matches!(state_letter(&stat), Some('Z') | Some('X') | None))
        .unwrap_or(false)
}

pub fn signal(pid: i32, signal: Signal) {
    if pid > 1 {
        let _ = kill(Pid::from_raw(pid), signal);
    }
}

/// CPU time in milliseconds and resident memory in KiB of a process.
pub fn usage(pid: i32) -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let ticks = cpu_ticks(&stat)?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_ascii_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    // USER_HZ is 100 on every Linux the agent runs on.
    Some((ticks * 10, rss))
}

pub fn read_pid_file(path: &Path) -> Option<i32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_odd_names() {
        let stat = "123 (qemu (x) y) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0";
        assert_eq!(state_letter(stat), Some('S'));
        assert_eq!(cpu_ticks(stat), Some(300));
        assert_eq!(state_letter("1 (a) Z 0"), Some('Z'));
    }

    #[test]
    fn own_process_is_not_a_qemu() {
        let me = std::process::id() as i32;
        assert!(!is_our_qemu(me, Path::new("/nowhere")));
        assert!(usage(me).is_some());
        assert!(!is_our_qemu(0, Path::new("/")));
    }
}
