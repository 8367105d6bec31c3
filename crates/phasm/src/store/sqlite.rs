//! The embedded store: one SQLite file in WAL mode, driven by a thread this store owns.
//!
//! Every request travels over a channel to the writer thread, which drains whatever has
//! queued up and runs it all in one transaction (group commit): with `synchronous=FULL` each
//! transaction costs one fsync, so many concurrent steps share one. Replies are sent only
//! after the transaction is durable. Each request runs inside its own savepoint, so one
//! failing request never undoes another's work.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use rusqlite::{params, Connection, OptionalExtension, Transaction};
use tokio::sync::{oneshot, Notify};

use super::{
    cut_message, Applied, AppliedCommit, BranchCounts, ClaimRequest, Control, InstanceStatus,
    InstanceSummary, InstanceView, ListFilter, NewInstance, Page, PageRequest, Started, Store,
    StoreError, StoreResult, SuccessorClaim, TaskStatus, TaskView, WorkerView,
    MAX_PAGE_MESSAGE_CHARS, VIEW_ROWS,
};
use super::{worker_view, WORKERS_KEPT};
use crate::clock::{micros, Micros};
use crate::engine::{
    Commit, Context, Disposition, HistoryEntry, InstanceChange, LogLine, NewTask, Parked, Task,
    TaskKind,
};

/// How hard SQLite works to make each commit durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Synchronous {
    /// fsync at every commit: nothing committed is lost, even on power loss (the default).
    #[default]
    Full,
    /// fsync at checkpoints only: survives a crash of phasm, but a power loss can lose the
    /// last commits.
    Normal,
    /// Never fsync: for benchmarks and throwaway runs; a power loss can corrupt nothing
    /// committed long ago but loses recent commits.
    Off,
}

/// How to open a SQLite store.
#[derive(Debug, Clone, Default)]
pub struct SqliteOptions {
    /// Durability of commits.
    pub synchronous: Synchronous,
    /// Whether the file may be created, and whether it is written.
    pub access: Access,
}

/// What opening a SQLite file may do to it. In every mode a file that holds another
/// application's tables, or a newer phasm's schema, is refused and left exactly as it was.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Access {
    /// Create the file if it is missing, and bring its schema up to date (commands that
    /// start work: `run`, `start`, `worker`, `serve`).
    #[default]
    Create,
    /// The file must exist; its schema is brought up to date (`retry`, `cancel`, `scrub`).
    Existing,
    /// The file must exist and is only read, so it may belong to someone else
    /// (`status`, `list`, `logs`); its schema must be this phasm's.
    ReadOnly,
}

/// The SQLite store. Cheap to clone; the writer thread stops when the last clone is dropped.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    requests: mpsc::Sender<Request>,
    /// Reads go to a connection of their own, so they never wait behind a batch of commits
    /// (the same queue as `requests` for an in-memory database).
    reads: mpsc::Sender<Request>,
    changes: Arc<Notify>,
    path: PathBuf,
}

type Reply<T> = oneshot::Sender<StoreResult<T>>;

enum Request {
    Start(Micros, Box<NewInstance>, Reply<Started>),
    Claim(Micros, ClaimRequest, Reply<Vec<Task>>),
    Renew(Micros, Vec<(i64, i64)>, Micros, Reply<Vec<bool>>),
    Apply(
        Micros,
        Vec<Commit>,
        Option<SuccessorClaim>,
        Reply<Vec<AppliedCommit>>,
    ),
    NextDue(Reply<Option<Micros>>),
    Instance(String, Reply<Option<InstanceView>>),
    List(ListFilter, Reply<Vec<InstanceSummary>>),
    Logs(String, Reply<Vec<LogLine>>),
    HistoryPage(String, PageRequest, Reply<Option<Page<HistoryEntry>>>),
    LogsPage(String, PageRequest, Reply<Option<Page<LogLine>>>),
    Retry(Micros, String, Reply<Control>),
    Cancel(Micros, String, Reply<Control>),
    Probe(usize, Reply<f64>),
    Scrub(Micros, usize, Reply<u64>),
    Stats(Micros, Reply<super::StoreStats>),
    WorkerAlive(Micros, Box<WorkerView>, Reply<()>),
    WorkerStopped(String, Reply<()>),
    Workers(Micros, Reply<Vec<WorkerView>>),
}

/// The newest schema version this build writes.
const SCHEMA_VERSION: i64 = 4;

/// Schema migrations, applied in order; entry `i` takes the schema to version `i + 1`.
const MIGRATIONS: &[&str] = &[
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
];

impl SqliteStore {
    /// Open (creating if needed) the database at `path`, migrate its schema, and start the
    /// writer thread.
    ///
    /// # Errors
    /// When the file cannot be opened, is not a phasm database, or is from a newer phasm.
    pub fn open(path: impl AsRef<Path>, options: &SqliteOptions) -> StoreResult<Self> {
        let path = path.as_ref().to_path_buf();
        let conn = open_connection(&path, options)?;
        let requests = spawn_batcher("phasm-sqlite", conn)?;
        let reads = match open_reader(&path) {
            Some(conn) => spawn_batcher("phasm-sqlite-read", conn)?,
            None => requests.clone(),
        };
        Ok(Self {
            requests,
            reads,
            changes: Arc::new(Notify::new()),
            path,
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Request) -> StoreResult<T> {
        let (tx, rx) = oneshot::channel();
        self.requests
            .send(make(tx))
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// A request that only reads, on the reading connection. It sees every commit whose
    /// caller has had its answer (WAL: each read transaction starts from the latest commit).
    async fn read<T>(&self, make: impl FnOnce(Reply<T>) -> Request) -> StoreResult<T> {
        let (tx, rx) = oneshot::channel();
        self.reads.send(make(tx)).map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }
}

fn db(e: rusqlite::Error) -> StoreError {
    use rusqlite::ErrorCode;
    let transient = matches!(
        e.sqlite_error_code(),
        Some(
            ErrorCode::DatabaseBusy
                | ErrorCode::DatabaseLocked
                | ErrorCode::DiskFull
                | ErrorCode::SystemIoFailure
                | ErrorCode::OutOfMemory
        )
    );
    StoreError::driver(e.to_string(), transient, e)
}

/// Start a thread that runs the requests sent to it on `conn`, in batches.
fn spawn_batcher(name: &str, conn: Connection) -> StoreResult<mpsc::Sender<Request>> {
    let (requests, receiver) = mpsc::channel();
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || Batcher { conn }.run(receiver))
        .map_err(|e| StoreError::database(format!("cannot start the SQLite thread: {e}")))?;
    Ok(requests)
}

/// A second, read-only connection to a database file already opened (and migrated) by the
/// writer; `None` for an in-memory database (another connection would see another database)
/// or when it cannot be opened (the writer then serves reads too).
fn open_reader(path: &Path) -> Option<Connection> {
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
    conn.execute_batch("PRAGMA query_only = ON").ok()?;
    Some(conn)
}

fn open_connection(path: &Path, options: &SqliteOptions) -> StoreResult<Connection> {
    use rusqlite::OpenFlags;
    let in_memory = path.as_os_str() == ":memory:";
    if options.access != Access::Create && !in_memory && !path.exists() {
        return Err(StoreError::database(format!(
            "no phasm database at `{}` (a mistyped path? `phasm run`, `start`, `worker` and `serve` create one)",
            path.display()
        )));
    }
    let flags = match options.access {
        Access::Create => OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE,
        Access::Existing => OpenFlags::SQLITE_OPEN_READ_WRITE,
        Access::ReadOnly => OpenFlags::SQLITE_OPEN_READ_ONLY,
    } | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags)
        .map_err(|e| StoreError::database(format!("cannot open `{}`: {e}", path.display())))?;
    conn.busy_timeout(Duration::from_secs(10)).map_err(db)?;
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
fn inspect(conn: &Connection, path: &Path) -> StoreResult<i64> {
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
fn schema_version(conn: &Connection) -> StoreResult<i64> {
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
fn short(e: &rusqlite::Error) -> String {
    match e {
        rusqlite::Error::SqliteFailure(code, Some(message)) => format!("{message} ({code})"),
        rusqlite::Error::SqliteFailure(code, None) => code.to_string(),
        rusqlite::Error::SqlInputError { msg, .. } => msg.clone(),
        other => other.to_string(),
    }
}

fn migrate(conn: &Connection, path: &Path) -> StoreResult<()> {
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
                [i as i64 + 1],
            )
            .map_err(db)?;
        }
        Ok(())
    })();
    let end = if result.is_ok() { "COMMIT" } else { "ROLLBACK" };
    conn.execute_batch(end).map_err(db)?;
    result
}

