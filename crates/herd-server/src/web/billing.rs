//! Bills: the charges of a period per VM with the total, the last months as a chart,
//! and the same bill as a CSV download.

use super::layout::{self, Section};
use super::{given, Caller, WebError, WebState};
use crate::api::{self, ApiQuery, BillQuery, BillView};
use axum::extract::{Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use maud::{html, Markup};
use serde::Deserialize;

#[derive(Debug, Clone, Default, Deserialize, serde::Serialize)]
#[serde(default)]
pub struct Period {
    pub project: String,
    pub from: String,
    pub to: String,
}

/// Months shown in the chart, this one included.
const MONTHS: usize = 6;

/// The first instants (unix seconds) of this month and the `n - 1` before it, oldest
/// first, and the instant now.
fn month_starts(now_s: i64, n: usize) -> Vec<(i64, String)> {
    let (mut year, mut month) = civil_month(now_s);
    let mut out = Vec::new();
    for _ in 0..n {
        out.push((
            days_from_civil(year, month) * 86_400,
            format!("{year}-{month:02}"),
        ));
        if month == 1 {
            year -= 1;
            month = 12;
        } else {
            month -= 1;
        }
    }
    out.reverse();
    out
}

/// The year and month of a unix time (UTC), by the proleptic Gregorian calendar.
fn civil_month(unix_s: i64) -> (i64, u32) {
    let days = unix_s.div_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month)
}

/// Days since the epoch of the first day of a month.
fn days_from_civil(year: i64, month: u32) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let yoe = year - era * 400;
    let m = i64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

async fn bill(caller: &Caller, web: &WebState, query: BillQuery) -> Result<BillView, WebError> {
    let axum::Json(bill) = api::billing::get_bill(
        caller.user.clone(),
        State(web.cloud.clone()),
        ApiQuery(query),
    )
    .await?;
    Ok(bill)
}

pub async fn page(
    caller: Caller,
    State(web): State<WebState>,
    Query(period): Query<Period>,
) -> Result<Markup, WebError> {
    let project = given(&period.project);
    let asked = BillQuery {
        project: project.clone(),
        from: given(&period.from),
        to: given(&period.to),
    };
    let (from, to) = api::billing::period(&asked)?;
    let now_s = crate::store::now_ms() / 1000;
    let starts = month_starts(now_s, MONTHS);
    // The months of the chart and the period asked for, in one pass over the ledger.
    let mut periods: Vec<(i64, i64)> = starts
        .iter()
        .enumerate()
        .map(|(i, (from, _))| {
            let to = starts.get(i + 1).map_or(now_s, |(next, _)| *next);
            (from * 1000, to * 1000)
        })
        .collect();
    periods.push((from, to));
    let mut bills = api::billing::bills(&caller.user, &web.cloud, project.as_deref(), &periods)?;
    let current = BillView::of(&bills.pop().unwrap_or_default(), from, to);
    let months: Vec<(String, u64)> = starts
        .iter()
        .zip(&bills)
        .map(|((_, label), lines)| (label.clone(), lines.iter().map(|l| l.cost_micros).sum()))
        .collect();
    let top = months.iter().map(|(_, m)| *m).max().unwrap_or(0);
    let csv_query = serde_urlencoded::to_string(&period).unwrap_or_default();
    Ok(layout::page(
        &caller,
        Section::Billing,
        "Billing",
        html! {
            form.filters method="get" action="/ui/billing" {
                label { "Project " input type="text" name="project" value=(period.project) size="12" placeholder="all"; }
                label { "From " input type="text" name="from" value=(period.from) placeholder="30 days ago"; }
                label { "To " input type="text" name="to" value=(period.to) placeholder="now"; }
                button type="submit" { "Show" }
                a.button href={ "/ui/billing.csv?" (csv_query) } download="bill.csv" { "Download CSV" }
            }
            section aria-labelledby="months" {
                h2 #months { "By month" }
                ol.chart {
                    @for (label, micros) in &months {
                        li {
                            span.label { (label) }
                            (layout::bar(*micros, top, &layout::money(*micros)))
                        }
                    }
                }
            }
            section aria-labelledby="lines" {
                h2 #lines { "From " (layout::time(&current.from)) " to " (layout::time(&current.to)) ": " strong { (layout::money(current.total_micros)) } }
                @if current.lines.is_empty() { p.muted { "No charges in this period." } }
                @else {
                    table.bill {
                        thead { tr {
                            th scope="col" { "VM" } th scope="col" { "Project" } th scope="col" { "Hours" }
                            th scope="col" { "CPU s" } th scope="col" { "Memory GiB·h" } th scope="col" { "Network GiB" }
                            th scope="col" { "Cost" }
                        } }
                        tbody {
                            @for l in &current.lines {
                                tr {
                                    td { a href={ "/ui/vms/" (l.vm) } { (l.name) } } td { (l.project) }
                                    td.num { (format!("{:.2}", l.hours)) } td.num { (format!("{:.1}", l.cpu_seconds)) }
                                    td.num { (format!("{:.3}", l.memory_gib_hours)) } td.num { (format!("{:.3}", l.net_gib)) }
                                    td.num { (layout::money(l.cost_micros)) }
                                }
                            }
                        }
                    }
                }
            }
        },
    ))
}

pub async fn csv(
    caller: Caller,
    State(web): State<WebState>,
    Query(period): Query<Period>,
) -> Result<Response, WebError> {
    let bill = bill(
        &caller,
        &web,
        BillQuery {
            project: given(&period.project),
            from: given(&period.from),
            to: given(&period.to),
        },
    )
    .await?;
    Ok((
        [
            (header::CONTENT_TYPE, "text/csv; charset=utf-8"),
            (
                header::CONTENT_DISPOSITION,
                "attachment; filename=\"bill.csv\"",
            ),
        ],
        bill.csv(),
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn months_start_on_their_first_day() {
        // 2026-12-08T01:00:00Z
        let now = 1_796_691_600;
        let months = month_starts(now, 3);
        assert_eq!(
            months,
            vec![
                (1_790_812_800, "2026-10".to_owned()),
                (1_793_491_200, "2026-11".to_owned()),
                (1_796_083_200, "2026-12".to_owned()),
            ]
        );
        // Across a new year.
        assert_eq!(month_starts(1_767_225_600, 2)[0].1, "2025-12");
    }
}
