//! The self-management policy engine, sans-IO: the same decisions run inside every guest
//! (herd-guest) and on its host (the agent's backstop), so it must not do I/O.
//!
//! An [`Evaluator`] holds one VM's [`PolicySpec`] and what it has seen so far. The caller
//! (herd-guest inside the VM, the agent as a backstop outside it) samples the VM's
//! counters and clock about once a second and feeds them to [`Evaluator::observe`], which
//! returns the warnings and actions due now. Nothing here reads a clock, a file or a
//! socket, so every rule is tested with made-up samples.
//!
//! Rules fire at the first sample at or past their threshold, so "within one sample
//! interval of the threshold". Each rule warns at most once and acts at most once; a
//! warning, when the rule has one, always comes before (or together with, in the same
//! batch, first) its action. After an action that ends or freezes the VM (`Suspend`,
//! `Stop`, `Terminate`) the evaluator returns nothing more, but keeps accounting.
//!
//! **Gap rule.** An interval between two samples longer than [`MAX_RATE_INTERVAL_MS`] is
//! time the VM did not run through (it was suspended, or the sampler stalled): it does
//! not count towards idle or over-use streaks (it breaks them), nor towards memory
//! GiB-hours, nor towards the time-based prices. Counters (CPU, network) still count
//! whatever they grew by. Lifespan is wall-clock and ignores the rule.
//!
//! **Counter resets.** A counter that goes down is taken as reset (a reboot); its new
//! value is all new usage.

mod pricing;

pub use herd_proto::policy::{PolicyAction, PolicySpec, RateCard};
pub use pricing::{
    fine_to_micros, is_peak_hour, peak_ms_between, price_interval, price_interval_fine,
    FINE_PER_MICRO,
};

use herd_proto::policy::Enforcement;
use pricing::counter_delta;
use serde::{Deserialize, Serialize};

/// Intervals longer than this are gaps (see the crate docs).
pub const MAX_RATE_INTERVAL_MS: u64 = 30_000;

/// KiB x ms in one thousandth of a GiB-hour.
const KIB_MS_PER_GIB_HOUR_MILLI: u128 = 1024 * 1024 * 3_600_000 / 1000;

/// One reading of a VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sample {
    /// Wall clock when sampled.
    pub unix_ms: u64,
    /// Cumulative CPU time of the VM (all vCPUs) since it was born.
    pub cpu_ms: u64,
    /// Memory in use now.
    pub mem_kib: u64,
    /// Cumulative rx+tx bytes since born.
    pub net_bytes: u64,
    pub workload: Workload,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Workload {
    NotStarted,
    Running,
    Exited { code: i32 },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Rule {
    Lifespan,
    Task,
    Idle,
    Overuse,
    Budget,
    CostCap,
    Errors,
}

impl Rule {
    pub fn as_str(self) -> &'static str {
        match self {
            Rule::Lifespan => "lifespan",
            Rule::Task => "task",
            Rule::Idle => "idle",
            Rule::Overuse => "overuse",
            Rule::Budget => "budget",
            Rule::CostCap => "cost_cap",
            Rule::Errors => "errors",
        }
    }

    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

impl std::fmt::Display for Rule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Verdict {
    Warn {
        rule: Rule,
        message: String,
    },
    Act {
        rule: Rule,
        action: PolicyAction,
        reason: String,
    },
}

/// How far one rule is from firing, for people.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RuleProgress {
    pub rule: Rule,
    /// E.g. "cpu 12.0 of 30 s (40%)".
    pub text: String,
    /// How close to firing, in thousandths (1000 = at the threshold).
    pub fraction_milli: u32,
    pub seconds_left: Option<u64>,
}

/// Everything an [`Evaluator`] learned, to persist and [`Evaluator::restore`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EvaluatorState {
    pub born_unix_ms: u64,
    /// Memory allocated to the VM, for the memory price of the cost cap.
    pub memory_mib: u64,
    pub last: Option<Sample>,
    pub cpu_ms_total: u64,
    pub net_bytes_total: u64,
    /// Memory in use integrated over time, KiB x ms.
    pub mem_kib_ms: u128,
    /// Cost so far in fine units (see [`FINE_PER_MICRO`]).
    pub cost_fine: u128,
    /// Start of the current idle streak.
    pub idle_since_ms: Option<u64>,
    /// Start of the current over-use streak.
    pub overuse_since_ms: Option<u64>,
    pub crashes: u32,
    /// The latest crash was already counted (by `record_crash` or a sample).
    pub crash_counted: bool,
    /// Bit set of rules that warned / acted (bit = `Rule as u8`).
    pub warned: u8,
    pub acted: u8,
    /// A Suspend, Stop or Terminate was returned.
    pub done: bool,
}

