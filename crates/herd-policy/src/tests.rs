use super::*;
use herd_proto::policy::{Budget, CostCap, Idle, Lifespan, OnErrors, Overuse, Rate, TaskBasis};
use proptest::prelude::*;

const BORN: u64 = 1_700_000_000_000;

fn enf(action: PolicyAction, warn: Option<u64>) -> Enforcement {
    Enforcement { action, warn }
}

fn sample(t_ms: u64, cpu_ms: u64) -> Sample {
    Sample {
        unix_ms: BORN + t_ms,
        cpu_ms,
        mem_kib: 100_000,
        net_bytes: 0,
        workload: Workload::Running,
    }
}

fn rules(vs: &[Verdict]) -> Vec<(Rule, bool)> {
    vs.iter()
        .map(|v| match v {
            Verdict::Warn { rule, .. } => (*rule, false),
            Verdict::Act { rule, .. } => (*rule, true),
        })
        .collect()
}

#[test]
fn lifespan_warns_then_acts_once() {
    let spec = PolicySpec {
        lifespan: Some(Lifespan {
            max_seconds: Some(6),
            end_at: None,
            enforce: enf(PolicyAction::Stop, Some(3)),
        }),
        ..Default::default()
    };
    let mut e = Evaluator::new(spec, 1, BORN);
    assert_eq!(e.next_deadline_ms(), Some(BORN + 3000));
    assert!(e.observe(&sample(1000, 0)).is_empty());
    assert!(e.observe(&sample(2999, 0)).is_empty());
    assert_eq!(
        rules(&e.observe(&sample(3000, 0))),
        vec![(Rule::Lifespan, false)]
    );
    assert_eq!(e.next_deadline_ms(), Some(BORN + 6000));
    assert!(e.observe(&sample(5999, 0)).is_empty());
    let v = e.observe(&sample(6000, 0));
    assert_eq!(
        v,
        vec![Verdict::Act {
            rule: Rule::Lifespan,
            action: PolicyAction::Stop,
            reason: "lifespan reached".into()
        }]
    );
    assert!(e.is_done());
    assert!(e.observe(&sample(7000, 0)).is_empty());
    assert_eq!(e.next_deadline_ms(), None);
}

#[test]
fn end_at_and_max_seconds_take_the_earlier() {
    let spec = PolicySpec {
        lifespan: Some(Lifespan {
            max_seconds: Some(100),
            end_at: Some(BORN / 1000 + 10),
            enforce: enf(PolicyAction::Terminate, None),
        }),
        ..Default::default()
    };
    let mut e = Evaluator::new(spec, 1, BORN);
    assert!(e.observe(&sample(9_999, 0)).is_empty());
    assert_eq!(
        rules(&e.observe(&sample(10_000, 0))),
        vec![(Rule::Lifespan, true)]
    );
}

#[test]
fn cpu_budget_with_warning_at_80_percent() {
    let spec = PolicySpec {
        budget: Some(Budget {
            cpu_seconds: Some(3),
            mem_gib_hours_milli: None,
            net_bytes: None,
            enforce: enf(PolicyAction::Stop, Some(800)),
        }),
        ..Default::default()
    };
    let mut e = Evaluator::new(spec, 1, BORN);
    assert!(e.observe(&sample(1000, 1000)).is_empty());
    assert!(e.observe(&sample(2000, 2000)).is_empty());
    assert_eq!(
        rules(&e.observe(&sample(2500, 2400))),
        vec![(Rule::Budget, false)]
    );
    assert_eq!(e.progress()[0].fraction_milli, 800);
    assert_eq!(e.progress()[0].text, "cpu 2.4 of 3 s (80%)");
    assert_eq!(
        rules(&e.observe(&sample(3100, 3000))),
        vec![(Rule::Budget, true)]
    );
}

#[test]
fn memory_budget_integrates_gib_hours() {
    // 1 GiB in use for 36 s is 0.01 GiB-hours = 10 milli.
    let spec = PolicySpec {
        budget: Some(Budget {
            cpu_seconds: None,
            mem_gib_hours_milli: Some(10),
            net_bytes: None,
            enforce: enf(PolicyAction::Notify, None),
        }),
        ..Default::default()
    };
    let mut e = Evaluator::new(spec, 1, BORN);
    let mut s = sample(0, 0);
    s.mem_kib = 1024 * 1024;
    for t in 1..=35 {
        s.unix_ms = BORN + t * 1000;
        assert!(e.observe(&s).is_empty(), "fired early at {t}");
    }
    s.unix_ms = BORN + 36_000;
    assert_eq!(rules(&e.observe(&s)), vec![(Rule::Budget, true)]);
    // Notify does not end evaluation.
    assert!(!e.is_done());
}

