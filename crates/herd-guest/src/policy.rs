//! The policy inside the guest: sample this VM's own /proc and clock about once a
//! second, feed `herd_policy::Evaluator`, and carry out what it says with nobody else
//! reachable.
//!
//! - `Notify`: a `PolicyAction` report, nothing else.
//! - `Stop`, `Terminate`: the report, up to 500 ms to hand it (and anything kept) to a
//!   host, then power off. Inside the VM the two are the same; the host frees a
//!   terminated VM's resources when it learns of it.
//! - `Suspend`: the report, then the host is expected to suspend the VM. If no host is
//!   connected 5 s later, the guest freezes its workload (SIGSTOP to its process group)
//!   so it stops consuming CPU, and keeps reporting; a host that greets the guest after
//!   it received the action (e.g. after suspending and resuming the VM) unfreezes it.
//! - Task basis: a workload that exits 0 (or non-zero with no errors rule) fires it.
//! - Errors: a non-zero exit is restarted, after [`RESTART_BACKOFF`], up to
//!   `max_restarts` times; the next crash fires the rule.
//!
//! Counters come from the whole guest: CPU from /proc/stat (all CPUs, busy time), memory
//! in use from /proc/meminfo, network from /proc/net/dev without `lo`; in a container,
//! CPU and memory come from its own cgroup instead. They restart at
//! each boot, so budgets and cost restart when a stopped VM boots again (a suspend keeps
//! them: the guest's memory, evaluator included, is saved). Lifespan counts from
//! `herd.born`, which the host keeps across boots.

use crate::cmdline::GuestConfig;
use crate::{log, stats, Shared};
use herd_policy::{Evaluator, PolicyAction, Sample, Verdict};
use herd_proto::guest::GuestMsg;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const RESTART_BACKOFF: Duration = Duration::from_millis(500);
const SAMPLE_EVERY: Duration = Duration::from_secs(1);
const USAGE_EVERY: Duration = Duration::from_secs(3);
const PROGRESS_EVERY: Duration = Duration::from_secs(5);
const SUSPEND_GRACE: Duration = Duration::from_secs(5);

pub use herd_proto::clock::unix_ms;

pub struct Monitor {
    evaluator: Evaluator,
}

impl Monitor {
    pub fn new(config: &GuestConfig) -> Monitor {
        let vcpus = config.cpus.unwrap_or_else(|| {
            stats::n_cpus(&std::fs::read_to_string("/proc/stat").unwrap_or_default())
        });
        let born = config.born_unix_ms.unwrap_or_else(unix_ms);
        Monitor {
            evaluator: Evaluator::new(config.policy, vcpus, born)
                .with_memory_mib(config.memory_mib),
        }
    }
}

/// What the supervisor does after the workload exited.
pub enum AfterExit {
    Restart,
    /// Keep the VM up (a Suspend is under way).
    Stay,
    /// As without a policy: power off unless `herd.keep=1`.
    Default,
}

/// The most the verdicts asked for that leaves this process running.
#[derive(PartialEq, Eq)]
enum Outcome {
    Nothing,
    Suspend,
}

struct Reading {
    sample: Sample,
    net: (u64, u64),
}

fn read(shared: &Shared) -> Reading {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let (rx, tx) = stats::net_bytes(&read("/proc/net/dev"));
    // A container's /proc/stat and /proc/meminfo are the host's; its own cgroup, mounted
    // at /sys/fs/cgroup inside, counts only what it uses.
    let (cpu_ms, mem_kib) = match &shared.cgroup {
        Some(layout) => {
            let counters = layout.read("/").unwrap_or_default();
            (counters.cpu_ns / 1_000_000, counters.memory_bytes / 1024)
        }
        None => (
            stats::cpu_ms(&read("/proc/stat")),
            stats::mem_kib(&read("/proc/meminfo")),
        ),
    };
    Reading {
        sample: Sample {
            unix_ms: unix_ms(),
            cpu_ms,
            mem_kib,
            net_bytes: rx.saturating_add(tx),
            workload: shared.workload_state(),
        },
        net: (rx, tx),
    }
}

