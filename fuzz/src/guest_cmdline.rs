//! Target `guest_cmdline`: herd-guest's kernel command line parser, and the policy
//! engine it configures.
//!
//! The command line is written by the host, but it is the only configuration herd-guest
//! (PID 1 of the VM) gets, and a panic there leaves a VM with no init. The parser must
//! not panic, and whatever it accepts must survive being written back the way the
//! module docs describe and parsed again. The policy it decodes then drives herd-guest's
//! [`Evaluator`], fed here with arbitrary samples (a guest's own clock and counters are
//! whatever the workload made them); the evaluator's documented promises must hold:
//! each rule warns at most once and acts at most once, never warns after it acted, and
//! after a Suspend, Stop or Terminate returns nothing more.
//!
//! Input: the command line, then optionally a NUL byte (never part of a real command
//! line) and samples of 33 bytes each: unix ms, CPU ms, memory KiB, network bytes (all
//! big-endian u64) and a workload byte (0 not started, 1 running, else exited with the
//! byte as its code; bit 7 also records a crash, as herd-guest does on a non-zero exit).

use base64::Engine;
use herd_guest_cmdline::{parse, GuestConfig};
use herd_policy::{Evaluator, Rule, Sample, Verdict, Workload};
use herd_proto::policy::{PolicyAction, PolicySpec};
use std::collections::HashSet;

pub const SAMPLE_BYTES: usize = 33;

pub fn run(data: &[u8]) {
    let (line, samples) = match data.iter().position(|&b| b == 0) {
        Some(nul) => (&data[..nul], &data[nul + 1..]),
        None => (data, &[][..]),
    };
    // herd-guest reads /proc/cmdline with read_to_string; text that is not UTF-8 never
    // reaches the parser, so only UTF-8 is interesting here.
    let Ok(line) = std::str::from_utf8(line) else {
        return;
    };
    let Ok(config) = parse(line) else {
        return;
    };
    assert!(!config.command.is_empty(), "no workload from {line:?}");
    let again = parse(&render(&config));
    assert_eq!(
        again.as_ref(),
        Ok(&config),
        "{line:?} does not survive a rewrite"
    );
    evaluate(&config, samples);
}

/// The command line the host would write for `config` (see herd-guest's cmdline docs).
pub fn render(config: &GuestConfig) -> String {
    let b64 = base64::engine::general_purpose::STANDARD;
    let b64url = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let command = serde_json::to_vec(&config.command).expect("a list of strings encodes");
    let policy = postcard::to_stdvec(&config.policy).expect("a policy encodes");
    let mut line = format!(
        "herd.vm={} herd.token={} herd.cmd={} herd.keep={} herd.policy={} herd.mem={}",
        config.vm_id,
        config.token,
        b64.encode(command),
        if config.keep { 1 } else { 0 },
        b64url.encode(policy),
        config.memory_mib,
    );
    if let Some(born) = config.born_unix_ms {
        line.push_str(&format!(" herd.born={born}"));
    }
    if let Some(now) = config.host_now_unix_ms {
        line.push_str(&format!(" herd.now={now}"));
    }
    line
}

fn evaluate(config: &GuestConfig, samples: &[u8]) {
    let born = config.born_unix_ms.unwrap_or(1_700_000_000_000);
    let mut evaluator = Evaluator::new(config.policy, 2, born).with_memory_mib(config.memory_mib);
    let mut promises = Promises::default();
    for chunk in samples.chunks_exact(SAMPLE_BYTES).take(64) {
        let word = |idx: usize| {
            let mut bytes = [0u8; 8];
            bytes.copy_from_slice(&chunk[idx * 8..idx * 8 + 8]);
            u64::from_be_bytes(bytes)
        };
        let workload_byte = chunk[32];
        let workload = match workload_byte & 0x7f {
            0 => Workload::NotStarted,
            1 => Workload::Running,
            code => Workload::Exited {
                code: i32::from(code),
            },
        };
        let sample = Sample {
            unix_ms: word(0),
            cpu_ms: word(1),
            mem_kib: word(2),
            net_bytes: word(3),
            workload,
        };
        let _ = evaluator.next_deadline_ms();
        if workload_byte & 0x80 != 0 {
            let verdict = evaluator.record_crash();
            promises.check(&config.policy, verdict.into_iter().collect(), true);
        }
        let verdicts = evaluator.observe(&sample);
        promises.check(&config.policy, verdicts, false);
        assert_eq!(evaluator.is_done(), promises.done, "is_done disagrees");
        let _ = evaluator.progress();
        let _ = evaluator.cost_micros();
    }
}

/// What the evaluator returned so far, to check its promises against.
#[derive(Default)]
struct Promises {
    warned: HashSet<Rule>,
    acted: HashSet<Rule>,
    done: bool,
}

impl Promises {
    fn check(&mut self, spec: &PolicySpec, verdicts: Vec<Verdict>, from_crash: bool) {
        if self.done {
            assert!(
                verdicts.is_empty(),
                "verdicts after the VM ended: {verdicts:?}"
            );
        }
        for verdict in verdicts {
            match verdict {
                Verdict::Warn { rule, .. } => {
                    assert!(!self.acted.contains(&rule), "{rule} warned after acting");
                    assert!(self.warned.insert(rule), "{rule} warned twice");
                }
                Verdict::Act { rule, action, .. } => {
                    assert!(self.acted.insert(rule), "{rule} acted twice");
                    // record_crash may skip the errors rule's warning (see its docs).
                    if warns(spec, rule) && !from_crash {
                        assert!(self.warned.contains(&rule), "{rule} acted without warning");
                    }
                    if action != PolicyAction::Notify {
                        self.done = true;
                    }
                }
            }
        }
    }
}

/// Whether the spec gives `rule` a warning.
fn warns(spec: &PolicySpec, rule: Rule) -> bool {
    let enforce = match rule {
        Rule::Lifespan => spec.lifespan.map(|r| r.enforce),
        Rule::Task => spec.task.map(|r| r.enforce),
        Rule::Idle => spec.idle.map(|r| r.enforce),
        Rule::Overuse => spec.overuse.map(|r| r.enforce),
        Rule::Budget => spec.budget.map(|r| r.enforce),
        Rule::CostCap => spec.cost_cap.map(|r| r.enforce),
        Rule::Errors => spec.errors.map(|r| r.enforce),
    };
    enforce.is_some_and(|e| e.warn.is_some())
}
