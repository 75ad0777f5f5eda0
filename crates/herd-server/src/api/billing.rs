//! What VMs cost: the rate card a cloud admin sets for each project, and the bill a
//! project's members may read.

use super::{
    ApiError, ApiJson, ApiPath, ApiQuery, AppState, BillQuery, BillView, CloudAdmin, ErrorBody,
    User,
};
use crate::access::Perm;
use axum::extract::State;
use axum::Json;
use herd_proto::policy::RateCard;

/// The prices a project's VMs pay: its own rate card, or the standard one until a cloud
/// admin sets one.
#[utoipa::path(get, path = "/v1/rate-cards/{project}", params(("project" = String, Path, description = "project")),
    responses((status = 200, body = RateCard), (status = 404, body = ErrorBody)))]
pub(crate) async fn get_rate_card(
    user: User,
    State(cloud): State<AppState>,
    ApiPath(project): ApiPath<String>,
) -> Result<Json<RateCard>, ApiError> {
    user.check(&project, Perm::Read, "project", &project)?;
    cloud.project(&project)?;
    Ok(Json(cloud.rate_card(&project)?))
}

/// Set a project's rate card (prices in millionths of the currency unit).
#[utoipa::path(put, path = "/v1/rate-cards/{project}", params(("project" = String, Path, description = "project")),
    request_body = RateCard, responses((status = 200, body = RateCard), (status = 400, body = ErrorBody)))]
pub(crate) async fn put_rate_card(
    _: CloudAdmin,
    State(cloud): State<AppState>,
    ApiPath(project): ApiPath<String>,
    ApiJson(card): ApiJson<RateCard>,
) -> Result<Json<RateCard>, ApiError> {
    cloud.set_rate_card(&project, &card)?;
    Ok(Json(card))
}

fn parse_time(field: &'static str, text: &str) -> Result<i64, ApiError> {
    if let Ok(seconds) = text.parse::<i64>() {
        return Ok(seconds.saturating_mul(1000));
    }
    humantime::parse_rfc3339_weak(text)
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_millis() as i64)
        .ok_or_else(|| {
            ApiError::bad_request(
                "invalid_query",
                format!("{field}: not RFC 3339 or unix seconds"),
            )
        })
}

/// Per-VM charges and the total over a period.
#[utoipa::path(get, path = "/v1/billing", params(BillQuery),
    responses((status = 200, body = BillView), (status = 400, body = ErrorBody)))]
pub(crate) async fn get_bill(
    user: User,
    State(cloud): State<AppState>,
    ApiQuery(query): ApiQuery<BillQuery>,
) -> Result<Json<BillView>, ApiError> {
    let (from, to) = period(&query)?;
    let lines = bills(&user, &cloud, query.project.as_deref(), &[(from, to)])?
        .pop()
        .unwrap_or_default();
    Ok(Json(BillView::of(&lines, from, to)))
}

/// The period a bill query asks for: `from` defaults to 30 days ago, `to` to now (and
/// is never later).
pub(crate) fn period(query: &BillQuery) -> Result<(i64, i64), ApiError> {
    let now = crate::store::now_ms();
    let from = query
        .from
        .as_deref()
        .map(|t| parse_time("from", t))
        .transpose()?
        .unwrap_or(now - 30 * 86_400_000);
    let to = query
        .to
        .as_deref()
        .map(|t| parse_time("to", t))
        .transpose()?
        .unwrap_or(now)
        .min(now);
    if from >= to {
        return Err(ApiError::bad_request(
            "invalid_query",
            "from must be before to",
        ));
    }
    Ok((from, to))
}

/// The bills of these periods that the caller may read: of the project named (if they
/// may read its bill), else of every project whose bill they may read.
pub(crate) fn bills(
    user: &User,
    cloud: &crate::cloud::Cloud,
    project: Option<&str>,
    periods: &[(i64, i64)],
) -> Result<Vec<Vec<crate::billing::BillLine>>, ApiError> {
    Ok(match (project, user.principal.scope(Perm::ReadBill)) {
        (Some(project), _) => {
            user.check(project, Perm::ReadBill, "project", project)?;
            crate::blocking(|| cloud.bills(Some(project), periods))?
        }
        (None, None) => crate::blocking(|| cloud.bills(None, periods))?,
        (None, Some(projects)) => {
            let mut all: Vec<Vec<_>> = periods.iter().map(|_| Vec::new()).collect();
            for project in projects {
                let bills = crate::blocking(|| cloud.bills(Some(&project), periods))?;
                for (lines, more) in all.iter_mut().zip(bills) {
                    lines.extend(more);
                }
            }
            all
        }
    })
}