/// Samples, reports usage and enforces the policy, for ever.
pub fn monitor_loop(shared: Arc<Shared>) {
    let mut last_usage = Instant::now();
    let mut last_progress = Instant::now();
    loop {
        let sleep = match shared.policy.as_ref() {
            None => USAGE_EVERY,
            Some(m) => {
                // Wake at a time rule's deadline rather than up to a second after it.
                let deadline = m.lock().ok().and_then(|m| m.evaluator.next_deadline_ms());
                let now = unix_ms();
                match deadline {
                    Some(d) if d > now => SAMPLE_EVERY.min(Duration::from_millis(d - now + 5)),
                    Some(_) => Duration::from_millis(20),
                    None => SAMPLE_EVERY,
                }
            }
        };
        std::thread::sleep(sleep);
        let reading = read(&shared);
        if last_usage.elapsed() >= USAGE_EVERY || shared.policy.is_none() {
            last_usage = Instant::now();
            shared.send(&GuestMsg::Usage {
                cpu_ms: reading.sample.cpu_ms,
                mem_kib: reading.sample.mem_kib,
                net_rx: reading.net.0,
                net_tx: reading.net.1,
            });
        }
        let Some(monitor) = shared.policy.as_ref() else {
            continue;
        };
        let (verdicts, progress) = {
            let Ok(mut m) = monitor.lock() else {
                continue;
            };
            let verdicts = m.evaluator.observe(&reading.sample);
            let progress = (last_progress.elapsed() >= PROGRESS_EVERY).then(|| {
                m.evaluator
                    .progress()
                    .into_iter()
                    .map(|p| {
                        (
                            p.rule.as_str().to_string(),
                            p.text,
                            p.fraction_milli,
                            p.seconds_left,
                        )
                    })
                    .collect::<Vec<_>>()
            });
            (verdicts, progress)
        };
        if let Some(items) = progress {
            last_progress = Instant::now();
            shared.send(&GuestMsg::PolicyProgress { items });
        }
        handle_verdicts(&shared, verdicts);
    }
}

/// Reports and carries out verdicts; Stop and Terminate do not return.
fn handle_verdicts(shared: &Arc<Shared>, verdicts: Vec<Verdict>) -> Outcome {
    let mut outcome = Outcome::Nothing;
    for verdict in verdicts {
        match verdict {
            Verdict::Warn { rule, message } => {
                log(format!("policy warning ({rule}): {message}"));
                shared.send(&GuestMsg::PolicyWarning {
                    rule: rule.as_str().into(),
                    message,
                });
            }
            Verdict::Act {
                rule,
                action,
                reason,
            } => {
                log(format!("policy action {action:?} ({rule}): {reason}"));
                if action == PolicyAction::Suspend {
                    shared.suspend_requested.store(true, Ordering::SeqCst);
                }
                shared.send(&GuestMsg::PolicyAction {
                    rule: rule.as_str().into(),
                    action,
                    reason,
                });
                match action {
                    PolicyAction::Notify => {}
                    PolicyAction::Stop | PolicyAction::Terminate => {
                        // With a host listening, hand it the report first; with none,
                        // waiting would only make the VM late (the console keeps the
                        // reason for the host to read later).
                        if shared
                            .host_connected
                            .load(std::sync::atomic::Ordering::SeqCst)
                        {
                            shared.flush_best_effort(Duration::from_millis(500));
                            // Give the host a moment to read the report before the VM goes.
                            std::thread::sleep(Duration::from_millis(200));
                        }
                        shared.power_off();
                    }
                    PolicyAction::Suspend => {
                        outcome = Outcome::Suspend;
                        let s = shared.clone();
                        std::thread::spawn(move || {
                            std::thread::sleep(SUSPEND_GRACE);
                            if !s.host_connected.load(Ordering::SeqCst) {
                                s.freeze(true);
                            }
                        });
                    }
                }
            }
        }
    }
    outcome
}

/// Applies the task and errors rules to a workload exit.
pub fn on_workload_exit(shared: &Arc<Shared>, code: i32) -> AfterExit {
    let Some(monitor) = shared.policy.as_ref() else {
        return AfterExit::Default;
    };
    let spec = match monitor.lock() {
        Ok(m) => *m.evaluator.spec(),
        Err(_) => return AfterExit::Default,
    };
    let after = |outcome: Outcome| match outcome {
        Outcome::Suspend => AfterExit::Stay,
        Outcome::Nothing => AfterExit::Default,
    };
    if code != 0 && spec.errors.is_some() {
        let (verdict, restart) = match monitor.lock() {
            Ok(mut m) => {
                let v = m.evaluator.record_crash();
                (v, m.evaluator.should_restart())
            }
            Err(_) => return AfterExit::Default,
        };
        let outcome = handle_verdicts(shared, verdict.into_iter().collect());
        return if restart {
            AfterExit::Restart
        } else {
            after(outcome)
        };
    }
    if spec.task.is_some() {
        let reading = read(shared);
        let verdicts = match monitor.lock() {
            Ok(mut m) => m.evaluator.observe(&reading.sample),
            Err(_) => return AfterExit::Default,
        };
        return after(handle_verdicts(shared, verdicts));
    }
    AfterExit::Default
}