/// Sends a request's result once the batch it ran in has committed.
type Pending = Box<dyn FnOnce(Option<&StoreError>) + Send>;

fn pending<T: Send + 'static>(reply: Reply<T>, result: StoreResult<T>) -> Pending {
    Box::new(move |batch_error| {
        let result = match (batch_error, result) {
            (Some(e), _) => Err(e.during("commit failed")),
            (None, r) => r,
        };
        let _ = reply.send(result);
    })
}

/// Runs requests on one connection (the writer's, or the reader's), all that queued up
/// while the last batch ran in one transaction.
struct Batcher {
    conn: Connection,
}

/// Most requests run in one transaction.
const MAX_BATCH: usize = 512;

impl Batcher {
    fn run(mut self, receiver: mpsc::Receiver<Request>) {
        while let Ok(first) = receiver.recv() {
            // Whatever queued up while the last transaction ran goes into the next one.
            // (Lingering for more was measured: it costs more than it gains on 2 cores.)
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match receiver.try_recv() {
                    Ok(next) => batch.push(next),
                    Err(_) => break,
                }
            }
            let mut probes = Vec::new();
            let mut work = Vec::with_capacity(batch.len());
            for r in batch {
                match r {
                    Request::Probe(n, reply) => probes.push((n, reply)),
                    other => work.push(other),
                }
            }
            if !work.is_empty() {
                self.run_batch(work);
            }
            for (n, reply) in probes {
                let _ = reply.send(self.probe(n));
            }
        }
    }

    fn run_batch(&mut self, batch: Vec<Request>) {
        let tx = match self.conn.transaction() {
            Ok(tx) => tx,
            Err(e) => {
                let e = db(e);
                for r in batch {
                    fail_request(r, &e);
                }
                return;
            }
        };
        let mut replies: Vec<Pending> = Vec::with_capacity(batch.len());
        for request in batch {
            replies.push(handle(&tx, request));
        }
        match tx.commit().map_err(db) {
            Ok(()) => replies.into_iter().for_each(|r| r(None)),
            Err(e) => replies.into_iter().for_each(|r| r(Some(&e))),
        }
    }

    fn probe(&mut self, n: usize) -> StoreResult<f64> {
        self.conn
            .execute_batch(
                "CREATE TABLE IF NOT EXISTS phasm_probe (id INTEGER PRIMARY KEY, at INTEGER)",
            )
            .map_err(db)?;
        let started = Instant::now();
        for i in 0..n {
            let tx = self.conn.transaction().map_err(db)?;
            tx.execute("INSERT INTO phasm_probe (at) VALUES (?1)", [i as i64])
                .map_err(db)?;
            tx.commit().map_err(db)?;
        }
        let secs = started.elapsed().as_secs_f64();
        self.conn
            .execute_batch("DROP TABLE phasm_probe")
            .map_err(db)?;
        Ok(n as f64 / secs.max(1e-9))
    }
}

fn fail_request(request: Request, e: &StoreError) {
    let err = || e.clone();
    match request {
        Request::Start(_, _, r) => drop(r.send(Err(err()))),
        Request::Claim(_, _, r) => drop(r.send(Err(err()))),
        Request::Renew(_, _, _, r) => drop(r.send(Err(err()))),
        Request::Apply(_, _, _, r) => drop(r.send(Err(err()))),
        Request::NextDue(r) => drop(r.send(Err(err()))),
        Request::Instance(_, r) => drop(r.send(Err(err()))),
        Request::List(_, r) => drop(r.send(Err(err()))),
        Request::Logs(_, r) => drop(r.send(Err(err()))),
        Request::HistoryPage(_, _, r) => drop(r.send(Err(err()))),
        Request::LogsPage(_, _, r) => drop(r.send(Err(err()))),
        Request::Retry(_, _, r) | Request::Cancel(_, _, r) => drop(r.send(Err(err()))),
        Request::Probe(_, r) => drop(r.send(Err(err()))),
        Request::Scrub(_, _, r) => drop(r.send(Err(err()))),
        Request::Stats(_, r) => drop(r.send(Err(err()))),
        Request::WorkerAlive(_, _, r) | Request::WorkerStopped(_, r) => drop(r.send(Err(err()))),
        Request::Workers(_, r) => drop(r.send(Err(err()))),
    }
}