#[test]
fn idle_after_warmup() {
    let spec = PolicySpec {
        idle: Some(Idle {
            cpu_below_permille: 100,
            net_below_bps: 1000,
            for_seconds: 5,
            warmup_seconds: 2,
            enforce: enf(PolicyAction::Stop, Some(2)),
        }),
        ..Default::default()
    };
    let mut e = Evaluator::new(spec, 2, BORN);
    // 2 vCPUs, 150 ms of CPU per second is 75 permille: idle.
    let mut cpu = 0;
    let mut got = Vec::new();
    for t in 1..=10u64 {
        cpu += 150;
        for v in e.observe(&sample(t * 1000, cpu)) {
            got.push((t, v));
        }
    }
    // The streak starts at the end of the warm-up (2 s): warn at 2+3, act at 2+5.
    let seen: Vec<(u64, Rule, bool)> = got
        .iter()
        .map(|(t, v)| match v {
            Verdict::Warn { rule, .. } => (*t, *rule, false),
            Verdict::Act { rule, .. } => (*t, *rule, true),
        })
        .collect();
    assert_eq!(seen, vec![(5, Rule::Idle, false), (7, Rule::Idle, true)]);
}

#[test]
fn activity_resets_the_idle_streak_and_gaps_do_not_count() {
    let spec = PolicySpec {
        idle: Some(Idle {
            cpu_below_permille: 100,
            net_below_bps: 1000,
            for_seconds: 3,
            warmup_seconds: 0,
            enforce: enf(PolicyAction::Notify, None),
        }),
        ..Default::default()
    };
    let mut e = Evaluator::new(spec, 1, BORN);
    assert!(e.observe(&sample(1000, 0)).is_empty());
    assert!(e.observe(&sample(2000, 0)).is_empty());
    // Busy second.
    assert!(e.observe(&sample(3000, 900)).is_empty());
    assert!(e.observe(&sample(4000, 900)).is_empty());
    assert!(e.observe(&sample(5000, 900)).is_empty());
    // A suspension of an hour is not idleness.
    assert!(e.observe(&sample(3_605_000, 900)).is_empty());
    assert!(e.observe(&sample(3_606_000, 900)).is_empty());
    assert!(e.observe(&sample(3_607_000, 900)).is_empty());
    assert_eq!(
        rules(&e.observe(&sample(3_608_000, 900))),
        vec![(Rule::Idle, true)]
    );
}

#[test]
fn overuse_of_cpu_memory_or_net() {
    let spec = PolicySpec {
        overuse: Some(Overuse {
            cpu_above_permille: Some(500),
            mem_above_mib: Some(1000),
            net_above_bps: None,
            for_seconds: 3,
            enforce: enf(PolicyAction::Suspend, None),
        }),
        ..Default::default()
    };
    let mut e = Evaluator::new(spec, 1, BORN);
    assert!(e.observe(&sample(1000, 100)).is_empty());
    assert!(e.observe(&sample(2000, 1000)).is_empty());
    assert!(e.observe(&sample(3000, 1900)).is_empty());
    let mut s = sample(4000, 2000);
    s.mem_kib = 2000 * 1024;
    assert_eq!(
        e.observe(&s),
        vec![Verdict::Act {
            rule: Rule::Overuse,
            action: PolicyAction::Suspend,
            reason: "over-use for 3.0 of 3 s".into()
        }]
    );
    assert!(e.is_done());
}

