//! Logging in: the token form, the cookie it sets, and the check every page goes through.

use std::sync::Arc;

use axum::extract::{Form, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Redirect, Response};
use maud::html;
use serde::Deserialize;

use super::layout::page;
use crate::server::auth::{cookie_value, token_given, Verdict, TOKEN_COOKIE};
use crate::server::state::ServerState;

/// Pages need the token too: a bearer header, or the cookie set by the login form.
/// Let a page through, or send the browser to the login form.
/// A wrong cookie counts against the address as a wrong bearer token does (one throttle).
pub(crate) async fn authorize_pages(
    State(state): State<Arc<ServerState>>,
    client: crate::server::state::Client,
    headers: HeaderMap,
    request: Request,
    next: Next,
) -> Response {
    let Some(token) = &state.token else {
        return next.run(request).await;
    };
    match state
        .throttle
        .check(client.0, token_given(&headers).as_deref(), token)
    {
        Verdict::Allowed => next.run(request).await,
        Verdict::Blocked(wait) => too_many(wait),
        Verdict::Missing | Verdict::Wrong => Redirect::to("/login").into_response(),
    }
}

/// The page refusing an address that sent too many wrong tokens.
fn too_many(wait: std::time::Duration) -> Response {
    let secs = wait.as_secs().max(1);
    let body = html! {
        h1 { "Log in" }
        p class="err" { "Too many wrong tokens from this address: try again in " (secs) " s." }
    };
    (
        StatusCode::TOO_MANY_REQUESTS,
        [(header::RETRY_AFTER, secs.to_string())],
        page("Log in", body),
    )
        .into_response()
}

/// `GET /login`.
pub(crate) async fn login_form() -> Html<String> {
    page(
        "Log in",
        html! {
            h1 { "Log in" }
            form method="post" action="/login" {
                label { "Token " input type="password" name="token" autofocus; }
                " "
                button { "Log in" }
            }
        },
    )
}

#[derive(Deserialize)]
pub(crate) struct Login {
    token: String,
}

/// `POST /login`: a right token sets the cookie.
pub(crate) async fn login(
    State(state): State<Arc<ServerState>>,
    client: crate::server::state::Client,
    Form(form): Form<Login>,
) -> Response {
    let Some(token) = &state.token else {
        return Redirect::to("/").into_response();
    };
    match state.throttle.check(client.0, Some(&form.token), token) {
        Verdict::Allowed => {}
        Verdict::Blocked(wait) => return too_many(wait),
        Verdict::Missing | Verdict::Wrong => {
            let body = html! {
                h1 { "Log in" }
                p class="err" { "Wrong token." }
                p { a href="/login" { "Try again" } }
            };
            return (StatusCode::UNAUTHORIZED, page("Log in", body)).into_response();
        }
    }
    (
        [(
            header::SET_COOKIE,
            format!(
                "{TOKEN_COOKIE}={}; Path=/; HttpOnly; SameSite=Strict",
                cookie_value(&form.token)
            ),
        )],
        Redirect::to("/"),
    )
        .into_response()
}