/// Run one request inside a savepoint of the batch's transaction.
fn handle(tx: &Transaction<'_>, request: Request) -> Pending {
    fn scoped<T>(
        tx: &Transaction<'_>,
        f: impl FnOnce(&Transaction<'_>) -> StoreResult<T>,
    ) -> StoreResult<T> {
        tx.execute_batch("SAVEPOINT request").map_err(db)?;
        let result = f(tx);
        let end = if result.is_ok() {
            "RELEASE request"
        } else {
            "ROLLBACK TO request; RELEASE request"
        };
        tx.execute_batch(end).map_err(db)?;
        result
    }
    match request {
        Request::Start(now, instance, reply) => {
            pending(reply, scoped(tx, |tx| start(tx, now, &instance)))
        }
        Request::Claim(now, req, reply) => pending(reply, scoped(tx, |tx| claim(tx, now, &req))),
        Request::Renew(now, leases, until, reply) => {
            pending(reply, scoped(tx, |tx| renew(tx, now, &leases, until)))
        }
        Request::Apply(now, commits, successors, reply) => {
            let results = commits
                .iter()
                .map(|c| scoped(tx, |tx| apply(tx, now, c, successors.as_ref())))
                .collect::<StoreResult<Vec<_>>>();
            pending(reply, results)
        }
        Request::NextDue(reply) => pending(reply, next_due(tx)),
        Request::Instance(name, reply) => pending(reply, instance(tx, &name)),
        Request::List(filter, reply) => pending(reply, list(tx, &filter)),
        Request::Logs(name, reply) => pending(reply, logs(tx, &name)),
        Request::HistoryPage(name, page, reply) => pending(reply, history_page(tx, &name, page)),
        Request::LogsPage(name, page, reply) => pending(reply, logs_page(tx, &name, page)),
        Request::Retry(now, name, reply) => pending(reply, scoped(tx, |tx| retry(tx, now, &name))),
        Request::Cancel(now, name, reply) => {
            pending(reply, scoped(tx, |tx| cancel(tx, now, &name)))
        }
        Request::Stats(now, reply) => pending(reply, stats(tx, now)),
        Request::WorkerAlive(now, worker, reply) => {
            pending(reply, scoped(tx, |tx| worker_alive(tx, now, &worker)))
        }
        Request::WorkerStopped(owner, reply) => pending(
            reply,
            tx.execute("DELETE FROM workers WHERE owner = ?1", [owner])
                .map(drop)
                .map_err(db),
        ),
        Request::Workers(now, reply) => pending(reply, workers(tx, now)),
        Request::Scrub(cutoff, batch, reply) => {
            pending(reply, scoped(tx, |tx| scrub(tx, cutoff, batch)))
        }
        Request::Probe(_, reply) => {
            pending(reply, Err(StoreError::database("probe inside a batch")))
        }
    }
}

fn worker_alive(tx: &Transaction<'_>, now: Micros, w: &WorkerView) -> StoreResult<()> {
    let list =
        |v: &[String]| serde_json::to_string(v).map_err(|e| StoreError::Corrupt(e.to_string()));
    let queues = w.queues.as_deref().map(list).transpose()?;
    tx.prepare_cached(
        "INSERT INTO workers (owner, machines, targets, queues, started_at, seen_at, expires_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
         ON CONFLICT (owner) DO UPDATE SET machines = excluded.machines, targets = excluded.targets,
             queues = excluded.queues, seen_at = excluded.seen_at, expires_at = excluded.expires_at",
    )
    .map_err(db)?
    .execute(params![
        w.owner,
        list(&w.machines)?,
        w.targets.to_column(),
        queues,
        w.started_at,
        w.seen_at,
        w.expires_at
    ])
    .map_err(db)?;
    tx.prepare_cached("DELETE FROM workers WHERE expires_at < ?1")
        .map_err(db)?
        .execute([now - WORKERS_KEPT])
        .map_err(db)?;
    Ok(())
}

fn workers(tx: &Transaction<'_>, now: Micros) -> StoreResult<Vec<WorkerView>> {
    let rows = tx
        .prepare_cached(
            "SELECT owner, machines, targets, queues, started_at, seen_at, expires_at
             FROM workers WHERE expires_at > ?1 ORDER BY started_at, owner",
        )
        .map_err(db)?
        .query_map([now], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, Option<String>>(2)?,
                r.get::<_, Option<String>>(3)?,
                r.get::<_, i64>(4)?,
                r.get::<_, i64>(5)?,
                r.get::<_, i64>(6)?,
            ))
        })
        .map_err(db)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(db)?;
    rows.into_iter()
        .map(
            |(owner, machines, targets, queues, started_at, seen_at, expires_at)| {
                worker_view(
                    owner,
                    &machines,
                    targets.as_deref(),
                    queues.as_deref(),
                    [started_at, seen_at, expires_at],
                )
            },
        )
        .collect()
}

fn to_json(context: &Context) -> StoreResult<String> {
    serde_json::to_string(context).map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn from_json(text: &str) -> StoreResult<Context> {
    serde_json::from_str(text).map_err(|e| StoreError::Corrupt(format!("bad context JSON: {e}")))
}

fn start(tx: &Transaction<'_>, now: Micros, new: &NewInstance) -> StoreResult<Started> {
    let existing = tx
        .query_row(
            "SELECT machine, status FROM instances WHERE name = ?1",
            [&new.name],
            |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)),
        )
        .optional()
        .map_err(db)?;
    if let Some((machine, status)) = existing {
        return Ok(Started::Existing {
            machine,
            status: parse_status(&status)?,
        });
    }
    tx.execute(
        "INSERT INTO instances (name, machine, status, context, created_at, updated_at)
         VALUES (?1, ?2, 'running', ?3, ?4, ?4)",
        params![new.name, new.machine, to_json(&new.context)?, now],
    )
    .map_err(db)?;
    let id = tx.last_insert_rowid();
    insert_task(tx, id, &new.start, now, None)?;
    Ok(Started::Created)
}

fn parse_status(s: &str) -> StoreResult<InstanceStatus> {
    InstanceStatus::parse(s)
        .ok_or_else(|| StoreError::Corrupt(format!("unknown instance status `{s}`")))
}

/// Insert a task (a task of that name already pending is left as it is). With a lease
/// (owner, expiry), the task is inserted already claimed; returns its id when inserted.
fn insert_task(
    tx: &Transaction<'_>,
    instance_id: i64,
    t: &NewTask,
    now: Micros,
    lease: Option<(&str, Micros)>,
) -> StoreResult<Option<i64>> {
    let (owner, due_at, claim, attempts, first) = match lease {
        Some((owner, until)) => (Some(owner), until, 1, 1, Some(now)),
        None => (None, t.due_at, 0, 0, None),
    };
    let mut stmt = tx
        .prepare_cached(
            "INSERT INTO tasks (instance_id, name, kind, from_state, event, context, step, branch,
                                queue, target, status, due_at, created_at, lease_owner, claim,
                                attempts, first_attempt_at, token)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, 'ready', ?11, ?12, ?13, ?14, ?15, ?16, ?17)
             ON CONFLICT (instance_id, name) DO NOTHING",
        )
        .map_err(db)?;
    let inserted = stmt
        .execute(params![
            instance_id,
            t.name,
            t.kind.as_str(),
            t.from_state,
            t.event,
            to_json(&t.context)?,
            t.step as i64,
            t.branch,
            t.queue,
            t.target,
            due_at,
            now,
            owner,
            claim,
            attempts,
            first,
            t.token.as_ref().map(ToString::to_string)
        ])
        .map_err(db)?;
    Ok((inserted == 1).then(|| tx.last_insert_rowid()))
}

/// A claimable task as read from the database.
struct ClaimRow {
    id: i64,
    claim: i64,
    instance_id: i64,
    instance: String,
    machine: String,
    name: String,
    from_state: Option<String>,
    event: String,
    kind: String,
    context: String,
    step: i64,
    branch: String,
    attempts: i64,
    first: Option<i64>,
    queue: String,
    token: Option<String>,
    grp: Option<String>,
    page_queued: bool,
    target: Option<String>,
}