#[derive(Clone, Debug)]
pub struct Evaluator {
    spec: PolicySpec,
    vcpus: u32,
    st: EvaluatorState,
}

fn ms_to_s(ms: u64) -> String {
    format!("{}.{}", ms / 1000, (ms % 1000) / 100)
}

fn permille(used: u128, limit: u128) -> u32 {
    if limit == 0 {
        return 1000;
    }
    u32::try_from(used.saturating_mul(1000) / limit).unwrap_or(u32::MAX)
}

fn micros_text(micros: u64) -> String {
    format!("{}.{:06}", micros / 1_000_000, micros % 1_000_000)
}

impl Evaluator {
    pub fn new(spec: PolicySpec, vcpus: u32, born_unix_ms: u64) -> Evaluator {
        Evaluator {
            spec,
            vcpus: vcpus.max(1),
            st: EvaluatorState {
                born_unix_ms,
                memory_mib: 0,
                last: None,
                cpu_ms_total: 0,
                net_bytes_total: 0,
                mem_kib_ms: 0,
                cost_fine: 0,
                idle_since_ms: None,
                overuse_since_ms: None,
                crashes: 0,
                crash_counted: false,
                warned: 0,
                acted: 0,
                done: false,
            },
        }
    }

    /// Sets the memory allocated to the VM, which the cost cap's memory rate prices
    /// (0, the default, prices no memory).
    pub fn with_memory_mib(mut self, memory_mib: u64) -> Evaluator {
        self.st.memory_mib = memory_mib;
        self
    }

    pub fn spec(&self) -> &PolicySpec {
        &self.spec
    }

    pub fn state(&self) -> EvaluatorState {
        self.st.clone()
    }

    pub fn restore(spec: PolicySpec, vcpus: u32, state: EvaluatorState) -> Evaluator {
        Evaluator {
            spec,
            vcpus: vcpus.max(1),
            st: state,
        }
    }

    /// Total cost so far in micro-units, priced with the cost cap's rate card (0 if
    /// none), rounded down once.
    pub fn cost_micros(&self) -> u64 {
        fine_to_micros(self.st.cost_fine)
    }

    /// Workload crashes counted so far.
    pub fn crashes(&self) -> u32 {
        self.st.crashes
    }

    /// Whether a Suspend, Stop or Terminate was returned.
    pub fn is_done(&self) -> bool {
        self.st.done
    }

    /// The next wall-clock instant (unix ms) at which a time rule is due, so a caller can
    /// sample then rather than up to one interval later.
    pub fn next_deadline_ms(&self) -> Option<u64> {
        if self.st.done {
            return None;
        }
        let (deadline, enforce) = self.lifespan()?;
        if self.acted(Rule::Lifespan) {
            return None;
        }
        match enforce.warn {
            Some(w) if !self.warned(Rule::Lifespan) => {
                Some(deadline.saturating_sub(w.saturating_mul(1000)))
            }
            _ => Some(deadline),
        }
    }

    fn lifespan(&self) -> Option<(u64, Enforcement)> {
        let l = self.spec.lifespan?;
        let by_age = l
            .max_seconds
            .map(|s| self.st.born_unix_ms.saturating_add(s.saturating_mul(1000)));
        let by_time = l.end_at.map(|s| s.saturating_mul(1000));
        let deadline = match (by_age, by_time) {
            (Some(a), Some(b)) => a.min(b),
            (Some(a), None) => a,
            (None, Some(b)) => b,
            (None, None) => return None,
        };
        Some((deadline, l.enforce))
    }

    fn warned(&self, rule: Rule) -> bool {
        self.st.warned & rule.bit() != 0
    }

    fn acted(&self, rule: Rule) -> bool {
        self.st.acted & rule.bit() != 0
    }

    /// Emits a rule's warning and/or action; a due action whose warning was never given
    /// gets it first, in the same batch.
    fn fire(
        &mut self,
        rule: Rule,
        enforce: Enforcement,
        warn_now: bool,
        act_now: bool,
        message: impl Fn() -> String,
        out: &mut Vec<Verdict>,
    ) {
        if self.st.done || self.acted(rule) {
            return;
        }
        if (warn_now || act_now) && enforce.warn.is_some() && !self.warned(rule) {
            self.st.warned |= rule.bit();
            out.push(Verdict::Warn {
                rule,
                message: message(),
            });
        }
        if act_now {
            self.st.acted |= rule.bit();
            if enforce.action != PolicyAction::Notify {
                self.st.done = true;
            }
            out.push(Verdict::Act {
                rule,
                action: enforce.action,
                reason: message(),
            });
        }
    }

