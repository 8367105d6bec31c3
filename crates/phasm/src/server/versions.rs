//! The deployed versions of a machine: `GET /api/machines/{machine}/versions` and
//! `GET /api/machines/{machine}/versions/{version}` (with its texts); moving instances to a
//! later one: `POST /api/instances/{name}/upgrade` and `POST /api/machines/{machine}/upgrade`.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use super::openapi::ErrorBody;
use super::{error, ServerState};
use crate::clock::rfc3339;
use crate::control::{UpgradeError, UpgradeOptions, UpgradeReport, UpgradeWhich};
use crate::store::{Upgraded, VersionRecord};

fn record_json(v: &VersionRecord) -> serde_json::Value {
    json!({
        "machine": v.machine,
        "version": v.version,
        "hash": v.hash,
        "path": v.path,
        "deployed_at": rfc3339(v.deployed_at),
    })
}

/// The deployed versions of a machine, oldest first.
#[utoipa::path(
    get,
    path = "/api/machines/{machine}/versions",
    tag = "machines",
    params(("machine" = String, Path, description = "The machine's name")),
    responses(
        (status = 200, description = "`{\"versions\": [{machine, version, hash, path, deployed_at, running, waiting, failed}]}`, oldest first (empty when the machine was never deployed); the counts are its live instances on each", body = serde_json::Value),
        (status = 503, description = "The database cannot be reached or failed", body = ErrorBody),
    )
)]
pub(super) async fn list(
    State(state): State<Arc<ServerState>>,
    Path(machine): Path<String>,
) -> Response {
    let read = async {
        let versions = state.store.versions(Some(&machine)).await?;
        let counts = state.store.version_counts(Some(&machine)).await?;
        Ok::<_, crate::store::StoreError>((versions, counts))
    };
    match read.await {
        Ok((versions, counts)) => {
            let rows: Vec<_> = versions
                .iter()
                .map(|v| crate::control::version_json(v, &counts))
                .collect();
            Json(json!({ "versions": rows })).into_response()
        }
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

/// One deployed version of a machine, with its definition (the self-contained machine file
/// it runs on) and the source file's text.
#[utoipa::path(
    get,
    path = "/api/machines/{machine}/versions/{version}",
    tag = "machines",
    params(
        ("machine" = String, Path, description = "The machine's name"),
        ("version" = u32, Path, description = "The version's number, from 1"),
    ),
    responses(
        (status = 200, description = "The version: `machine`, `version`, `hash`, `path`, `deployed_at`, `definition` (YAML) and `source` (YAML)", body = serde_json::Value),
        (status = 400, description = "The version is not a number", body = ErrorBody),
        (status = 404, description = "No such version of that machine (the message names those that exist)", body = ErrorBody),
        (status = 503, description = "The database cannot be reached or failed", body = ErrorBody),
    )
)]
pub(super) async fn one(
    State(state): State<Arc<ServerState>>,
    Path((machine, version)): Path<(String, String)>,
) -> Response {
    let Ok(number) = version.trim_start_matches('v').parse::<u32>() else {
        return error(
            StatusCode::BAD_REQUEST,
            format!("`{version}` is not a version number (1, 2, …)"),
        );
    };
    match state.store.version(&machine, number).await {
        Ok(Some(v)) => {
            let mut body = record_json(&v.record);
            body["definition"] = v.definition.into();
            body["source"] = v.source.into();
            Json(body).into_response()
        }
        Ok(None) => {
            let known = match state.store.versions(Some(&machine)).await {
                Ok(all) if !all.is_empty() => format!(
                    "; its versions: {}",
                    all.iter()
                        .map(|v| v.version.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                _ => " (it was never deployed)".to_string(),
            };
            error(
                StatusCode::NOT_FOUND,
                format!("machine `{machine}` has no version {number}{known}"),
            )
        }
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

/// The body of the upgrade endpoints.
#[derive(Debug, Default, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct UpgradeBody {
    /// The version to move to (default: the latest).
    to: Option<u32>,
    /// With `POST /api/machines/{machine}/upgrade`: the version the instances are on.
    from: Option<u32>,
    /// States renamed on the way: `{"approval": "review"}`.
    #[serde(default)]
    map: std::collections::BTreeMap<String, String>,
    /// Say what would move, and move nothing.
    #[serde(default)]
    dry_run: bool,
}

/// The body, or why it is refused (400).
fn read_body(body: &[u8]) -> Result<UpgradeBody, String> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(UpgradeBody::default());
    }
    serde_json::from_slice(body).map_err(|e| {
        format!(
            "the body must be {{\"to\": N, \"map\": {{\"OLD\": \"NEW\"}}, \"dry_run\": false}} (each optional): {e}"
        )
    })
}

fn report_json(r: &UpgradeReport, dry_run: bool) -> serde_json::Value {
    json!({
        "instance": r.instance,
        "from": r.from,
        "to": r.to,
        "moved": r.moved(),
        "dry_run": dry_run,
        "message": r.describe(dry_run),
    })
}

/// Run an upgrade; its reports, or the error's status and message.
async fn run(
    state: &ServerState,
    which: UpgradeWhich,
    body: UpgradeBody,
) -> Result<(Vec<UpgradeReport>, bool), (StatusCode, String)> {
    let options = UpgradeOptions {
        to: body.to,
        map: body.map,
        dry_run: body.dry_run,
    };
    match crate::control::upgrade(&*state.store, &*state.clock, &which, &options).await {
        Ok(reports) => Ok((reports, options.dry_run)),
        Err(e @ UpgradeError::Store(_)) => Err((StatusCode::SERVICE_UNAVAILABLE, e.to_string())),
        Err(e @ UpgradeError::Invalid(_)) => Err((StatusCode::BAD_REQUEST, e.to_string())),
        Err(e @ UpgradeError::Unreadable(_)) => {
            Err((StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
        }
    }
}

/// Move an instance to a later version of its machine, if every state its branches are in,
/// and every pending step's transition, exists in the target (directly or renamed by
/// `map`), and no step of it is running. Logged in the instance's log.
#[utoipa::path(
    post,
    path = "/api/instances/{name}/upgrade",
    tag = "instances",
    params(("name" = String, Path, description = "The instance's name")),
    request_body = Option<UpgradeBody>,
    responses(
        (status = 200, description = "Moved (or would move, with `dry_run`): `{instance, from, to, moved: true, message}`", body = serde_json::Value),
        (status = 400, description = "A bad body, or a version that is not stored", body = ErrorBody),
        (status = 404, description = "No instance of that name", body = ErrorBody),
        (status = 409, description = "Not moved: the message says why (the state missing from the target and the map that fixes it, a running step, an older target)", body = ErrorBody),
        (status = 503, description = "The database cannot be reached or failed", body = ErrorBody),
    )
)]
pub(super) async fn upgrade_one(
    State(state): State<Arc<ServerState>>,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    let body = match read_body(&body) {
        Ok(b) => b,
        Err(message) => return error(StatusCode::BAD_REQUEST, message),
    };
    if body.from.is_some() {
        return error(
            StatusCode::BAD_REQUEST,
            "`from` is for moving a machine's instances (POST /api/machines/{machine}/upgrade)",
        );
    }
    let (reports, dry_run) = match run(&state, UpgradeWhich::Instances(vec![name]), body).await {
        Ok(done) => done,
        Err((status, message)) => return error(status, message),
    };
    let Some(r) = reports.first() else {
        return error(StatusCode::NOT_FOUND, "no instance to move");
    };
    match &r.outcome {
        Ok(Upgraded::Moved { .. }) => Json(report_json(r, dry_run)).into_response(),
        Ok(Upgraded::NotFound) => error(StatusCode::NOT_FOUND, r.describe(dry_run)),
        _ => error(StatusCode::CONFLICT, r.describe(dry_run)),
    }
}

/// Move every running or failed instance of a machine on version `from` to a later version,
/// each as `POST /api/instances/{name}/upgrade` would (each in its own transaction).
#[utoipa::path(
    post,
    path = "/api/machines/{machine}/upgrade",
    tag = "machines",
    params(("machine" = String, Path, description = "The machine's name")),
    request_body = UpgradeBody,
    responses(
        (status = 200, description = "`{\"moved\": N, \"not_moved\": N, \"instances\": [{instance, from, to, moved, message}]}`", body = serde_json::Value),
        (status = 400, description = "A bad body (`from` is required), or a version that is not stored", body = ErrorBody),
        (status = 503, description = "The database cannot be reached or failed", body = ErrorBody),
    )
)]
pub(super) async fn upgrade_machine(
    State(state): State<Arc<ServerState>>,
    Path(machine): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    let body = match read_body(&body) {
        Ok(b) => b,
        Err(message) => return error(StatusCode::BAD_REQUEST, message),
    };
    let Some(from) = body.from else {
        return error(
            StatusCode::BAD_REQUEST,
            "give `from`: the version whose instances move",
        );
    };
    let (reports, dry_run) = match run(&state, UpgradeWhich::Machine { machine, from }, body).await
    {
        Ok(done) => done,
        Err((status, message)) => return error(status, message),
    };
    let moved = reports.iter().filter(|r| r.moved()).count();
    let list: Vec<_> = reports.iter().map(|r| report_json(r, dry_run)).collect();
    Json(json!({
        "moved": moved,
        "not_moved": reports.len() - moved,
        "dry_run": dry_run,
        "instances": list,
    }))
    .into_response()
}