/// How many more tasks of each limited queue may start now, whoever claims them: its
/// `max_concurrent` less the tasks of it running, and the tokens of its `rate` bucket (topped
/// up for the time since it was last drawn from).
fn shared_allowance(
    tx: &Transaction<'_>,
    now: Micros,
    limits: &[(String, crate::machine::QueueLimits)],
) -> StoreResult<Vec<(String, usize)>> {
    let mut allowance = Vec::new();
    for (queue, l) in limits {
        if l.max_concurrent.is_none() && l.rate.is_none() {
            continue;
        }
        let mut allowed = usize::MAX;
        if let Some(max) = l.max_concurrent {
            let running: i64 = tx
                .prepare_cached(
                    "SELECT COUNT(*) FROM tasks
                     WHERE queue = ?1 AND lease_owner IS NOT NULL AND status = 'ready' AND due_at > ?2",
                )
                .map_err(db)?
                .query_row(params![queue, now], |r| r.get(0))
                .map_err(db)?;
            allowed = allowed.min(usize::try_from(i64::from(max) - running).unwrap_or(0));
        }
        if let Some(rate) = l.rate {
            let capacity = f64::from(rate.count);
            let per_micro = capacity / micros(rate.per).max(1) as f64;
            let tokens: f64 = tx
                .prepare_cached(
                    "INSERT INTO queue_rates (queue, tokens, updated_at) VALUES (?1, ?2, ?3)
                     ON CONFLICT (queue) DO UPDATE
                       SET tokens = MIN(?2, queue_rates.tokens + (?3 - queue_rates.updated_at) * ?4),
                           updated_at = ?3
                     RETURNING tokens",
                )
                .map_err(db)?
                .query_row(params![queue, capacity, now, per_micro], |r| r.get(0))
                .map_err(db)?;
            allowed = allowed.min(tokens.floor().max(0.0) as usize);
        }
        allowance.push((queue.clone(), allowed));
    }
    Ok(allowance)
}

fn claim(tx: &Transaction<'_>, now: Micros, req: &ClaimRequest) -> StoreResult<Vec<Task>> {
    if req.limit == 0 {
        return Ok(Vec::new());
    }
    // Look at a few more candidates than wanted, so per-queue limits can skip some.
    let window = (req.limit * 2).max(16) as i64;
    let rows = tx
        .prepare_cached(
            "SELECT t.id, t.claim, t.instance_id, i.name, i.machine, t.name, t.from_state, t.event,
                    t.kind, t.context, t.step, t.branch, t.attempts, t.first_attempt_at, t.queue,
                    t.token, t.grp, t.page_queued, t.target
             FROM tasks t JOIN instances i ON i.id = t.instance_id
             WHERE t.status = 'ready' AND t.due_at <= ?1
             ORDER BY t.due_at LIMIT ?2",
        )
        .map_err(db)?
        .query_map(params![now, window], |r| {
            Ok(ClaimRow {
                id: r.get(0)?,
                claim: r.get(1)?,
                instance_id: r.get(2)?,
                instance: r.get(3)?,
                machine: r.get(4)?,
                name: r.get(5)?,
                from_state: r.get(6)?,
                event: r.get(7)?,
                kind: r.get(8)?,
                context: r.get(9)?,
                step: r.get(10)?,
                branch: r.get(11)?,
                attempts: r.get(12)?,
                first: r.get(13)?,
                queue: r.get(14)?,
                token: r.get(15)?,
                grp: r.get(16)?,
                page_queued: r.get(17)?,
                target: r.get(18)?,
            })
        })
        .map_err(db)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(db)?;
    let until = now + micros(req.lease);
    let mut per_queue: Vec<(String, usize)> = req.queue_limits.clone();
    // The configured limits hold across every worker process on the file too.
    for (queue, allowed) in shared_allowance(tx, now, &req.shared_limits)? {
        match per_queue.iter_mut().find(|(q, _)| *q == queue) {
            Some((_, left)) => *left = (*left).min(allowed),
            None => per_queue.push((queue, allowed)),
        }
    }
    let mut claimed = Vec::new();
    for row in rows {
        if claimed.len() >= req.limit {
            break;
        }
        if let Some(only) = &req.queues {
            if !only.contains(&row.queue) {
                continue;
            }
        }
        if !req.targets.takes(row.target.as_deref()) {
            continue;
        }
        if let Some((_, left)) = per_queue.iter_mut().find(|(q, _)| *q == row.queue) {
            if *left == 0 {
                continue;
            }
            *left -= 1;
        }
        tx.prepare_cached(
            "UPDATE tasks SET claim = claim + 1, lease_owner = ?2, due_at = ?3, attempts = attempts + 1,
                              first_attempt_at = COALESCE(first_attempt_at, ?4)
             WHERE id = ?1",
        )
        .map_err(db)?
        .execute(params![row.id, req.owner, until, now])
        .map_err(db)?;
        let kind = TaskKind::parse(&row.kind)
            .ok_or_else(|| StoreError::Corrupt(format!("task kind `{}`", row.kind)))?;
        let contexts = if kind == TaskKind::Join {
            join_items(tx, &row)?
        } else {
            Vec::new()
        };
        claimed.push(Task {
            id: row.id,
            claim: row.claim + 1,
            instance: row.instance,
            machine: row.machine,
            name: row.name,
            from_state: row.from_state,
            event: row.event,
            kind,
            context: from_json(&row.context)?,
            step: row.step as u64,
            branch: row.branch,
            attempt: row.attempts as u32,
            first_attempt_at: row.first.unwrap_or(now),
            queue: row.queue,
            token: row
                .token
                .map(|t| serde_json::from_str(&t))
                .transpose()
                .map_err(|e| StoreError::Corrupt(format!("bad token: {e}")))?,
            contexts,
            next_page_queued: row.page_queued,
        });
    }
    // Each start draws a token from its queue's bucket.
    for (queue, limits) in &req.shared_limits {
        let taken = claimed.iter().filter(|t| &t.queue == queue).count();
        if limits.rate.is_some() && taken > 0 {
            tx.prepare_cached(
                "UPDATE queue_rates SET tokens = MAX(tokens - ?2, 0) WHERE queue = ?1",
            )
            .map_err(db)?
            .execute(params![queue, taken as f64])
            .map_err(db)?;
        }
    }
    Ok(claimed)
}

/// A join takes every item parked in its group and not taken by another join (an item
/// taken by an earlier attempt of this same join stays with it).
fn join_items(tx: &Transaction<'_>, row: &ClaimRow) -> StoreResult<Vec<Context>> {
    let state = row.from_state.as_deref().unwrap_or_default();
    let grp = row.grp.as_deref().unwrap_or_default();
    tx.prepare_cached(
        "UPDATE items SET join_task = ?1
         WHERE instance_id = ?2 AND state = ?3 AND grp = ?4 AND (join_task IS NULL OR join_task = ?1)",
    )
    .map_err(db)?
    .execute(params![row.id, row.instance_id, state, grp])
    .map_err(db)?;
    let texts = tx
        .prepare_cached("SELECT context FROM items WHERE join_task = ?1 ORDER BY id")
        .map_err(db)?
        .query_map([row.id], |r| r.get::<_, String>(0))
        .map_err(db)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(db)?;
    texts.iter().map(|t| from_json(t)).collect()
}

fn renew(
    tx: &Transaction<'_>,
    now: Micros,
    leases: &[(i64, i64)],
    until: Micros,
) -> StoreResult<Vec<bool>> {
    let mut stmt = tx
        .prepare_cached(
            "UPDATE tasks SET due_at = ?3
             WHERE id = ?1 AND claim = ?2 AND status = 'ready' AND due_at > ?4",
        )
        .map_err(db)?;
    leases
        .iter()
        .map(|(id, claim)| Ok(stmt.execute(params![id, claim, until, now]).map_err(db)? == 1))
        .collect()
}