#[test]
fn task_and_errors() {
    let spec = PolicySpec {
        task: Some(TaskBasis {
            enforce: enf(PolicyAction::Terminate, None),
        }),
        errors: Some(OnErrors {
            max_restarts: 2,
            enforce: enf(PolicyAction::Stop, Some(0)),
        }),
        ..Default::default()
    };
    let mut e = Evaluator::new(spec, 1, BORN);
    assert!(e.observe(&sample(1000, 0)).is_empty());
    assert_eq!(e.record_crash(), None);
    assert!(e.should_restart());
    // The sample after the crash does not count it again.
    let mut s = sample(2000, 0);
    s.workload = Workload::Exited { code: 1 };
    assert!(e.observe(&s).is_empty());
    assert!(e.observe(&sample(3000, 0)).is_empty());
    assert!(matches!(
        e.record_crash(),
        Some(Verdict::Warn {
            rule: Rule::Errors,
            ..
        })
    ));
    assert!(e.should_restart());
    // A crash seen only through samples counts too.
    assert!(e.observe(&sample(4000, 0)).is_empty());
    let v = e.observe(&s.clone_at(5000));
    assert_eq!(rules(&v), vec![(Rule::Errors, true)]);
    assert!(!e.should_restart());
    assert_eq!(e.crashes(), 3);

    // A clean exit completes the task.
    let mut e = Evaluator::new(e.spec().to_owned(), 1, BORN);
    let mut s = sample(1000, 0);
    s.workload = Workload::Exited { code: 0 };
    assert_eq!(rules(&e.observe(&s)), vec![(Rule::Task, true)]);
}

impl Sample {
    fn clone_at(&self, t_ms: u64) -> Sample {
        Sample {
            unix_ms: BORN + t_ms,
            ..*self
        }
    }
}

fn rates(per_hour: u64, cpu: u64, mem: u64, net: u64) -> RateCard {
    let r = |v| Rate {
        peak: v * 2,
        off_peak: v,
    };
    RateCard {
        per_hour: r(per_hour),
        per_cpu_second: r(cpu),
        per_gib_hour_memory: r(mem),
        per_gib_transferred: r(net),
        peak_start_hour: 8,
        peak_end_hour: 20,
        burst_per_vcpu_hour: Default::default(),
    }
}

fn at(unix_ms: u64, cpu_ms: u64, net_bytes: u64) -> Sample {
    Sample {
        unix_ms,
        cpu_ms,
        mem_kib: 0,
        net_bytes,
        workload: Workload::Running,
    }
}

#[test]
fn price_matches_a_hand_calculation() {
    // Day 0 of the epoch, 07:30 to 08:30 UTC: half off-peak, half peak.
    // per_hour 0.10 off / 0.20 peak: 0.05 + 0.10 = 0.15
    // memory 512 MiB at 0.04 off / 0.08 peak per GiB-hour: 0.5 * (0.02 + 0.04) = 0.03
    // cpu 90 s at the 07:30 (off-peak) rate of 0.001/s: 0.09
    // net 3 GiB at the off-peak 0.01/GiB: 0.03
    // total 0.30
    let r = rates(100_000, 1_000, 40_000, 10_000);
    let from = at(7 * 3_600_000 + 1_800_000, 0, 0);
    let to = at(8 * 3_600_000 + 1_800_000, 90_000, 3 << 30);
    assert_eq!(price_interval(&r, &from, &to, 512), 300_000);
    // A third of a micro-unit per interval adds up exactly over three intervals.
    let r = RateCard {
        per_cpu_second: Rate {
            peak: 1,
            off_peak: 1,
        },
        ..Default::default()
    };
    let s = [at(0, 0, 0), at(1, 333, 0), at(2, 666, 0), at(3, 1000, 0)];
    let fine: u128 = s
        .windows(2)
        .map(|w| price_interval_fine(&r, &w[0], &w[1], 0))
        .sum();
    assert_eq!(fine_to_micros(fine), 1);
    assert_eq!(price_interval(&r, &s[0], &s[1], 0), 0);
}

#[test]
fn peak_hours_wrap_midnight() {
    let r = RateCard {
        peak_start_hour: 22,
        peak_end_hour: 2,
        ..Default::default()
    };
    assert!(is_peak_hour(&r, 23) && is_peak_hour(&r, 0) && is_peak_hour(&r, 1));
    assert!(!is_peak_hour(&r, 2) && !is_peak_hour(&r, 21));
    assert_eq!(peak_ms_between(&r, 0, 86_400_000), 4 * 3_600_000);
    assert_eq!(
        peak_ms_between(&r, 3_600_000, 3 * 86_400_000),
        11 * 3_600_000
    );
    let none = RateCard::default();
    assert_eq!(peak_ms_between(&none, 0, 86_400_000), 0);
}

