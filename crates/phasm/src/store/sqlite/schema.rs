//! The schema and its migrations, and opening a file: what is refused before anything is touched.

use std::path::Path;
use std::time::Duration;

use rusqlite::Connection;

use super::{db, Access, SqliteOptions, Synchronous};
use crate::store::convert::bigint;
use crate::store::{StoreError, StoreResult};

/// The newest schema version this build writes.
pub(super) const SCHEMA_VERSION: i64 = 10;

/// Schema migrations, applied in order; entry `i` takes the schema to version `i + 1`.
pub(super) const MIGRATIONS: &[&str] = &[
    r"
CREATE TABLE instances (
    id          INTEGER PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    machine     TEXT NOT NULL,
    status      TEXT NOT NULL,
    context     TEXT NOT NULL,
    result      TEXT,
    error       TEXT,
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL,
    ended_at    INTEGER
);
CREATE INDEX instances_by_machine ON instances (machine, id);
CREATE INDEX instances_by_status ON instances (status, id);

-- A pending task. While a worker holds it, `due_at` is its lease's expiry, so one index
-- answers both 'what is due' and 'which leases expired'.
-- AUTOINCREMENT: a task id is never reused, so a stale worker's (id, claim) fence can never
-- match a later task that happened to get the same id.
CREATE TABLE tasks (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    instance_id      INTEGER NOT NULL REFERENCES instances (id) ON DELETE CASCADE,
    name             TEXT NOT NULL,
    kind             TEXT NOT NULL,
    from_state       TEXT,
    event            TEXT NOT NULL,
    context          TEXT NOT NULL,
    step             INTEGER NOT NULL,
    branch           TEXT NOT NULL,
    queue            TEXT NOT NULL,
    target           TEXT,
    status           TEXT NOT NULL,
    due_at           INTEGER NOT NULL,
    claim            INTEGER NOT NULL DEFAULT 0,
    lease_owner      TEXT,
    attempts         INTEGER NOT NULL DEFAULT 0,
    first_attempt_at INTEGER,
    last_error       TEXT,
    created_at       INTEGER NOT NULL,
    UNIQUE (instance_id, name)
);
CREATE INDEX tasks_ready ON tasks (due_at) WHERE status = 'ready';

CREATE TABLE history (
    id          INTEGER PRIMARY KEY,
    instance_id INTEGER NOT NULL REFERENCES instances (id) ON DELETE CASCADE,
    from_state  TEXT,
    event       TEXT NOT NULL,
    to_state    TEXT NOT NULL,
    attempt     INTEGER NOT NULL,
    started_at  INTEGER NOT NULL,
    finished_at INTEGER NOT NULL,
    task        TEXT NOT NULL,
    branch      TEXT NOT NULL
);
CREATE INDEX history_by_instance ON history (instance_id, id);

CREATE TABLE logs (
    id          INTEGER PRIMARY KEY,
    instance_id INTEGER NOT NULL REFERENCES instances (id) ON DELETE CASCADE,
    at          INTEGER NOT NULL,
    level       TEXT NOT NULL,
    message     TEXT NOT NULL,
    task        TEXT NOT NULL
);
CREATE INDEX logs_by_instance ON logs (instance_id, id);
",
    r"
-- Parallel patterns: spawned instances know their parent; continuation pages carry a token;
-- join tasks name their fan-in group; branches parked at fan-in states are items.
ALTER TABLE instances ADD COLUMN parent TEXT;
CREATE INDEX instances_by_parent ON instances (parent) WHERE parent IS NOT NULL;
CREATE INDEX instances_ended ON instances (ended_at) WHERE status <> 'running';
ALTER TABLE tasks ADD COLUMN token TEXT;
ALTER TABLE tasks ADD COLUMN grp TEXT;
-- Set when a continuation page queued the next page: a retry of the page must not queue it
-- again (the next page may have finished, and its task row be gone, by then).
ALTER TABLE tasks ADD COLUMN page_queued INTEGER NOT NULL DEFAULT 0;
-- Barrier joins wait (status 'waiting') until no branch of their instance is live.
CREATE INDEX tasks_waiting ON tasks (instance_id) WHERE status = 'waiting';
-- Finding a group's pending join when a branch parks (without it, parking N branches of one
-- instance costs O(N²)).
CREATE INDEX tasks_joins ON tasks (instance_id, from_state, grp) WHERE kind = 'join';
ALTER TABLE history ADD COLUMN ends_branch INTEGER NOT NULL DEFAULT 0;
CREATE TABLE items (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    instance_id INTEGER NOT NULL REFERENCES instances (id) ON DELETE CASCADE,
    state       TEXT NOT NULL,
    grp         TEXT NOT NULL,
    context     TEXT NOT NULL,
    branch      TEXT NOT NULL,
    step        INTEGER NOT NULL,
    join_task   INTEGER,
    created_at  INTEGER NOT NULL
);
CREATE INDEX items_by_group ON items (instance_id, state, grp, id);
CREATE INDEX items_by_join ON items (join_task) WHERE join_task IS NOT NULL;
",
    r"
