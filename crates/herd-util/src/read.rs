//! The module's only I/O: one pass over /proc, the data dir's filesystem and the
//! drivers' footprints per interval, into a [`Reading`]. Files are read into one
//! reused buffer; a file that cannot be read leaves its figure out rather than
//! stopping the sample.

use crate::parse;
use crate::sample::{DiskReading, DriverReading, Member, Reading, NS_PER_JIFFY};
use crate::{Footprint, Source};
use herd_cgroup::Layout;
use std::io::Read;
use std::path::{Path, PathBuf};

/// Interfaces past this many are left out, so that a host with thousands of veths
/// still sends a small message.
const MAX_INTERFACES: usize = 64;

pub struct Reader {
    data_dir: PathBuf,
    sources: Vec<Source>,
    cgroups: Option<Layout>,
    page_size: u64,
    buf: String,
}

impl Reader {
    pub fn new(data_dir: PathBuf, sources: Vec<Source>) -> Reader {
        let needs_cgroups = sources
            .iter()
            .any(|s| matches!(s.footprint, Footprint::Cgroup { .. }));
        let page_size = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
            .ok()
            .flatten()
            .and_then(|size| u64::try_from(size).ok())
            .unwrap_or(4096);
        Reader {
            data_dir,
            sources,
            cgroups: if needs_cgroups {
                Layout::detect()
            } else {
                None
            },
            page_size,
            buf: String::with_capacity(8192),
        }
    }

    /// Reads `path` into the shared buffer; `None` if it cannot be read.
    fn file(&mut self, path: impl AsRef<Path>) -> Option<&str> {
        self.buf.clear();
        std::fs::File::open(path)
            .ok()?
            .read_to_string(&mut self.buf)
            .ok()?;
        Some(&self.buf)
    }

    pub fn read(&mut self, at_ms: u64) -> Reading {
        let cpu = self.file("/proc/stat").and_then(parse::cpu_jiffies);
        let mem_kib = self.file("/proc/meminfo").and_then(parse::memory_kib);
        let load1_centi = self.file("/proc/loadavg").and_then(parse::load1_centi);
        let mut net = self
            .file("/proc/net/dev")
            .map(parse::net_dev)
            .unwrap_or_default();
        net.truncate(MAX_INTERFACES);
        let disk = self.disk();
        let sources = std::mem::take(&mut self.sources);
        let drivers = sources.iter().map(|s| self.footprint(s)).collect();
        self.sources = sources;
        Reading {
            at_ms,
            cpu,
            mem_kib,
            load1_centi,
            disk,
            net,
            drivers,
        }
    }

    fn disk(&mut self) -> DiskReading {
        let mut disk = DiskReading::default();
        if let Ok(fs) = nix::sys::statvfs::statvfs(&self.data_dir) {
            let fragment = fs.fragment_size();
            disk.total_bytes = fs.blocks().saturating_mul(fragment);
            disk.free_bytes = fs.blocks_available().saturating_mul(fragment);
        }
        if let Ok(st) = nix::sys::stat::stat(&self.data_dir) {
            let (major, minor) = (
                nix::sys::stat::major(st.st_dev),
                nix::sys::stat::minor(st.st_dev),
            );
            // Major 0: tmpfs, overlay and the like, with no device to count I/O on.
            if major != 0 {
                disk.device = self
                    .file("/proc/diskstats")
                    .and_then(|text| parse::diskstats(text, major, minor));
            }
        }
        disk
    }

    fn footprint(&mut self, source: &Source) -> DriverReading {
        let mut reading = DriverReading {
            kind: source.kind.clone(),
            ..DriverReading::default()
        };
        match &source.footprint {
            Footprint::Pidfiles { dir, file, comm } => {
                let Ok(entries) = std::fs::read_dir(dir) else {
                    return reading;
                };
                for entry in entries.flatten() {
                    let Some(pid) = self
                        .file(entry.path().join(file))
                        .and_then(|text| text.trim().parse::<u32>().ok())
                    else {
                        continue;
                    };
                    if let Some(member) = self.process(pid, comm) {
                        reading.members.push(member);
                    }
                }
                reading.n = reading.members.len() as u32;
            }
            Footprint::Cgroup { path } => {
                let Some(layout) = &self.cgroups else {
                    return reading;
                };
                if let Some(counters) = layout.read(path) {
                    reading.members.push(Member {
                        id: 0,
                        cpu_ns: counters.cpu_ns,
                        mem_bytes: counters.memory_bytes,
                    });
                }
                reading.n = layout
                    .dirs(path)
                    .first()
                    .and_then(|dir| std::fs::read_dir(dir).ok())
                    .map(|entries| {
                        entries
                            .flatten()
                            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                            .count() as u32
                    })
                    .unwrap_or(0);
            }
        }
        reading
    }

    /// A live process whose command name starts with `comm` (a pid file can outlive
    /// its process, and the pid be reused).
    fn process(&mut self, pid: u32, comm: &str) -> Option<Member> {
        let stat = self.file(format!("/proc/{pid}/stat"))?;
        if !parse::comm(stat)?.starts_with(comm)
            || matches!(parse::state_letter(stat), Some('Z' | 'X'))
        {
            return None;
        }
        let ticks = parse::cpu_ticks(stat)?;
        let page_size = self.page_size;
        let pages = self
            .file(format!("/proc/{pid}/statm"))
            .and_then(parse::resident_pages)
            .unwrap_or(0);
        Some(Member {
            id: u64::from(pid),
            cpu_ns: ticks.saturating_mul(NS_PER_JIFFY),
            mem_bytes: pages.saturating_mul(page_size),
        })
    }
}
