//! Which cgroup hierarchy a host has, and one cgroup's counters.
//!
//! Hosts differ: a current Debian boots with the unified (v2) hierarchy, where one tree
//! holds every controller and a cgroup's figures are `cpu.stat`, `memory.current` and
//! `io.stat`; older or hybrid hosts (this one) mount each v1 controller on its own
//! tree and name the same figures `cpuacct.usage`, `memory.usage_in_bytes` and
//! `blkio.throttle.io_service_bytes`. Everything that reads a cgroup (the agent's
//! container driver, the guest module inside a container, the node's utility module)
//! asks [`Layout`] where a figure lives instead of assuming one mode.
//!
//! The parsers are pure functions of file contents; [`Layout::read`] is the only I/O.

use std::path::{Path, PathBuf};

/// The cgroup hierarchy of a host (or of a container's view of its own cgroup).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layout {
    /// One tree with every controller, mounted here.
    Unified { root: PathBuf },
    /// One tree per controller: `cpuacct`, `memory`, `blkio`, `freezer` mount points.
    Legacy {
        cpuacct: Option<PathBuf>,
        memory: Option<PathBuf>,
        blkio: Option<PathBuf>,
        freezer: Option<PathBuf>,
    },
}

/// A cgroup's counters since it was made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    pub cpu_ns: u64,
    pub memory_bytes: u64,
    pub io_read_bytes: u64,
    pub io_write_bytes: u64,
}

impl Layout {
    /// The hierarchy described by a `/proc/self/mountinfo`. The unified tree counts only
    /// when it has the controllers (a hybrid host mounts an empty one beside the v1
    /// trees); `None` when no usable cgroup is mounted.
    pub fn from_mountinfo(mountinfo: &str, unified_controllers: &str) -> Option<Layout> {
        let mut unified = None;
        let (mut cpuacct, mut memory, mut blkio, mut freezer) = (None, None, None, None);
        for line in mountinfo.lines() {
            // <id> <parent> <maj:min> <root> <mount point> <options> <optional...> - <fstype> <source> <super options>
            let Some((left, right)) = line.split_once(" - ") else {
                continue;
            };
            let Some(mount_point) = left.split(' ').nth(4) else {
                continue;
            };
            let mut right = right.split(' ');
            let fstype = right.next().unwrap_or("");
            let super_options = right.nth(1).unwrap_or("");
            let point = PathBuf::from(unescape(mount_point));
            match fstype {
                "cgroup2" => unified = Some(point),
                "cgroup" => {
                    for option in super_options.split(',') {
                        let slot = match option {
                            "cpuacct" => &mut cpuacct,
                            "memory" => &mut memory,
                            "blkio" => &mut blkio,
                            "freezer" => &mut freezer,
                            _ => continue,
                        };
                        slot.get_or_insert_with(|| point.clone());
                    }
                }
                _ => {}
            }
        }
        let has = |name: &str| unified_controllers.split_whitespace().any(|c| c == name);
        match unified {
            Some(root) if has("memory") && has("cpu") => Some(Layout::Unified { root }),
            _ if cpuacct.is_some() || memory.is_some() => Some(Layout::Legacy {
                cpuacct,
                memory,
                blkio,
                freezer,
            }),
            Some(root) => Some(Layout::Unified { root }),
            None => None,
        }
    }

    /// This host's hierarchy, as this process sees it.
    pub fn detect() -> Option<Layout> {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
        let unified = Layout::from_mountinfo(&mountinfo, "")?;
        let controllers = match &unified {
            Layout::Unified { root } => {
                std::fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default()
            }
            Layout::Legacy { .. } => String::new(),
        };
        Layout::from_mountinfo(&mountinfo, &controllers)
    }

