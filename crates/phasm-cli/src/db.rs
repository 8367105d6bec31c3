//! Opening the store a command names with `--db` / `PHASM_DB`: a SQLite file path, or a
//! `postgres://` URL.

use std::process::ExitCode;
use std::sync::Arc;

use phasm::store::{
    Access, PostgresOptions, PostgresStore, SqliteOptions, SqliteStore, Store, Synchronous,
};

use crate::cmd::SyncMode;
use crate::DbArgs;

/// Most connections one process opens to PostgreSQL.
const MAX_POOL: usize = 24;

/// True for a PostgreSQL URL.
pub fn is_postgres(db: &str) -> bool {
    db.starts_with("postgres://") || db.starts_with("postgresql://")
}

/// Open the store for work, creating a SQLite file if there is none, or explain why not.
/// `connections` sizes a PostgreSQL pool (a worker's concurrency plus a few for claims and
/// heartbeats).
pub async fn open(args: &DbArgs, connections: usize) -> Result<Arc<dyn Store>, String> {
    open_as(args, connections, Access::Create).await
}

/// Open the store with the given SQLite access (PostgreSQL is always opened for work: its
/// schema lives in the database the URL names).
pub async fn open_as(
    args: &DbArgs,
    connections: usize,
    access: Access,
) -> Result<Arc<dyn Store>, String> {
    if is_postgres(&args.db) {
        // A PostgreSQL server allows about 100 connections in all (`max_connections`), shared
        // by every worker: steps wait for a pooled connection rather than open more.
        // One-shot commands (`status`, `cancel`, `start`…: `connections` of 2) ride out a
        // restart of the server and wait for no one's work; a worker or server retries its
        // own calls and listens for other processes' work.
        let one_shot = connections <= 2;
        let options = PostgresOptions {
            pool_size: (connections + 4).min(MAX_POOL),
            transient_retries: if one_shot { 5 } else { 0 },
            listen: !one_shot,
            ..PostgresOptions::default()
        };
        return PostgresStore::open(&args.db, &options)
            .await
            .map(|s| Arc::new(s) as Arc<dyn Store>)
            .map_err(|e| format!("{e} (database {})", redact(&args.db)));
    }
    let synchronous = match args.sync {
        SyncMode::Full => Synchronous::Full,
        SyncMode::Normal => Synchronous::Normal,
        SyncMode::Off => Synchronous::Off,
    };
    SqliteStore::open(
        &args.db,
        &SqliteOptions {
            synchronous,
            access,
            ..SqliteOptions::default()
        },
    )
    .map(|s| Arc::new(s) as Arc<dyn Store>)
    .map_err(|e| e.to_string())
}

/// A URL with its password hidden, for messages.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.find('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let creds = &url[scheme + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

/// A temporary database in the current folder, unless one was named.
pub(crate) fn bench_db(
    db: Option<String>,
) -> Result<(Option<tempfile::NamedTempFile>, String), ExitCode> {
    match db {
        Some(path) => Ok((None, path)),
        None => match tempfile::Builder::new()
            .prefix("phasm-bench-")
            .suffix(".db")
            .tempfile_in(".")
        {
            Ok(t) => {
                let path = t.path().display().to_string();
                Ok((Some(t), path))
            }
            Err(e) => Err(crate::exit::failed(format!(
                "cannot create a temporary database here: {e}"
            ))),
        },
    }
}
