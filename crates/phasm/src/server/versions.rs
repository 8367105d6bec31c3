//! The deployed versions of a machine: `GET /api/machines/{machine}/versions` and
//! `GET /api/machines/{machine}/versions/{version}` (with its texts).

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use super::openapi::ErrorBody;
use super::{error, ServerState};
use crate::clock::rfc3339;
use crate::store::VersionRecord;

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
        (status = 200, description = "`{\"versions\": [{machine, version, hash, path, deployed_at}]}`, oldest first (empty when the machine was never deployed)", body = serde_json::Value),
        (status = 503, description = "The database cannot be reached or failed", body = ErrorBody),
    )
)]
pub(super) async fn list(
    State(state): State<Arc<ServerState>>,
    Path(machine): Path<String>,
) -> Response {
    match state.store.versions(Some(&machine)).await {
        Ok(versions) => {
            let rows: Vec<_> = versions.iter().map(record_json).collect();
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