-- Workers say they are alive (and what they take), so status can tell that no worker will
-- take a step.
CREATE TABLE workers (
    owner      TEXT PRIMARY KEY,
    machines   TEXT NOT NULL,
    targets    TEXT,
    queues     TEXT,
    started_at INTEGER NOT NULL,
    seen_at    INTEGER NOT NULL,
    expires_at INTEGER NOT NULL
);
",
    r"
-- A queue's `rate`, shared by every worker process on the file: a token bucket.
CREATE TABLE queue_rates (
    queue      TEXT PRIMARY KEY,
    tokens     REAL NOT NULL,
    updated_at INTEGER NOT NULL
);
",
    r"
-- Waiting for events from outside. A waiting branch is a task of kind 'wait' (due at its
-- timeout, or never); `accepts` says how each event it accepts is dispatched.
ALTER TABLE tasks ADD COLUMN accepts TEXT;
CREATE INDEX tasks_waits ON tasks (instance_id) WHERE kind = 'wait';
-- Events accepted while no branch waited for them, in order, until a wait takes them.
CREATE TABLE events (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    instance_id INTEGER NOT NULL REFERENCES instances (id) ON DELETE CASCADE,
    event       TEXT NOT NULL,
    data        TEXT NOT NULL,
    event_id    TEXT,
    created_at  INTEGER NOT NULL
);
CREATE INDEX events_by_instance ON events (instance_id, id);
-- The ids of events accepted per instance: the same id sent again changes nothing.
CREATE TABLE deliveries (
    instance_id INTEGER NOT NULL REFERENCES instances (id) ON DELETE CASCADE,
    event_id    TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    PRIMARY KEY (instance_id, event_id)
);
-- Keys made once per database: `wait_token` signs wait tokens.
CREATE TABLE phasm_keys (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
INSERT INTO phasm_keys (name, value) VALUES ('wait_token', lower(hex(randomblob(32))));
",
    r"
-- Schedules: the last tick each fired. A tick fires only when it is later than `last_tick`,
-- which every worker checks and moves in one transaction (the fence).
CREATE TABLE schedules (
    name          TEXT PRIMARY KEY,
    last_tick     INTEGER NOT NULL,
    last_instance TEXT,
    updated_at    INTEGER NOT NULL
);
",
    r"
-- The console's machine page counts running and failed instances of one machine, and what
-- ended lately; both through an index, however many instances ended long ago.
CREATE INDEX instances_by_machine_status ON instances (machine, status);
CREATE INDEX instances_ended_by_machine ON instances (machine, ended_at, status)
    WHERE status <> 'running';
-- An instance's tasks in order (the list shows each instance's oldest pending step).
CREATE INDEX tasks_by_instance ON tasks (instance_id, id);
-- What a worker says of itself besides what it takes (host, pid, version, concurrency,
-- steps in flight), as JSON.
ALTER TABLE workers ADD COLUMN about TEXT;
",
    r"
-- Each step keeps the context it was given and its step number: the console shows a step's
-- context before and after, and a reset runs a chosen step again from exactly that context.
ALTER TABLE history ADD COLUMN context TEXT;
ALTER TABLE history ADD COLUMN step INTEGER;
-- A reset runs an instance again: the history rows up to this id belong to its earlier runs,
-- so its branch counts and end states are of the run since.
ALTER TABLE instances ADD COLUMN reset_after INTEGER NOT NULL DEFAULT 0;
-- The instance list with a created range: newest first through this index, however many
-- instances were created since (one entry per instance started).
CREATE INDEX instances_by_created ON instances (created_at, id);
",
    r"
