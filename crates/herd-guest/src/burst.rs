//! `herd-guest burst`: the workload asks its host for more CPU or memory for a while.
//!
//! The module owns the channel to the host, so the workload cannot speak on it; it
//! asks the module instead, over a unix socket only processes inside the guest reach
//! (`/run/herd-guest.sock`), one line each way. The module passes the ask on as a
//! `GuestMsg::Burst`, waits for the host's `HostMsg::Burst`, and answers the line. One
//! ask at a time: a second asker waits for the first to be answered.
//!
//! The host alone decides (from its own room and the project's limits), so with no host
//! connected the answer is a refusal at once, not a wait.

use crate::{log, Shared};
use herd_proto::burst::{BurstAnswer, BurstAsk};
use herd_proto::guest::GuestMsg;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

const SOCKET: &str = "/run/herd-guest.sock";
/// How long the module waits for the host's answer.
const ANSWER_WITHIN: Duration = Duration::from_secs(10);
/// The longest line an asker may send.
const MAX_LINE: usize = 256;

/// Where the host's answer to the ask in flight is put.
#[derive(Default)]
pub(crate) struct Pending {
    answer: Mutex<Option<BurstAnswer>>,
    arrived: Condvar,
}

impl Pending {
    /// The host answered (an answer nobody waits for replaces nothing useful).
    pub(crate) fn answered(&self, answer: BurstAnswer) {
        if let Ok(mut slot) = self.answer.lock() {
            *slot = Some(answer);
            self.arrived.notify_all();
        }
    }

    fn take_within(&self, within: Duration) -> Option<BurstAnswer> {
        let deadline = Instant::now() + within;
        let mut slot = self.answer.lock().ok()?;
        loop {
            if let Some(answer) = slot.take() {
                return Some(answer);
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            slot = self.arrived.wait_timeout(slot, left).ok()?.0;
        }
    }

    fn clear(&self) {
        if let Ok(mut slot) = self.answer.lock() {
            *slot = None;
        }
    }
}

/// Parses an asker's line: `burst CPUS MEMORY_MIB SECONDS`.
pub(crate) fn parse_line(line: &str) -> Result<BurstAsk, String> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let [verb, cpus, memory_mib, seconds] = words.as_slice() else {
        return Err("expected: burst CPUS MEMORY_MIB SECONDS".into());
    };
    if *verb != "burst" {
        return Err(format!("unknown request {verb:?}"));
    }
    let number = |what: &str, text: &str| -> Result<u64, String> {
        text.parse()
            .map_err(|_| format!("{what} {text:?} is not a whole number"))
    };
    Ok(BurstAsk {
        cpus: u32::try_from(number("cpus", cpus)?).map_err(|_| "cpus: too large".to_owned())?,
        memory_mib: number("memory", memory_mib)?,
        seconds: u32::try_from(number("seconds", seconds)?)
            .map_err(|_| "seconds: too large".to_owned())?,
    })
}

/// The line an answer goes back as.
fn answer_line(answer: &BurstAnswer) -> String {
    match answer {
        BurstAnswer::Granted(lease) => format!(
            "granted {} {} {}\n",
            lease.cpus, lease.memory_mib, lease.expires_ms
        ),
        BurstAnswer::Denied { reason } => format!("denied {}\n", reason.replace('\n', " ")),
    }
}

