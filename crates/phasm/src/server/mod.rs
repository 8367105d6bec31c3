//! The HTTP API (`phasm serve`): JSON over HTTP for starting, inspecting, cancelling,
//! retrying and resetting instances, plus the machines and their drawings, and the web
//! console's pages ([`crate::server::console`]). `GET /api/openapi.json` describes the API: each
//! route is registered with its `#[utoipa::path]` description (`openapi`), so the document
//! lists what the router serves. This file holds the router, the entry points and the
//! helpers every handler uses; the handlers live by what they act on: `machines` (the list,
//! drawings, starting), `instances` (list, view, pages, cancel, retry), `steps` (a step,
//! reset), `events`, `versions` (versions, upgrade), `operations` (workers, queues,
//! schedules), `health` (`/healthz`, `/metrics`); `console`, the web pages. Beside them: `layers` (what every request
//! passes), `auth` (the token), `guard` (hosts, forms, JSON writes), `listen` (the accept
//! loop), `batch` (a batch start's body, read item by item), `state`, `openapi`.
//!
//! The router only calls the library ([`crate::control`], the [`Store`](crate::store::Store)); errors are JSON
//! objects `{"error": MESSAGE}` with a 4xx status for bad requests, never a 500 for bad
//! input. The entry point takes its listener and shutdown signal as arguments, so tests and
//! embedders choose the address and the lifetime.

pub mod auth;
mod batch;
pub mod console;
mod events;
mod guard;
mod health;
mod instances;
mod layers;
mod listen;
mod machines;
mod openapi;
mod operations;
pub(crate) mod state;
pub(crate) mod steps;
mod versions;

pub use guard::LOOPBACK_HOSTS;

pub use health::install_metrics;
pub use listen::ServeOptions;
pub use state::{client_address, Client, ServerState};

use std::future::Future;
use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Request};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};

use crate::engine::is_valid_instance_name;

/// Largest request body accepted (a context is at most `Limits::max_context_bytes` anyway).
pub const MAX_BODY_BYTES: usize = 2 * 1024 * 1024;

/// Largest body of a batch start (`POST /api/machines/{m}/instances/batch`): room for
/// [`MAX_BATCH_START`](crate::control::MAX_BATCH_START) contexts of a few kilobytes each.
pub const MAX_BATCH_BODY_BYTES: usize = 32 * 1024 * 1024;

/// Largest body of an event sent with a wait token (`POST /api/waits/{token}`), read only
/// once the token's signature has checked.
pub const MAX_UNAUTHENTICATED_BODY_BYTES: usize = 256 * 1024;

/// Largest login form.
pub const MAX_LOGIN_BODY_BYTES: usize = 4 * 1024;

/// Longest request target (path and query) answered; longer ones get a JSON 414.
pub const MAX_URI_BYTES: usize = 8 * 1024;

/// Most header bytes a request may carry; more get a JSON 431.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;

/// A JSON error response.
fn error(status: StatusCode, message: impl Into<String>) -> Response {
    let body = openapi::ErrorBody {
        error: message.into(),
    };
    (status, Json(body)).into_response()
}

