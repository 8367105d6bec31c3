//! Logging in: the token form, the cookie it sets, and the check every page goes through.

use std::sync::Arc;

use axum::extract::{Form, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Redirect, Response};
use maud::html;
use serde::Deserialize;

use super::layout::page;
use crate::server::auth::{cookie_value, token_given, token_matches, TOKEN_COOKIE};
use crate::server::ServerState;

/// Pages need the token too: a bearer header, or the cookie set by the login form.
/// Let a page through, or send the browser to the login form.
pub(crate) async fn authorize_pages(
    State(state): State<Arc<ServerState>>,
    headers: HeaderMap,
    request: Request,
    next: Next,
) -> Response {
    match &state.token {
        Some(token) if !token_matches(token_given(&headers).as_deref(), token) => {
            Redirect::to("/login").into_response()
        }
        _ => next.run(request).await,
    }
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
    client: crate::server::Client,
    Form(form): Form<Login>,
) -> Response {
    let Some(token) = &state.token else {
        return Redirect::to("/").into_response();
    };
    if let Some(wait) = state.throttle.blocked(client.0) {
        let secs = wait.as_secs().max(1);
        let body = html! {
            h1 { "Log in" }
            p class="err" { "Too many wrong tokens from this address: try again in " (secs) " s." }
        };
        return (
            StatusCode::TOO_MANY_REQUESTS,
            [(header::RETRY_AFTER, secs.to_string())],
            page("Log in", body),
        )
            .into_response();
    }
    if token_matches(Some(&form.token), token) {
        state.throttle.succeeded(client.0);
        return (
            [(
                header::SET_COOKIE,
                format!(
                    "{TOKEN_COOKIE}={}; Path=/; HttpOnly; SameSite=Strict",
                    cookie_value(&form.token)
                ),
            )],
            Redirect::to("/"),
        )
            .into_response();
    }
    state.throttle.failed(client.0);
    let body = html! {
        h1 { "Log in" }
        p class="err" { "Wrong token." }
        p { a href="/login" { "Try again" } }
    };
    (StatusCode::UNAUTHORIZED, page("Log in", body)).into_response()
}