fn apply(
    tx: &Transaction<'_>,
    now: Micros,
    c: &Commit,
    successors: Option<&SuccessorClaim>,
) -> StoreResult<AppliedCommit> {
    // The fence: the task must still be ours and our lease unexpired. Finishing or
    // rescheduling the task and checking the fence are one statement.
    let fence = "AND claim = ?2 AND status = 'ready' AND due_at > ?3 RETURNING instance_id, kind";
    let (sql, extra): (String, Option<(Micros, &String)>) = match &c.disposition {
        Disposition::Finished => (format!("DELETE FROM tasks WHERE id = ?1 {fence}"), None),
        Disposition::Keep => (format!("UPDATE tasks SET page_queued = 1 WHERE id = ?1 {fence}"), None),
        Disposition::Retry { due_at, error } => (
            format!("UPDATE tasks SET due_at = ?4, lease_owner = NULL, last_error = ?5 WHERE id = ?1 {fence}"),
            Some((*due_at, error)),
        ),
        Disposition::Failed { error } => (
            format!(
                "UPDATE tasks SET status = 'failed', due_at = ?3, lease_owner = NULL, last_error = ?5
                 WHERE id = ?1 {fence}"
            ),
            Some((now, error)),
        ),
        // The claim did not count: take back the attempt it added.
        Disposition::Postpone { due_at, reason } => (
            format!(
                "UPDATE tasks SET due_at = ?4, lease_owner = NULL, last_error = ?5,
                        attempts = MAX(attempts - 1, 0),
                        first_attempt_at = CASE WHEN attempts <= 1 THEN NULL ELSE first_attempt_at END
                 WHERE id = ?1 {fence}"
            ),
            Some((*due_at, reason)),
        ),
    };
    let mut stmt = tx.prepare_cached(&sql).map_err(db)?;
    let row = |r: &rusqlite::Row<'_>| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?));
    let found: Option<(i64, String)> = match extra {
        None => stmt.query_row(params![c.task_id, c.claim, now], row),
        Some((due_at, error)) => {
            stmt.query_row(params![c.task_id, c.claim, now, due_at, error], row)
        }
    }
    .optional()
    .map_err(db)?;
    drop(stmt);
    let found = match found {
        Some((instance_id, kind)) => {
            if kind == TaskKind::Join.as_str() && c.disposition == Disposition::Finished {
                // The join's outcome is committed: the contexts it joined are gone with it.
                tx.prepare_cached("DELETE FROM items WHERE join_task = ?1")
                    .map_err(db)?
                    .execute([c.task_id])
                    .map_err(db)?;
            }
            Some(instance_id)
        }
        None => None,
    };
    let Some(instance_id) = found else {
        return Ok(AppliedCommit {
            applied: Applied::Fenced,
            claimed: Vec::new(),
        });
    };
    let machine = &c.machine;
    let mut claimed = Vec::new();
    for t in &c.new_tasks {
        let lease = successors.filter(|s| {
            t.due_at <= now
                && claimed.len() < s.max
                && s.takes(&t.queue, machine, t.target.as_deref())
        });
        let until = lease.map(|s| (s.owner.as_str(), now + micros(s.lease)));
        if let (Some(id), Some(_)) = (insert_task(tx, instance_id, t, now, until)?, until) {
            claimed.push(t.claimed(id, &c.instance, machine, now));
        }
    }
    for h in &c.history {
        tx.prepare_cached(
            "INSERT INTO history (instance_id, from_state, event, to_state, attempt, started_at,
                                  finished_at, task, branch, ends_branch)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
        )
        .map_err(db)?
        .execute(params![
            instance_id,
            h.from,
            h.event,
            h.to,
            h.attempt,
            h.started_at,
            h.finished_at,
            h.task,
            h.branch,
            h.ends_branch
        ])
        .map_err(db)?;
    }
    for p in &c.parked {
        park(tx, instance_id, &c.instance, p, now)?;
    }
    for child in &c.spawns {
        let inserted = tx
            .prepare_cached(
                "INSERT INTO instances (name, machine, status, context, parent, created_at, updated_at)
                 VALUES (?1, ?2, 'running', ?3, ?4, ?5, ?5)
                 ON CONFLICT (name) DO NOTHING",
            )
            .map_err(db)?
            .execute(params![child.name, child.machine, to_json(&child.context)?, c.instance, now])
            .map_err(db)?;
        if inserted == 1 {
            let child_id = tx.last_insert_rowid();
            insert_task(tx, child_id, &child.start, now, None)?;
        }
    }
    for l in &c.logs {
        insert_log(tx, instance_id, l)?;
    }
    match &c.instance_change {
        InstanceChange::None => {}
        InstanceChange::BranchEnded(context) => {
            // The last branch to end leaves its context as the instance's result; the
            // instance is completed when no task and no parked branch of it is left.
            tx.prepare_cached(
                "UPDATE instances SET result = ?3,
                        status = CASE WHEN NOT EXISTS (SELECT 1 FROM tasks WHERE instance_id = ?1)
                                       AND NOT EXISTS (SELECT 1 FROM items WHERE instance_id = ?1)
                                      THEN 'completed' ELSE status END,
                        updated_at = ?2,
                        ended_at = CASE WHEN NOT EXISTS (SELECT 1 FROM tasks WHERE instance_id = ?1)
                                         AND NOT EXISTS (SELECT 1 FROM items WHERE instance_id = ?1)
                                        THEN ?2 ELSE ended_at END
                 WHERE id = ?1 AND status = 'running'",
            )
            .map_err(db)?
            .execute(params![instance_id, now, to_json(context)?])
            .map_err(db)?;
        }
        InstanceChange::Halt(reason) => {
            drop_pending(tx, instance_id).map_err(db)?;
            end_instance(tx, instance_id, InstanceStatus::Halted, Some(reason), now)?;
        }
        InstanceChange::Fail(error) => {
            tx.execute(
                "UPDATE tasks SET status = 'held', lease_owner = NULL
                 WHERE instance_id = ?1 AND status = 'ready'",
                [instance_id],
            )
            .map_err(db)?;
            end_instance(tx, instance_id, InstanceStatus::Failed, Some(error), now)?;
        }
    }
    if c.disposition != Disposition::Keep {
        release_barriers(tx, instance_id, now)?;
    }
    Ok(AppliedCommit {
        applied: Applied::Yes,
        claimed,
    })
}