    /// Feed one sample (call every ~1 s). Returns what to do now.
    pub fn observe(&mut self, sample: &Sample) -> Vec<Verdict> {
        let born = self.st.born_unix_ms;
        let prev = self.st.last.unwrap_or(Sample {
            unix_ms: born,
            cpu_ms: 0,
            mem_kib: sample.mem_kib,
            net_bytes: 0,
            workload: Workload::NotStarted,
        });
        let now = sample.unix_ms;
        let dt = now.saturating_sub(prev.unix_ms);
        let gap = dt > MAX_RATE_INTERVAL_MS;
        let d_cpu = counter_delta(prev.cpu_ms, sample.cpu_ms);
        let d_net = counter_delta(prev.net_bytes, sample.net_bytes);
        self.st.cpu_ms_total = self.st.cpu_ms_total.saturating_add(d_cpu);
        self.st.net_bytes_total = self.st.net_bytes_total.saturating_add(d_net);
        if !gap {
            self.st.mem_kib_ms = self
                .st
                .mem_kib_ms
                .saturating_add(u128::from(sample.mem_kib) * u128::from(dt));
        }
        if let Some(cap) = self.spec.cost_cap {
            let price = pricing::price_fine(&cap.rates, &prev, sample, self.st.memory_mib, !gap);
            self.st.cost_fine = self.st.cost_fine.saturating_add(price);
        }
        // Rates over this interval, when it is a real one: between two samples (the
        // first one's interval from birth spans the boot), no gap.
        let rates = (!gap && dt > 0 && self.st.last.is_some()).then(|| {
            let cpu_permille = u128::from(d_cpu) * 1000 / (u128::from(dt) * u128::from(self.vcpus));
            let net_bps = u128::from(d_net) * 1000 / u128::from(dt);
            (cpu_permille, net_bps)
        });
        if let Some(idle) = self.spec.idle {
            let warm_end = born.saturating_add(idle.warmup_seconds.saturating_mul(1000));
            match rates {
                _ if gap => self.st.idle_since_ms = None,
                None => {}
                Some(_) if now <= warm_end => self.st.idle_since_ms = None,
                Some((cpu, net)) => {
                    if cpu < u128::from(idle.cpu_below_permille)
                        && net < u128::from(idle.net_below_bps)
                    {
                        self.st
                            .idle_since_ms
                            .get_or_insert(prev.unix_ms.max(warm_end));
                    } else {
                        self.st.idle_since_ms = None;
                    }
                }
            }
        }
        if let Some(over) = self.spec.overuse {
            match rates {
                _ if gap => self.st.overuse_since_ms = None,
                None => {}
                Some((cpu, net)) => {
                    let cpu_over = over.cpu_above_permille.is_some_and(|t| cpu > u128::from(t));
                    let mem_over = over
                        .mem_above_mib
                        .is_some_and(|t| sample.mem_kib > t.saturating_mul(1024));
                    let net_over = over.net_above_bps.is_some_and(|t| net > u128::from(t));
                    if cpu_over || mem_over || net_over {
                        self.st.overuse_since_ms.get_or_insert(prev.unix_ms);
                    } else {
                        self.st.overuse_since_ms = None;
                    }
                }
            }
        }
        let mut out = Vec::new();
        // A crash seen in the samples that record_crash did not already count.
        match sample.workload {
            Workload::Exited { code } if code != 0 && !self.st.crash_counted => {
                self.st.crashes += 1;
                self.st.crash_counted = true;
                self.crash_verdicts(&mut out);
            }
            Workload::Running => self.st.crash_counted = false,
            _ => {}
        }
        self.st.last = Some(*sample);
        self.evaluate(now, &mut out);
        out
    }

