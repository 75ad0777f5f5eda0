//! Live regions: an SSE stream per page that renders the page's live part again every
//! tick and sends it when it changed. Each tick authenticates anew, so a logout or a
//! revoked token ends the stream; an error (the VM is gone) ends it too.

use super::vms::{self, ListQuery};
use super::{overview, Caller, WebError, WebState};
use axum::extract::{Path, Query, State};
use axum::http::request::Parts;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures_util::Stream;
use maud::Markup;
use std::convert::Infallible;
use std::future::Future;
use std::time::Duration;

/// How often a live region is rendered again: a state change shows well within a
/// second. Rendering one region is a few store reads.
const TICK: Duration = Duration::from_millis(300);
/// The console is fetched from the VM's host, so less often.
const CONSOLE_TICK: Duration = Duration::from_millis(1000);

type Render = fn(
    Caller,
    WebState,
    String,
) -> std::pin::Pin<Box<dyn Future<Output = Result<Markup, WebError>> + Send>>;

/// The stream: `render` every `tick` as the caller of `parts`, sent when it changed.
fn stream(
    parts: Parts,
    web: WebState,
    arg: String,
    tick: Duration,
    render: Render,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let state = (parts, web, arg, None::<String>);
    let events = futures_util::stream::unfold(state, move |(parts, web, arg, last)| async move {
        loop {
            tokio::time::sleep(tick).await;
            let caller = Caller::authenticate(&parts, &web).ok()?;
            let html = render(caller, web.clone(), arg.clone())
                .await
                .ok()?
                .into_string();
            if last.as_deref() != Some(html.as_str()) {
                let event = Event::default().data(&html);
                return Some((Ok(event), (parts, web, arg, Some(html))));
            }
        }
    });
    Sse::new(events).keep_alive(KeepAlive::default())
}

pub async fn overview(
    caller: Caller,
    parts: Parts,
    State(web): State<WebState>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    drop(caller);
    stream(parts, web, String::new(), TICK, |caller, web, _| {
        Box::pin(async move { overview::live(&caller, &web).await })
    })
}

pub async fn vm_list(
    caller: Caller,
    parts: Parts,
    State(web): State<WebState>,
    Query(query): Query<ListQuery>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, WebError> {
    drop(caller);
    let query = serde_urlencoded::to_string(&query).unwrap_or_default();
    Ok(stream(parts, web, query, TICK, |caller, web, query| {
        Box::pin(async move {
            let query: ListQuery = serde_urlencoded::from_str(&query).unwrap_or_default();
            vms::list_live(&caller, &web, &query).await
        })
    }))
}

pub async fn vm_detail(
    caller: Caller,
    parts: Parts,
    State(web): State<WebState>,
    Path(id): Path<String>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    drop(caller);
    stream(parts, web, id, TICK, |caller, web, id| {
        Box::pin(async move { Ok(vms::detail_live(&caller, &web, &id).await?.1) })
    })
}

pub async fn console(
    caller: Caller,
    parts: Parts,
    State(web): State<WebState>,
    Path(id): Path<String>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    drop(caller);
    stream(parts, web, id, CONSOLE_TICK, |caller, web, id| {
        Box::pin(async move { vms::console_live(&caller, &web, &id).await })
    })
}