/// Park a branch at a fan-in state, and make sure a join will take it: a window join due
/// `window` after the first arrival (unless one not yet started is pending), or a waiting
/// barrier join.
fn park(
    tx: &Transaction<'_>,
    instance_id: i64,
    instance: &str,
    p: &Parked,
    now: Micros,
) -> StoreResult<()> {
    tx.prepare_cached(
        "INSERT INTO items (instance_id, state, grp, context, branch, step, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )
    .map_err(db)?
    .execute(params![
        instance_id,
        p.state,
        p.group,
        to_json(&p.context)?,
        p.branch,
        p.step as i64,
        now
    ])
    .map_err(db)?;
    let item = tx.last_insert_rowid();
    let pending: bool = tx
        .prepare_cached(
            "SELECT EXISTS (SELECT 1 FROM tasks
                            WHERE instance_id = ?1 AND kind = 'join' AND from_state = ?2 AND grp = ?3
                              AND status IN ('ready', 'waiting') AND lease_owner IS NULL)",
        )
        .map_err(db)?
        .query_row(params![instance_id, p.state, p.group], |r| r.get(0))
        .map_err(db)?;
    if pending {
        return Ok(());
    }
    let (status, due_at, suffix) = match p.window {
        Some(window) => ("ready", now + window, "window"),
        None => ("waiting", now, "all"),
    };
    tx.prepare_cached(
        "INSERT INTO tasks (instance_id, name, kind, from_state, event, context, step, branch,
                            queue, target, status, due_at, created_at, grp)
         VALUES (?1, ?2, 'join', ?3, 'fan-in', '{}', ?4, '', ?5, ?6, ?7, ?8, ?9, ?10)",
    )
    .map_err(db)?
    .execute(params![
        instance_id,
        format!(
            "{instance}--{}--fan-in--{}--{suffix}-{item}",
            p.state, p.group
        ),
        p.state,
        p.step as i64,
        p.queue,
        p.target,
        status,
        due_at,
        now,
        p.group
    ])
    .map_err(db)?;
    Ok(())
}

/// Barrier joins (`fan_in: all`) run once no branch of their instance is live: when the
/// instance has no ready task left, its waiting joins become due.
fn release_barriers(tx: &Transaction<'_>, instance_id: i64, now: Micros) -> StoreResult<()> {
    tx.prepare_cached(
        "UPDATE tasks SET status = 'ready', due_at = ?2
         WHERE instance_id = ?1 AND status = 'waiting'
           AND NOT EXISTS (SELECT 1 FROM tasks WHERE instance_id = ?1 AND status = 'ready')",
    )
    .map_err(db)?
    .execute(params![instance_id, now])
    .map_err(db)?;
    Ok(())
}

/// Drop an instance's pending tasks and parked branches (it was halted or cancelled).
fn drop_pending(tx: &Transaction<'_>, instance_id: i64) -> rusqlite::Result<usize> {
    tx.execute("DELETE FROM items WHERE instance_id = ?1", [instance_id])?;
    tx.execute("DELETE FROM tasks WHERE instance_id = ?1", [instance_id])
}

fn insert_log(tx: &Transaction<'_>, instance_id: i64, l: &LogLine) -> StoreResult<()> {
    tx.prepare_cached(
        "INSERT INTO logs (instance_id, at, level, message, task) VALUES (?1, ?2, ?3, ?4, ?5)",
    )
    .map_err(db)?
    .execute(params![instance_id, l.at, l.level, l.message, l.task])
    .map_err(db)?;
    Ok(())
}

fn end_instance(
    tx: &Transaction<'_>,
    id: i64,
    status: InstanceStatus,
    error: Option<&String>,
    now: Micros,
) -> StoreResult<()> {
    tx.execute(
        "UPDATE instances SET status = ?2, error = ?3, updated_at = ?4, ended_at = ?4 WHERE id = ?1",
        params![id, status.as_str(), error, now],
    )
    .map_err(db)?;
    Ok(())
}

fn next_due(tx: &Transaction<'_>) -> StoreResult<Option<Micros>> {
    tx.query_row(
        "SELECT MIN(due_at) FROM tasks WHERE status = 'ready'",
        [],
        |r| r.get(0),
    )
    .map_err(db)
}

fn instance(tx: &Transaction<'_>, name: &str) -> StoreResult<Option<InstanceView>> {
    let row = tx
        .query_row(
            "SELECT id, machine, status, context, error, created_at, updated_at, ended_at, result
             FROM instances WHERE name = ?1",
            [name],
            |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, Option<String>>(4)?,
                    r.get::<_, i64>(5)?,
                    r.get::<_, i64>(6)?,
                    r.get::<_, Option<i64>>(7)?,
                    r.get::<_, Option<String>>(8)?,
                ))
            },
        )
        .optional()
        .map_err(db)?;
    let Some((id, machine, status, context, error, created_at, updated_at, ended_at, result)) = row
    else {
        return Ok(None);
    };
    let history = tx
        .prepare_cached(
            "SELECT from_state, event, to_state, attempt, started_at, finished_at, task, branch,
                    ends_branch
             FROM (SELECT * FROM history WHERE instance_id = ?1 ORDER BY id DESC LIMIT ?2)
             ORDER BY id",
        )
        .map_err(db)?
        .query_map(params![id, VIEW_ROWS as i64], |r| {
            Ok(HistoryEntry {
                from: r.get(0)?,
                event: r.get(1)?,
                to: r.get(2)?,
                attempt: r.get(3)?,
                started_at: r.get(4)?,
                finished_at: r.get(5)?,
                task: r.get(6)?,
                branch: r.get(7)?,
                ends_branch: r.get(8)?,
            })
        })
        .map_err(db)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(db)?;
    let mut contexts = Vec::new();
    let rows = tx
        .prepare_cached(
            "SELECT name, from_state, event, status, due_at, lease_owner, attempts, last_error, queue, context, target
             FROM tasks WHERE instance_id = ?1 ORDER BY id LIMIT ?2",
        )
        .map_err(db)?
        .query_map(params![id, VIEW_ROWS as i64], |r| {
            Ok((
                TaskView {
                    name: r.get(0)?,
                    from: r.get(1)?,
                    event: r.get(2)?,
                    status: TaskStatus::Ready,
                    due_at: r.get(4)?,
                    leased_by: r.get(5)?,
                    attempts: r.get(6)?,
                    last_error: r.get(7)?,
                    queue: r.get(8)?,
                    target: r.get(10)?,
                },
                r.get::<_, String>(9)?,
                r.get::<_, String>(3)?,
            ))
        })
        .map_err(db)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(db)?;
    let mut tasks = Vec::with_capacity(rows.len());
    for (mut view, ctx, status) in rows {
        if contexts.is_empty() {
            contexts.push(ctx);
        }
        view.status = TaskStatus::parse(&status)?;
        tasks.push(view);
    }
    let current_context = match contexts.first().or(result.as_ref()) {
        Some(c) => Some(from_json(c)?),
        None => None,
    };
    let parent: Option<String> = tx
        .query_row("SELECT parent FROM instances WHERE id = ?1", [id], |r| {
            r.get(0)
        })
        .map_err(db)?;
    let children = tx
        .prepare_cached("SELECT name FROM instances WHERE parent = ?1 ORDER BY id")
        .map_err(db)?
        .query_map([name], |r| r.get::<_, String>(0))
        .map_err(db)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(db)?;
    let count = |sql: &str| -> StoreResult<u64> {
        tx.prepare_cached(sql)
            .map_err(db)?
            .query_row([id], |r| r.get::<_, i64>(0))
            .map(|n| n.max(0) as u64)
            .map_err(db)
    };
    let branches = BranchCounts {
        live: count("SELECT COUNT(*) FROM tasks WHERE instance_id = ?1 AND status = 'ready' AND kind <> 'join'")?
            + count("SELECT COUNT(*) FROM tasks WHERE instance_id = ?1 AND status = 'ready' AND kind = 'join' AND lease_owner IS NOT NULL")?,
        held: count("SELECT COUNT(*) FROM tasks WHERE instance_id = ?1 AND status = 'held'")?,
        parked: count("SELECT COUNT(*) FROM items WHERE instance_id = ?1")?,
        ended: count("SELECT COUNT(*) FROM history WHERE instance_id = ?1 AND ends_branch = 1")?,
        failed: count("SELECT COUNT(*) FROM tasks WHERE instance_id = ?1 AND status = 'failed'")?,
    };
    let history_total = count("SELECT COUNT(*) FROM history WHERE instance_id = ?1")?;
    let tasks_total = count("SELECT COUNT(*) FROM tasks WHERE instance_id = ?1")?;
    let end_states = tx
        .prepare_cached(
            "SELECT to_state FROM history WHERE instance_id = ?1 AND ends_branch = 1
             GROUP BY to_state ORDER BY MAX(id)",
        )
        .map_err(db)?
        .query_map([id], |r| r.get::<_, String>(0))
        .map_err(db)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(db)?;
    Ok(Some(InstanceView {
        parent,
        children,
        branches,
        name: name.to_string(),
        machine,
        status: parse_status(&status)?,
        context: from_json(&context)?,
        error,
        created_at,
        updated_at,
        ended_at,
        history,
        history_total,
        tasks,
        tasks_total,
        end_states,
        current_context,
    }))
}

