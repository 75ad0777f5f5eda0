//! The per-node utility module: a small process of its own on every node that samples
//! the host itself, apart from any hypervisor driver, and prints one JSON line per
//! interval for the agent that started it.
//!
//! Why a process and not a task in the agent: the figures must keep coming when a
//! driver hangs or the agent's runtime is busy, and a process's own footprint can be
//! measured and held to a budget (5 MB resident, 0.5% of a core at 1 s). It reads only
//! /proc, the data dir's filesystem and cgroups; what each driver's guests cost it finds
//! from the footprint the agent names on its command line (pid files for QEMU, a
//! parent cgroup for containers), so it knows no driver's code.
//!
//! It ends when its output is closed (the agent is gone) or its parent changes; the
//! agent restarts it if it dies.

pub mod parse;
mod read;
pub mod sample;

use std::ffi::OsString;
use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum UtilError {
    #[error("{0}\nusage: herd-util --data-dir DIR [--interval-ms N] [--once] [--pidfiles KIND DIR FILE COMM]... [--cgroup KIND PATH]...")]
    Usage(String),
    #[error("the data dir {0} does not exist")]
    NoDataDir(PathBuf),
    #[error("encoding a sample")]
    Encode(#[from] serde_json::Error),
}

/// Where a driver's guests are to be found from outside.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Footprint {
    /// One process per guest, its pid in `<dir>/<any>/<file>`; counted only while the
    /// process's command name starts with `comm`.
    Pidfiles {
        dir: PathBuf,
        file: String,
        comm: String,
    },
    /// One parent cgroup (a path in the hierarchy) holding every guest's cgroup.
    Cgroup { path: String },
}

/// A driver's footprint, named by the driver's kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    pub kind: String,
    pub footprint: Footprint,
}

impl Source {
    /// The command-line arguments that describe this source to the module.
    pub fn to_args(&self) -> Vec<OsString> {
        match &self.footprint {
            Footprint::Pidfiles { dir, file, comm } => vec![
                "--pidfiles".into(),
                self.kind.clone().into(),
                dir.clone().into(),
                file.into(),
                comm.into(),
            ],
            Footprint::Cgroup { path } => {
                vec!["--cgroup".into(), self.kind.clone().into(), path.into()]
            }
        }
    }
}

/// How the module runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub data_dir: PathBuf,
    pub interval: Duration,
    /// One sample, then exit (for operators and tests).
    pub once: bool,
    pub sources: Vec<Source>,
}

pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(1);

impl Config {
    /// The arguments after the program name.
    pub fn from_args(args: impl IntoIterator<Item = OsString>) -> Result<Config, UtilError> {
        let mut args = args.into_iter();
        let mut data_dir = None;
        let mut interval = DEFAULT_INTERVAL;
        let mut once = false;
        let mut sources = Vec::new();
        let usage = |m: String| UtilError::Usage(m);
        let value = |args: &mut dyn Iterator<Item = OsString>, flag: &str| {
            args.next()
                .ok_or_else(|| usage(format!("{flag} needs a value")))
        };
        let text = |v: OsString, what: &str| {
            v.into_string()
                .map_err(|_| usage(format!("{what} must be UTF-8")))
        };
        while let Some(arg) = args.next() {
            match arg.to_str() {
                Some("--data-dir") => {
                    data_dir = Some(PathBuf::from(value(&mut args, "--data-dir")?))
                }
                Some("--interval-ms") => {
                    let ms: u64 = text(value(&mut args, "--interval-ms")?, "--interval-ms")?
                        .parse()
                        .map_err(|_| usage("--interval-ms must be a number".into()))?;
                    if !(10..=3_600_000).contains(&ms) {
                        return Err(usage("--interval-ms must be between 10 and 3600000".into()));
                    }
                    interval = Duration::from_millis(ms);
                }
                Some("--once") => once = true,
                Some("--pidfiles") => {
                    let kind = text(value(&mut args, "--pidfiles")?, "KIND")?;
                    let dir = PathBuf::from(value(&mut args, "--pidfiles")?);
                    let file = text(value(&mut args, "--pidfiles")?, "FILE")?;
                    let comm = text(value(&mut args, "--pidfiles")?, "COMM")?;
                    sources.push(Source {
                        kind,
                        footprint: Footprint::Pidfiles { dir, file, comm },
                    });
                }
                Some("--cgroup") => {
                    let kind = text(value(&mut args, "--cgroup")?, "KIND")?;
                    let path = text(value(&mut args, "--cgroup")?, "PATH")?;
                    sources.push(Source {
                        kind,
                        footprint: Footprint::Cgroup { path },
                    });
                }
                _ => return Err(usage(format!("unknown argument {arg:?}"))),
            }
        }
        let data_dir = data_dir.ok_or_else(|| usage("--data-dir is required".into()))?;
        Ok(Config {
            data_dir,
            interval,
            once,
            sources,
        })
    }

