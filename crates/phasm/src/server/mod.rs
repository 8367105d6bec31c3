//! The HTTP API (`phasm serve`): JSON over HTTP for starting, inspecting, cancelling,
//! retrying and resetting instances, plus the machines and their drawings, and the web
//! console's pages ([`crate::console`]). `GET /api/openapi.json` describes the API: each
//! route is registered with its `#[utoipa::path]` description (`openapi`), so the document
//! lists what the router serves. Modules: `auth` (the token), `guard` (hosts, forms, JSON
//! writes), `listen` (the accept loop), `events` and `steps` (their endpoints), `openapi`.
//!
//! The router only calls the library ([`crate::control`], the [`Store`](crate::store::Store)); errors are JSON
//! objects `{"error": MESSAGE}` with a 4xx status for bad requests, never a 500 for bad
//! input. The entry point takes its listener and shutdown signal as arguments, so tests and
//! embedders choose the address and the lifetime.

pub mod auth;
mod batch;
mod events;
mod guard;
mod listen;
mod openapi;
pub(crate) mod state;
pub(crate) mod steps;
mod versions;

use openapi::{BatchBody, ErrorBody, StartBody};

pub use guard::LOOPBACK_HOSTS;

pub use listen::ServeOptions;
pub use state::{client_address, Client, ServerState};

use std::future::Future;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::control::{
    instance_json, start_instances, BatchStartError, StartError, StartOutcome, MAX_BATCH_START,
};
use crate::engine::is_valid_instance_name;
use crate::store::Control;

/// Largest request body accepted (a context is at most `Limits::max_context_bytes` anyway).
pub const MAX_BODY_BYTES: usize = 2 * 1024 * 1024;

/// Largest body of a batch start (`POST /api/machines/{m}/instances/batch`): room for
/// [`MAX_BATCH_START`] contexts of a few kilobytes each.
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
    let (batch_schemas, batch_paths, batch) = routes!(start_batch);
    let mut api = OpenApiRouter::with_openapi(openapi::ApiDoc::openapi())
        .routes(routes!(machines))
        .routes(routes!(graph))
        .routes(routes!(versions::list))
        .routes(routes!(versions::one))
        .routes(routes!(versions::upgrade_machine))
        .routes(routes!(versions::upgrade_one))
        .routes(routes!(start))
        .routes((
            batch_schemas,
            batch_paths,
            batch.layer(DefaultBodyLimit::max(MAX_BATCH_BODY_BYTES)),
        ))
        .routes(routes!(list))
        .routes(routes!(instance))
        .routes(routes!(history_page))
        .routes(routes!(steps::step))
        .routes(routes!(logs_page))
        .routes(routes!(cancel))
        .routes(routes!(retry))
        .routes(routes!(steps::reset))
        .routes(routes!(events::to_instance))
        .routes(routes!(workers))
        .routes(routes!(schedules))
        .routes(routes!(queues))
        .routes(routes!(prometheus))
        .routes(routes!(openapi::openapi_json))
        .layer(middleware::from_fn_with_state(
            Arc::clone(&state),
            authorize,
        ))
        .layer(middleware::from_fn(guard::json_writes))
        .layer(middleware::from_fn(json_errors));
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
        .layer(middleware::from_fn(json_errors));
    let health = OpenApiRouter::new().routes(routes!(healthz));
    let (api, document) = api.merge(waits).merge(health).split_for_parts();
    let document = openapi::Document(
        document
            .to_json()
            .unwrap_or_else(|e| format!("{{\"error\": \"the document did not serialise: {e}\"}}"))
            .into(),
    );
    let api = api.layer(axum::Extension(document));
    let pages = Router::new()
        .route("/", get(crate::console::machines))
        .route("/machines/{name}", get(crate::console::machine))
        .route("/machines/{name}/start", post(crate::console::start))
        .route(
            "/machines/{name}/versions/{n}",
            get(crate::console::version),
        )
        .route(
            "/machines/{name}/versions/{n}/graph.svg",
            get(crate::console::version_graph),
        )
        .route("/machines/{name}/diff", get(crate::console::diff_page))
        .route("/machines/{name}/upgrade", post(crate::console::upgrade))
        .route(
            "/machines/{name}/graph.svg",
            get(crate::console::machine_graph),
        )
        .route("/workers", get(crate::console::workers))
        .route("/queues", get(crate::console::queues))
        .route("/instances", get(crate::console::instances))
        .route("/instances/bulk", post(crate::console::bulk))
        .route("/instances/{name}", get(crate::console::instance))
        .route(
            "/instances/{name}/graph.svg",
            get(crate::console::instance_graph),
        )
        .route("/instances/{name}/cancel", post(crate::console::cancel))
        .route("/instances/{name}/retry", post(crate::console::retry))
        .route("/instances/{name}/events", post(crate::console::send_event))
        .route("/instances/{name}/history", get(crate::console::history))
        .route("/instances/{name}/steps/{id}", get(crate::console::step))
        .route("/instances/{name}/reset", post(crate::console::reset))
        .layer(middleware::from_fn_with_state(
            Arc::clone(&state),
            crate::console::authorize_pages,
        ))
        .layer(middleware::from_fn(guard::same_origin_forms))
        .layer(middleware::from_fn(crate::console::html_errors));
    Router::new()
        .merge(
            Router::new()
                .route(
                    "/login",
                    get(crate::console::login_form).post(crate::console::login),
                )
                .layer(DefaultBodyLimit::max(MAX_LOGIN_BODY_BYTES))
                .layer(middleware::from_fn(guard::same_origin_forms))
                .route(crate::console::SCRIPT_PATH, get(crate::console::script)),
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
        .layer(middleware::from_fn(limit_head))
        .layer(middleware::from_fn(guard::security_headers))
        .with_state(state)
}