    /// The hierarchy's name as operators know it.
    pub fn name(&self) -> &'static str {
        match self {
            Layout::Unified { .. } => "cgroup v2",
            Layout::Legacy { .. } => "cgroup v1",
        }
    }

    /// The directories a cgroup at `path` (relative to each tree's root) has, one per
    /// tree; all of them are removed when the cgroup is.
    pub fn dirs(&self, path: &str) -> Vec<PathBuf> {
        let path = path.trim_start_matches('/');
        match self {
            Layout::Unified { root } => vec![root.join(path)],
            Layout::Legacy {
                cpuacct,
                memory,
                blkio,
                freezer,
            } => [cpuacct, memory, blkio, freezer]
                .into_iter()
                .flatten()
                .map(|tree| tree.join(path))
                .collect(),
        }
    }

    /// The counters of the cgroup at `path`; `None` if it does not exist.
    pub fn read(&self, path: &str) -> Option<Counters> {
        let path = path.trim_start_matches('/');
        let read = |dir: &Path, file: &str| std::fs::read_to_string(dir.join(path).join(file));
        match self {
            Layout::Unified { root } => {
                let cpu = read(root, "cpu.stat").ok()?;
                let memory = read(root, "memory.current").unwrap_or_default();
                let io = read(root, "io.stat").unwrap_or_default();
                let (io_read_bytes, io_write_bytes) = v2_io(&io);
                Some(Counters {
                    cpu_ns: v2_cpu_usec(&cpu).saturating_mul(1000),
                    memory_bytes: number(&memory),
                    io_read_bytes,
                    io_write_bytes,
                })
            }
            Layout::Legacy {
                cpuacct,
                memory,
                blkio,
                ..
            } => {
                let cpu = read(cpuacct.as_deref()?, "cpuacct.usage").ok()?;
                let memory = memory
                    .as_deref()
                    .and_then(|m| read(m, "memory.usage_in_bytes").ok())
                    .unwrap_or_default();
                let io = blkio
                    .as_deref()
                    .and_then(|b| read(b, "blkio.throttle.io_service_bytes").ok())
                    .unwrap_or_default();
                let (io_read_bytes, io_write_bytes) = v1_io(&io);
                Some(Counters {
                    cpu_ns: number(&cpu),
                    memory_bytes: number(&memory),
                    io_read_bytes,
                    io_write_bytes,
                })
            }
        }
    }

    /// Whether the cgroup at `path` is frozen; `None` if that cannot be read.
    pub fn frozen(&self, path: &str) -> Option<bool> {
        let path = path.trim_start_matches('/');
        match self {
            Layout::Unified { root } => {
                let events = std::fs::read_to_string(root.join(path).join("cgroup.events")).ok()?;
                Some(events.lines().any(|l| l.trim() == "frozen 1"))
            }
            Layout::Legacy { freezer, .. } => {
                let state =
                    std::fs::read_to_string(freezer.as_deref()?.join(path).join("freezer.state"))
                        .ok()?;
                Some(state.trim() == "FROZEN")
            }
        }
    }
}

/// mountinfo escapes spaces, tabs, newlines and backslashes as octal.
fn unescape(field: &str) -> String {
    let mut out = String::with_capacity(field.len());
    let mut chars = field.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            let code: String = chars.clone().take(3).collect();
            if let Ok(byte) = u8::from_str_radix(&code, 8) {
                out.push(char::from(byte));
                chars.nth(2);
                continue;
            }
        }
        out.push(c);
    }
    out
}

/// A file holding one number ("max" and garbage read as 0).
pub fn number(text: &str) -> u64 {
    text.trim().parse().unwrap_or(0)
}

/// `usage_usec` of a v2 `cpu.stat`.
pub fn v2_cpu_usec(cpu_stat: &str) -> u64 {
    cpu_stat
        .lines()
        .find_map(|l| l.strip_prefix("usage_usec "))
        .map(number)
        .unwrap_or(0)
}

/// Bytes read and written, summed over devices, from a v2 `io.stat`.
pub fn v2_io(io_stat: &str) -> (u64, u64) {
    let (mut read, mut written) = (0u64, 0u64);
    for field in io_stat.split_whitespace() {
        if let Some(v) = field.strip_prefix("rbytes=") {
            read = read.saturating_add(number(v));
        } else if let Some(v) = field.strip_prefix("wbytes=") {
            written = written.saturating_add(number(v));
        }
    }
    (read, written)
}

