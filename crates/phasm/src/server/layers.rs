//! The layers every request passes: methods and sizes refused early, deadlines, JSON errors for
//! what axum answers itself, and the token check.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::Response;

use super::{auth, error, Client, ServerState, MAX_HEADER_BYTES, MAX_URI_BYTES};

/// A 405 the API left without a body gets its JSON error, naming the methods the path takes
/// (from the `Allow` header the router adds last). The console's 405 is a page already.
pub(super) async fn methods_not_allowed(request: Request, next: Next) -> Response {
    let response = next.run(request).await;
    if response.status() != StatusCode::METHOD_NOT_ALLOWED {
        return response;
    }
    let is_page_or_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/html") || v.starts_with("application/json"));
    if is_page_or_json {
        return response;
    }
    let allowed = response
        .headers()
        .get(header::ALLOW)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .replace(',', ", ");
    let mut answer = error(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("method not allowed here; this path takes {allowed}"),
    );
    for (name, value) in response.headers() {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            answer.headers_mut().insert(name.clone(), value.clone());
        }
    }
    answer
}

/// Answer 408 (and close the connection) when a request is not answered within `deadline`
/// of its head: a body sent a byte at a time holds a connection no longer than that.
pub(super) async fn request_deadline(
    deadline: std::time::Duration,
    request: Request,
    next: Next,
) -> Response {
    if let Ok(response) = tokio::time::timeout(deadline, next.run(request)).await {
        response
    } else {
        let mut response = error(
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "the request was not complete and answered within {} s; send the body at once",
                deadline.as_secs()
            ),
        );
        response.headers_mut().insert(
            header::CONNECTION,
            axum::http::HeaderValue::from_static("close"),
        );
        response
    }
}

/// Refuse request targets and header sets over the limits, with a JSON error.
pub(super) async fn limit_head(request: Request, next: Next) -> Response {
    let target = request
        .uri()
        .path_and_query()
        .map_or(0, |p| p.as_str().len());
    if target > MAX_URI_BYTES {
        return error(
            StatusCode::URI_TOO_LONG,
            format!("the request target is {target} bytes; at most {MAX_URI_BYTES} are accepted"),
        );
    }
    let headers: usize = request
        .headers()
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 4)
        .sum();
    if headers > MAX_HEADER_BYTES {
        return error(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            format!("the request's headers are {headers} bytes; at most {MAX_HEADER_BYTES} are accepted"),
        );
    }
    next.run(request).await
}

/// Every error answer of the API is `{"error": MESSAGE}`, including those the router and
/// axum's extractors make in plain text or with no body (a method the route does not take, a
/// bad query string, invalid UTF-8 in the path, a body over the limit).
pub(super) async fn json_errors(request: Request, next: Next) -> Response {
    let response = next.run(request).await;
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if is_json {
        return response;
    }
    if status == StatusCode::METHOD_NOT_ALLOWED {
        // `methods_not_allowed`, around the whole router, answers once the router has added
        // the `Allow` header (inside a route it is not there yet).
        return response;
    }
    let (parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, 64 * 1024)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_default();
    let message = if text.is_empty() {
        status
            .canonical_reason()
            .unwrap_or("error")
            .to_ascii_lowercase()
    } else {
        text
    };
    let mut answer = error(status, message);
    if let Some(value) = parts.headers.get(header::RETRY_AFTER) {
        answer
            .headers_mut()
            .insert(header::RETRY_AFTER, value.clone());
    }
    answer
}

pub(super) async fn authorize(
    State(state): State<Arc<ServerState>>,
    client: Client,
    headers: HeaderMap,
    request: Request,
    next: Next,
) -> Response {
    if let Some(token) = &state.token {
        let given = auth::token_given(&headers);
        match state.throttle.check(client.0, given.as_deref(), token) {
            auth::Verdict::Allowed => {}
            auth::Verdict::Blocked(wait) => {
                let secs = wait.as_secs().max(1);
                let mut response = error(
                    StatusCode::TOO_MANY_REQUESTS,
                    format!("too many wrong tokens from this address: try again in {secs} s"),
                );
                if let Ok(value) = secs.to_string().parse() {
                    response.headers_mut().insert(header::RETRY_AFTER, value);
                }
                return response;
            }
            auth::Verdict::Missing | auth::Verdict::Wrong => {
                return error(
                    StatusCode::UNAUTHORIZED,
                    "missing or wrong token: send `Authorization: Bearer TOKEN`",
                );
            }
        }
    }
    next.run(request).await
}
