//! Turns `herd vm launch` policy flags into a `PolicySpec`.

use crate::PolicyArgs;
use anyhow::{anyhow, bail, Result};
use herd_proto::policy::{
    Activation, Budget, CostCap, Deadline, Enforcement, Idle, Lifespan, OnErrors, Overuse,
    PolicyAction, PolicySpec, RateCard, TaskBasis,
};
use std::time::UNIX_EPOCH;

fn action(flag: &str, text: &str) -> Result<PolicyAction> {
    PolicyAction::parse(text).ok_or_else(|| {
        anyhow!("--{flag}: {text:?} is not an action (notify, suspend, stop, terminate)")
    })
}

fn seconds(flag: &str, text: &str) -> Result<u64> {
    humantime::parse_duration(text)
        .map(|d| d.as_secs())
        .map_err(|e| anyhow!("--{flag}: {text:?} is not a duration like 90s, 15m or 2h ({e})"))
}

fn unix_seconds(flag: &str, text: &str) -> Result<u64> {
    humantime::parse_rfc3339_weak(text)
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_secs())
        .ok_or_else(|| anyhow!("--{flag}: {text:?} is not a time like 2026-12-01T08:00:00Z"))
}

fn permille(flag: &str, percent: f64) -> Result<u32> {
    if !(0.0..=100_000.0).contains(&percent) {
        bail!("--{flag}: {percent} is not a percentage");
    }
    Ok((percent * 10.0).round() as u32)
}

/// Money like `5.00` in micro-units.
pub fn money_micros(flag: &str, text: &str) -> Result<u64> {
    herd_proto::policy::parse_money(text)
        .ok_or_else(|| anyhow!("--{flag}: {text:?} is not an amount like 5.00"))
}

