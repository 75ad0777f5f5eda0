//! Numeric axis scales: a data interval rounded out to readable ticks, mapped to pixels.

/// About how many labelled ticks a linear axis gets.
const TARGET_TICKS: f64 = 6.0;

/// Logarithmic axes spanning at most this many decades label 1, 2 and 5 times each
/// power of ten; wider ones label only powers of ten.
const LOG_125_DECADES: f64 = 3.0;

/// Relative tolerance for comparing values computed with floating-point steps.
const EPS: f64 = 1e-9;

/// A numeric axis: a data interval (rounded out so that it starts and ends on a tick)
/// and the pixel interval it is drawn on.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scale {
    lo: f64,
    hi: f64,
    /// Tick spacing of a linear scale; unused on a logarithmic one.
    step: f64,
    log: bool,
    pix_lo: f64,
    pix_hi: f64,
}

impl Scale {
    /// A linear scale showing `[min, max]`, widened to multiples of a 1-2-5 tick step.
    /// With `include_zero`, the interval also reaches zero, so that lengths compare.
    pub fn linear(min: f64, max: f64, include_zero: bool) -> Scale {
        let (mut min, mut max) = (min.min(max), min.max(max));
        if include_zero {
            min = min.min(0.0);
            max = max.max(0.0);
        }
        if max - min <= f64::EPSILON * max.abs().max(min.abs()).max(1.0) {
            // A single value: show it in the middle of a unit-sized interval.
            let half = if min == 0.0 { 1.0 } else { min.abs() / 2.0 };
            (min, max) = if include_zero && min >= 0.0 {
                (0.0, max + half)
            } else if include_zero {
                (min - half, 0.0)
            } else {
                (min - half, max + half)
            };
        }
        let step = nice_step((max - min) / TARGET_TICKS);
        // Tolerate rounding noise: 2.9999999 steps is 3 steps, not 2.
        let lo = floor_tolerant(min / step) * step;
        let hi = ceil_tolerant(max / step) * step;
        Scale {
            lo,
            hi,
            step,
            log: false,
            pix_lo: 0.0,
            pix_hi: 1.0,
        }
    }

    /// A logarithmic scale showing `[min, max]`, both positive, widened to the nearest
    /// 1, 2 or 5 times a power of ten.
    pub fn log(min: f64, max: f64) -> Scale {
        let (min, max) = (min.min(max), min.max(max));
        let (mut lo, mut hi) = (floor_125(min), ceil_125(max));
        if hi / lo < 1.0 + EPS {
            lo = floor_125(lo * (1.0 - 1e-6));
            hi = ceil_125(hi * (1.0 + 1e-6));
        }
        if (hi / lo).log10() > LOG_125_DECADES {
            // Only powers of ten get labels: end on them, so both ends are labelled.
            lo = 10f64.powi(decade(lo));
            let power = 10f64.powi(decade(hi));
            hi = if same(power, hi) { power } else { power * 10.0 };
        }
        Scale {
            lo,
            hi,
            step: 0.0,
            log: true,
            pix_lo: 0.0,
            pix_hi: 1.0,
        }
    }

    /// The same scale drawn from pixel `pix_lo` (at the low end of the data) to `pix_hi`.
    /// A y axis runs from the bottom of the plot upwards, so its `pix_lo > pix_hi`.
    pub fn with_pixels(self, pix_lo: f64, pix_hi: f64) -> Scale {
        Scale {
            pix_lo,
            pix_hi,
            ..self
        }
    }

    /// The data interval shown, after rounding out.
    pub fn domain(&self) -> (f64, f64) {
        (self.lo, self.hi)
    }

    pub fn is_log(&self) -> bool {
        self.log
    }

    /// The pixel position of data value `v`.
    pub fn map(&self, v: f64) -> f64 {
        let t = if self.log {
            (v.log10() - self.lo.log10()) / (self.hi.log10() - self.lo.log10())
        } else {
            (v - self.lo) / (self.hi - self.lo)
        };
        self.pix_lo + t * (self.pix_hi - self.pix_lo)
    }

    /// The values that get a label and a grid line, from low to high.
    pub fn ticks(&self) -> Vec<f64> {
        if !self.log {
            let first = (self.lo / self.step).round() as i64;
            let last = (self.hi / self.step).round() as i64;
            return (first..=last).map(|k| k as f64 * self.step).collect();
        }
        let decades = (self.hi / self.lo).log10();
        if decades <= LOG_125_DECADES + EPS {
            // Few decades: 1, 2 and 5 times each power of ten.
            return self.log_values(&[1.0, 2.0, 5.0], 1);
        }
        // Many decades: powers of ten, thinned to at most about eight labels.
        let stride = (decades / 8.0).ceil().max(1.0) as i32;
        self.log_values(&[1.0], stride)
    }

