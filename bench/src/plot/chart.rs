//! The SVG writer: lays out a chart (title, axes, grid, ticks, series, legend) and
//! writes it as a standalone SVG document.

use super::scale::{format_number, format_value, Scale};
use super::PlotError;
use std::fmt::Write as _;

/// Colour-blind-safe colours (Okabe and Ito), picked by `Series::color`.
const PALETTE: [&str; 8] = [
    "#0072B2", "#D55E00", "#009E73", "#E69F00", "#CC79A7", "#56B4E9", "#000000", "#999999",
];

/// Line dash patterns, picked by `Series::variant` on line charts.
const DASHES: [&str; 4] = ["", "7 4", "2 3", "10 3 2 3"];

/// Bar fill opacities, picked by `Series::variant` on bar charts.
const BAR_OPACITY: [f64; 4] = [1.0, 0.45, 0.7, 0.25];

/// Estimated width of one character, as a fraction of the font size. SVG cannot measure
/// text before it is drawn; this is a little wide for digits in common sans-serif fonts,
/// so labels get room to spare.
const CHAR_WIDTH: f64 = 0.6;

const FONT_SIZE: f64 = 12.0;
const TITLE_SIZE: f64 = 16.0;
const TICK_LENGTH: f64 = 5.0;
const POINT_RADIUS: f64 = 3.5;
/// Line series with more points than this are drawn as a line without point markers.
const MAX_MARKERS: usize = 60;
/// Width of a legend entry's line (line charts) or swatch (bar charts), with the space
/// before its label.
const LEGEND_LINE: f64 = 36.0;
const LEGEND_SWATCH: f64 = 24.0;
const LEGEND_ROW_HEIGHT: f64 = FONT_SIZE + 8.0;
/// Space between legend entries in one row.
const LEGEND_GAP: f64 = 18.0;

