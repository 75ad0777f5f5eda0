//! Self-management policies of a VM, as data.
//!
//! A policy travels with the VM spec: the server stores it, the agent enforces it as a
//! backstop from host-side measurements, and herd-guest enforces it inside the VM from
//! its own measurements and clock, with nobody else reachable. All three read this one
//! definition; evaluation lives in `herd-policy`.
//!
//! Money is integer micro-units (1/1,000,000 of the currency unit), so a bill computed
//! here, in the agent and in the guest agrees to the cent with a hand calculation.

use serde::{Deserialize, Serialize};

/// What a rule does when it fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum PolicyAction {
    /// Only report.
    Notify,
    /// Save to disk and stop consuming CPU and memory.
    Suspend,
    /// Power off; the VM can be started again.
    Stop,
    /// End the VM and free everything it holds.
    Terminate,
}

impl PolicyAction {
    pub const ALL: [PolicyAction; 4] = [
        PolicyAction::Notify,
        PolicyAction::Suspend,
        PolicyAction::Stop,
        PolicyAction::Terminate,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            PolicyAction::Notify => "notify",
            PolicyAction::Suspend => "suspend",
            PolicyAction::Stop => "stop",
            PolicyAction::Terminate => "terminate",
        }
    }

    pub fn parse(text: &str) -> Option<PolicyAction> {
        PolicyAction::ALL.into_iter().find(|a| a.as_str() == text)
    }
}

/// Every rule has an action and may warn ahead of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Enforcement {
    pub action: PolicyAction,
    /// For time-based rules: warn this many seconds before the action. For budgets and
    /// cost caps: warn at this many thousandths of the limit (e.g. 800 = at 80%).
    #[serde(default)]
    pub warn: Option<u64>,
}

/// End of life: after a duration since first boot, or at a wall-clock time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Lifespan {
    /// Seconds of life since the VM first booted.
    pub max_seconds: Option<u64>,
    /// Unix seconds at which the VM ends.
    pub end_at: Option<u64>,
    pub enforce: Enforcement,
}

/// When a VM starts: at a time, or after another VM completed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Activation {
    /// Unix seconds.
    pub start_at: Option<u64>,
    /// Start once this VM's workload has completed.
    pub after_vm: Option<uuid::Uuid>,
}

/// Run until the workload completes, then act.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct TaskBasis {
    pub enforce: Enforcement,
}

/// Idle: CPU and network below thresholds for a period, after a warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Idle {
    /// CPU below this many thousandths of the VM's vCPUs.
    pub cpu_below_permille: u32,
    /// Network (in + out) below this many bytes per second.
    pub net_below_bps: u64,
    pub for_seconds: u64,
    /// No idle verdict during this many seconds after boot.
    #[serde(default)]
    pub warmup_seconds: u64,
    pub enforce: Enforcement,
}

/// Over-use: CPU, memory or network above thresholds for a period.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Overuse {
    pub cpu_above_permille: Option<u32>,
    pub mem_above_mib: Option<u64>,
    pub net_above_bps: Option<u64>,
    pub for_seconds: u64,
    pub enforce: Enforcement,
}

/// Resource budgets over the VM's life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Budget {
    pub cpu_seconds: Option<u64>,
    /// Memory GiB-hours, in thousandths (1000 = 1 GiB for 1 hour).
    pub mem_gib_hours_milli: Option<u64>,
    pub net_bytes: Option<u64>,
    pub enforce: Enforcement,
}

/// Prices, in micro-units of money. Peak rates apply between `peak_start_hour` and
/// `peak_end_hour` (UTC, start inclusive, end exclusive); off-peak rates otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct RateCard {
    pub per_hour: Rate,
    pub per_cpu_second: Rate,
    pub per_gib_hour_memory: Rate,
    pub per_gib_transferred: Rate,
    #[serde(default)]
    pub peak_start_hour: u8,
    #[serde(default)]
    pub peak_end_hour: u8,
    /// What each vCPU of a burst costs per hour it is granted, on top of the CPU it
    /// uses (priced per CPU-second like any) and the memory it adds (per GiB-hour like
    /// any). None by default: a burst costs what it uses, at the normal prices.
    #[serde(default)]
    pub burst_per_vcpu_hour: Rate,
}