#[test]
fn cost_cap_prices_memory_and_cpu() {
    let spec = PolicySpec {
        cost_cap: Some(CostCap {
            max_micros: 3_000,
            rates: RateCard {
                per_cpu_second: Rate {
                    peak: 1_000,
                    off_peak: 1_000,
                },
                ..Default::default()
            },
            enforce: enf(PolicyAction::Stop, Some(500)),
        }),
        ..Default::default()
    };
    let mut e = Evaluator::new(spec, 1, BORN).with_memory_mib(256);
    assert!(e.observe(&sample(1000, 1000)).is_empty());
    assert_eq!(e.cost_micros(), 1000);
    assert_eq!(
        rules(&e.observe(&sample(2000, 1500))),
        vec![(Rule::CostCap, false)]
    );
    assert_eq!(
        rules(&e.observe(&sample(3000, 3000))),
        vec![(Rule::CostCap, true)]
    );
    assert_eq!(e.progress()[0].text, "cost 0.003000 of 0.003000 (100%)");
}

#[test]
fn state_survives_json_and_postcard() {
    let spec = PolicySpec {
        budget: Some(Budget {
            cpu_seconds: Some(10),
            mem_gib_hours_milli: Some(5),
            net_bytes: None,
            enforce: enf(PolicyAction::Stop, Some(500)),
        }),
        ..Default::default()
    };
    let mut e = Evaluator::new(spec, 1, BORN);
    e.observe(&sample(1000, 6000));
    let st = e.state();
    let json = serde_json::to_string(&st).expect("json");
    assert_eq!(
        serde_json::from_str::<EvaluatorState>(&json).expect("json"),
        st
    );
    let pc = postcard::to_stdvec(&st).expect("postcard");
    assert!(pc.len() < 100, "state is {} bytes", pc.len());
    let mut r = Evaluator::restore(spec, 1, postcard::from_bytes(&pc).expect("postcard"));
    assert_eq!(r.state(), st);
    assert_eq!(
        rules(&r.observe(&sample(2000, 10_000))),
        vec![(Rule::Budget, true)]
    );
}

fn cpu_steps() -> impl Strategy<Value = Vec<(u64, u64)>> {
    // (dt ms, cpu ms used in it) with up to 2 vCPUs.
    proptest::collection::vec(
        (200u64..2000).prop_flat_map(|dt| (Just(dt), 0..=2 * dt)),
        1..80,
    )
}