pub fn spec(args: &PolicyArgs) -> Result<PolicySpec> {
    let warn_s = args
        .warn
        .as_deref()
        .map(|w| seconds("warn", w))
        .transpose()?;
    let warn_milli = (args.warn_at > 0.0).then(|| (args.warn_at * 10.0).round() as u64);
    let mut spec = PolicySpec::default();
    if args.lifespan.is_some() || args.end_at.is_some() {
        spec.lifespan = Some(Lifespan {
            max_seconds: args
                .lifespan
                .as_deref()
                .map(|l| seconds("lifespan", l))
                .transpose()?,
            end_at: args
                .end_at
                .as_deref()
                .map(|t| unix_seconds("end-at", t))
                .transpose()?,
            enforce: Enforcement {
                action: action("on-lifespan", &args.on_lifespan)?,
                warn: warn_s,
            },
        });
    }
    if let Some(idle) = &args.idle {
        spec.idle = Some(Idle {
            cpu_below_permille: permille("idle-cpu", args.idle_cpu)?,
            net_below_bps: args.idle_net,
            for_seconds: seconds("idle", idle)?,
            warmup_seconds: seconds("warmup", &args.warmup)?,
            enforce: Enforcement {
                action: action("on-idle", &args.on_idle)?,
                warn: warn_s,
            },
        });
    }
    if args.overuse_cpu.is_some() || args.overuse_mem.is_some() || args.overuse_net.is_some() {
        spec.overuse = Some(Overuse {
            cpu_above_permille: args
                .overuse_cpu
                .map(|p| permille("overuse-cpu", p))
                .transpose()?,
            mem_above_mib: args.overuse_mem,
            net_above_bps: args.overuse_net,
            for_seconds: seconds("overuse-for", &args.overuse_for)?,
            enforce: Enforcement {
                action: action("on-overuse", &args.on_overuse)?,
                warn: warn_s,
            },
        });
    }
    if args.cpu_budget.is_some() || args.mem_budget.is_some() || args.net_budget.is_some() {
        spec.budget = Some(Budget {
            cpu_seconds: args.cpu_budget,
            mem_gib_hours_milli: args.mem_budget.map(|g| (g * 1000.0).round() as u64),
            net_bytes: args.net_budget,
            enforce: Enforcement {
                action: action("on-resource-budget", &args.on_resource_budget)?,
                warn: warn_milli,
            },
        });
    }
    if let Some(budget) = &args.budget {
        spec.cost_cap = Some(CostCap {
            max_micros: money_micros("budget", budget)?,
            // The server prices it with the project's rate card.
            rates: RateCard::default(),
            enforce: Enforcement {
                action: action("on-budget", &args.on_budget)?,
                warn: warn_milli,
            },
        });
    }
    if let Some(on_complete) = &args.on_complete {
        spec.task = Some(TaskBasis {
            enforce: Enforcement {
                action: action("on-complete", on_complete)?,
                warn: None,
            },
        });
    }
    if let Some(max_restarts) = args.max_restarts {
        spec.errors = Some(OnErrors {
            max_restarts,
            enforce: Enforcement {
                action: action("on-errors", &args.on_errors)?,
                warn: None,
            },
        });
    }
    if let Some(deadline) = &args.deadline {
        let copies = match args.on_deadline.as_str() {
            "duplicate" | "duplicate=all" => 0,
            other => other
                .strip_prefix("duplicate=")
                .and_then(|n| n.parse::<u32>().ok())
                .filter(|n| (1..=1000).contains(n))
                .ok_or_else(|| {
                    anyhow!("--on-deadline: {other:?} is not duplicate, duplicate=all or duplicate=N (1 to 1000)")
                })?,
        };
        spec.deadline = Some(Deadline {
            seconds: seconds("deadline", deadline)?,
            copies,
        });
    }
    if args.start_at.is_some() || args.after.is_some() {
        spec.activation = Some(Activation {
            start_at: args
                .start_at
                .as_deref()
                .map(|t| unix_seconds("start-at", t))
                .transpose()?,
            after_vm: args
                .after
                .as_deref()
                .map(|v| v.parse().map_err(|_| anyhow!("--after: give the VM's id")))
                .transpose()?,
        });
    }
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn money_is_exact() {
        assert_eq!(money_micros("b", "5.00").ok(), Some(5_000_000));
        assert_eq!(money_micros("b", "0.5").ok(), Some(500_000));
        assert_eq!(money_micros("b", "12").ok(), Some(12_000_000));
        assert_eq!(money_micros("b", ".000001").ok(), Some(1));
        assert!(money_micros("b", "1.0000001").is_err());
        assert!(money_micros("b", "abc").is_err());
        assert!(money_micros("b", "-1").is_err());
    }

    #[test]
    fn flags_make_a_policy() {
        let args = PolicyArgs {
            lifespan: Some("2h".into()),
            on_lifespan: "terminate".into(),
            idle: Some("15m".into()),
            idle_cpu: 5.0,
            idle_net: 10_240,
            warmup: "0s".into(),
            on_idle: "suspend".into(),
            overuse_for: "60s".into(),
            on_overuse: "notify".into(),
            on_resource_budget: "stop".into(),
            budget: Some("5.00".into()),
            on_budget: "terminate".into(),
            on_errors: "stop".into(),
            warn_at: 80.0,
            ..PolicyArgs::default()
        };
        let spec = spec(&args).expect("spec");
        assert_eq!(spec.lifespan.and_then(|l| l.max_seconds), Some(7200));
        assert_eq!(spec.idle.map(|i| i.for_seconds), Some(900));
        assert_eq!(spec.idle.map(|i| i.cpu_below_permille), Some(50));
        let cap = spec.cost_cap.expect("cost cap");
        assert_eq!(cap.max_micros, 5_000_000);
        assert_eq!(cap.enforce.action, PolicyAction::Terminate);
        assert_eq!(cap.enforce.warn, Some(800));
    }

    #[test]
    fn a_deadline_duplicates_onto_all_or_n_hosts() {
        let with = |on: &str| {
            spec(&PolicyArgs {
                deadline: Some("20s".into()),
                on_deadline: on.into(),
                ..PolicyArgs::default()
            })
        };
        let copies = |on: &str| with(on).ok().and_then(|s| s.deadline).map(|d| d.copies);
        assert_eq!(copies("duplicate"), Some(0));
        assert_eq!(copies("duplicate=all"), Some(0));
        assert_eq!(copies("duplicate=3"), Some(3));
        for bad in ["duplicate=0", "duplicate=x", "terminate", "duplicate=1001"] {
            let e = with(bad).expect_err(bad).to_string();
            assert!(e.contains("--on-deadline"), "{e}");
        }
        assert_eq!(
            with("duplicate")
                .ok()
                .and_then(|s| s.deadline)
                .map(|d| d.seconds),
            Some(20)
        );
    }
}
