//! The limits each guest is held to, as pure decisions on what the guest sent and
//! when: token buckets for bytes, messages and reports, doubling penalties, log
//! throttling, which policy messages its policy allows, and text cut to a bound. They
//! outlive a reconnection, so dropping the connection does not reset them.

use super::{
    ACTIONS_BURST, ACTIONS_PER_SEC, BYTES_BURST, BYTES_PER_SEC, FIRST_PENALTY, FORGIVE_AFTER,
    LOG_EVERY, MAX_NAME, MAX_PENALTY, MAX_PROGRESS_ITEMS, MAX_TEXT, MSGS_BURST, MSGS_PER_SEC,
    REPORTS_BURST, REPORTS_PER_SEC,
};
use herd_policy::Rule;
use herd_proto::guest::GuestMsg;
use herd_proto::policy::{Enforcement, PolicySpec};
use herd_proto::wire::VmId;
use std::time::Duration;
use tokio::time::Instant;
use tracing::warn;

/// A token bucket: `burst` tokens, refilled at `per_sec`.
#[derive(Debug, Clone)]
pub(super) struct Bucket {
    tokens: f64,
    burst: f64,
    per_sec: f64,
    at: Instant,
}

impl Bucket {
    pub(super) fn new(burst: f64, per_sec: f64, now: Instant) -> Bucket {
        Bucket {
            tokens: burst,
            burst,
            per_sec,
            at: now,
        }
    }

    pub(super) fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.per_sec).min(self.burst);
        self.at = self.at.max(now);
    }

    /// Takes one token if there is one.
    pub(super) fn take(&mut self, now: Instant) -> bool {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Takes `n` tokens, into debt if need be; returns how long until the debt is paid.
    pub(super) fn charge(&mut self, n: f64, now: Instant) -> Duration {
        self.refill(now);
        self.tokens -= n;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.per_sec)
        }
    }
}

/// One guest's budgets, offences and log allowance; kept across its connections, so
/// reconnecting buys a guest nothing.
#[derive(Debug)]
pub(super) struct Guard {
    pub(super) bytes: Bucket,
    pub(super) messages: Bucket,
    pub(super) reports: Bucket,
    pub(super) actions: Bucket,
    pub(super) strikes: u32,
    pub(super) last_strike: Option<Instant>,
    pub(super) last_log: Option<Instant>,
    /// Log lines held back since the last one written.
    pub(super) held_back: u64,
    /// Totals, for the log.
    pub(super) bytes_read: u64,
    pub(super) dropped: u64,
    pub(super) lines_logged: u64,
}

impl Guard {
    pub(super) fn new(now: Instant) -> Guard {
        Guard {
            bytes: Bucket::new(BYTES_BURST, BYTES_PER_SEC, now),
            messages: Bucket::new(MSGS_BURST, MSGS_PER_SEC, now),
            reports: Bucket::new(REPORTS_BURST, REPORTS_PER_SEC, now),
            actions: Bucket::new(ACTIONS_BURST, ACTIONS_PER_SEC, now),
            strikes: 0,
            last_strike: None,
            last_log: None,
            held_back: 0,
            bytes_read: 0,
            dropped: 0,
            lines_logged: 0,
        }
    }

    /// Counts `n` bytes read; returns how long to wait before reading again.
    pub(super) fn on_read(&mut self, n: usize, now: Instant) -> Duration {
        self.bytes_read += n as u64;
        self.bytes.charge(n as f64, now)
    }

    /// Counts an offence (which ends the connection); returns the penalty.
    pub(super) fn strike(&mut self, now: Instant) -> Duration {
        if self
            .last_strike
            .is_some_and(|at| now.saturating_duration_since(at) >= FORGIVE_AFTER)
        {
            self.strikes = 0;
        }
        self.last_strike = Some(now);
        self.strikes = self.strikes.saturating_add(1);
        FIRST_PENALTY
            .saturating_mul(1 << (self.strikes - 1).min(16))
            .min(MAX_PENALTY)
    }

    /// Counts an offence, logs it (within the allowance) and returns the penalty.
    pub(super) fn offence(&mut self, id: VmId, now: Instant, what: &str) -> Duration {
        let penalty = self.strike(now);
        self.complain(
            id,
            now,
            &format!(
                "{what}; dropping the channel for {} s (offence {})",
                penalty.as_secs(),
                self.strikes
            ),
        );
        penalty
    }

    /// Logs a line about this guest unless one was logged within [`LOG_EVERY`].
    pub(super) fn complain(&mut self, id: VmId, now: Instant, what: &str) {
        if self
            .last_log
            .is_some_and(|at| now.saturating_duration_since(at) < LOG_EVERY)
        {
            self.held_back += 1;
            return;
        }
        self.last_log = Some(now);
        self.lines_logged += 1;
        // Taken outside the macro: its fields are not evaluated when the level is off.
        let held_back = std::mem::take(&mut self.held_back);
        warn!(
            %id,
            held_back,
            bytes_read = self.bytes_read,
            dropped = self.dropped,
            "guest channel: {what}"
        );
    }