/// A 405 the API left without a body gets its JSON error, naming the methods the path takes
/// (from the `Allow` header the router adds last). The console's 405 is a page already.
async fn methods_not_allowed(request: Request, next: Next) -> Response {
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
async fn request_deadline(deadline: std::time::Duration, request: Request, next: Next) -> Response {
    match tokio::time::timeout(deadline, next.run(request)).await {
        Ok(response) => response,
        Err(_) => {
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
}

/// Refuse request targets and header sets over the limits, with a JSON error.
async fn limit_head(request: Request, next: Next) -> Response {
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
async fn json_errors(request: Request, next: Next) -> Response {
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
        request_deadline(deadline, request, next)
    }));
    // Around the whole router (a route's layers run before its `Allow` header is added).
    let app = Router::new()
        .fallback_service(app)
        .layer(middleware::from_fn(methods_not_allowed));
    listen::serve_app(listener, app, options, unlimited, shutdown).await
}

async fn authorize(
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

/// Whether the server and its database answer (no token asked).
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "operations",
    security(()),
    responses(
        (status = 200, description = "The server and its database answer: `{\"status\": \"ok\"}`", body = serde_json::Value),
        (status = 503, description = "The database cannot be reached or failed", body = ErrorBody),
    )
)]
async fn healthz(State(state): State<Arc<ServerState>>) -> Response {
    match state.store.next_due().await {
        Ok(_) => Json(json!({ "status": "ok" })).into_response(),
        Err(e) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the store is unavailable: {e}"),
        ),
    }
}

/// Install the process-wide Prometheus recorder (once) and return its handle.
///
/// # Errors
/// When another metrics recorder is already installed.
pub fn install_metrics() -> Result<metrics_exporter_prometheus::PrometheusHandle, String> {
    static HANDLE: std::sync::Mutex<Option<metrics_exporter_prometheus::PrometheusHandle>> =
        std::sync::Mutex::new(None);
    let mut installed = HANDLE
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(h) = installed.as_ref() {
        return Ok(h.clone());
    }
    let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .map_err(|e| e.to_string())?;
    *installed = Some(handle.clone());
    Ok(handle)
}