/// The API's routes.
pub fn router(state: Arc<ServerState>) -> Router {
    use utoipa::OpenApi;
    use utoipa_axum::{router::OpenApiRouter, routes};
    // Each route is registered with its description (`routes!`): the document served at
    // `/api/openapi.json` lists exactly what these routers answer.
    let (batch_schemas, batch_paths, batch) = routes!(machines::start_batch);
    let mut api = OpenApiRouter::with_openapi(openapi::ApiDoc::openapi())
        .routes(routes!(machines::machines))
        .routes(routes!(machines::graph))
        .routes(routes!(versions::list))
        .routes(routes!(versions::one))
        .routes(routes!(versions::upgrade_machine))
        .routes(routes!(versions::upgrade_one))
        .routes(routes!(machines::start))
        .routes((
            batch_schemas,
            batch_paths,
            batch.layer(DefaultBodyLimit::max(MAX_BATCH_BODY_BYTES)),
        ))
        .routes(routes!(instances::list))
        .routes(routes!(instances::instance))
        .routes(routes!(instances::history_page))
        .routes(routes!(steps::step))
        .routes(routes!(instances::logs_page))
        .routes(routes!(instances::cancel))
        .routes(routes!(instances::retry))
        .routes(routes!(steps::reset))
        .routes(routes!(events::to_instance))
        .routes(routes!(operations::workers))
        .routes(routes!(operations::schedules))
        .routes(routes!(operations::queues))
        .routes(routes!(health::prometheus))
        .routes(routes!(openapi::openapi_json))
        .layer(middleware::from_fn_with_state(
            Arc::clone(&state),
            layers::authorize,
        ))
        .layer(middleware::from_fn(guard::json_writes))
        .layer(middleware::from_fn(layers::json_errors));
    // Every route so far is behind `authorize`.
    openapi::add_token_errors(api.get_openapi_mut());
    // The wait token is the credential here: no bearer token asked.
    let waits = OpenApiRouter::new()
        .routes(routes!(events::to_wait))
        // Read only after the token's signature checks, and small.
        .layer(DefaultBodyLimit::max(MAX_UNAUTHENTICATED_BODY_BYTES))
        .layer(middleware::from_fn_with_state(
            Arc::clone(&state),
            events::signed_wait_token,
        ))
        .layer(middleware::from_fn(guard::json_writes))
        .layer(middleware::from_fn(layers::json_errors));
    let health = OpenApiRouter::new().routes(routes!(health::healthz));
    let (api, document) = api.merge(waits).merge(health).split_for_parts();
    let document = openapi::Document(
        document
            .to_json()
            .unwrap_or_else(|e| format!("{{\"error\": \"the document did not serialise: {e}\"}}"))
            .into(),
    );
    let api = api.layer(axum::Extension(document));
    let pages = Router::new()
        .route("/", get(crate::server::console::machines))
        .route("/machines/{name}", get(crate::server::console::machine))
        .route(
            "/machines/{name}/start",
            post(crate::server::console::start),
        )
        .route(
            "/machines/{name}/versions/{n}",
            get(crate::server::console::version),
        )
        .route(
            "/machines/{name}/versions/{n}/graph.svg",
            get(crate::server::console::version_graph),
        )
        .route(
            "/machines/{name}/diff",
            get(crate::server::console::diff_page),
        )
        .route(
            "/machines/{name}/upgrade",
            post(crate::server::console::upgrade),
        )
        .route(
            "/machines/{name}/graph.svg",
            get(crate::server::console::machine_graph),
        )
        .route("/workers", get(crate::server::console::workers))
        .route("/queues", get(crate::server::console::queues))
        .route("/instances", get(crate::server::console::instances))
        .route("/instances/bulk", post(crate::server::console::bulk))
        .route("/instances/{name}", get(crate::server::console::instance))
        .route(
            "/instances/{name}/graph.svg",
            get(crate::server::console::instance_graph),
        )
        .route(
            "/instances/{name}/cancel",
            post(crate::server::console::cancel),
        )
        .route(
            "/instances/{name}/retry",
            post(crate::server::console::retry),
        )
        .route(
            "/instances/{name}/events",
            post(crate::server::console::send_event),
        )
        .route(
            "/instances/{name}/history",
            get(crate::server::console::history),
        )
        .route(
            "/instances/{name}/steps/{id}",
            get(crate::server::console::step),
        )
        .route(
            "/instances/{name}/reset",
            post(crate::server::console::reset),
        )
        .layer(middleware::from_fn_with_state(
            Arc::clone(&state),
            crate::server::console::authorize_pages,
        ))
        .layer(middleware::from_fn(guard::same_origin_forms))
        .layer(middleware::from_fn(crate::server::console::html_errors));
    Router::new()
        .merge(
            Router::new()
                .route(
                    "/login",
                    get(crate::server::console::login_form).post(crate::server::console::login),
                )
                .layer(DefaultBodyLimit::max(MAX_LOGIN_BODY_BYTES))
                .layer(middleware::from_fn(guard::same_origin_forms))
                .route(
                    crate::server::console::SCRIPT_PATH,
                    get(crate::server::console::script),
                ),
        )
        .merge(api)
        .merge(pages)
        .fallback(|| async {
            error(
                StatusCode::NOT_FOUND,
                "no such endpoint; see the README for the API",
            )
        })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn_with_state(
            Arc::clone(&state),
            guard::check_host,
        ))
        .layer(middleware::from_fn(layers::limit_head))
        .layer(middleware::from_fn(guard::security_headers))
        .with_state(state)
}

/// Serve the API on `listener` until `shutdown` completes.
///
/// # Errors
/// When the listener fails.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<ServerState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_with(listener, state, ServeOptions::default(), shutdown).await
}

/// [`serve`] with chosen connection limits.
///
/// # Errors
/// When the listener fails.
pub async fn serve_with(
    listener: tokio::net::TcpListener,
    state: Arc<ServerState>,
    options: ServeOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let unlimited = state.trusted_proxies.clone();
    let deadline = options.request_timeout;
    let app = router(state).layer(middleware::from_fn(move |request: Request, next: Next| {
        layers::request_deadline(deadline, request, next)
    }));
    // Around the whole router (a route's layers run before its `Allow` header is added).
    let app = Router::new()
        .fallback_service(app)
        .layer(middleware::from_fn(layers::methods_not_allowed));
    listen::serve_app(listener, app, options, unlimited, shutdown).await
}

/// A request body read as its documented type `T`; else a message that says what was wrong
/// and where (the field, or the line and column of bad JSON), and the body's `shape`.
pub(super) fn json_body<T: serde::de::DeserializeOwned>(
    body: &[u8],
    shape: &str,
) -> Result<T, String> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let value: T = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            format!("the body is not JSON: {inner}; send {shape}")
        } else if path == "." {
            format!("the body must be {shape}: {inner}")
        } else {
            format!("`{path}`: {inner}; the body must be {shape}")
        }
    })?;
    de.end()
        .map_err(|e| format!("the body is not JSON: {e}; send {shape}"))?;
    Ok(value)
}

fn check_name(name: &str) -> Option<Response> {
    (!is_valid_instance_name(name)).then(|| {
        error(
            StatusCode::BAD_REQUEST,
            format!("invalid instance name `{name}`"),
        )
    })
}
