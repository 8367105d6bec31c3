//! Opening the store a command names with `--db` / `PHASM_DB`.

use std::sync::Arc;

use phasm::store::{SqliteOptions, SqliteStore, Store, Synchronous};

use crate::cmd::SyncMode;
use crate::DbArgs;

/// Open the store, or explain why not.
pub fn open(args: &DbArgs) -> Result<Arc<dyn Store>, String> {
    if args.db.starts_with("postgres://") || args.db.starts_with("postgresql://") {
        return Err("PostgreSQL databases are not supported by this version of phasm yet; use a SQLite file path".into());
    }
    let synchronous = match args.sync {
        SyncMode::Full => Synchronous::Full,
        SyncMode::Normal => Synchronous::Normal,
        SyncMode::Off => Synchronous::Off,
    };
    SqliteStore::open(&args.db, &SqliteOptions { synchronous })
        .map(|s| Arc::new(s) as Arc<dyn Store>)
        .map_err(|e| e.to_string())
}