/// Prometheus metrics: step counters and durations, and pending work per queue sampled now.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    responses(
        (status = 200, description = "Prometheus text: step counters and durations, and pending work per queue", content_type = "text/plain", body = String),
        (status = 404, description = "Metrics are not enabled in this server", body = ErrorBody),
        (status = 503, description = "The database cannot be reached or failed", body = ErrorBody),
    )
)]
async fn prometheus(State(state): State<Arc<ServerState>>) -> Response {
    let Some(handle) = &state.metrics else {
        return error(
            StatusCode::NOT_FOUND,
            "metrics are not enabled in this server",
        );
    };
    match state.store.stats(state.clock.now()).await {
        Ok(stats) => {
            for q in &stats.queues {
                let queue = q.queue.clone();
                metrics::gauge!("phasm_queue_due", "queue" => queue.clone()).set(q.due as f64);
                metrics::gauge!("phasm_queue_scheduled", "queue" => queue.clone())
                    .set(q.scheduled as f64);
                metrics::gauge!("phasm_queue_running", "queue" => queue.clone())
                    .set(q.running as f64);
                metrics::gauge!("phasm_queue_oldest_due_age_seconds", "queue" => queue)
                    .set(q.oldest_due_age_seconds);
            }
            metrics::gauge!("phasm_parked_branches").set(stats.parked as f64);
        }
        Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        handle.render(),
    )
        .into_response()
}

/// The machines this server runs: their states and initial state.
#[utoipa::path(
    get,
    path = "/api/machines",
    tag = "machines",
    responses(
        (status = 200, description = "The machines, with their states and initial state", body = serde_json::Value),
    )
)]
async fn machines(State(state): State<Arc<ServerState>>) -> Response {
    let machines: Vec<Value> = state
        .config
        .machines
        .iter()
        .map(|m| {
            json!({
                "name": m.name,
                "states": m.states.iter().map(|s| s.name.clone()).collect::<Vec<_>>(),
                "initial": m.initial_state().map(|s| s.name.clone()),
            })
        })
        .collect();
    Json(json!({ "machines": machines })).into_response()
}

/// A machine drawn as SVG.
#[utoipa::path(
    get,
    path = "/api/machines/{machine}/graph.svg",
    tag = "machines",
    params(("machine" = String, Path, description = "The machine's name")),
    responses(
        (status = 200, description = "The machine drawn as SVG", content_type = "image/svg+xml", body = String),
        (status = 404, description = "No machine of that name", body = ErrorBody),
    )
)]
async fn graph(State(state): State<Arc<ServerState>>, Path(machine): Path<String>) -> Response {
    match state.config.machine(&machine) {
        Some(m) => (
            [(header::CONTENT_TYPE, "image/svg+xml")],
            crate::graph::to_svg(m),
        )
            .into_response(),
        None => error(
            StatusCode::NOT_FOUND,
            format!("no machine named `{machine}`"),
        ),
    }
}

/// What a start's body is, for its error messages.
const START_SHAPE: &str =
    "a JSON object {\"context\": {...}, \"name\": \"...\", \"version\": N}, each optional";

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

/// Start an instance of a machine (idempotent by name).
///
/// The context's values are checked and converted against the machine's `context_types`; a
/// name already used by an instance of this machine changes nothing (200, `created: false`).
#[utoipa::path(
    post,
    path = "/api/machines/{machine}/instances",
    tag = "machines",
    params(("machine" = String, Path, description = "The machine's name")),
    request_body = Option<StartBody>,
    responses(
        (status = 201, description = "Started: `{\"instance\": NAME, \"created\": true}`", body = serde_json::Value),
        (status = 200, description = "An instance of that name existed: nothing changed (`created: false`, its `status`)", body = serde_json::Value),
        (status = 400, description = "A bad name, parameter or body, or a version that is not stored (the message says which)", body = ErrorBody),
        (status = 404, description = "No machine of that name", body = ErrorBody),
        (status = 409, description = "The name is taken by an instance of another machine", body = ErrorBody),
        (status = 500, description = "The version asked for is stored, but this phasm cannot read it", body = ErrorBody),
        (status = 413, description = "The body is too large", body = ErrorBody),
        (status = 415, description = "The body is not `application/json`", body = ErrorBody),
        (status = 503, description = "The database cannot be reached or failed", body = ErrorBody),
    )
)]
async fn start(
    State(state): State<Arc<ServerState>>,
    Path(machine): Path<String>,
    body: Bytes,
) -> Response {
    let body: StartBody = if body.iter().all(u8::is_ascii_whitespace) {
        StartBody::default()
    } else {
        match json_body(&body, START_SHAPE) {
            Ok(body) => body,
            Err(message) => return error(StatusCode::BAD_REQUEST, message),
        }
    };
    let name = body.name;
    let request = crate::control::StartRequest {
        machine: &machine,
        version: body.version.map(std::num::NonZeroU32::get),
        context: body.context.unwrap_or_default(),
        name: name.as_deref(),
    };
    let outcome = crate::control::start_on(
        &*state.store,
        &state.config,
        &*state.clock,
        request,
        &state.limits,
    )
    .await;
    match outcome {
        Ok(StartOutcome::Started(name)) => (
            StatusCode::CREATED,
            Json(json!({ "instance": name, "created": true })),
        )
            .into_response(),
        Ok(StartOutcome::AlreadyExists { name, status, .. }) => {
            Json(json!({ "instance": name, "created": false, "status": status })).into_response()
        }
        Err(e) => error(start_error_status(&e), e.to_string()),
    }
}