    fn evaluate(&mut self, now: u64, out: &mut Vec<Verdict>) {
        if let Some((deadline, enforce)) = self.lifespan() {
            let warn_at = deadline.saturating_sub(enforce.warn.unwrap_or(0).saturating_mul(1000));
            let left = deadline.saturating_sub(now);
            self.fire(
                Rule::Lifespan,
                enforce,
                now >= warn_at,
                now >= deadline,
                || {
                    if now >= deadline {
                        "lifespan reached".to_string()
                    } else {
                        format!("lifespan ends in {} s", ms_to_s(left))
                    }
                },
                out,
            );
        }
        if let (
            Some(task),
            Some(Sample {
                workload: Workload::Exited { code },
                ..
            }),
        ) = (self.spec.task, self.st.last)
        {
            // A crash is the errors rule's business when there is one.
            let done = code == 0 || self.spec.errors.is_none();
            self.fire(
                Rule::Task,
                task.enforce,
                done,
                done,
                || format!("task completed (exit code {code})"),
                out,
            );
        }
        if let Some(budget) = self.spec.budget {
            let parts = self.budget_parts();
            let warn = budget.enforce.warn;
            let over = parts.iter().any(|(_, used, limit)| used >= limit);
            let warn_now = warn.is_some_and(|w| {
                parts.iter().any(|(_, used, limit)| {
                    used.saturating_mul(1000) >= limit.saturating_mul(u128::from(w))
                })
            });
            let text = self.budget_text();
            self.fire(
                Rule::Budget,
                budget.enforce,
                warn_now,
                over,
                || {
                    if over {
                        format!("budget used up: {text}")
                    } else {
                        format!("budget nearly used: {text}")
                    }
                },
                out,
            );
        }
        if let Some(cap) = self.spec.cost_cap {
            let limit = u128::from(cap.max_micros) * FINE_PER_MICRO;
            let used = self.st.cost_fine;
            let over = used >= limit;
            let warn_now = cap
                .enforce
                .warn
                .is_some_and(|w| used.saturating_mul(1000) >= limit.saturating_mul(u128::from(w)));
            let cost = self.cost_micros();
            self.fire(
                Rule::CostCap,
                cap.enforce,
                warn_now,
                over,
                || {
                    format!(
                        "cost {} of {}",
                        micros_text(cost),
                        micros_text(cap.max_micros)
                    )
                },
                out,
            );
        }
        if let Some(over) = self.spec.overuse {
            if let Some(since) = self.st.overuse_since_ms {
                let streak = now.saturating_sub(since);
                let need = over.for_seconds.saturating_mul(1000);
                let warn_at =
                    need.saturating_sub(over.enforce.warn.unwrap_or(0).saturating_mul(1000));
                self.fire(
                    Rule::Overuse,
                    over.enforce,
                    streak >= warn_at,
                    streak >= need,
                    || format!("over-use for {} of {} s", ms_to_s(streak), over.for_seconds),
                    out,
                );
            }
        }
        if let Some(idle) = self.spec.idle {
            if let Some(since) = self.st.idle_since_ms {
                let streak = now.saturating_sub(since);
                let need = idle.for_seconds.saturating_mul(1000);
                let warn_at =
                    need.saturating_sub(idle.enforce.warn.unwrap_or(0).saturating_mul(1000));
                self.fire(
                    Rule::Idle,
                    idle.enforce,
                    streak >= warn_at,
                    streak >= need,
                    || format!("idle for {} of {} s", ms_to_s(streak), idle.for_seconds),
                    out,
                );
            }
        }
    }

    /// (name, used, limit) of every budget component, in comparable units.
    fn budget_parts(&self) -> Vec<(&'static str, u128, u128)> {
        let Some(b) = self.spec.budget else {
            return Vec::new();
        };
        let mut parts = Vec::new();
        if let Some(s) = b.cpu_seconds {
            parts.push((
                "cpu",
                u128::from(self.st.cpu_ms_total),
                u128::from(s) * 1000,
            ));
        }
        if let Some(m) = b.mem_gib_hours_milli {
            parts.push((
                "memory",
                self.st.mem_kib_ms,
                u128::from(m) * KIB_MS_PER_GIB_HOUR_MILLI,
            ));
        }
        if let Some(n) = b.net_bytes {
            parts.push(("net", u128::from(self.st.net_bytes_total), u128::from(n)));
        }
        parts
    }

    fn budget_text(&self) -> String {
        let Some(b) = self.spec.budget else {
            return String::new();
        };
        let mut texts = Vec::new();
        if let Some(s) = b.cpu_seconds {
            let used = self.st.cpu_ms_total;
            texts.push(format!(
                "cpu {} of {s} s ({}%)",
                ms_to_s(used),
                permille(u128::from(used), u128::from(s) * 1000) / 10
            ));
        }
        if let Some(m) = b.mem_gib_hours_milli {
            let used_milli = self.st.mem_kib_ms / KIB_MS_PER_GIB_HOUR_MILLI;
            texts.push(format!(
                "memory {used_milli} of {m} milli-GiB-h ({}%)",
                permille(
                    self.st.mem_kib_ms,
                    u128::from(m) * KIB_MS_PER_GIB_HOUR_MILLI
                ) / 10
            ));
        }
        if let Some(n) = b.net_bytes {
            let used = self.st.net_bytes_total;
            texts.push(format!(
                "net {used} of {n} bytes ({}%)",
                permille(u128::from(used), u128::from(n)) / 10
            ));
        }
        texts.join(", ")
    }

