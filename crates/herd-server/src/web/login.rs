//! Logging in with an API token, and out.

use super::caller::form_body;
use super::{layout, session, Posted, WebError, WebState};
use crate::auth::Identity;
use axum::extract::{Query, Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use maud::{html, Markup};
use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
pub struct Next {
    #[serde(default)]
    next: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct LoginForm {
    #[serde(default)]
    token: String,
    #[serde(default)]
    next: Option<String>,
}

/// Where a login may send the browser on: only to a page of ours (no open redirect).
fn landing(next: Option<&str>) -> &str {
    match next {
        Some(path) if path.starts_with("/ui") && !path.contains("//") && !path.contains('\\') => {
            path
        }
        _ => "/ui",
    }
}

fn login_page(next: Option<&str>, error: Option<&str>) -> Markup {
    layout::bare(
        "Log in",
        html! {
            @if let Some(error) = error { p.error role="alert" { (error) } }
            form.card method="post" action="/ui/login" {
                label for="token" { "API token" }
                input #token type="password" name="token" required autocomplete="off"
                    autofocus placeholder="herd_…";
                input type="hidden" name="next" value=(landing(next));
                button type="submit" { "Log in" }
            }
            p.hint {
                "Tokens come from " code { "herd token create" } "; the first cloud admin's is in "
                code { "herd up" } "'s client config."
            }
        },
    )
}

pub async fn form(Query(next): Query<Next>) -> Markup {
    login_page(next.next.as_deref(), None)
}

pub async fn submit(State(web): State<WebState>, req: Request) -> Result<Response, WebError> {
    // No session yet, so no CSRF token: the Origin check and the SameSite cookie guard
    // this form.
    let (_, login): (_, LoginForm) = form_body(req, &web, None).await?;
    let token = login.token.trim().to_owned();
    match web.cloud.authenticate(Some(&token)) {
        Ok(Identity::User(principal)) => {
            let (id, _) = web.sessions.open(token, crate::store::now_ms());
            tracing::info!(user = %principal.user, "logged in to the web UI");
            let cookie = session::set_cookie(&id, web.sessions.ttl_seconds());
            Ok((
                [(header::SET_COOKIE, cookie)],
                Redirect::to(landing(login.next.as_deref())),
            )
                .into_response())
        }
        Ok(Identity::Agent { .. }) => Ok((
            StatusCode::FORBIDDEN,
            login_page(
                login.next.as_deref(),
                Some("that is an agent's credential; log in with a user's API token"),
            ),
        )
            .into_response()),
        Err(_) => Ok((
            StatusCode::UNAUTHORIZED,
            login_page(
                login.next.as_deref(),
                Some("that token is not valid (unknown, revoked or expired)"),
            ),
        )
            .into_response()),
    }
}

#[derive(Debug, Deserialize)]
pub struct Nothing {}

pub async fn logout(
    State(web): State<WebState>,
    posted: Posted<Nothing>,
) -> Result<Response, WebError> {
    web.sessions.close(&posted.caller.session_id);
    Ok((
        [(header::SET_COOKIE, session::clear_cookie())],
        Redirect::to("/ui/login"),
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::landing;

    #[test]
    fn a_login_lands_only_on_our_own_pages() {
        assert_eq!(
            landing(Some("/ui/vms?state=running")),
            "/ui/vms?state=running"
        );
        assert_eq!(landing(Some("https://evil.example/")), "/ui");
        assert_eq!(landing(Some("//evil.example")), "/ui");
        assert_eq!(landing(Some("/ui//evil.example")), "/ui");
        assert_eq!(landing(Some("/v1/vms")), "/ui");
        assert_eq!(landing(None), "/ui");
    }
}