/// The status of a start refused for `e`.
fn start_error_status(e: &StartError) -> StatusCode {
    match e {
        StartError::UnknownMachine { .. } => StatusCode::NOT_FOUND,
        StartError::InvalidName(_)
        | StartError::InvalidKey(_)
        | StartError::ReservedName { .. }
        | StartError::ContextTooLarge { .. }
        | StartError::BadValue(_)
        | StartError::UnknownVersion { .. } => StatusCode::BAD_REQUEST,
        StartError::NameTaken { .. } => StatusCode::CONFLICT,
        StartError::Unreadable(_) => StatusCode::INTERNAL_SERVER_ERROR,
        StartError::Store(_) => StatusCode::SERVICE_UNAVAILABLE,
    }
}

/// Start one instance per context, all in one transaction: all or none.
///
/// At most 10,000 contexts (`MAX_BATCH_START`); a bad one is named (`contexts[i]`) and nothing starts.
#[utoipa::path(
    post,
    path = "/api/machines/{machine}/instances/batch",
    tag = "machines",
    params(("machine" = String, Path, description = "The machine's name")),
    request_body = BatchBody,
    responses(
        (status = 201, description = "Every context started (or existed): `{\"instances\": [NAME, ...], \"created\": N}`", body = serde_json::Value),
        (status = 400, description = "A bad body, or `contexts[i]` is bad (the message names it); nothing was started", body = ErrorBody),
        (status = 404, description = "No machine of that name", body = ErrorBody),
        (status = 413, description = "Over 10,000 contexts, or the body is too large", body = ErrorBody),
        (status = 415, description = "The body is not `application/json`", body = ErrorBody),
        (status = 503, description = "The database cannot be reached or failed", body = ErrorBody),
    )
)]
async fn start_batch(
    State(state): State<Arc<ServerState>>,
    Path(machine): Path<String>,
    body: Bytes,
) -> Response {
    let request = match batch::read(&body, state.limits.max_context_bytes) {
        Ok(r) => r,
        Err(batch::BodyError::TooMany) => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("more than {MAX_BATCH_START} contexts in one request; send at most {MAX_BATCH_START} per request"),
            )
        }
        Err(batch::BodyError::Bad(message)) => return error(StatusCode::BAD_REQUEST, message),
    };
    let batch = crate::control::Batch {
        machine: &machine,
        items: request.items,
        key: request.key.as_deref(),
        version: request.version,
    };
    let outcome = start_instances(
        &*state.store,
        &state.config,
        &*state.clock,
        batch,
        &state.limits,
    )
    .await;
    match outcome {
        Ok(outcomes) => {
            let created = outcomes
                .iter()
                .filter(|o| matches!(o, StartOutcome::Started(_)))
                .count();
            let names: Vec<&str> = outcomes.iter().map(StartOutcome::name).collect();
            (
                StatusCode::CREATED,
                Json(json!({ "instances": names, "created": created })),
            )
                .into_response()
        }
        Err(BatchStartError::Context { index, error: e }) => error(
            StatusCode::BAD_REQUEST,
            format!("contexts[{index}]: {e}; nothing was started"),
        ),
        Err(BatchStartError::Start(e)) => error(start_error_status(&e), e.to_string()),
        Err(e @ BatchStartError::Partial { .. }) => {
            error(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
        }
    }
}

/// Query of a history or log page.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct PageQuery {
    /// The `next_cursor` of the previous page (none: the first page).
    cursor: Option<String>,
    /// At most this many rows (default 100, at most 1000).
    limit: Option<usize>,
    /// History pages only: the steps of this branch (`""`: the main line).
    branch: Option<String>,
}

