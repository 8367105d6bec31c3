//! Commits of other processes sharing the file: a thread asks a connection of its own for
//! `PRAGMA data_version` (which changes when any other connection commits) every
//! [`WATCH_EVERY`], and wakes this process's idle workers when it changed. A `phasm start` in
//! another process, or a worker there queueing a step, is then noticed within that time
//! rather than at the next poll.

use std::path::Path;
use std::time::Duration;

use rusqlite::Connection;
use tokio::sync::Notify;

use super::schema::open_reader;

/// How often the watcher looks.
pub(super) const WATCH_EVERY: Duration = Duration::from_millis(20);

/// Start watching the file at `path` for as long as `changes` is alive; false when the file
/// cannot be watched (an in-memory database, or no read-only connection).
pub(super) fn spawn_watcher(path: &Path, changes: std::sync::Weak<Notify>) -> bool {
    let Some(conn) = open_reader(path) else {
        return false;
    };
    let version = |conn: &Connection| {
        conn.query_row("PRAGMA data_version", [], |r| r.get::<_, i64>(0))
            .ok()
    };
    let mut last = version(&conn);
    std::thread::Builder::new()
        .name("phasm-sqlite-watch".into())
        .spawn(move || loop {
            std::thread::sleep(WATCH_EVERY);
            // The store is gone: stop.
            let Some(changes) = changes.upgrade() else {
                return;
            };
            let now = version(&conn);
            if now != last {
                last = now;
                changes.notify_waiters();
            }
        })
        .is_ok()
}