/// Serves askers for as long as the module lives.
pub(crate) fn serve(shared: Arc<Shared>) {
    let _ = std::fs::remove_file(SOCKET);
    let listener = match UnixListener::bind(SOCKET) {
        Ok(listener) => listener,
        Err(e) => {
            log(format!("bursts: cannot listen on {SOCKET}: {e}"));
            return;
        }
    };
    for stream in listener.incoming() {
        match stream {
            Ok(stream) => serve_one(&shared, stream),
            Err(e) => {
                log(format!("bursts: accepting: {e}"));
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

fn serve_one(shared: &Shared, stream: UnixStream) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let mut line = String::new();
    let read = BufReader::new(std::io::Read::take(stream, MAX_LINE as u64)).read_line(&mut line);
    let answer = match read {
        Err(e) => BurstAnswer::Denied {
            reason: format!("reading the request: {e}"),
        },
        Ok(_) => match parse_line(&line) {
            Err(reason) => BurstAnswer::Denied { reason },
            Ok(_) if !shared.host_connected.load(Ordering::SeqCst) => BurstAnswer::Denied {
                reason: "no host is connected: only the VM's host can grant a burst".into(),
            },
            Ok(ask) => {
                shared.bursts.clear();
                shared.send(&GuestMsg::Burst { ask });
                shared
                    .bursts
                    .take_within(ANSWER_WITHIN)
                    .unwrap_or_else(|| BurstAnswer::Denied {
                        reason: format!(
                            "the host did not answer within {} s",
                            ANSWER_WITHIN.as_secs()
                        ),
                    })
            }
        },
    };
    let _ = writer.write_all(answer_line(&answer).as_bytes());
}

/// Splits `10m` into 10 and the scale its unit gives (from `units`), refusing what is
/// not a whole number, an unknown unit, and a product past u64.
fn scaled(text: &str, what: &str, units: &[(&str, u64)]) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let names: Vec<&str> = units
        .iter()
        .map(|(name, _)| *name)
        .filter(|n| !n.is_empty())
        .collect();
    let value: u64 = number.parse().map_err(|_| {
        let example = names.first().copied().unwrap_or_default();
        format!("{text:?} is not a {what}: write e.g. 10{example}")
    })?;
    let scale = units
        .iter()
        .find(|(name, _)| *name == unit)
        .map(|(_, scale)| *scale)
        .ok_or_else(|| format!("unknown {what} unit {unit:?}: use {}", names.join(", ")))?;
    value
        .checked_mul(scale)
        .ok_or_else(|| format!("{text:?} is too large"))
}

/// Parses `90`, `90s`, `10m`, `2h` into seconds.
pub(crate) fn parse_seconds(text: &str) -> Result<u64, String> {
    scaled(
        text,
        "duration",
        &[("", 1), ("s", 1), ("m", 60), ("h", 3600)],
    )
}

/// Parses `512`, `512M`, `2G` into MiB.
pub(crate) fn parse_mib(text: &str) -> Result<u64, String> {
    scaled(
        text,
        "size",
        &[("", 1), ("M", 1), ("MiB", 1), ("G", 1024), ("GiB", 1024)],
    )
}

/// `herd-guest burst --cpu N --memory SIZE --for DURATION`, run by the workload: asks,
/// prints the answer, and exits 0 if granted, 1 if denied, 2 on a usage error.
pub(crate) fn client(args: &[String]) -> ! {
    let usage = "usage: herd-guest burst [--cpu N] [--memory SIZE] --for DURATION";
    let mut cpus = 0u64;
    let mut memory_mib = 0u64;
    let mut seconds = None;
    let mut args = args.iter();
    let fail = |message: String| -> ! {
        eprintln!("herd-guest burst: {message}\n{usage}");
        std::process::exit(2)
    };
    while let Some(flag) = args.next() {
        let Some(value) = args.next() else {
            fail(format!("{flag} needs a value"))
        };
        let parsed = match flag.as_str() {
            "--cpu" => value
                .parse()
                .map(|v| cpus = v)
                .map_err(|_| format!("--cpu {value:?} is not a whole number")),
            "--memory" => parse_mib(value).map(|v| memory_mib = v),
            "--for" => parse_seconds(value).map(|v| seconds = Some(v)),
            other => Err(format!("unknown flag {other:?}")),
        };
        if let Err(e) = parsed {
            fail(e);
        }
    }
    let Some(seconds) = seconds else {
        fail("--for is required".into())
    };
    let request = format!("burst {cpus} {memory_mib} {seconds}\n");
    let answer = UnixStream::connect(SOCKET).and_then(|mut stream| {
        stream.set_read_timeout(Some(ANSWER_WITHIN + Duration::from_secs(5)))?;
        stream.write_all(request.as_bytes())?;
        let mut line = String::new();
        BufReader::new(stream).read_line(&mut line)?;
        Ok(line)
    });
    match answer {
        Ok(line) if line.starts_with("granted ") => {
            print!("{line}");
            std::process::exit(0)
        }
        Ok(line) => {
            eprint!("herd-guest burst: {line}");
            std::process::exit(1)
        }
        Err(e) => {
            eprintln!("herd-guest burst: asking the module on {SOCKET}: {e}");
            std::process::exit(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use herd_proto::burst::BurstLease;

    #[test]
    fn a_line_asks_exactly_what_it_says() {
        assert_eq!(
            parse_line("burst 2 512 600\n"),
            Ok(BurstAsk {
                cpus: 2,
                memory_mib: 512,
                seconds: 600
            })
        );
        assert!(parse_line("burst -1 0 60").is_err());
        assert!(parse_line("burst 1 0").is_err());
        assert!(parse_line("grant 1 0 60").is_err());
        assert!(parse_line("burst 99999999999 0 60").is_err());
    }

    #[test]
    fn answers_are_one_line() {
        let lease = BurstLease {
            cpus: 1,
            memory_mib: 0,
            granted_ms: 5,
            expires_ms: 10,
        };
        assert_eq!(
            answer_line(&BurstAnswer::Granted(lease)),
            "granted 1 0 10\n"
        );
        let denied = BurstAnswer::Denied {
            reason: "no\nroom".into(),
        };
        assert_eq!(answer_line(&denied), "denied no room\n");
    }

    #[test]
    fn sizes_and_durations_as_people_type_them() {
        assert_eq!(parse_seconds("90"), Ok(90));
        assert_eq!(parse_seconds("10m"), Ok(600));
        assert_eq!(parse_seconds("2h"), Ok(7200));
        assert!(parse_seconds("-5s").is_err());
        assert!(parse_seconds("5d").is_err());
        assert!(parse_seconds("99999999999999999999h").is_err());
        assert_eq!(parse_mib("512M"), Ok(512));
        assert_eq!(parse_mib("2G"), Ok(2048));
        assert!(parse_mib("1T").is_err());
    }

    #[test]
    fn a_pending_answer_is_taken_once_or_times_out() {
        let pending = Pending::default();
        assert_eq!(pending.take_within(Duration::from_millis(10)), None);
        let denied = BurstAnswer::Denied { reason: "x".into() };
        pending.answered(denied.clone());
        assert_eq!(pending.take_within(Duration::from_millis(10)), Some(denied));
        assert_eq!(pending.take_within(Duration::from_millis(10)), None);
    }
}
