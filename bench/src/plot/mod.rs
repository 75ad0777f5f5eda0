//! A small SVG chart writer for the benchmark report: line and grouped bar charts with
//! linear, logarithmic or categorical axes, tick labels and a legend.
//!
//! Hand-written rather than a plotting crate: the report needs four plain charts, and
//! SVG text diffs well in review. The pure parts (CSV parsing, scales, ticks, number
//! formatting) are separate from the SVG writer so they can be tested on their own.

mod chart;
mod scale;
mod table;

pub use chart::{render, Chart, ChartKind, Series, XAxis};
pub use scale::{format_number, format_value, Scale};
pub use table::{Row as TableRow, Table};

use std::fmt;

/// Why a chart could not be read or drawn.
#[derive(Debug, Clone, PartialEq)]
pub enum PlotError {
    /// The CSV text is malformed.
    Csv { line: usize, message: String },
    /// A column named on the command line is not in the CSV header.
    NoColumn { name: String, available: String },
    /// A cell that must hold a number does not.
    NotANumber {
        line: usize,
        column: String,
        value: String,
    },
    /// A value that cannot be shown on a logarithmic axis.
    NotPositiveOnLogAxis { axis: &'static str, value: f64 },
    /// A value that is NaN or infinite.
    NotFinite { axis: &'static str },
    /// No series has any point.
    NothingToPlot,
    /// Bars are drawn per category; a numeric x axis has none.
    BarsNeedCategories,
    /// A point's x is not the index of one of the categories.
    NoSuchCategory { index: f64 },
}

impl fmt::Display for PlotError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PlotError::Csv { line, message } => write!(f, "CSV line {line}: {message}"),
            PlotError::NoColumn { name, available } => {
                write!(f, "no column {name:?}; the columns are {available}")
            }
            PlotError::NotANumber {
                line,
                column,
                value,
            } => write!(
                f,
                "CSV line {line}, column {column:?}: {value:?} is not a number"
            ),
            PlotError::NotPositiveOnLogAxis { axis, value } => {
                write!(f, "the {axis} axis is logarithmic but a value is {value}")
            }
            PlotError::NotFinite { axis } => write!(f, "a value on the {axis} axis is not finite"),
            PlotError::NothingToPlot => write!(f, "nothing to plot: no series has a point"),
            PlotError::BarsNeedCategories => {
                write!(f, "bar charts need a categorical x axis")
            }
            PlotError::NoSuchCategory { index } => {
                write!(f, "x = {index} is not the index of a category")
            }
        }
    }
}

impl std::error::Error for PlotError {}