/// What the x axis shows.
#[derive(Debug, Clone, PartialEq)]
pub enum XAxis {
    Linear,
    Log,
    /// Named categories, evenly spaced in this order; a point's x is a category's index.
    Categories(Vec<String>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChartKind {
    /// Points joined by lines, in order of x.
    Line,
    /// One bar per series in each category.
    Bar,
}

/// One named series of (x, y) points.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
    /// Index into the palette (wraps around).
    pub color: usize,
    /// Dash pattern for lines, fill strength for bars: tells apart series of one colour.
    pub variant: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Chart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub x_axis: XAxis,
    pub log_y: bool,
    /// Whether a linear y axis reaches zero, so that heights compare.
    pub y_from_zero: bool,
    pub kind: ChartKind,
    /// Writes each value next to its point or on top of its bar.
    pub value_labels: bool,
    pub width: f64,
    pub height: f64,
    pub series: Vec<Series>,
}

impl Chart {
    /// A line chart of 800 x 500 pixels with linear axes and no series yet.
    pub fn new(title: &str, x_label: &str, y_label: &str) -> Chart {
        Chart {
            title: title.to_string(),
            x_label: x_label.to_string(),
            y_label: y_label.to_string(),
            x_axis: XAxis::Linear,
            log_y: false,
            y_from_zero: true,
            kind: ChartKind::Line,
            value_labels: false,
            width: 800.0,
            height: 500.0,
            series: Vec::new(),
        }
    }
}

/// How x values become pixels: a numeric scale or evenly spaced category bands.
enum XPlacement {
    Numeric(Scale),
    Bands {
        names: Vec<String>,
        left: f64,
        band: f64,
    },
}

impl XPlacement {
    fn map(&self, x: f64) -> f64 {
        match self {
            XPlacement::Numeric(scale) => scale.map(x),
            XPlacement::Bands { left, band, .. } => left + (x + 0.5) * band,
        }
    }
}

/// Writes the chart as an SVG document.
pub fn render(chart: &Chart) -> Result<String, PlotError> {
    validate(chart)?;
    let all_points = || chart.series.iter().flat_map(|s| s.points.iter());
    let (y_min, y_max) = min_max(all_points().map(|p| p.1));
    let y_scale = if chart.log_y {
        Scale::log(y_min, y_max)
    } else {
        Scale::linear(
            y_min,
            y_max,
            chart.y_from_zero || chart.kind == ChartKind::Bar,
        )
    };
    let y_ticks = y_scale.ticks();
    let y_tick_width = y_ticks
        .iter()
        .map(|v| text_width(&format_number(*v), FONT_SIZE))
        .fold(0.0, f64::max);

    // Margins around the plot area, from the outside in: title, axis labels, tick
    // labels, and the legend when there is more than one series: on the right of a line
    // chart, below a bar chart (whose bars need the width more than its height).
    let show_legend = chart.series.len() > 1;
    let legend_below = show_legend && chart.kind == ChartKind::Bar;
    let legend_item_widths: Vec<f64> = chart
        .series
        .iter()
        .map(|s| legend_sample(chart.kind) + text_width(&s.label, FONT_SIZE))
        .collect();
    let legend_width = if show_legend && !legend_below {
        legend_item_widths.iter().fold(0.0, |a: f64, b| a.max(*b)) + 16.0
    } else {
        0.0
    };
    let top = if chart.title.is_empty() {
        20.0
    } else {
        20.0 + TITLE_SIZE + 16.0
    };
    let left = 12.0 + FONT_SIZE + 12.0 + y_tick_width + TICK_LENGTH + 6.0;
    let right = 24.0 + legend_width;
    let plot_left = left;
    let plot_right = (chart.width - right).max(plot_left + 50.0);
    let legend_rows = if legend_below {
        legend_rows(&legend_item_widths, plot_right - plot_left)
    } else {
        Vec::new()
    };
    let axis_label_bottom = TICK_LENGTH + 6.0 + FONT_SIZE + 14.0 + FONT_SIZE;
    let legend_height = if legend_rows.is_empty() {
        0.0
    } else {
        8.0 + legend_rows.len() as f64 * LEGEND_ROW_HEIGHT
    };
    let bottom = axis_label_bottom + 12.0 + legend_height;
    let plot_top = top;
    let plot_bottom = (chart.height - bottom).max(plot_top + 50.0);
    let y_scale = y_scale.with_pixels(plot_bottom, plot_top);

    let x_place = match &chart.x_axis {
        XAxis::Categories(names) => XPlacement::Bands {
            names: names.clone(),
            left: plot_left,
            band: (plot_right - plot_left) / names.len().max(1) as f64,
        },
        axis => {
            let (x_min, x_max) = min_max(all_points().map(|p| p.0));
            let scale = if *axis == XAxis::Log {
                Scale::log(x_min, x_max)
            } else {
                Scale::linear(x_min, x_max, false)
            };
            XPlacement::Numeric(scale.with_pixels(plot_left, plot_right))
        }
    };

    let mut svg = String::new();
    let _ = writeln!(svg, r#"<?xml version="1.0" encoding="UTF-8"?>"#);
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="DejaVu Sans, Helvetica, Arial, sans-serif" font-size="{FONT_SIZE}">"#,
        w = chart.width,
        h = chart.height
    );
    let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
    if !chart.title.is_empty() {
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="{TITLE_SIZE}" font-weight="bold">{}</text>"#,
            chart.width / 2.0,
            20.0 + TITLE_SIZE,
            escape(&chart.title)
        );
    }