    fn crash_verdicts(&mut self, out: &mut Vec<Verdict>) {
        let Some(errors) = self.spec.errors else {
            return;
        };
        let crashes = self.st.crashes;
        let max = errors.max_restarts;
        self.fire(
            Rule::Errors,
            errors.enforce,
            crashes >= max,
            crashes > max,
            || format!("workload crashed {crashes} times, {max} restarts allowed"),
            out,
        );
    }

    /// Counts one workload crash (a non-zero exit) that the caller saw directly. Returns
    /// the errors rule's verdict: `Act` once crashes exceed `max_restarts` (the caller
    /// must then not restart), a `Warn` at the last allowed restart, else `None`. A
    /// warning skipped because the limit was passed at once is not returned separately.
    pub fn record_crash(&mut self) -> Option<Verdict> {
        self.st.crashes += 1;
        self.st.crash_counted = true;
        let mut out = Vec::new();
        self.crash_verdicts(&mut out);
        out.pop()
    }

    /// Whether the caller should restart a crashed workload: there is an errors rule and
    /// it has not acted.
    pub fn should_restart(&self) -> bool {
        self.spec.errors.is_some() && !self.acted(Rule::Errors) && !self.st.done
    }

    pub fn progress(&self) -> Vec<RuleProgress> {
        let now = self
            .st
            .last
            .map(|s| s.unix_ms)
            .unwrap_or(self.st.born_unix_ms);
        let mut out = Vec::new();
        if let Some((deadline, _)) = self.lifespan() {
            let born = self.st.born_unix_ms;
            let age = now.saturating_sub(born);
            let total = deadline.saturating_sub(born);
            out.push(RuleProgress {
                rule: Rule::Lifespan,
                text: format!("age {} of {} s", ms_to_s(age), ms_to_s(total)),
                fraction_milli: permille(u128::from(age), u128::from(total)),
                seconds_left: Some(deadline.saturating_sub(now).div_ceil(1000)),
            });
        }
        if self.spec.task.is_some() {
            let (text, f) = match self.st.last.map(|s| s.workload) {
                Some(Workload::Exited { code }) => (format!("workload exited ({code})"), 1000),
                Some(Workload::Running) => ("workload running".to_string(), 0),
                _ => ("workload not started".to_string(), 0),
            };
            out.push(RuleProgress {
                rule: Rule::Task,
                text,
                fraction_milli: f,
                seconds_left: None,
            });
        }
        for (rule, since, for_seconds) in [
            (
                Rule::Idle,
                self.st.idle_since_ms,
                self.spec.idle.map(|i| i.for_seconds),
            ),
            (
                Rule::Overuse,
                self.st.overuse_since_ms,
                self.spec.overuse.map(|o| o.for_seconds),
            ),
        ] {
            let Some(for_seconds) = for_seconds else {
                continue;
            };
            let streak = since.map(|s| now.saturating_sub(s)).unwrap_or(0);
            let need = for_seconds.saturating_mul(1000);
            out.push(RuleProgress {
                rule,
                text: format!("{} {} of {for_seconds} s", rule, ms_to_s(streak)),
                fraction_milli: permille(u128::from(streak), u128::from(need)),
                seconds_left: since.map(|_| need.saturating_sub(streak).div_ceil(1000)),
            });
        }
        if self.spec.budget.is_some() {
            let f = self
                .budget_parts()
                .iter()
                .map(|(_, used, limit)| permille(*used, *limit))
                .max()
                .unwrap_or(0);
            out.push(RuleProgress {
                rule: Rule::Budget,
                text: self.budget_text(),
                fraction_milli: f,
                seconds_left: None,
            });
        }
        if let Some(cap) = self.spec.cost_cap {
            let f = permille(
                self.st.cost_fine,
                u128::from(cap.max_micros) * FINE_PER_MICRO,
            );
            out.push(RuleProgress {
                rule: Rule::CostCap,
                text: format!(
                    "cost {} of {} ({}%)",
                    micros_text(self.cost_micros()),
                    micros_text(cap.max_micros),
                    f / 10
                ),
                fraction_milli: f,
                seconds_left: None,
            });
        }
        if let Some(errors) = self.spec.errors {
            out.push(RuleProgress {
                rule: Rule::Errors,
                text: format!(
                    "crashes {} of {} restarts",
                    self.st.crashes, errors.max_restarts
                ),
                fraction_milli: permille(
                    u128::from(self.st.crashes),
                    u128::from(errors.max_restarts) + 1,
                ),
                seconds_left: None,
            });
        }
        out
    }
}

#[cfg(test)]
mod tests;