/// The page a query asks for (at most 1000 rows, 100 by default), or why the cursor is bad.
fn page_request(query: &PageQuery) -> Result<crate::store::PageRequest, String> {
    let after = match query.cursor.as_deref() {
        None | Some("") => 0,
        Some(c) => match c.parse::<i64>() {
            Ok(n) if n >= 0 => n,
            _ => {
                return Err(format!(
                    "unknown cursor `{c}`: use the `next_cursor` of the previous page"
                ))
            }
        },
    };
    Ok(crate::store::PageRequest {
        after,
        limit: query.limit.unwrap_or(100).clamp(1, 1000),
    })
}

/// A page of an instance's steps, oldest first (of one branch with `branch`).
#[utoipa::path(
    get,
    path = "/api/instances/{name}/history",
    tag = "instances",
    params(("name" = String, Path, description = "The instance's name"), PageQuery),
    responses(
        (status = 200, description = "`{\"history\": [steps, oldest first], \"next_cursor\": C}`; each step has an `id` for its full view", body = serde_json::Value),
        (status = 400, description = "A bad name, parameter or body (the message says which)", body = ErrorBody),
        (status = 404, description = "No instance of that name", body = ErrorBody),
        (status = 503, description = "The database cannot be reached or failed", body = ErrorBody),
    )
)]
async fn history_page(
    State(state): State<Arc<ServerState>>,
    Path(name): Path<String>,
    Query(query): Query<PageQuery>,
) -> Response {
    let page = match check_page(&name, &query) {
        Ok(p) => p,
        Err(bad) => return *bad,
    };
    page_response(
        &name,
        "history",
        state
            .store
            .history_page(&name, page, query.branch.as_deref())
            .await,
        crate::control::history_json,
    )
}

/// A page of an instance's log lines, oldest first.
///
/// Each message is cut at 16 Ki characters, with a note saying so.
#[utoipa::path(
    get,
    path = "/api/instances/{name}/logs",
    tag = "instances",
    params(("name" = String, Path, description = "The instance's name"), PageQuery),
    responses(
        (status = 200, description = "`{\"logs\": [lines, oldest first], \"next_cursor\": C}`", body = serde_json::Value),
        (status = 400, description = "A bad name, parameter or body (the message says which)", body = ErrorBody),
        (status = 404, description = "No instance of that name", body = ErrorBody),
        (status = 503, description = "The database cannot be reached or failed", body = ErrorBody),
    )
)]
async fn logs_page(
    State(state): State<Arc<ServerState>>,
    Path(name): Path<String>,
    Query(query): Query<PageQuery>,
) -> Response {
    let page = match check_page(&name, &query) {
        Ok(p) => p,
        Err(bad) => return *bad,
    };
    page_response(
        &name,
        "logs",
        state.store.logs_page(&name, page).await,
        |l| {
            json!({
                "at": crate::clock::rfc3339(l.at),
                "level": l.level,
                "message": l.message,
                "task": l.task,
            })
        },
    )
}

/// The instance name and the page a paging request names, or its 400.
fn check_page(name: &str, query: &PageQuery) -> Result<crate::store::PageRequest, Box<Response>> {
    if let Some(bad) = check_name(name) {
        return Err(Box::new(bad));
    }
    page_request(query).map_err(|why| Box::new(error(StatusCode::BAD_REQUEST, why)))
}

