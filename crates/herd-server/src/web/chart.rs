//! Small charts drawn as inline SVG on the server: a VM's state timeline and its CPU
//! and memory over its latest samples. Pure: figures in, markup out.

use crate::store::UsageRow;
use herd_proto::VmState;
use maud::{html, Markup};

const WIDTH: f64 = 600.0;

/// The colour of a state on the timeline (the same families as the state badges).
fn colour(state: VmState) -> &'static str {
    use VmState::*;
    match state {
        Running => "#2da44e",
        Paused | Suspending | Suspended | Resuming => "#8250df",
        Error | Unknown => "#cf222e",
        Pending | Scheduled | Building | Booting | Migrating => "#d4a72c",
        Stopping | Stopped | Terminating | Terminated | Purged => "#8c959f",
    }
}

/// One run of a state on the timeline: where it starts and ends, in thousandths of the
/// whole span.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub state: VmState,
    pub from_ms: i64,
    pub to_ms: i64,
}

/// The runs of states from the first change to `now_ms`; each lasts until the next.
pub fn segments(history: &[(i64, VmState)], now_ms: i64) -> Vec<Segment> {
    history
        .iter()
        .enumerate()
        .map(|(i, &(from_ms, state))| Segment {
            state,
            from_ms,
            to_ms: history
                .get(i + 1)
                .map_or(now_ms, |&(next, _)| next)
                .max(from_ms),
        })
        .filter(|s| s.to_ms > s.from_ms)
        .collect()
}

/// The state timeline as a bar of coloured runs, each with its state as a tooltip.
pub fn timeline(history: &[(i64, VmState)], now_ms: i64) -> Markup {
    let runs = segments(history, now_ms);
    let (Some(first), Some(last)) = (runs.first(), runs.last()) else {
        return html! {};
    };
    let span = (last.to_ms - first.from_ms).max(1) as f64;
    let x = |ms: i64| (ms - first.from_ms) as f64 / span * WIDTH;
    html! {
        svg.timeline viewBox={ "0 0 " (WIDTH) " 16" } preserveAspectRatio="none" role="img"
            aria-label={ "State timeline over " (super::layout::duration(((last.to_ms - first.from_ms) / 1000) as u64)) } {
            @for run in &runs {
                rect x=(format!("{:.2}", x(run.from_ms))) y="0"
                    width=(format!("{:.2}", (x(run.to_ms) - x(run.from_ms)).max(0.5))) height="16"
                    fill=(colour(run.state)) {
                    title { (run.state.as_str()) " for " (super::layout::duration(((run.to_ms - run.from_ms) / 1000) as u64)) }
                }
            }
        }
    }
}

/// CPU use between consecutive samples, in percent of the VM's vCPUs, at each later
/// sample's time. A counter that went back (a restart) gives no point.
pub fn cpu_percent(samples: &[UsageRow], vcpus: u32) -> Vec<(i64, f64)> {
    samples
        .windows(2)
        .filter_map(|pair| {
            let (a, b) = (&pair[0], &pair[1]);
            let dt = b.sampled_at_ms - a.sampled_at_ms;
            if dt <= 0 || b.cpu_ms < a.cpu_ms {
                return None;
            }
            let share = (b.cpu_ms - a.cpu_ms) as f64 / dt as f64 / f64::from(vcpus.max(1));
            Some((b.sampled_at_ms, (share * 100.0).clamp(0.0, 100.0)))
        })
        .collect()
}

/// A line over time, scaled to `max` (or the largest value, if larger).
pub fn sparkline(points: &[(i64, f64)], max: f64, label: &str) -> Markup {
    let (Some(first), Some(last)) = (points.first(), points.last()) else {
        return html! { p.muted { "No samples yet." } };
    };
    if points.len() < 2 {
        return html! { p.muted { "One sample so far." } };
    }
    let top = points
        .iter()
        .map(|p| p.1)
        .fold(max, f64::max)
        .max(f64::EPSILON);
    let span = (last.0 - first.0).max(1) as f64;
    let line: Vec<String> = points
        .iter()
        .map(|&(t, v)| {
            format!(
                "{:.1},{:.1}",
                (t - first.0) as f64 / span * WIDTH,
                40.0 - v / top * 38.0
            )
        })
        .collect();
    html! {
        svg.spark viewBox={ "0 0 " (WIDTH) " 40" } preserveAspectRatio="none" role="img" aria-label=(label) {
            title { (label) }
            polyline points=(line.join(" ")) fill="none" stroke="#0a5cc2" stroke-width="1.5" vector-effect="non-scaling-stroke" {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(at: i64, cpu_ms: u64) -> UsageRow {
        UsageRow {
            sampled_at_ms: at,
            cpu_ms,
            mem_kib: 0,
            net_bytes: 0,
            disk_bytes: 0,
        }
    }

    #[test]
    fn each_state_lasts_until_the_next_and_the_last_until_now() {
        let history = [
            (1000, VmState::Booting),
            (3000, VmState::Running),
            (3000, VmState::Paused),
            (9000, VmState::Running),
        ];
        let runs = segments(&history, 10_000);
        let spans: Vec<(VmState, i64)> = runs
            .iter()
            .map(|s| (s.state, s.to_ms - s.from_ms))
            .collect();
        // The running of no length at 3000 is dropped.
        assert_eq!(
            spans,
            vec![
                (VmState::Booting, 2000),
                (VmState::Paused, 6000),
                (VmState::Running, 1000)
            ]
        );
        assert!(segments(&[], 5).is_empty());
        assert_eq!(timeline(&[], 5).into_string(), "");
    }

    #[test]
    fn cpu_is_the_share_of_the_vcpus_between_samples() {
        let samples = [row(0, 0), row(1000, 500), row(2000, 2500), row(3000, 100)];
        // 500 ms in 1 s on 2 vCPUs is 25 %; 2000 ms in 1 s is all of both; a reset
        // gives no point.
        assert_eq!(cpu_percent(&samples, 2), vec![(1000, 25.0), (2000, 100.0)]);
    }

    #[test]
    fn a_sparkline_without_points_says_so() {
        assert!(sparkline(&[], 100.0, "cpu")
            .into_string()
            .contains("No samples"));
        let line = sparkline(&[(0, 0.0), (10, 50.0)], 100.0, "cpu").into_string();
        assert!(line.contains("points=\"0.0,40.0 600.0,21.0\""), "{line}");
    }
}
