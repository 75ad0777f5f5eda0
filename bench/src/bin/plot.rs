//! Draws a line or bar chart from a CSV file as SVG, for bench/REPORT.md.
//!
//! ```text
//! plot --csv bench/out/sched.csv --x hosts \
//!      --y index_decisions_per_s:index,linear_decisions_per_s:linear \
//!      --group strategy --where shapes="5 sizes" --logx --logy \
//!      --title "Placement rate" --xlabel hosts --ylabel "decisions/s" \
//!      --out bench/plots/sched-rate.svg
//! ```
//!
//! Each `--y` column is a series; with `--group`, each (group, column) pair is one,
//! coloured by group and dashed by column. Empty cells are missing values and skipped.

use anyhow::{bail, Context, Result};
use clap::Parser;
use herd_bench::plot::{format_number, render, Chart, ChartKind, Series, Table, XAxis};
use std::path::PathBuf;

#[derive(Parser)]
#[command(about = "Draw a chart from a CSV file as SVG")]
struct Args {
    /// CSV file with a header line.
    #[arg(long)]
    csv: PathBuf,
    /// Column for the x axis.
    #[arg(long)]
    x: String,
    /// Columns for the y axis, each `COLUMN` or `COLUMN:LABEL`, comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    y: Vec<String>,
    /// Column whose values split the rows into series.
    #[arg(long)]
    group: Option<String>,
    /// Keep only rows where COLUMN=VALUE; may be given more than once.
    #[arg(long = "where", value_name = "COLUMN=VALUE")]
    filters: Vec<String>,
    #[arg(long, default_value = "")]
    title: String,
    #[arg(long, default_value = "")]
    xlabel: String,
    #[arg(long, default_value = "")]
    ylabel: String,
    /// Logarithmic x axis.
    #[arg(long)]
    logx: bool,
    /// Logarithmic y axis.
    #[arg(long)]
    logy: bool,
    /// Grouped bars, one group per distinct x value, instead of lines.
    #[arg(long)]
    bar: bool,
    /// Write each value next to its point or bar.
    #[arg(long)]
    labels: bool,
    /// Fit a linear y axis to the data instead of starting it at zero.
    #[arg(long)]
    no_zero: bool,
    #[arg(long, default_value_t = 800.0)]
    width: f64,
    #[arg(long, default_value_t = 500.0)]
    height: f64,
    /// SVG file to write.
    #[arg(long)]
    out: PathBuf,
}

/// One `--y` column and the name its series gets.
struct YColumn {
    idx: usize,
    name: String,
    label: String,
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.bar && args.logx {
        bail!("--bar draws one group per x value; --logx does not apply");
    }
    let text = std::fs::read_to_string(&args.csv)
        .with_context(|| format!("reading {}", args.csv.display()))?;
    let mut table = Table::parse(&text).with_context(|| format!("in {}", args.csv.display()))?;
    for filter in &args.filters {
        let (column, value) = filter
            .split_once('=')
            .with_context(|| format!("--where {filter:?}: expected COLUMN=VALUE"))?;
        table.filter(column, value)?;
    }
    let chart = build_chart(&args, &table)?;
    let svg = render(&chart).with_context(|| format!("plotting {}", args.csv.display()))?;
    std::fs::write(&args.out, svg).with_context(|| format!("writing {}", args.out.display()))?;
    let n_points: usize = chart.series.iter().map(|s| s.points.len()).sum();
    eprintln!(
        "wrote {} ({} series, {n_points} points)",
        args.out.display(),
        chart.series.len()
    );
    Ok(())
}

fn build_chart(args: &Args, table: &Table) -> Result<Chart> {
    let x_idx = table.column(&args.x)?;
    let y_columns = args
        .y
        .iter()
        .map(|spec| {
            let (name, label) = spec.split_once(':').unwrap_or((spec, spec));
            Ok(YColumn {
                idx: table.column(name)?,
                name: name.to_string(),
                label: label.to_string(),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let group_idx = args.group.as_deref().map(|g| table.column(g)).transpose()?;
    let groups: Vec<String> = match group_idx {
        Some(idx) => distinct(table.rows.iter().map(|r| r.cells[idx].trim().to_string())),
        None => vec![String::new()],
    };

    // Bars are drawn per category: the distinct x values, in numeric order when they
    // are all numbers and in order of appearance otherwise.
    let categories = if args.bar {
        let mut names = distinct(table.rows.iter().map(|r| r.cells[x_idx].trim().to_string()));
        names.retain(|n| !n.is_empty());
        let numbers: Option<Vec<f64>> = names.iter().map(|n| n.parse().ok()).collect();
        if let Some(mut numbers) = numbers {
            numbers.sort_by(f64::total_cmp);
            numbers.dedup();
            names = numbers.iter().map(|v| v.to_string()).collect();
        }
        Some(names)
    } else {
        None
    };
    let x_of = |row: &herd_bench::plot::TableRow| -> Result<Option<f64>> {
        match &categories {
            None => Ok(row.number(x_idx, &args.x)?),
            Some(names) => {
                let cell = row.cells[x_idx].trim();
                let key = cell
                    .parse::<f64>()
                    .map(|v| v.to_string())
                    .unwrap_or_else(|_| cell.to_string());
                Ok(names.iter().position(|n| *n == key).map(|i| i as f64))
            }
        }
    };

    let colour_by_group = groups.len() > 1 && y_columns.len() > 1;
    let mut series = Vec::new();
    for (group_no, group) in groups.iter().enumerate() {
        for (y_no, y) in y_columns.iter().enumerate() {
            let mut points = Vec::new();
            for row in &table.rows {
                if group_idx.is_some_and(|idx| row.cells[idx].trim() != group) {
                    continue;
                }
                if let (Some(x), Some(value)) = (x_of(row)?, row.number(y.idx, &y.name)?) {
                    points.push((x, value));
                }
            }
            if points.is_empty() {
                continue;
            }
            let label = match (group_idx.is_some(), y_columns.len() > 1) {
                (true, true) => format!("{group}, {}", y.label),
                (true, false) => group.clone(),
                (false, _) => y.label.clone(),
            };
            let (color, variant) = if colour_by_group {
                (group_no, y_no)
            } else {
                (series.len(), 0)
            };
            series.push(Series {
                label,
                points,
                color,
                variant,
            });
        }
    }
    if series.is_empty() {
        bail!(
            "no rows with both {} and {} in {}",
            args.x,
            args.y.join(" or "),
            args.csv.display()
        );
    }

    let mut chart = Chart::new(&args.title, &args.xlabel, &args.ylabel);
    chart.x_axis = match categories {
        Some(names) => XAxis::Categories(
            names
                .iter()
                .map(|n| n.parse::<f64>().map(format_number).unwrap_or(n.clone()))
                .collect(),
        ),
        None if args.logx => XAxis::Log,
        None => XAxis::Linear,
    };
    chart.kind = if args.bar {
        ChartKind::Bar
    } else {
        ChartKind::Line
    };
    chart.log_y = args.logy;
    chart.y_from_zero = !args.no_zero;
    chart.value_labels = args.labels;
    chart.width = args.width;
    chart.height = args.height;
    chart.series = series;
    Ok(chart)
}

/// The distinct values, in order of first appearance.
fn distinct(values: impl Iterator<Item = String>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for v in values {
        if !out.contains(&v) {
            out.push(v);
        }
    }
    out
}