    // Grid lines first, so that everything else is drawn over them.
    let _ = writeln!(svg, r#"<g class="grid" stroke-width="1">"#);
    for v in y_scale.minor_ticks() {
        let y = y_scale.map(v);
        let _ = writeln!(
            svg,
            r##"<line x1="{plot_left:.1}" y1="{y:.1}" x2="{plot_right:.1}" y2="{y:.1}" stroke="#f0f0f0"/>"##
        );
    }
    for v in &y_ticks {
        let y = y_scale.map(*v);
        let _ = writeln!(
            svg,
            r##"<line x1="{plot_left:.1}" y1="{y:.1}" x2="{plot_right:.1}" y2="{y:.1}" stroke="#dddddd"/>"##
        );
    }
    if let XPlacement::Numeric(x_scale) = &x_place {
        for v in x_scale.minor_ticks() {
            let x = x_scale.map(v);
            let _ = writeln!(
                svg,
                r##"<line x1="{x:.1}" y1="{plot_top:.1}" x2="{x:.1}" y2="{plot_bottom:.1}" stroke="#f0f0f0"/>"##
            );
        }
        for v in x_scale.ticks() {
            let x = x_scale.map(v);
            let _ = writeln!(
                svg,
                r##"<line x1="{x:.1}" y1="{plot_top:.1}" x2="{x:.1}" y2="{plot_bottom:.1}" stroke="#dddddd"/>"##
            );
        }
    }
    let _ = writeln!(svg, "</g>");

    // Axes: lines, tick marks, tick labels and axis labels.
    let _ = writeln!(svg, r##"<g class="axes" stroke="#333333" fill="#333333">"##);
    let _ = writeln!(
        svg,
        r#"<line x1="{plot_left:.1}" y1="{plot_bottom:.1}" x2="{plot_right:.1}" y2="{plot_bottom:.1}"/>"#
    );
    let _ = writeln!(
        svg,
        r#"<line x1="{plot_left:.1}" y1="{plot_top:.1}" x2="{plot_left:.1}" y2="{plot_bottom:.1}"/>"#
    );
    for v in &y_ticks {
        let y = y_scale.map(*v);
        let _ = writeln!(
            svg,
            r#"<line x1="{:.1}" y1="{y:.1}" x2="{plot_left:.1}" y2="{y:.1}"/>"#,
            plot_left - TICK_LENGTH
        );
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end" stroke="none">{}</text>"#,
            plot_left - TICK_LENGTH - 4.0,
            y + FONT_SIZE * 0.35,
            escape(&format_number(*v))
        );
    }
    let x_tick_labels: Vec<(f64, String)> = match &x_place {
        XPlacement::Numeric(scale) => scale
            .ticks()
            .into_iter()
            .map(|v| (scale.map(v), format_number(v)))
            .collect(),
        XPlacement::Bands { names, .. } => names
            .iter()
            .enumerate()
            .map(|(idx, name)| (x_place.map(idx as f64), name.clone()))
            .collect(),
    };
    for (x, label) in &x_tick_labels {
        let _ = writeln!(
            svg,
            r#"<line x1="{x:.1}" y1="{plot_bottom:.1}" x2="{x:.1}" y2="{:.1}"/>"#,
            plot_bottom + TICK_LENGTH
        );
        let _ = writeln!(
            svg,
            r#"<text x="{x:.1}" y="{:.1}" text-anchor="middle" stroke="none">{}</text>"#,
            plot_bottom + TICK_LENGTH + 4.0 + FONT_SIZE,
            escape(label)
        );
    }
    let _ = writeln!(
        svg,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" stroke="none">{}</text>"#,
        (plot_left + plot_right) / 2.0,
        plot_bottom + TICK_LENGTH + 4.0 + FONT_SIZE + 14.0 + FONT_SIZE,
        escape(&chart.x_label)
    );
    let (y_label_x, y_label_y) = (12.0 + FONT_SIZE, (plot_top + plot_bottom) / 2.0);
    let _ = writeln!(
        svg,
        r#"<text x="{y_label_x:.1}" y="{y_label_y:.1}" text-anchor="middle" stroke="none" transform="rotate(-90 {y_label_x:.1} {y_label_y:.1})">{}</text>"#,
        escape(&chart.y_label)
    );
    let _ = writeln!(svg, "</g>");

    match chart.kind {
        ChartKind::Line => write_lines(&mut svg, chart, &x_place, &y_scale),
        ChartKind::Bar => write_bars(&mut svg, chart, &x_place, &y_scale, plot_bottom),
    }

    if legend_below {
        // Rows centred under the plot area, below the x axis label.
        let mut positions = Vec::new();
        for (row_no, row) in legend_rows.iter().enumerate() {
            let row_width: f64 = row.iter().map(|idx| legend_item_widths[*idx]).sum::<f64>()
                + LEGEND_GAP * (row.len() as f64 - 1.0);
            let mut x = (plot_left + plot_right - row_width) / 2.0;
            let y =
                plot_bottom + axis_label_bottom + 8.0 + (row_no as f64 + 0.5) * LEGEND_ROW_HEIGHT;
            for idx in row {
                positions.push((x, y));
                x += legend_item_widths[*idx] + LEGEND_GAP;
            }
        }
        write_legend(&mut svg, chart, &positions);
    } else if show_legend {
        let positions: Vec<(f64, f64)> = (0..chart.series.len())
            .map(|idx| {
                let y = plot_top + 8.0 + (idx as f64 + 0.5) * LEGEND_ROW_HEIGHT;
                (plot_right + 24.0, y)
            })
            .collect();
        write_legend(&mut svg, chart, &positions);
    }
    let _ = writeln!(svg, "</svg>");
    Ok(svg)
}

fn write_lines(svg: &mut String, chart: &Chart, x_place: &XPlacement, y_scale: &Scale) {
    for series in &chart.series {
        let color = color(series);
        let mut points = series.points.clone();
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
        let pixels: Vec<(f64, f64)> = points
            .iter()
            .map(|(x, y)| (x_place.map(*x), y_scale.map(*y)))
            .collect();
        let _ = writeln!(svg, r#"<g class="series" fill="{color}" stroke="{color}">"#);
        if pixels.len() > 1 {
            let coords: Vec<String> = pixels
                .iter()
                .map(|(x, y)| format!("{x:.1},{y:.1}"))
                .collect();
            let _ = writeln!(
                svg,
                r#"<polyline class="line" points="{}" fill="none" stroke-width="2"{}/>"#,
                coords.join(" "),
                dash_attribute(series)
            );
        }
        // Markers on a dense series would only thicken its line.
        if points.len() > MAX_MARKERS {
            let _ = writeln!(svg, "</g>");
            continue;
        }
        for ((x, y), (px, py)) in points.iter().zip(&pixels) {
            let _ = writeln!(
                svg,
                r#"<circle class="point" cx="{px:.1}" cy="{py:.1}" r="{POINT_RADIUS}" stroke="white" stroke-width="1"><title>{}: {}, {}</title></circle>"#,
                escape(&series.label),
                escape(&x_text(chart, *x)),
                escape(&format_number(*y))
            );
            if chart.value_labels {
                let _ = writeln!(
                    svg,
                    r#"<text x="{px:.1}" y="{:.1}" text-anchor="middle" stroke="none" font-size="10">{}</text>"#,
                    py - 7.0,
                    escape(&format_value(*y))
                );
            }
        }
        let _ = writeln!(svg, "</g>");
    }
}

fn write_bars(
    svg: &mut String,
    chart: &Chart,
    x_place: &XPlacement,
    y_scale: &Scale,
    plot_bottom: f64,
) {
    let XPlacement::Bands { band, .. } = x_place else {
        return;
    };
    let n_series = chart.series.len().max(1) as f64;
    let group_width = band * 0.8;
    let bar_width = group_width / n_series;
    // Bars grow from zero on a linear axis and from the bottom of a logarithmic one.
    let baseline = if y_scale.is_log() {
        plot_bottom
    } else {
        y_scale.map(0.0)
    };
    for (series_idx, series) in chart.series.iter().enumerate() {
        let color = color(series);
        let opacity = BAR_OPACITY[series.variant % BAR_OPACITY.len()];
        let _ = writeln!(
            svg,
            r#"<g class="series" fill="{color}" stroke="{color}" fill-opacity="{opacity}">"#
        );
        for (x, y) in &series.points {
            let left = x_place.map(*x) - group_width / 2.0 + series_idx as f64 * bar_width;
            let top = y_scale.map(*y);
            let (rect_top, rect_height) = (top.min(baseline), (top - baseline).abs());
            let _ = writeln!(
                svg,
                r#"<rect class="point" x="{left:.1}" y="{rect_top:.1}" width="{:.1}" height="{rect_height:.1}"><title>{}: {}, {}</title></rect>"#,
                bar_width * 0.92,
                escape(&series.label),
                escape(&x_text(chart, *x)),
                escape(&format_number(*y))
            );
            if chart.value_labels {
                let _ = writeln!(
                    svg,
                    r##"<text x="{:.1}" y="{:.1}" text-anchor="middle" stroke="none" fill="#333333" fill-opacity="1" font-size="10">{}</text>"##,
                    left + bar_width * 0.46,
                    rect_top - 4.0,
                    escape(&format_value(*y))
                );
            }
        }
        let _ = writeln!(svg, "</g>");
    }
}

/// Writes one legend entry per series; `positions` holds the left end and the vertical
/// middle of each, in series order.
fn write_legend(svg: &mut String, chart: &Chart, positions: &[(f64, f64)]) {
    let _ = writeln!(svg, r#"<g class="legend">"#);
    for (series, (left, y)) in chart.series.iter().zip(positions) {
        let (left, y) = (*left, *y);
        let color = color(series);
        match chart.kind {
            ChartKind::Line => {
                let _ = writeln!(
                    svg,
                    r#"<line x1="{left:.1}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="{color}" stroke-width="2"{}/>"#,
                    left + 28.0,
                    dash_attribute(series)
                );
                let _ = writeln!(
                    svg,
                    r#"<circle cx="{:.1}" cy="{y:.1}" r="{POINT_RADIUS}" fill="{color}" stroke="white" stroke-width="1"/>"#,
                    left + 14.0
                );
            }
            ChartKind::Bar => {
                let _ = writeln!(
                    svg,
                    r#"<rect x="{:.1}" y="{:.1}" width="16" height="12" fill="{color}" stroke="{color}" fill-opacity="{}"/>"#,
                    left,
                    y - 6.0,
                    BAR_OPACITY[series.variant % BAR_OPACITY.len()]
                );
            }
        }
        let _ = writeln!(
            svg,
            r##"<text x="{:.1}" y="{:.1}" fill="#333333">{}</text>"##,
            left + legend_sample(chart.kind),
            y + FONT_SIZE * 0.35,
            escape(&series.label)
        );
    }
    let _ = writeln!(svg, "</g>");
}

/// Checks what the layout relies on: some points, finite values, positive values on
/// logarithmic axes, and bars only over categories.
fn validate(chart: &Chart) -> Result<(), PlotError> {
    if chart.series.iter().all(|s| s.points.is_empty()) {
        return Err(PlotError::NothingToPlot);
    }
    if chart.kind == ChartKind::Bar && !matches!(chart.x_axis, XAxis::Categories(_)) {
        return Err(PlotError::BarsNeedCategories);
    }
    for (x, y) in chart.series.iter().flat_map(|s| s.points.iter()) {
        if !x.is_finite() {
            return Err(PlotError::NotFinite { axis: "x" });
        }
        if !y.is_finite() {
            return Err(PlotError::NotFinite { axis: "y" });
        }
        if chart.log_y && *y <= 0.0 {
            return Err(PlotError::NotPositiveOnLogAxis {
                axis: "y",
                value: *y,
            });
        }
        match &chart.x_axis {
            XAxis::Log if *x <= 0.0 => {
                return Err(PlotError::NotPositiveOnLogAxis {
                    axis: "x",
                    value: *x,
                })
            }
            XAxis::Categories(names)
                if x.fract() != 0.0 || *x < 0.0 || *x >= names.len() as f64 =>
            {
                return Err(PlotError::NoSuchCategory { index: *x })
            }
            _ => {}
        }
    }
    Ok(())
}

fn legend_sample(kind: ChartKind) -> f64 {
    match kind {
        ChartKind::Line => LEGEND_LINE,
        ChartKind::Bar => LEGEND_SWATCH,
    }
}

/// Splits legend entries of these widths into rows no wider than `width`, as indexes.
fn legend_rows(item_widths: &[f64], width: f64) -> Vec<Vec<usize>> {
    let mut rows: Vec<Vec<usize>> = Vec::new();
    let mut row_width = 0.0;
    for (idx, item_width) in item_widths.iter().enumerate() {
        match rows.last_mut() {
            Some(row) if row_width + LEGEND_GAP + item_width <= width => {
                row.push(idx);
                row_width += LEGEND_GAP + item_width;
            }
            _ => {
                rows.push(vec![idx]);
                row_width = *item_width;
            }
        }
    }
    rows
}

fn min_max(values: impl Iterator<Item = f64>) -> (f64, f64) {
    values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    })
}

fn color(series: &Series) -> &'static str {
    PALETTE[series.color % PALETTE.len()]
}