    /// The arguments that make [`Config::from_args`] give this config back.
    pub fn to_args(&self) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec![
            "--data-dir".into(),
            self.data_dir.clone().into(),
            "--interval-ms".into(),
            self.interval.as_millis().to_string().into(),
        ];
        if self.once {
            args.push("--once".into());
        }
        args.extend(self.sources.iter().flat_map(Source::to_args));
        args
    }
}

/// Samples every interval and writes each sample as a JSON line to `out`, until `out`
/// is closed or the parent process changes (it died and this one was reparented).
pub fn run(config: &Config, out: &mut impl Write) -> Result<(), UtilError> {
    if !config.data_dir.is_dir() {
        return Err(UtilError::NoDataDir(config.data_dir.clone()));
    }
    let parent = std::os::unix::process::parent_id();
    let interval_ms = u32::try_from(config.interval.as_millis()).unwrap_or(u32::MAX);
    let mut reader = read::Reader::new(config.data_dir.clone(), config.sources.clone());
    let mut sampler = sample::Sampler::new(interval_ms);
    let start = Instant::now();
    let mut n: u32 = 0;
    loop {
        let stats = sampler.sample(reader.read(herd_proto::clock::unix_ms()));
        let line = serde_json::to_string(&stats)?;
        if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
            // Nobody reads any more: the agent is gone.
            return Ok(());
        }
        if config.once || std::os::unix::process::parent_id() != parent {
            return Ok(());
        }
        // On a fixed grid from the start, so a slow pass does not push later ones back.
        n = n.saturating_add(1);
        let next = start + config.interval.saturating_mul(n);
        match next.checked_duration_since(Instant::now()) {
            Some(wait) => std::thread::sleep(wait),
            None => {
                n = (start.elapsed().as_nanos() / config.interval.as_nanos().max(1)) as u32;
            }
        }
    }
}

/// The `herd-util` program: arguments from the command line, samples to stdout.
pub fn main() -> std::process::ExitCode {
    let result = Config::from_args(std::env::args_os().skip(1))
        .and_then(|config| run(&config, &mut std::io::stdout().lock()));
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("herd-util: {e}");
            std::process::ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn arguments_round_trip() {
        let config = Config {
            data_dir: "/var/lib/herd".into(),
            interval: Duration::from_millis(500),
            once: true,
            sources: vec![
                Source {
                    kind: "qemu".into(),
                    footprint: Footprint::Pidfiles {
                        dir: "/var/lib/herd/qemu".into(),
                        file: "qemu.pid".into(),
                        comm: "qemu-system".into(),
                    },
                },
                Source {
                    kind: "oci".into(),
                    footprint: Footprint::Cgroup {
                        path: "/herd".into(),
                    },
                },
            ],
        };
        assert_eq!(Config::from_args(config.to_args()).unwrap(), config);
    }

    #[test]
    fn bad_arguments_say_what_is_wrong() {
        let err = |args: &[&str]| {
            Config::from_args(args.iter().map(OsString::from))
                .unwrap_err()
                .to_string()
        };
        assert!(err(&[]).starts_with("--data-dir is required"));
        assert!(err(&["--data-dir", "/x", "--interval-ms", "0"]).contains("between 10"));
        assert!(err(&["--data-dir", "/x", "--pidfiles", "qemu"]).contains("needs a value"));
        assert!(err(&["--bogus"]).contains("unknown argument"));
    }

    #[test]
    fn one_sample_of_this_host() {
        let dir = std::env::temp_dir();
        let config = Config {
            data_dir: dir.clone(),
            interval: DEFAULT_INTERVAL,
            once: true,
            sources: vec![Source {
                kind: "none".into(),
                footprint: Footprint::Pidfiles {
                    dir: dir.join("no-such-dir"),
                    file: "x.pid".into(),
                    comm: "x".into(),
                },
            }],
        };
        let mut out = Vec::new();
        run(&config, &mut out).unwrap();
        let stats: herd_proto::node::NodeStats = serde_json::from_slice(&out).unwrap();
        assert!(stats.mem_total_mib > 0 && stats.mem_used_mib <= stats.mem_total_mib);
        assert!(stats.disk.total_mib > 0);
        assert_eq!(stats.drivers[0].n, 0);
    }
}