-- Machines live in the database: every deploy stores each machine whose definition changed
-- as its next version (immutable, numbered from 1 per machine).
CREATE TABLE machine_versions (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    machine     TEXT NOT NULL,
    version     INTEGER NOT NULL,
    hash        TEXT NOT NULL,
    definition  TEXT NOT NULL,
    source      TEXT NOT NULL,
    path        TEXT NOT NULL,
    deployed_at INTEGER NOT NULL,
    UNIQUE (machine, version)
);
-- The version an instance started on (a machine_versions id): the latest of its machine when
-- it started; NULL for one started before its machine was first deployed, which that first
-- deploy adopts as version 1.
ALTER TABLE instances ADD COLUMN version INTEGER;
",
    r"
-- The live instances of each version (running or failed; ended ones are not counted), for
-- the counts `phasm versions` shows.
CREATE INDEX instances_live_by_version ON instances (version, status)
    WHERE status IN ('running', 'failed');
",
];

/// Prepared statements kept per connection. rusqlite keeps 16 by default; the writer's steps
/// and an instance's view use more than that, which made every read of an instance prepare
/// its statements again (parsing was 12 % of a chain benchmark's CPU, its reads included).
const STATEMENT_CACHE: usize = 128;

/// Plans that do not depend on bound values (SQLite's query planner stability guarantee).
/// Without it, SQLite prepares a statement again each time a value is bound to a parameter
/// its planner looked at — every `LIMIT ?` (the claim's among them), and `= ?` moving to or
/// from 0 and 1 — so a cached statement was parsed and planned again on nearly every use.
/// phasm's statements spell out the conditions their partial indexes need, so no plan needs
/// the values.
fn stable_plans(conn: &Connection) -> rusqlite::Result<bool> {
    conn.set_db_config(
        rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG,
        true,
    )
}

/// A second, read-only connection to a database file already opened (and migrated) by the
/// writer; `None` for an in-memory database (another connection would see another database)
/// or when it cannot be opened (the writer then serves reads too).
pub(super) fn open_reader(path: &Path) -> Option<Connection> {
    use rusqlite::OpenFlags;
    if path.as_os_str() == ":memory:" {
        return None;
    }
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .ok()?;
    conn.busy_timeout(Duration::from_secs(10)).ok()?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    stable_plans(&conn).ok()?;
    conn.execute_batch("PRAGMA query_only = ON").ok()?;
    // Read once now: the connection opens the WAL and its index at its first read and keeps
    // them, so reads still work later when the process is out of file descriptors.
    conn.query_row("SELECT COUNT(*) FROM phasm_schema", [], |r| {
        r.get::<_, i64>(0)
    })
    .ok()?;
    Some(conn)
}

/// Create an empty database file readable and writable by its owner alone (`0600`): it
/// holds every context and the wait-token key. SQLite gives the WAL and shared-memory files
/// it makes beside it the same mode.
fn create_private(path: &Path) -> StoreResult<()> {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(_) => Ok(()),
        // Another process made it first: it is opened as it is.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(StoreError::database(format!(
            "cannot create `{}`: {e}",
            path.display()
        ))),
    }
}

pub(super) fn open_connection(path: &Path, options: &SqliteOptions) -> StoreResult<Connection> {
    use rusqlite::OpenFlags;
    let in_memory = path.as_os_str() == ":memory:";
    if options.access != Access::Create && !in_memory && !path.exists() {
        return Err(StoreError::database(format!(
            "no phasm database at `{}` (a mistyped path? `phasm run`, `start`, `worker` and `serve` create one)",
            path.display()
        )));
    }
    if options.access == Access::Create && !in_memory && !path.exists() {
        create_private(path)?;
    }
    let flags = match options.access {
        Access::Create => OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE,
        Access::Existing => OpenFlags::SQLITE_OPEN_READ_WRITE,
        Access::ReadOnly => OpenFlags::SQLITE_OPEN_READ_ONLY,
    } | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags)
        .map_err(|e| StoreError::database(format!("cannot open `{}`: {e}", path.display())))?;
    conn.busy_timeout(Duration::from_secs(10)).map_err(db)?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    stable_plans(&conn).map_err(db)?;
    // Look before touching anything: whose file is this, and which schema does it hold?
    let version = inspect(&conn, path)?;
    if options.access == Access::ReadOnly {
        if version != SCHEMA_VERSION {
            return Err(StoreError::database(format!(
                "`{}` has phasm schema version {version}, this phasm reads version {SCHEMA_VERSION}: run a worker on it once to upgrade it",
                path.display()
            )));
        }
        conn.execute_batch("PRAGMA query_only = ON").map_err(db)?;
        return Ok(conn);
    }
    // Migrate in the file's own journal mode, so a failure leaves it as it was; only then
    // switch to WAL.
    migrate(&conn, path)?;
    let sync = match options.synchronous {
        Synchronous::Full => "FULL",
        Synchronous::Normal => "NORMAL",
        Synchronous::Off => "OFF",
    };
    conn.execute_batch(&format!(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = {sync}; PRAGMA foreign_keys = ON;"
    ))
    .map_err(|e| {
        StoreError::database(format!(
            "`{}` is not a usable SQLite database: {e}",
            path.display()
        ))
    })?;
    Ok(conn)
}