fn dash_attribute(series: &Series) -> String {
    match DASHES[series.variant % DASHES.len()] {
        "" => String::new(),
        dash => format!(r#" stroke-dasharray="{dash}""#),
    }
}

/// How a point's x reads in its tooltip: the category name or the number.
fn x_text(chart: &Chart, x: f64) -> String {
    match &chart.x_axis {
        XAxis::Categories(names) => names.get(x as usize).cloned().unwrap_or_default(),
        _ => format_number(x),
    }
}

fn text_width(text: &str, font_size: f64) -> f64 {
    text.chars().count() as f64 * font_size * CHAR_WIDTH
}

/// Escapes text for XML character data and attribute values.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            _ => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// Checks that `svg` is well-formed XML as far as this writer can go wrong: every
    /// element closed in order, attributes quoted, and no bare `<` or `&` in text.
    /// Returns the names of the elements opened, in document order.
    fn check_well_formed(svg: &str) -> Vec<String> {
        let mut stack: Vec<String> = Vec::new();
        let mut opened = Vec::new();
        let mut rest = svg;
        let mut seen_root = false;
        while let Some(start) = rest.find('<') {
            check_text(&rest[..start]);
            let end = rest[start..].find('>').unwrap() + start;
            let tag = &rest[start + 1..end];
            rest = &rest[end + 1..];
            if let Some(decl) = tag.strip_prefix('?') {
                assert!(decl.ends_with('?') && !seen_root, "misplaced <?{decl}>");
                continue;
            }
            if let Some(name) = tag.strip_prefix('/') {
                assert_eq!(
                    stack.pop().as_deref(),
                    Some(name.trim()),
                    "bad close </{name}>"
                );
                continue;
            }
            let self_closing = tag.ends_with('/');
            let body = tag.trim_end_matches('/');
            let name = body.split_whitespace().next().unwrap().to_string();
            check_attributes(&body[name.len()..]);
            assert!(
                !stack.is_empty() || !seen_root,
                "second root element <{name}>"
            );
            seen_root = true;
            opened.push(name.clone());
            if !self_closing {
                stack.push(name);
            }
        }
        check_text(rest);
        assert!(stack.is_empty(), "unclosed: {stack:?}");
        assert_eq!(opened.first().map(String::as_str), Some("svg"));
        opened
    }

    fn check_attributes(mut attrs: &str) {
        loop {
            attrs = attrs.trim_start();
            if attrs.is_empty() {
                return;
            }
            let eq = attrs.find('=').unwrap();
            let name = &attrs[..eq];
            assert!(
                name.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == ':'),
                "attribute name {name:?}"
            );
            assert_eq!(&attrs[eq + 1..eq + 2], "\"", "unquoted {name}");
            let close = attrs[eq + 2..].find('"').unwrap() + eq + 2;
            check_text(&attrs[eq + 2..close]);
            attrs = &attrs[close + 1..];
        }
    }

    fn check_text(text: &str) {
        assert!(!text.contains('<'), "bare < in {text:?}");
        for (idx, _) in text.match_indices('&') {
            let entity = &text[idx..text[idx..].find(';').unwrap() + idx + 1];
            assert!(
                ["&amp;", "&lt;", "&gt;", "&quot;", "&apos;"].contains(&entity),
                "entity {entity}"
            );
        }
    }

    fn count(svg: &str, needle: &str) -> usize {
        svg.matches(needle).count()
    }

    fn two_series() -> Chart {
        let mut chart = Chart::new("Rate <vs> hosts & more", "hosts", "placements/s");
        chart.x_axis = XAxis::Log;
        chart.log_y = true;
        chart.series = vec![
            Series {
                label: "index".into(),
                points: vec![
                    (10_000.0, 131_631.0),
                    (100.0, 418_944.0),
                    (1000.0, 221_329.0),
                ],
                color: 0,
                variant: 0,
            },
            Series {
                label: "linear \"slow\"".into(),
                points: vec![(100.0, 177_542.0), (1000.0, 33_590.0), (10_000.0, 3225.0)],
                color: 0,
                variant: 1,
            },
        ];
        chart
    }

    #[test]
    fn line_chart_is_well_formed_with_one_point_per_value() {
        let svg = render(&two_series()).unwrap();
        let elements = check_well_formed(&svg);
        assert_eq!(count(&svg, r#"class="point""#), 6);
        assert_eq!(count(&svg, "<polyline"), 2);
        assert_eq!(elements.iter().filter(|e| *e == "polyline").count(), 2);
        // The title and labels are escaped, and the legend names both series.
        assert!(svg.contains("Rate &lt;vs&gt; hosts &amp; more"));
        assert!(svg.contains(">linear &quot;slow&quot;</text>"));
        assert!(svg.contains(r#"stroke-dasharray="7 4""#));
        // Both log axes span under 2.5 decades, so 1, 2 and 5 times powers of ten are labelled.
        for label in [">100<", ">1k<", ">10k<", ">100k<", ">500k<"] {
            assert!(svg.contains(label), "{label}");
        }
    }

    #[test]
    fn line_points_are_drawn_in_order_of_x() {
        let svg = render(&two_series()).unwrap();
        let line = svg.lines().find(|l| l.contains("<polyline")).unwrap();
        let points = line
            .split("points=\"")
            .nth(1)
            .unwrap()
            .split('"')
            .next()
            .unwrap();
        let xs: Vec<f64> = points
            .split(' ')
            .map(|p| p.split(',').next().unwrap().parse().unwrap())
            .collect();
        assert_eq!(xs.len(), 3);
        assert!(xs.windows(2).all(|w| w[0] < w[1]), "{xs:?}");
    }

    #[test]
    fn points_lie_inside_the_plot_area() {
        let svg = render(&two_series()).unwrap();
        for line in svg
            .lines()
            .filter(|l| l.contains("<circle class=\"point\""))
        {
            let attr = |name: &str| -> f64 {
                let key = format!(" {name}=\"");
                line.split(&key)
                    .nth(1)
                    .unwrap()
                    .split('"')
                    .next()
                    .unwrap()
                    .parse()
                    .unwrap()
            };
            let (cx, cy) = (attr("cx"), attr("cy"));
            assert!(
                (0.0..=800.0).contains(&cx) && (0.0..=500.0).contains(&cy),
                "{line}"
            );
        }
    }

    #[test]
    fn dense_series_have_no_markers() {
        let mut chart = Chart::new("Memory", "VMs", "MiB");
        chart.series = vec![Series {
            label: "rss".into(),
            points: (0..=MAX_MARKERS)
                .map(|i| (i as f64 * 1000.0, 50.0 + i as f64))
                .collect(),
            color: 0,
            variant: 0,
        }];
        let svg = render(&chart).unwrap();
        check_well_formed(&svg);
        assert_eq!(count(&svg, r#"class="point""#), 0);
        assert_eq!(count(&svg, "<polyline"), 1);
        chart.series[0].points.pop();
        let svg = render(&chart).unwrap();
        assert_eq!(count(&svg, r#"class="point""#), MAX_MARKERS);
    }

    #[test]
    fn single_series_has_no_legend() {
        let mut chart = two_series();
        chart.series.truncate(1);
        let svg = render(&chart).unwrap();
        check_well_formed(&svg);
        assert!(!svg.contains(r#"class="legend""#));
    }

    #[test]
    fn bar_chart_has_one_bar_per_value() {
        let mut chart = Chart::new("Bytes", "busy VMs (%)", "bytes per interval");
        chart.kind = ChartKind::Bar;
        chart.log_y = true;
        chart.value_labels = true;
        chart.x_axis = XAxis::Categories(vec!["0".into(), "10".into(), "100".into()]);
        chart.series = vec![
            Series {
                label: "full".into(),
                points: vec![(0.0, 470_000.0), (1.0, 491_297.0), (2.0, 557_825.0)],
                color: 0,
                variant: 0,
            },
            Series {
                label: "delta".into(),
                points: vec![(0.0, 2433.0), (2.0, 38_762.0)],
                color: 1,
                variant: 0,
            },
        ];
        let svg = render(&chart).unwrap();
        check_well_formed(&svg);
        assert_eq!(count(&svg, r#"<rect class="point""#), 5);
        assert!(svg.contains(">470k</text>"));
        assert!(svg.contains(">2.43k</text>"));
        assert!(svg.contains(">100</text>"));
        // The legend goes below the bars, so every bar's top is above its axis labels.
        assert!(svg.contains(r#"class="legend""#));
    }

    #[test]
    fn legend_rows_wrap() {
        assert_eq!(
            legend_rows(&[100.0, 100.0, 100.0], 250.0),
            [vec![0, 1], vec![2]]
        );
        assert_eq!(legend_rows(&[300.0, 10.0], 250.0), [vec![0], vec![1]]);
        assert_eq!(legend_rows(&[], 250.0), Vec::<Vec<usize>>::new());
    }

    #[test]
    fn linear_bars_start_at_zero() {
        let mut chart = Chart::new("", "", "");
        chart.kind = ChartKind::Bar;
        chart.y_from_zero = false;
        chart.x_axis = XAxis::Categories(vec!["a".into()]);
        chart.series = vec![Series {
            label: "s".into(),
            points: vec![(0.0, 50.0)],
            color: 0,
            variant: 0,
        }];
        let svg = render(&chart).unwrap();
        check_well_formed(&svg);
        assert!(svg.contains(">0</text>"));
    }

    #[test]
    fn rejects_what_cannot_be_drawn() {
        let mut chart = two_series();
        chart.series[0].points.push((0.0, 1.0));
        assert!(matches!(
            render(&chart),
            Err(PlotError::NotPositiveOnLogAxis { axis: "x", .. })
        ));

        let mut chart = two_series();
        chart.series[1].points.push((5.0, -1.0));
        assert!(matches!(
            render(&chart),
            Err(PlotError::NotPositiveOnLogAxis { axis: "y", .. })
        ));

        let mut chart = two_series();
        chart.series[1].points.push((5.0, f64::NAN));
        assert_eq!(render(&chart), Err(PlotError::NotFinite { axis: "y" }));

        let mut chart = two_series();
        chart.kind = ChartKind::Bar;
        assert_eq!(render(&chart), Err(PlotError::BarsNeedCategories));

        let mut chart = two_series();
        chart.x_axis = XAxis::Categories(vec!["a".into()]);
        assert!(matches!(
            render(&chart),
            Err(PlotError::NoSuchCategory { .. })
        ));

        let mut chart = two_series();
        for series in &mut chart.series {
            series.points.clear();
        }
        assert_eq!(render(&chart), Err(PlotError::NothingToPlot));
    }
}