fn list(tx: &Transaction<'_>, filter: &ListFilter) -> StoreResult<Vec<InstanceSummary>> {
    let limit = if filter.limit == 0 { 100 } else { filter.limit } as i64;
    let mut stmt = tx
        .prepare_cached(
            "SELECT name, machine, status, created_at, updated_at, error FROM instances
             WHERE (?1 IS NULL OR machine = ?1) AND (?2 IS NULL OR status = ?2)
               AND (?4 IS NULL OR id < (SELECT id FROM instances WHERE name = ?4))
             ORDER BY id DESC LIMIT ?3",
        )
        .map_err(db)?;
    let rows = stmt
        .query_map(
            params![
                filter.machine,
                filter.status.map(InstanceStatus::as_str),
                limit,
                filter.before
            ],
            |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, i64>(4)?,
                    r.get::<_, Option<String>>(5)?,
                ))
            },
        )
        .map_err(db)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(db)?;
    rows.into_iter()
        .map(
            |(instance, machine, status, created_at, updated_at, error)| {
                Ok(InstanceSummary {
                    instance,
                    machine,
                    status: parse_status(&status)?,
                    created_at,
                    updated_at,
                    error,
                })
            },
        )
        .collect()
}

fn logs(tx: &Transaction<'_>, name: &str) -> StoreResult<Vec<LogLine>> {
    tx.prepare_cached(
        "SELECT l.at, l.level, l.message, l.task FROM logs l
         JOIN instances i ON i.id = l.instance_id WHERE i.name = ?1 ORDER BY l.id",
    )
    .map_err(db)?
    .query_map([name], |r| {
        Ok(LogLine {
            at: r.get(0)?,
            level: r.get(1)?,
            message: r.get(2)?,
            task: r.get(3)?,
        })
    })
    .map_err(db)?
    .collect::<Result<Vec<_>, _>>()
    .map_err(db)
}

fn history_page(
    tx: &Transaction<'_>,
    name: &str,
    page: PageRequest,
) -> StoreResult<Option<Page<HistoryEntry>>> {
    let Some((id, _)) = lookup(tx, name)? else {
        return Ok(None);
    };
    let limit = i64::try_from(page.limit).unwrap_or(i64::MAX - 1);
    let rows = tx
        .prepare_cached(
            "SELECT id, from_state, event, to_state, attempt, started_at, finished_at, task, branch,
                    ends_branch
             FROM history WHERE instance_id = ?1 AND id > ?2 ORDER BY id LIMIT ?3",
        )
        .map_err(db)?
        .query_map(params![id, page.after, limit + 1], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                HistoryEntry {
                    from: r.get(1)?,
                    event: r.get(2)?,
                    to: r.get(3)?,
                    attempt: r.get(4)?,
                    started_at: r.get(5)?,
                    finished_at: r.get(6)?,
                    task: r.get(7)?,
                    branch: r.get(8)?,
                    ends_branch: r.get(9)?,
                },
            ))
        })
        .map_err(db)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(db)?;
    Ok(Some(Page::from_rows(rows, page.limit)))
}

fn logs_page(
    tx: &Transaction<'_>,
    name: &str,
    page: PageRequest,
) -> StoreResult<Option<Page<LogLine>>> {
    let Some((id, _)) = lookup(tx, name)? else {
        return Ok(None);
    };
    let limit = i64::try_from(page.limit).unwrap_or(i64::MAX - 1);
    let cut = i64::try_from(MAX_PAGE_MESSAGE_CHARS).unwrap_or(i64::MAX);
    let rows = tx
        .prepare_cached(
            "SELECT id, at, level, substr(message, 1, ?4), length(message), task
             FROM logs WHERE instance_id = ?1 AND id > ?2 ORDER BY id LIMIT ?3",
        )
        .map_err(db)?
        .query_map(params![id, page.after, limit + 1, cut], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                LogLine {
                    at: r.get(1)?,
                    level: r.get(2)?,
                    message: cut_message(r.get(3)?, r.get(4)?),
                    task: r.get(5)?,
                },
            ))
        })
        .map_err(db)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(db)?;
    Ok(Some(Page::from_rows(rows, page.limit)))
}

fn lookup(tx: &Transaction<'_>, name: &str) -> StoreResult<Option<(i64, InstanceStatus)>> {
    let row = tx
        .query_row(
            "SELECT id, status FROM instances WHERE name = ?1",
            [name],
            |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)),
        )
        .optional()
        .map_err(db)?;
    row.map(|(id, s)| Ok((id, parse_status(&s)?))).transpose()
}

fn retry(tx: &Transaction<'_>, now: Micros, name: &str) -> StoreResult<Control> {
    let Some((id, status)) = lookup(tx, name)? else {
        return Ok(Control::NotFound);
    };
    if status != InstanceStatus::Failed {
        return Ok(Control::NotAllowed(status));
    }
    tx.execute(
        "UPDATE tasks SET status = 'ready', due_at = ?2, attempts = 0, first_attempt_at = NULL,
                          lease_owner = NULL, last_error = NULL
         WHERE instance_id = ?1 AND status IN ('failed', 'held')",
        params![id, now],
    )
    .map_err(db)?;
    tx.execute(
        "INSERT INTO logs (instance_id, at, level, message, task) VALUES (?1, ?2, 'info', 'resumed by retry', '')",
        params![id, now],
    )
    .map_err(db)?;
    tx.execute(
        "UPDATE instances SET status = 'running', error = NULL, updated_at = ?2, ended_at = NULL WHERE id = ?1",
        params![id, now],
    )
    .map_err(db)?;
    Ok(Control::Done)
}