/// Bytes read and written, summed over devices, from a v1
/// `blkio.throttle.io_service_bytes` (lines `<maj:min> Read <n>`, and a `Total` line).
pub fn v1_io(service_bytes: &str) -> (u64, u64) {
    let (mut read, mut written) = (0u64, 0u64);
    for line in service_bytes.lines() {
        let mut fields = line.split_whitespace();
        let (Some(_device), Some(op), Some(n)) = (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        match op {
            "Read" => read = read.saturating_add(number(n)),
            "Write" => written = written.saturating_add(number(n)),
            _ => {}
        }
    }
    (read, written)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
25 30 0:21 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
26 25 0:22 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:8 - tmpfs tmpfs ro,mode=755
27 26 0:23 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate
30 26 0:26 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid,nodev,noexec,relatime shared:12 - cgroup cgroup rw,cpu,cpuacct
31 26 0:27 / /sys/fs/cgroup/memory rw,nosuid,nodev,noexec,relatime shared:13 - cgroup cgroup rw,memory
32 26 0:28 / /sys/fs/cgroup/blkio rw,nosuid,nodev,noexec,relatime shared:14 - cgroup cgroup rw,blkio
33 26 0:29 / /sys/fs/cgroup/freezer rw,nosuid,nodev,noexec,relatime shared:15 - cgroup cgroup rw,freezer
";

    #[test]
    fn a_hybrid_host_is_read_as_v1_even_with_an_empty_unified_tree() {
        let layout = Layout::from_mountinfo(HYBRID, "").expect("layout");
        assert_eq!(
            layout,
            Layout::Legacy {
                cpuacct: Some("/sys/fs/cgroup/cpu,cpuacct".into()),
                memory: Some("/sys/fs/cgroup/memory".into()),
                blkio: Some("/sys/fs/cgroup/blkio".into()),
                freezer: Some("/sys/fs/cgroup/freezer".into()),
            }
        );
        assert_eq!(layout.name(), "cgroup v1");
        assert_eq!(layout.dirs("/herd/x").len(), 4);
    }

    #[test]
    fn a_unified_host_with_controllers_is_v2() {
        let info = "27 26 0:23 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n";
        let layout = Layout::from_mountinfo(info, "cpuset cpu io memory pids").expect("layout");
        assert_eq!(
            layout,
            Layout::Unified {
                root: "/sys/fs/cgroup".into()
            }
        );
        assert_eq!(
            layout.dirs("/herd/x"),
            vec![PathBuf::from("/sys/fs/cgroup/herd/x")]
        );
        assert_eq!(Layout::from_mountinfo("", ""), None);
    }

    #[test]
    fn mount_points_with_spaces_are_unescaped() {
        assert_eq!(unescape(r"/a\040b"), "/a b");
        assert_eq!(unescape(r"/plain"), "/plain");
        assert_eq!(unescape(r"/x\9"), r"/x\9");
    }

    #[test]
    fn counters_of_both_modes_parse() {
        assert_eq!(
            v2_cpu_usec("usage_usec 1500\nuser_usec 1000\nsystem_usec 500\n"),
            1500
        );
        assert_eq!(
            v2_io("8:0 rbytes=100 wbytes=20 rios=1 wios=1\n8:16 rbytes=1 wbytes=2\n"),
            (101, 22)
        );
        assert_eq!(
            v1_io("8:0 Read 4096\n8:0 Write 512\n8:0 Sync 0\n8:0 Total 4608\nTotal 4608\n"),
            (4096, 512)
        );
        assert_eq!(number("max\n"), 0);
        assert_eq!(number("123\n"), 123);
    }

    #[test]
    fn this_host_reads_its_own_cgroup() {
        // Whatever the mode, the root cgroup exists and has used some CPU.
        let layout = Layout::detect().expect("a cgroup hierarchy is mounted");
        let root = layout.read("/").expect("root counters");
        assert!(root.cpu_ns > 0, "{layout:?}: {root:?}");
    }

    proptest::proptest! {
        #[test]
        fn parsers_never_panic(text in ".{0,400}") {
            let _ = Layout::from_mountinfo(&text, &text);
            let _ = (v2_cpu_usec(&text), v2_io(&text), v1_io(&text), number(&text));
        }
    }
}