impl RateCard {
    /// The prices of a project that has no card of its own, so that a fresh install
    /// prices cost caps and bills at once (the README lists them). Per VM-hour 0.010
    /// peak and 0.006 off-peak, per CPU-second 0.000010 and 0.000006, per GiB-hour of
    /// memory 0.004 and 0.0025, per GiB transferred 0.010; peak is 08:00 to 20:00 UTC.
    /// A burst costs only what it uses.
    pub const STANDARD: RateCard = RateCard {
        per_hour: Rate {
            peak: 10_000,
            off_peak: 6_000,
        },
        per_cpu_second: Rate {
            peak: 10,
            off_peak: 6,
        },
        per_gib_hour_memory: Rate {
            peak: 4_000,
            off_peak: 2_500,
        },
        per_gib_transferred: Rate {
            peak: 10_000,
            off_peak: 10_000,
        },
        peak_start_hour: 8,
        peak_end_hour: 20,
        burst_per_vcpu_hour: Rate {
            peak: 0,
            off_peak: 0,
        },
    };
}

/// Money written like `5.00` (up to six decimals), in micro-units; `None` if it is not
/// an amount or does not fit.
pub fn parse_money(text: &str) -> Option<u64> {
    let (whole, frac) = text.split_once('.').unwrap_or((text, ""));
    if frac.len() > 6 || whole.is_empty() && frac.is_empty() {
        return None;
    }
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if !digits(whole) || !digits(frac) {
        return None;
    }
    let whole: u64 = if whole.is_empty() {
        0
    } else {
        whole.parse().ok()?
    };
    let frac: u64 = if frac.is_empty() {
        0
    } else {
        format!("{frac:0<6}").parse().ok()?
    };
    whole.checked_mul(1_000_000)?.checked_add(frac)
}

/// One price with its peak and off-peak values, in micro-units.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Rate {
    pub peak: u64,
    pub off_peak: u64,
}

/// A cap on what the VM may cost, priced by the rate card it carries (so the guest can
/// price itself with no server reachable).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct CostCap {
    pub max_micros: u64,
    pub rates: RateCard,
    pub enforce: Enforcement,
}

/// A workload that crashes is restarted up to `max_restarts` times, then the action.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct OnErrors {
    pub max_restarts: u32,
    pub enforce: Enforcement,
}

/// A job's deadline: if its workload has not finished this many seconds after launch,
/// it is copied from a snapshot onto other hosts of its type, and the first copy (the
/// original included) whose workload finishes is the job's result; the others end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Deadline {
    pub seconds: u64,
    /// How many copies; 0 is one on every other host of its type with room.
    pub copies: u32,
}

/// Every policy a VM may carry; all optional.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct PolicySpec {
    pub lifespan: Option<Lifespan>,
    pub activation: Option<Activation>,
    pub task: Option<TaskBasis>,
    pub idle: Option<Idle>,
    pub overuse: Option<Overuse>,
    pub budget: Option<Budget>,
    pub cost_cap: Option<CostCap>,
    pub errors: Option<OnErrors>,
    #[serde(default)]
    pub deadline: Option<Deadline>,
}

impl PolicySpec {
    pub fn is_empty(&self) -> bool {
        *self == PolicySpec::default()
    }

    /// Whether some rule of this policy takes `action`: a report that a rule acted is
    /// believed only then, since a guest could claim anything.
    pub fn allows(&self, action: PolicyAction) -> bool {
        [
            self.lifespan.map(|r| r.enforce),
            self.task.map(|r| r.enforce),
            self.idle.map(|r| r.enforce),
            self.overuse.map(|r| r.enforce),
            self.budget.map(|r| r.enforce),
            self.cost_cap.map(|r| r.enforce),
            self.errors.map(|r| r.enforce),
        ]
        .into_iter()
        .flatten()
        .any(|enforce| enforce.action == action)
    }
}

#[cfg(test)]
mod money_tests {
    use super::parse_money;

    #[test]
    fn money_parses_exactly_or_not_at_all() {
        assert_eq!(parse_money("5.00"), Some(5_000_000));
        assert_eq!(parse_money(".5"), Some(500_000));
        assert_eq!(parse_money("0.000001"), Some(1));
        for bad in [
            "",
            ".",
            "1.0000001",
            "-1",
            "+1",
            "1e3",
            "5,00",
            "18446744073710",
        ] {
            assert_eq!(parse_money(bad), None, "{bad}");
        }
    }
}