/// `{KEY: [rows], "next_cursor": C}`, a 404 for an unknown instance, a 503 for a store error.
fn page_response<T>(
    name: &str,
    key: &str,
    result: crate::store::StoreResult<Option<crate::store::Page<T>>>,
    row: impl Fn(&T) -> Value,
) -> Response {
    match result {
        Ok(Some(page)) => {
            let rows: Vec<Value> = page.items.iter().map(row).collect();
            Json(json!({ key: rows, "next_cursor": page.next.map(|n| n.to_string()) }))
                .into_response()
        }
        Ok(None) => error(StatusCode::NOT_FOUND, format!("no instance named `{name}`")),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

/// Instances, filtered and paged: newest first, or most recently ended first.
#[utoipa::path(
    get,
    path = "/api/instances",
    tag = "instances",
    params(crate::control::ListParams),
    responses(
        (status = 200, description = "A page of instances, newest first (or most recently ended first), and `next_cursor`", body = serde_json::Value),
        (status = 400, description = "A bad filter, order, limit or cursor (the message says which)", body = ErrorBody),
        (status = 503, description = "The database cannot be reached or failed", body = ErrorBody),
    )
)]
async fn list(
    State(state): State<Arc<ServerState>>,
    Query(query): Query<crate::control::ListParams>,
) -> Response {
    let filter = match query.to_filter(&state.config, state.clock.now()) {
        Ok(f) => f,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    let limit = filter.limit;
    let cursor = filter.before.clone();
    match state.store.list(&filter).await {
        Ok(rows) => {
            // An empty page after a cursor: is it the end, or a cursor that names nothing?
            if let (true, Some(c)) = (rows.is_empty(), cursor.as_deref()) {
                if matches!(state.store.instance(c).await, Ok(None)) {
                    return error(
                        StatusCode::BAD_REQUEST,
                        format!("unknown cursor `{c}`: use the `next_cursor` of the previous page"),
                    );
                }
            }
            let rows: Vec<Value> = rows
                .iter()
                .map(|r| crate::control::summary_json_in(Some(&state.config), r))
                .collect();
            // A full page may have a next one: it starts after this page's last instance.
            let next = (rows.len() == limit)
                .then(|| {
                    rows.last()
                        .and_then(|r| r["instance"].as_str().map(str::to_string))
                })
                .flatten();
            Json(json!({ "instances": rows, "next_cursor": next })).into_response()
        }
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

fn check_name(name: &str) -> Option<Response> {
    (!is_valid_instance_name(name)).then(|| {
        error(
            StatusCode::BAD_REQUEST,
            format!("invalid instance name `{name}`"),
        )
    })
}

/// The workers alive now (what they take, when they last said so), and those gone.
#[utoipa::path(
    get,
    path = "/api/workers",
    tag = "operations",
    responses(
        (status = 200, description = "`{\"workers\": [alive], \"gone\": [stopped answering in the last day]}`", body = serde_json::Value),
        (status = 503, description = "The database cannot be reached or failed", body = ErrorBody),
    )
)]
async fn workers(State(state): State<Arc<ServerState>>) -> Response {
    let now = state.clock.now();
    match (
        state.store.workers(now).await,
        state.store.workers_gone(now).await,
    ) {
        (Ok(workers), Ok(gone)) => {
            let json = |list: &[crate::store::WorkerView]| -> Vec<serde_json::Value> {
                list.iter().map(crate::control::worker_json).collect()
            };
            Json(json!({ "workers": json(&workers), "gone": json(&gone) })).into_response()
        }
        (Err(e), _) | (_, Err(e)) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

/// Pending work per queue (due, scheduled, running, oldest due) with its limits.
#[utoipa::path(
    get,
    path = "/api/queues",
    tag = "operations",
    responses(
        (status = 200, description = "`{\"queues\": [...], \"parked\": N}`: due, scheduled, running, oldest due, steps per second over the last minute, and limits per queue", body = serde_json::Value),
        (status = 503, description = "The database cannot be reached or failed", body = ErrorBody),
    )
)]
async fn queues(State(state): State<Arc<ServerState>>) -> Response {
    let now = state.clock.now();
    match crate::control::queue_report(&*state.store, Some(&state.config), now).await {
        Ok((queues, stats)) => {
            Json(json!({ "queues": queues, "parked": stats.parked })).into_response()
        }
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

/// The schedules: each one's next tick and the last it fired.
#[utoipa::path(
    get,
    path = "/api/schedules",
    tag = "operations",
    responses(
        (status = 200, description = "`{\"schedules\": [...]}`: each with its next and last tick", body = serde_json::Value),
        (status = 503, description = "The database cannot be reached or failed", body = ErrorBody),
    )
)]
async fn schedules(State(state): State<Arc<ServerState>>) -> Response {
    let now = state.clock.now();
    match crate::control::schedule_statuses(&*state.store, &state.config, now).await {
        Ok(all) => {
            let all: Vec<serde_json::Value> =
                all.iter().map(crate::control::schedule_json).collect();
            Json(json!({ "schedules": all })).into_response()
        }
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

/// One instance: status, contexts, branches, latest steps, pending steps, waits, children.
#[utoipa::path(
    get,
    path = "/api/instances/{name}",
    tag = "instances",
    params(("name" = String, Path, description = "The instance's name")),
    responses(
        (status = 200, description = "The instance: status, contexts, branches, latest history, pending steps, waits, children", body = serde_json::Value),
        (status = 400, description = "A bad name, parameter or body (the message says which)", body = ErrorBody),
        (status = 404, description = "No instance of that name", body = ErrorBody),
        (status = 503, description = "The database cannot be reached or failed", body = ErrorBody),
    )
)]
async fn instance(State(state): State<Arc<ServerState>>, Path(name): Path<String>) -> Response {
    if let Some(bad) = check_name(&name) {
        return bad;
    }
    match state.store.instance(&name).await {
        Ok(Some(view)) => {
            // Without the list of workers, no step is said to be unserved.
            let workers = state
                .store
                .workers(state.clock.now())
                .await
                .unwrap_or_default();
            Json(instance_json(&view, &workers)).into_response()
        }
        Ok(None) => error(StatusCode::NOT_FOUND, format!("no instance named `{name}`")),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

async fn control(
    name: &str,
    result: Result<Control, crate::store::StoreError>,
    done: &str,
) -> Response {
    match result {
        Ok(Control::Done) => Json(json!({ "instance": name, "status": done })).into_response(),
        Ok(Control::NotFound) => {
            error(StatusCode::NOT_FOUND, format!("no instance named `{name}`"))
        }
        Ok(Control::NotAllowed(status)) => {
            error(StatusCode::CONFLICT, format!("`{name}` is {status}"))
        }
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

/// The optional body of `POST /api/instances/{name}/cancel`.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct CancelBody {
    reason: Option<String>,
}

/// Cancel a running or failed instance, with an optional reason (`{"reason": "..."}`).
#[utoipa::path(
    post,
    path = "/api/instances/{name}/cancel",
    tag = "instances",
    params(("name" = String, Path, description = "The instance's name")),
    request_body = Option<CancelBody>,
    responses(
        (status = 200, description = "Cancelled: `{\"instance\": NAME, \"status\": \"cancelled\"}`", body = serde_json::Value),
        (status = 400, description = "A bad name, parameter or body (the message says which)", body = ErrorBody),
        (status = 404, description = "No instance of that name", body = ErrorBody),
        (status = 409, description = "The instance has ended", body = ErrorBody),
        (status = 415, description = "The body is not `application/json`", body = ErrorBody),
        (status = 503, description = "The database cannot be reached or failed", body = ErrorBody),
    )
)]
async fn cancel(
    State(state): State<Arc<ServerState>>,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    if let Some(bad) = check_name(&name) {
        return bad;
    }
    let body: CancelBody = if body.iter().all(u8::is_ascii_whitespace) {
        CancelBody::default()
    } else {
        match serde_json::from_slice(&body) {
            Ok(b) => b,
            Err(e) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("the body must be `{{\"reason\": \"...\"}}` or empty: {e}"),
                )
            }
        }
    };
    let reason = match crate::control::cancel_reason(body.reason.as_deref()) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    control(
        &name,
        state
            .store
            .cancel_because(state.clock.now(), &name, reason.as_deref())
            .await,
        "cancelled",
    )
    .await
}

/// Resume a failed instance: its failed and held steps run again from attempt 0.
#[utoipa::path(
    post,
    path = "/api/instances/{name}/retry",
    tag = "instances",
    params(("name" = String, Path, description = "The instance's name")),
    responses(
        (status = 200, description = "Running again from its failed step: `{\"instance\": NAME, \"status\": \"running\"}`", body = serde_json::Value),
        (status = 400, description = "A bad name, parameter or body (the message says which)", body = ErrorBody),
        (status = 404, description = "No instance of that name", body = ErrorBody),
        (status = 409, description = "The instance has not failed", body = ErrorBody),
        (status = 503, description = "The database cannot be reached or failed", body = ErrorBody),
    )
)]
async fn retry(State(state): State<Arc<ServerState>>, Path(name): Path<String>) -> Response {
    if let Some(bad) = check_name(&name) {
        return bad;
    }
    control(
        &name,
        state.store.retry(state.clock.now(), &name).await,
        "running",
    )
    .await
}