fn stats(tx: &Transaction<'_>, now: Micros) -> StoreResult<super::StoreStats> {
    let sql = "SELECT queue,
       SUM(CASE WHEN lease_owner IS NULL AND due_at <= ?1 THEN 1 ELSE 0 END),
       SUM(CASE WHEN lease_owner IS NULL AND due_at > ?1 THEN 1 ELSE 0 END),
       SUM(CASE WHEN lease_owner IS NOT NULL AND due_at > ?1 THEN 1 ELSE 0 END),
       MIN(CASE WHEN lease_owner IS NULL AND due_at <= ?1 THEN due_at END)
FROM tasks WHERE status = 'ready' GROUP BY queue ORDER BY queue";
    let queues = tx
        .prepare_cached(sql)
        .map_err(db)?
        .query_map([now], |r| {
            let oldest: Option<i64> = r.get(4)?;
            Ok(super::QueueStats {
                queue: r.get(0)?,
                due: r.get::<_, i64>(1)?.max(0) as u64,
                scheduled: r.get::<_, i64>(2)?.max(0) as u64,
                running: r.get::<_, i64>(3)?.max(0) as u64,
                oldest_due_age_seconds: oldest.map_or(0.0, |t| (now - t).max(0) as f64 / 1e6),
            })
        })
        .map_err(db)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(db)?;
    let parked: i64 = tx
        .query_row("SELECT COUNT(*) FROM items", [], |r| r.get(0))
        .map_err(db)?;
    Ok(super::StoreStats {
        queues,
        parked: parked.max(0) as u64,
    })
}

fn scrub(tx: &Transaction<'_>, cutoff: Micros, batch: usize) -> StoreResult<u64> {
    // Foreign keys cascade to tasks, history, logs and items.
    let deleted = tx
        .execute(
            "DELETE FROM instances WHERE id IN (
                 SELECT id FROM instances
                 WHERE status <> 'running' AND ended_at IS NOT NULL AND ended_at < ?1
                 ORDER BY id LIMIT ?2)",
            params![cutoff, batch as i64],
        )
        .map_err(db)?;
    Ok(deleted as u64)
}

fn cancel(tx: &Transaction<'_>, now: Micros, name: &str) -> StoreResult<Control> {
    let Some((id, status)) = lookup(tx, name)? else {
        return Ok(Control::NotFound);
    };
    if !matches!(status, InstanceStatus::Running | InstanceStatus::Failed) {
        return Ok(Control::NotAllowed(status));
    }
    drop_pending(tx, id).map_err(db)?;
    end_instance(tx, id, InstanceStatus::Cancelled, None, now)?;
    Ok(Control::Done)
}

#[async_trait]
impl Store for SqliteStore {
    async fn start(&self, now: Micros, instance: NewInstance) -> StoreResult<Started> {
        let started = self
            .call(|r| Request::Start(now, Box::new(instance), r))
            .await?;
        self.changes.notify_waiters();
        Ok(started)
    }

    async fn claim(&self, now: Micros, request: &ClaimRequest) -> StoreResult<Vec<Task>> {
        let request = request.clone();
        self.call(|r| Request::Claim(now, request, r)).await
    }

    async fn renew(
        &self,
        now: Micros,
        leases: &[(i64, i64)],
        until: Micros,
    ) -> StoreResult<Vec<bool>> {
        let leases = leases.to_vec();
        self.call(|r| Request::Renew(now, leases, until, r)).await
    }

    async fn apply(
        &self,
        now: Micros,
        commits: Vec<Commit>,
        successors: Option<&SuccessorClaim>,
    ) -> StoreResult<Vec<AppliedCommit>> {
        let changed: Vec<(bool, usize)> = commits
            .iter()
            .map(|c| {
                let rescheduled = !matches!(c.disposition, Disposition::Finished);
                (rescheduled || !c.new_tasks.is_empty(), c.new_tasks.len())
            })
            .collect();
        let successors = successors.cloned();
        let applied = self
            .call(|r| Request::Apply(now, commits, successors, r))
            .await?;
        // Wake idle workers of this process when work was queued that nobody holds yet.
        let queued = applied.iter().zip(&changed).any(|(a, (changed, n))| {
            a.applied == Applied::Yes && *changed && a.claimed.len() < (*n).max(1)
        });
        if queued {
            self.changes.notify_waiters();
        }
        Ok(applied)
    }

    async fn next_due(&self) -> StoreResult<Option<Micros>> {
        self.read(Request::NextDue).await
    }

    async fn instance(&self, name: &str) -> StoreResult<Option<InstanceView>> {
        let name = name.to_string();
        self.read(|r| Request::Instance(name, r)).await
    }

    async fn list(&self, filter: &ListFilter) -> StoreResult<Vec<InstanceSummary>> {
        let filter = filter.clone();
        self.read(|r| Request::List(filter, r)).await
    }

    async fn logs(&self, name: &str) -> StoreResult<Vec<LogLine>> {
        let name = name.to_string();
        self.read(|r| Request::Logs(name, r)).await
    }

    async fn history_page(
        &self,
        name: &str,
        page: PageRequest,
    ) -> StoreResult<Option<Page<HistoryEntry>>> {
        let name = name.to_string();
        self.read(|r| Request::HistoryPage(name, page, r)).await
    }

    async fn logs_page(&self, name: &str, page: PageRequest) -> StoreResult<Option<Page<LogLine>>> {
        let name = name.to_string();
        self.read(|r| Request::LogsPage(name, page, r)).await
    }

    async fn retry(&self, now: Micros, name: &str) -> StoreResult<Control> {
        let name = name.to_string();
        let done = self.call(|r| Request::Retry(now, name, r)).await?;
        self.changes.notify_waiters();
        Ok(done)
    }

    async fn cancel(&self, now: Micros, name: &str) -> StoreResult<Control> {
        let name = name.to_string();
        self.call(|r| Request::Cancel(now, name, r)).await
    }

    async fn worker_alive(&self, now: Micros, worker: &WorkerView) -> StoreResult<()> {
        let worker = Box::new(worker.clone());
        self.call(|r| Request::WorkerAlive(now, worker, r)).await
    }

    async fn worker_stopped(&self, owner: &str) -> StoreResult<()> {
        let owner = owner.to_string();
        self.call(|r| Request::WorkerStopped(owner, r)).await
    }

    async fn workers(&self, now: Micros) -> StoreResult<Vec<WorkerView>> {
        self.read(|r| Request::Workers(now, r)).await
    }

    async fn probe_commit_rate(&self, commits: usize) -> StoreResult<f64> {
        self.call(|r| Request::Probe(commits, r)).await
    }

    async fn scrub(&self, cutoff: Micros, batch: usize) -> StoreResult<u64> {
        self.call(|r| Request::Scrub(cutoff, batch, r)).await
    }

    async fn stats(&self, now: Micros) -> StoreResult<super::StoreStats> {
        self.read(|r| Request::Stats(now, r)).await
    }

    fn changes(&self) -> Arc<Notify> {
        Arc::clone(&self.changes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failure(code: std::os::raw::c_int) -> rusqlite::Error {
        rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(code), None)
    }

    #[test]
    fn busy_locked_and_full_are_transient_and_keep_their_source() {
        for code in [
            rusqlite::ffi::SQLITE_BUSY,
            rusqlite::ffi::SQLITE_LOCKED,
            rusqlite::ffi::SQLITE_FULL,
        ] {
            let e = db(failure(code));
            assert!(e.is_transient(), "{e}");
            assert!(std::error::Error::source(&e).is_some(), "{e}");
        }
        for code in [
            rusqlite::ffi::SQLITE_CONSTRAINT,
            rusqlite::ffi::SQLITE_CORRUPT,
        ] {
            assert!(!db(failure(code)).is_transient());
        }
        assert!(!StoreError::database("no phasm database").is_transient());
    }
}