proptest! {
    #[test]
    fn budget_fires_exactly_at_the_first_sample_past_its_limit(
        steps in cpu_steps(), limit_s in 0u64..60, warn in proptest::option::of(0u64..1000)
    ) {
        let spec = PolicySpec {
            budget: Some(Budget { cpu_seconds: Some(limit_s), mem_gib_hours_milli: None,
                net_bytes: None, enforce: enf(PolicyAction::Stop, warn) }),
            ..Default::default()
        };
        let mut e = Evaluator::new(spec, 2, BORN);
        let (mut t, mut cpu) = (0, 0);
        let mut warned = false;
        let mut acted = false;
        for (dt, used) in steps {
            t += dt;
            cpu += used;
            let v = e.observe(&sample(t, cpu));
            for verdict in &v {
                match verdict {
                    Verdict::Warn { .. } => {
                        prop_assert!(!warned && !acted);
                        prop_assert!(cpu * 1000 >= limit_s * 1000 * warn.unwrap_or(0));
                        warned = true;
                    }
                    Verdict::Act { .. } => {
                        prop_assert!(!acted);
                        prop_assert!(warned || warn.is_none(), "action before warning");
                        prop_assert!(cpu >= limit_s * 1000, "fired before the limit");
                        acted = true;
                    }
                }
            }
            // Never late: once the limit is crossed, this very sample acts.
            if cpu >= limit_s * 1000 {
                prop_assert!(acted, "did not fire at the first sample past the limit");
            }
        }
    }

    #[test]
    fn lifespan_fires_at_the_first_sample_past_the_deadline(
        dts in proptest::collection::vec(1u64..3000, 1..60),
        max_s in 1u64..60, warn in proptest::option::of(0u64..30)
    ) {
        let spec = PolicySpec {
            lifespan: Some(Lifespan { max_seconds: Some(max_s), end_at: None,
                enforce: enf(PolicyAction::Terminate, warn) }),
            ..Default::default()
        };
        let mut e = Evaluator::new(spec, 1, BORN);
        let mut t = 0;
        let mut seen = Vec::new();
        for dt in dts {
            t += dt;
            for v in e.observe(&sample(t, 0)) {
                seen.push((t, v));
            }
            let acted = seen.iter().any(|(_, v)| matches!(v, Verdict::Act { .. }));
            prop_assert_eq!(acted, t >= max_s * 1000);
            if let Some(w) = warn {
                let warned = seen.iter().any(|(_, v)| matches!(v, Verdict::Warn { .. }));
                prop_assert_eq!(warned, t + w * 1000 >= max_s * 1000);
            }
        }
        if warn.is_some() && seen.len() == 2 {
            let first_is_warn = matches!(seen[0].1, Verdict::Warn { .. });
            prop_assert!(first_is_warn);
        }
    }

    #[test]
    fn pricing_n_intervals_equals_pricing_their_union(
        start_in_hour in 0u64..3_000_000, hour in 0u64..48,
        steps in proptest::collection::vec((1u64..20_000, 0u64..40_000, 0u64..(1 << 31)), 1..30),
        mib in 0u64..65_536, per_hour in 0u64..10_000_000, cpu in 0u64..100_000,
        mem in 0u64..1_000_000, net in 0u64..1_000_000
    ) {
        let r = rates(per_hour, cpu, mem, net);
        let mut s = vec![at(hour * 3_600_000 + start_in_hour, 0, 0)];
        for (dt, dcpu, dnet) in steps {
            let last = *s.last().expect("one");
            s.push(at(last.unix_ms + dt, last.cpu_ms + dcpu, last.net_bytes + dnet));
        }
        let first = s[0];
        let last = *s.last().expect("one");
        // Keep inside one hour: no peak boundary.
        prop_assume!(last.unix_ms / 3_600_000 == first.unix_ms / 3_600_000);
        let parts: u128 = s.windows(2).map(|w| price_interval_fine(&r, &w[0], &w[1], mib)).sum();
        prop_assert_eq!(parts, price_interval_fine(&r, &first, &last, mib));
        prop_assert_eq!(fine_to_micros(parts), price_interval(&r, &first, &last, mib));
    }

    #[test]
    fn time_prices_split_exactly_across_peak_boundaries(
        start in 0u64..(3 * 86_400_000), dts in proptest::collection::vec(1u64..20_000_000, 1..10),
        mib in 0u64..65_536, per_hour in 0u64..10_000_000, mem in 0u64..1_000_000
    ) {
        let r = rates(per_hour, 0, mem, 0);
        let mut s = vec![at(start, 0, 0)];
        for dt in dts {
            let t = s.last().expect("one").unix_ms + dt;
            s.push(at(t, 0, 0));
        }
        let parts: u128 = s.windows(2).map(|w| price_interval_fine(&r, &w[0], &w[1], mib)).sum();
        prop_assert_eq!(parts, price_interval_fine(&r, &s[0], s.last().expect("one"), mib));
    }

    #[test]
    fn restore_mid_stream_changes_nothing(steps in cpu_steps(), cut in 0usize..80) {
        let spec = PolicySpec {
            budget: Some(Budget { cpu_seconds: Some(20), mem_gib_hours_milli: Some(1),
                net_bytes: None, enforce: enf(PolicyAction::Notify, Some(500)) }),
            idle: Some(Idle { cpu_below_permille: 300, net_below_bps: 1, for_seconds: 3,
                warmup_seconds: 1, enforce: enf(PolicyAction::Notify, Some(1)) }),
            overuse: Some(Overuse { cpu_above_permille: Some(700), mem_above_mib: None,
                net_above_bps: None, for_seconds: 2, enforce: enf(PolicyAction::Stop, None) }),
            cost_cap: Some(CostCap { max_micros: 5_000, rates: rates(1_000_000, 100, 0, 0),
                enforce: enf(PolicyAction::Stop, Some(900)) }),
            ..Default::default()
        };
        let mut a = Evaluator::new(spec, 2, BORN).with_memory_mib(512);
        let mut b = a.clone();
        let (mut t, mut cpu) = (0, 0);
        for (i, (dt, used)) in steps.into_iter().enumerate() {
            t += dt;
            cpu += used;
            if i == cut {
                let json = serde_json::to_string(&b.state()).expect("json");
                b = Evaluator::restore(spec, 2, serde_json::from_str(&json).expect("json"));
            }
            prop_assert_eq!(a.observe(&sample(t, cpu)), b.observe(&sample(t, cpu)));
            prop_assert_eq!(a.progress(), b.progress());
        }
    }
}