    /// Values that get a faint grid line but no label: on a logarithmic axis, the
    /// multiples of each power of ten not already labelled. None on a linear axis.
    pub fn minor_ticks(&self) -> Vec<f64> {
        if !self.log || (self.hi / self.lo).log10() > 6.0 {
            return Vec::new();
        }
        let labelled = self.ticks();
        self.log_values(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0], 1)
            .into_iter()
            .filter(|v| !labelled.iter().any(|t| same(*t, *v)))
            .collect()
    }

    /// Every `m * 10^e` inside the domain, for each mantissa `m` and every `stride`-th
    /// exponent `e`, from low to high.
    fn log_values(&self, mantissas: &[f64], stride: i32) -> Vec<f64> {
        let first = decade(self.lo);
        let last = decade(self.hi);
        let mut out = Vec::new();
        let mut exp = first;
        while exp <= last {
            for m in mantissas {
                let v = m * 10f64.powi(exp);
                if v >= self.lo * (1.0 - EPS) && v <= self.hi * (1.0 + EPS) {
                    out.push(v);
                }
            }
            exp += stride;
        }
        out
    }
}

/// The power of ten `e` with `10^e <= v < 10^(e+1)`, robust to rounding in `log10`.
fn decade(v: f64) -> i32 {
    let mut exp = v.log10().floor() as i32;
    if 10f64.powi(exp + 1) <= v * (1.0 + EPS) {
        exp += 1;
    } else if 10f64.powi(exp) > v * (1.0 + EPS) {
        exp -= 1;
    }
    exp
}

fn floor_tolerant(x: f64) -> f64 {
    (x + EPS * x.abs().max(1.0)).floor()
}

fn ceil_tolerant(x: f64) -> f64 {
    (x - EPS * x.abs().max(1.0)).ceil()
}

fn same(a: f64, b: f64) -> bool {
    (a - b).abs() <= EPS * a.abs().max(b.abs())
}

/// The largest 1, 2 or 5 times a power of ten that is at most `v` (> 0).
fn floor_125(v: f64) -> f64 {
    let power = 10f64.powi(decade(v));
    let m = v / power;
    let k = if m >= 5.0 * (1.0 - EPS) {
        5.0
    } else if m >= 2.0 * (1.0 - EPS) {
        2.0
    } else {
        1.0
    };
    k * power
}

/// The smallest 1, 2 or 5 times a power of ten that is at least `v` (> 0).
fn ceil_125(v: f64) -> f64 {
    let power = 10f64.powi(decade(v));
    let m = v / power;
    let k = if m <= 1.0 + EPS {
        1.0
    } else if m <= 2.0 * (1.0 + EPS) {
        2.0
    } else if m <= 5.0 * (1.0 + EPS) {
        5.0
    } else {
        10.0
    };
    k * power
}

/// The 1, 2 or 5 times a power of ten nearest above `raw` (> 0).
fn nice_step(raw: f64) -> f64 {
    ceil_125(raw)
}

/// A short label for a tick: `0`, `0.25`, `750`, `1.5k`, `10k`, `2.5M`, `1G`. Four
/// significant digits at most, so that close ticks (`1.025k`, `1.05k`) differ; trailing
/// zeros dropped.
pub fn format_number(v: f64) -> String {
    format_significant(v, 4)
}

/// A shorter label for a data value written next to its point or bar: three
/// significant digits (`2.43k`, `558k`), so that labels of neighbouring bars fit.
pub fn format_value(v: f64) -> String {
    format_significant(v, 3)
}