    /// Whether an authenticated guest's message (not a hello) may go on, or why not.
    pub(super) fn admit(
        &mut self,
        msg: &GuestMsg,
        policy: &PolicySpec,
        now: Instant,
    ) -> Result<(), &'static str> {
        let verdict = match msg {
            GuestMsg::Hello { .. }
            | GuestMsg::Status { .. }
            | GuestMsg::Usage { .. }
            | GuestMsg::PolicyProgress { .. } => Ok(()),
            GuestMsg::PolicyAction { .. } if !policy_allows(policy, msg) => {
                Err("a policy action its policy does not allow")
            }
            GuestMsg::PolicyAction { .. } => {
                if self.actions.take(now) {
                    Ok(())
                } else {
                    Err("more policy actions than allowed; dropping them")
                }
            }
            GuestMsg::PolicyWarning { rule, .. } if enforcement(policy, rule).is_none() => {
                Err("a policy warning for a rule its policy does not have")
            }
            GuestMsg::PolicyWarning { .. }
            | GuestMsg::Error { .. }
            | GuestMsg::WorkloadExit { .. }
            | GuestMsg::Burst { .. } => {
                if self.reports.take(now) {
                    Ok(())
                } else {
                    Err("more reports than allowed; dropping them")
                }
            }
        };
        if verdict.is_err() {
            self.dropped += 1;
        }
        verdict
    }
}

/// Whether a policy action is the one the VM's policy names for that rule (anything else
/// is not a policy action).
pub(crate) fn policy_allows(policy: &PolicySpec, msg: &GuestMsg) -> bool {
    match msg {
        GuestMsg::PolicyAction { rule, action, .. } => {
            enforcement(policy, rule).is_some_and(|e| e.action == *action)
        }
        _ => true,
    }
}

/// The enforcement the VM's policy gives the rule named `rule`, if it has that rule.
pub(super) fn enforcement(policy: &PolicySpec, rule: &str) -> Option<Enforcement> {
    const RULES: [Rule; 7] = [
        Rule::Lifespan,
        Rule::Task,
        Rule::Idle,
        Rule::Overuse,
        Rule::Budget,
        Rule::CostCap,
        Rule::Errors,
    ];
    let rule = RULES.into_iter().find(|r| r.as_str() == rule)?;
    match rule {
        Rule::Lifespan => policy.lifespan.map(|r| r.enforce),
        Rule::Task => policy.task.map(|r| r.enforce),
        Rule::Idle => policy.idle.map(|r| r.enforce),
        Rule::Overuse => policy.overuse.map(|r| r.enforce),
        Rule::Budget => policy.budget.map(|r| r.enforce),
        Rule::CostCap => policy.cost_cap.map(|r| r.enforce),
        Rule::Errors => policy.errors.map(|r| r.enforce),
    }
}

/// Cuts a guest's free text to a bound before it travels on (and into the event log).
pub(crate) fn clamp(msg: GuestMsg) -> GuestMsg {
    pub(super) fn cut(mut text: String, max: usize) -> String {
        if text.len() > max {
            let mut end = max;
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            text.truncate(end);
            text.push('…');
        }
        text
    }
    match msg {
        GuestMsg::Hello {
            vm_id,
            management_token,
            guest_version,
        } => GuestMsg::Hello {
            vm_id,
            management_token,
            guest_version: cut(guest_version, MAX_NAME),
        },
        GuestMsg::Error { message } => GuestMsg::Error {
            message: cut(message, MAX_TEXT),
        },
        GuestMsg::PolicyWarning { rule, message } => GuestMsg::PolicyWarning {
            rule: cut(rule, MAX_NAME),
            message: cut(message, MAX_TEXT),
        },
        GuestMsg::PolicyAction {
            rule,
            action,
            reason,
        } => GuestMsg::PolicyAction {
            rule: cut(rule, MAX_NAME),
            action,
            reason: cut(reason, MAX_TEXT),
        },
        GuestMsg::PolicyProgress { mut items } => {
            items.truncate(MAX_PROGRESS_ITEMS);
            GuestMsg::PolicyProgress {
                items: items
                    .into_iter()
                    .map(|(rule, text, milli, left)| {
                        (cut(rule, MAX_NAME), cut(text, MAX_NAME * 4), milli, left)
                    })
                    .collect(),
            }
        }
        other @ (GuestMsg::Status { .. }
        | GuestMsg::Usage { .. }
        | GuestMsg::WorkloadExit { .. }
        | GuestMsg::Burst { .. }) => other,
    }
}