/// The phasm schema version of a file (0: empty, a new database), without changing it.
///
/// # Errors
/// The file is not SQLite, holds another application's tables, or a newer phasm's schema.
pub(super) fn inspect(conn: &Connection, path: &Path) -> StoreResult<i64> {
    let tables: Vec<String> = conn
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name")
        .and_then(|mut st| {
            st.query_map([], |r| r.get::<_, String>(0))?
                .collect::<Result<Vec<_>, _>>()
        })
        .map_err(|e| {
            StoreError::database(format!(
                "`{}` is not a SQLite database ({}); phasm left it untouched",
                path.display(),
                short(&e)
            ))
        })?;
    if tables.is_empty() {
        return Ok(0);
    }
    if !tables.iter().any(|t| t == "phasm_schema") {
        let shown: Vec<&str> = tables.iter().take(8).map(String::as_str).collect();
        return Err(StoreError::database(format!(
            "`{}` is a SQLite database of something else (tables: {}{}); phasm left it untouched — name another file with --db",
            path.display(),
            shown.join(", "),
            if tables.len() > shown.len() { ", …" } else { "" }
        )));
    }
    schema_version(conn)
}

/// The schema version recorded in `phasm_schema`; a newer one than this build's is an error.
pub(super) fn schema_version(conn: &Connection) -> StoreResult<i64> {
    let version: i64 = conn
        .query_row(
            "SELECT COALESCE(MAX(version), 0) FROM phasm_schema",
            [],
            |r| r.get(0),
        )
        .map_err(db)?;
    if version > SCHEMA_VERSION {
        return Err(StoreError::TooNew {
            found: version,
            supported: SCHEMA_VERSION,
        });
    }
    Ok(version)
}

/// SQLite's own words for an error, without the SQL text it failed on.
pub(super) fn short(e: &rusqlite::Error) -> String {
    match e {
        rusqlite::Error::SqliteFailure(code, Some(message)) => format!("{message} ({code})"),
        rusqlite::Error::SqliteFailure(code, None) => code.to_string(),
        rusqlite::Error::SqlInputError { msg, .. } => msg.clone(),
        other => other.to_string(),
    }
}

pub(super) fn migrate(conn: &Connection, path: &Path) -> StoreResult<()> {
    conn.execute_batch("BEGIN IMMEDIATE").map_err(db)?;
    let result = (|| {
        conn.execute_batch("CREATE TABLE IF NOT EXISTS phasm_schema (version INTEGER NOT NULL)")
            .map_err(db)?;
        // Read again inside the write transaction: another process may have migrated.
        let version = schema_version(conn)?;
        for (i, sql) in MIGRATIONS
            .iter()
            .enumerate()
            .skip(usize::try_from(version).unwrap_or(0))
        {
            conn.execute_batch(sql).map_err(|e| {
                StoreError::database(format!(
                    "cannot bring `{}` to phasm schema version {}: {}; phasm left it as it was",
                    path.display(),
                    i + 1,
                    short(&e)
                ))
            })?;
            conn.execute(
                "INSERT INTO phasm_schema (version) VALUES (?1)",
                [bigint(i) + 1],
            )
            .map_err(db)?;
        }
        Ok(())
    })();
    let end = if result.is_ok() { "COMMIT" } else { "ROLLBACK" };
    conn.execute_batch(end).map_err(db)?;
    result
}
