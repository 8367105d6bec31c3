//! What the server refuses from browsers acting for another site: a `Host` a loopback
//! listener does not answer to (DNS rebinding), API writes that are not JSON (a cross-site
//! `no-cors` POST can only send form or text bodies), and console forms posted from another
//! origin (cross-site request forgery, including from a sibling origin of the same site);
//! and, on every answer, the headers that keep a page from being framed (clickjacking),
//! running scripts other than the server's own, or being sniffed as another type.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::Next;
use axum::response::Response;

use super::{error, ServerState};

/// The Content-Security-Policy of every answer: the console's pages run only the server's
/// own script, load nothing from elsewhere, post forms only to the server, and may not be
/// framed. (Inline styles are allowed: the console and its graphs style elements inline.)
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self'; \
     style-src 'self' 'unsafe-inline'; img-src 'self' data:; object-src 'none'; \
     base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// Add the headers that protect a browser to every answer: no framing (`X-Frame-Options`,
/// `frame-ancestors`), scripts from this server only, no type sniffing, and no `Referer`
/// sent to other sites.
pub(crate) async fn security_headers(request: Request, next: Next) -> Response {
    use axum::http::HeaderValue;
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    response
}

/// The names a loopback listener answers to (any port).
pub const LOOPBACK_HOSTS: &[&str] = &["localhost", "127.0.0.1", "[::1]"];

/// Serve only requests whose `Host` names this server (when the state restricts hosts).
pub(crate) async fn check_host(
    State(state): State<Arc<ServerState>>,
    request: Request,
    next: Next,
) -> Response {
    if let Some(allowed) = &state.allowed_hosts {
        let host = request
            .headers()
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .map(without_port)
            .unwrap_or_default();
        if !allowed.iter().any(|a| a.eq_ignore_ascii_case(host)) {
            return error(
                StatusCode::MISDIRECTED_REQUEST,
                format!(
                    "this server does not answer to host `{host}`; it answers to {} (add names with --allow-host)",
                    allowed
                        .iter()
                        .map(|a| format!("`{a}`"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            );
        }
    }
    next.run(request).await
}

/// `example.com:8080` → `example.com`; `[::1]:8080` → `[::1]`.
fn without_port(host: &str) -> &str {
    if let Some(end) = host.find(']') {
        return &host[..=end];
    }
    host.split(':').next().unwrap_or(host)
}

/// API requests that change something must say they carry JSON.
pub(crate) async fn json_writes(request: Request, next: Next) -> Response {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        let json = request
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| {
                v.split(';')
                    .next()
                    .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"))
            });
        if !json {
            return error(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "send `Content-Type: application/json` (an empty body may be `{}`)",
            );
        }
    }
    next.run(request).await
}

/// Console forms are taken only from the console's own pages: the `Origin` (or, without
/// one, the `Referer`) must be this server as the browser addressed it.
pub(crate) async fn same_origin_forms(request: Request, next: Next) -> Response {
    if request.method() == Method::POST {
        let headers = request.headers();
        let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
        let source = headers
            .get(header::ORIGIN)
            .or_else(|| headers.get(header::REFERER))
            .and_then(|v| v.to_str().ok())
            .and_then(authority);
        if host.is_none() || source != host {
            return error(
                StatusCode::FORBIDDEN,
                "a form from another origin: the console takes forms only from its own pages",
            );
        }
    }
    next.run(request).await
}

/// `http://host:port/path` → `host:port`.
fn authority(url: &str) -> Option<&str> {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))?;
    Some(rest.split(['/', '?', '#']).next().unwrap_or(rest))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_and_origins_are_compared_by_their_parts() {
        assert_eq!(without_port("localhost:8080"), "localhost");
        assert_eq!(without_port("[::1]:8080"), "[::1]");
        assert_eq!(without_port("127.0.0.1"), "127.0.0.1");
        assert_eq!(
            authority("http://127.0.0.1:8080/instances/x"),
            Some("127.0.0.1:8080")
        );
        assert_eq!(authority("https://a.example"), Some("a.example"));
        assert_eq!(authority("null"), None);
    }
}