fn format_significant(v: f64, digits: i32) -> String {
    if !v.is_finite() {
        return v.to_string();
    }
    if v == 0.0 {
        return "0".into();
    }
    let abs = v.abs();
    for (divisor, suffix) in [(1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")] {
        if abs >= divisor * (1.0 - EPS) {
            return format!("{}{suffix}", significant(v / divisor, digits));
        }
    }
    if abs < 1e-3 {
        return format!("{:.1e}", v).replace(".0e", "e");
    }
    significant(v, digits)
}

/// `v` rounded to `digits` significant digits (at most six decimals), without trailing
/// zeros.
fn significant(v: f64, digits: i32) -> String {
    let magnitude = v.abs().log10().floor() as i32;
    let decimals = (digits - 1 - magnitude).clamp(0, 6) as usize;
    let mut s = format!("{v:.decimals$}");
    if s.contains('.') {
        s = s.trim_end_matches('0').trim_end_matches('.').to_string();
    }
    if s == "-0" {
        s = "0".into();
    }
    s
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn labels(scale: &Scale) -> Vec<String> {
        scale.ticks().into_iter().map(format_number).collect()
    }

    #[test]
    fn formats_numbers_shortly() {
        let cases = [
            (0.0, "0"),
            (1.0, "1"),
            (0.25, "0.25"),
            (0.1 + 0.2, "0.3"),
            (750.0, "750"),
            (1000.0, "1k"),
            (1500.0, "1.5k"),
            (10_000.0, "10k"),
            (131_631.0, "131.6k"),
            (250_000.0, "250k"),
            (1_000_000.0, "1M"),
            (2_500_000.0, "2.5M"),
            (3e9, "3G"),
            (-2000.0, "-2k"),
            (0.0001, "1e-4"),
            (-1e-10, "-1e-10"),
        ];
        for (v, want) in cases {
            assert_eq!(format_number(v), want, "{v}");
        }
    }

    #[test]
    fn formats_values_shorter() {
        assert_eq!(format_value(2433.0), "2.43k");
        assert_eq!(format_value(557_825.0), "558k");
        assert_eq!(format_value(12.0), "12");
        assert_eq!(format_value(0.1234), "0.123");
        assert_eq!(format_number(1025.0), "1.025k");
    }

    #[test]
    fn linear_ticks_are_round_and_cover_the_data() {
        let scale = Scale::linear(3.0, 97.0, false);
        assert_eq!(scale.domain(), (0.0, 100.0));
        assert_eq!(labels(&scale), ["0", "20", "40", "60", "80", "100"]);

        let scale = Scale::linear(2433.0, 557_825.0, true);
        assert_eq!(scale.domain(), (0.0, 600_000.0));
        assert_eq!(
            labels(&scale),
            ["0", "100k", "200k", "300k", "400k", "500k", "600k"]
        );

        let scale = Scale::linear(0.12, 0.31, false);
        assert_eq!(
            labels(&scale),
            ["0.1", "0.15", "0.2", "0.25", "0.3", "0.35"]
        );

        let scale = Scale::linear(-7.0, 12.0, false);
        assert_eq!(labels(&scale), ["-10", "-5", "0", "5", "10", "15"]);
    }

    #[test]
    fn linear_ticks_on_exact_boundaries_do_not_grow_the_domain() {
        let scale = Scale::linear(0.0, 100.0, false);
        assert_eq!(scale.domain(), (0.0, 100.0));
        let scale = Scale::linear(-100.0, -20.0, false);
        assert_eq!(scale.domain(), (-100.0, -20.0));
    }

    #[test]
    fn linear_single_value() {
        let scale = Scale::linear(5.0, 5.0, false);
        let (lo, hi) = scale.domain();
        assert!(lo < 5.0 && hi > 5.0);
        let scale = Scale::linear(0.0, 0.0, true);
        assert_eq!(scale.domain(), (0.0, 1.0));
        let scale = Scale::linear(40.0, 40.0, true);
        assert_eq!(scale.domain().0, 0.0);
        assert!(scale.domain().1 >= 40.0);
    }

    #[test]
    fn log_ticks_use_125_over_few_decades() {
        let scale = Scale::log(130.0, 9000.0);
        assert_eq!(scale.domain(), (100.0, 10_000.0));
        assert_eq!(
            labels(&scale),
            ["100", "200", "500", "1k", "2k", "5k", "10k"]
        );
        let scale = Scale::log(2433.0, 557_825.0);
        assert_eq!(scale.domain(), (2000.0, 1_000_000.0));
        assert_eq!(
            labels(&scale),
            ["2k", "5k", "10k", "20k", "50k", "100k", "200k", "500k", "1M"]
        );

        let scale = Scale::log(130.0, 9000.0);
        let minor = scale.minor_ticks();
        assert_eq!(minor.len(), 12);
        assert!(minor.iter().all(|v| (100.0..=10_000.0).contains(v)));
    }

    #[test]
    fn log_ticks_use_powers_of_ten_over_many_decades() {
        let scale = Scale::log(243.3, 557_825.0);
        assert_eq!(scale.domain(), (100.0, 1_000_000.0));
        assert_eq!(labels(&scale), ["100", "1k", "10k", "100k", "1M"]);

        let scale = Scale::log(0.02, 300.0);
        assert_eq!(scale.domain(), (0.01, 1000.0));
        assert_eq!(labels(&scale), ["0.01", "0.1", "1", "10", "100", "1k"]);

        let scale = Scale::log(1.0, 1e20);
        let ticks = scale.ticks();
        assert!(ticks.len() <= 9, "{ticks:?}");
        assert_eq!(ticks[0], 1.0);
        assert!(scale.minor_ticks().is_empty());
    }

    #[test]
    fn log_single_value() {
        let scale = Scale::log(1000.0, 1000.0);
        let (lo, hi) = scale.domain();
        assert!(lo < 1000.0 && hi > 1000.0);
    }

    #[test]
    fn maps_to_pixels() {
        let scale = Scale::linear(0.0, 100.0, false).with_pixels(400.0, 0.0);
        assert_eq!(scale.map(0.0), 400.0);
        assert_eq!(scale.map(25.0), 300.0);
        assert_eq!(scale.map(100.0), 0.0);

        let scale = Scale::log(10.0, 1000.0).with_pixels(0.0, 200.0);
        assert!((scale.map(100.0) - 100.0).abs() < 1e-9);
        assert!((scale.map(1000.0) - 200.0).abs() < 1e-9);
    }

    #[test]
    fn decades_are_robust_to_rounding() {
        assert_eq!(decade(1000.0), 3);
        assert_eq!(decade(999.999), 2);
        assert_eq!(decade(1e-3), -3);
        assert_eq!(floor_125(0.3), 0.2);
        assert_eq!(ceil_125(0.3), 0.5);
        assert_eq!(ceil_125(6.0), 10.0);
    }
}
