//! The shared store: one PostgreSQL database that workers on any number of hosts use at once.
//!
//! Claims take due tasks with `FOR UPDATE SKIP LOCKED`, so workers never wait for each other.
//! Every commit is one transaction, fenced like SQLite's (claim number and unexpired lease).
//! Two checks that span an instance's branches — "is the instance complete?" and "may its
//! barrier joins run?" — run as single statements right *after* the commit that could make
//! them true: whichever of two concurrent commits finishes last then sees both, which a check
//! inside either transaction (under READ COMMITTED) could not. [`Store::sweep`] repeats them
//! now and then in case a worker died between its commit and the check. Idle workers wait for
//! `NOTIFY phasm`, sent by commits that queue work, instead of polling.

use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod};
use futures_util::StreamExt;
use tokio::sync::Notify;
use tokio_postgres::types::ToSql;
use tokio_postgres::{AsyncMessage, NoTls, Row};

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

/// How to open a PostgreSQL store.
#[derive(Debug, Clone)]
pub struct PostgresOptions {
    /// Most connections in the pool (size it a little above the worker's concurrency).
    pub pool_size: usize,
}

impl Default for PostgresOptions {
    fn default() -> Self {
        Self { pool_size: 16 }
    }
}

/// The PostgreSQL store. Cheap to clone.
#[derive(Clone)]
pub struct PostgresStore {
    pool: Pool,
    changes: Arc<Notify>,
    /// Instances whose settle check is running in this process, and whether another commit
    /// asked for one meanwhile (then it runs again): thousands of branches parking at once
    /// cost a few checks, not thousands, and a check still starts after every commit.
    settling: Arc<std::sync::Mutex<std::collections::HashMap<i64, (bool, bool)>>>,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore").finish_non_exhaustive()
    }
}

/// The newest schema version this build writes.
const SCHEMA_VERSION: i64 = 2;

/// Schema migrations, applied in order; entry `i` takes the schema to version `i + 1`.
const MIGRATIONS: &[&str] = &[
    r"
CREATE TABLE instances (
    id          BIGSERIAL PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    machine     TEXT NOT NULL,
    status      TEXT NOT NULL,
    context     TEXT NOT NULL,
    result      TEXT,
    error       TEXT,
    parent      TEXT,
    created_at  BIGINT NOT NULL,
    updated_at  BIGINT NOT NULL,
    ended_at    BIGINT
);
CREATE INDEX instances_by_machine ON instances (machine, id);
CREATE INDEX instances_by_status ON instances (status, id);
CREATE INDEX instances_by_parent ON instances (parent) WHERE parent IS NOT NULL;
CREATE INDEX instances_ended ON instances (ended_at) WHERE status <> 'running';

-- No foreign keys to `instances`: every insert would share-lock the instance's row, and the
-- branches of one instance (100,000 of them, say) would all contend for that one row.
-- phasm deletes an instance's rows itself.
CREATE TABLE tasks (
    id               BIGSERIAL PRIMARY KEY,
    instance_id      BIGINT NOT NULL,
    name             TEXT NOT NULL,
    kind             TEXT NOT NULL,
    from_state       TEXT,
    event            TEXT NOT NULL,
    context          TEXT NOT NULL,
    step             BIGINT NOT NULL,
    branch           TEXT NOT NULL,
    queue            TEXT NOT NULL,
    target           TEXT,
    status           TEXT NOT NULL,
    due_at           BIGINT NOT NULL,
    claim            BIGINT NOT NULL DEFAULT 0,
    lease_owner      TEXT,
    attempts         BIGINT NOT NULL DEFAULT 0,
    first_attempt_at BIGINT,
    last_error       TEXT,
    created_at       BIGINT NOT NULL,
    token            TEXT,
    grp              TEXT,
    page_queued      BOOLEAN NOT NULL DEFAULT FALSE,
    UNIQUE (instance_id, name)
);
CREATE INDEX tasks_ready ON tasks (due_at) WHERE status = 'ready';
CREATE INDEX tasks_waiting ON tasks (instance_id) WHERE status = 'waiting';
CREATE INDEX tasks_joins ON tasks (instance_id, from_state, grp) WHERE kind = 'join';

CREATE TABLE history (
    id          BIGSERIAL PRIMARY KEY,
    instance_id BIGINT NOT NULL,
    from_state  TEXT,
    event       TEXT NOT NULL,
    to_state    TEXT NOT NULL,
    attempt     BIGINT NOT NULL,
    started_at  BIGINT NOT NULL,
    finished_at BIGINT NOT NULL,
    task        TEXT NOT NULL,
    branch      TEXT NOT NULL,
    ends_branch BOOLEAN NOT NULL DEFAULT FALSE
);
CREATE INDEX history_by_instance ON history (instance_id, id);

CREATE TABLE logs (
    id          BIGSERIAL PRIMARY KEY,
    instance_id BIGINT NOT NULL,
    at          BIGINT NOT NULL,
    level       TEXT NOT NULL,
    message     TEXT NOT NULL,
    task        TEXT NOT NULL
);
CREATE INDEX logs_by_instance ON logs (instance_id, id);

CREATE TABLE items (
    id          BIGSERIAL PRIMARY KEY,
    instance_id BIGINT NOT NULL,
    state       TEXT NOT NULL,
    grp         TEXT NOT NULL,
    context     TEXT NOT NULL,
    branch      TEXT NOT NULL,
    step        BIGINT NOT NULL,
    join_task   BIGINT,
    created_at  BIGINT NOT NULL
);
CREATE INDEX items_by_group ON items (instance_id, state, grp, id);
CREATE INDEX items_by_join ON items (join_task) WHERE join_task IS NOT NULL;
-- Counting a queue's running steps across workers (`max_concurrent`).
CREATE INDEX tasks_leased ON tasks (queue) WHERE lease_owner IS NOT NULL;

-- A queue's `rate`, shared by every worker: a token bucket.
CREATE TABLE queue_rates (
    queue      TEXT PRIMARY KEY,
    tokens     DOUBLE PRECISION NOT NULL,
    updated_at BIGINT NOT NULL
);
",
    r"
-- Workers say they are alive (and what they take), so status can tell that no worker will
-- take a step.
CREATE TABLE workers (
    owner      TEXT PRIMARY KEY,
    machines   TEXT NOT NULL,
    targets    TEXT,
    queues     TEXT,
    started_at BIGINT NOT NULL,
    seen_at    BIGINT NOT NULL,
    expires_at BIGINT NOT NULL
);
",
];

/// Any number, the same in every phasm: serialises schema migrations of workers starting at
/// once.
const MIGRATION_LOCK: i64 = 0x7068_6173_6d00;

/// A transaction whose statements are prepared once per connection and cached, so the
/// server does not parse and plan them again on every step.
struct Transaction<'a>(deadpool_postgres::Transaction<'a>);

type Params<'p> = &'p [&'p (dyn ToSql + Sync)];

impl Transaction<'_> {
    async fn execute(&self, sql: &str, params: Params<'_>) -> Result<u64, tokio_postgres::Error> {
        let statement = self.0.prepare_cached(sql).await?;
        self.0.execute(&statement, params).await
    }

    async fn query(
        &self,
        sql: &str,
        params: Params<'_>,
    ) -> Result<Vec<Row>, tokio_postgres::Error> {
        let statement = self.0.prepare_cached(sql).await?;
        self.0.query(&statement, params).await
    }

    async fn query_opt(
        &self,
        sql: &str,
        params: Params<'_>,
    ) -> Result<Option<Row>, tokio_postgres::Error> {
        let statement = self.0.prepare_cached(sql).await?;
        self.0.query_opt(&statement, params).await
    }

    async fn query_one(&self, sql: &str, params: Params<'_>) -> Result<Row, tokio_postgres::Error> {
        let statement = self.0.prepare_cached(sql).await?;
        self.0.query_one(&statement, params).await
    }

    async fn batch_execute(&self, sql: &str) -> Result<(), tokio_postgres::Error> {
        self.0.batch_execute(sql).await
    }

    async fn commit(self) -> Result<(), tokio_postgres::Error> {
        self.0.commit().await
    }
}

/// Begin a transaction with cached statements.
async fn begin(client: &mut Object) -> StoreResult<Transaction<'_>> {
    client.transaction().await.map(Transaction).map_err(pg)
}

/// Lock an instance's row for the rest of `tx` (so a worker cannot end or advance it
/// meanwhile) and return its id and status; `None` when no instance has that name.
async fn lock_instance_by_name(
    tx: &Transaction<'_>,
    name: &str,
) -> StoreResult<Option<(i64, InstanceStatus)>> {
    let Some(row) = tx
        .query_opt(
            "SELECT id, status FROM instances WHERE name = $1 FOR UPDATE",
            &[&name],
        )
        .await
        .map_err(pg)?
    else {
        return Ok(None);
    };
    Ok(Some((row.get(0), parse_status(row.get(1))?)))
}

fn pg(e: tokio_postgres::Error) -> StoreError {
    use std::error::Error;
    let (message, transient) = match e.as_db_error() {
        Some(db) => {
            let code = db.code().code();
            // Connection exceptions, insufficient resources (a full disk), the server
            // shutting down or starting, serialization failures and deadlocks pass.
            let transient = code.starts_with("08")
                || code.starts_with("53")
                || code.starts_with("57P")
                || code == "40001"
                || code == "40P01";
            (format!("{code}: {}", db.message()), transient)
        }
        // Without a server's answer: a lost connection passes, a client-side mistake (a
        // parameter that cannot be sent) does not.
        None => {
            let io = e.source().is_some_and(|s| s.is::<std::io::Error>());
            (e.to_string(), e.is_closed() || io)
        }
    };
    StoreError::driver(message, transient, e)
}

fn to_json(context: &Context) -> StoreResult<String> {
    serde_json::to_string(context).map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn from_json(text: &str) -> StoreResult<Context> {
    serde_json::from_str(text).map_err(|e| StoreError::Corrupt(format!("bad context JSON: {e}")))
}

fn parse_status(s: &str) -> StoreResult<InstanceStatus> {
    InstanceStatus::parse(s)
        .ok_or_else(|| StoreError::Corrupt(format!("unknown instance status `{s}`")))
}

impl PostgresStore {
    /// Connect to `url` (`postgres://USER@HOST:PORT/DB`), migrate the schema (safe when several
    /// workers start at once), and start listening for other processes' work.
    ///
    /// # Errors
    /// When the database cannot be reached, or has a newer schema than this phasm.
    pub async fn open(url: &str, options: &PostgresOptions) -> StoreResult<Self> {
        let config = tokio_postgres::Config::from_str(url)
            .map_err(|e| StoreError::database(format!("bad PostgreSQL URL: {e}")))?;
        let manager = Manager::from_config(
            config.clone(),
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(options.pool_size.max(2))
            .build()
            .map_err(|e| StoreError::database(e.to_string()))?;
        let store = Self {
            pool,
            changes: Arc::new(Notify::new()),
            settling: Arc::default(),
        };
        store.migrate().await?;
        tokio::spawn(listen(config, Arc::clone(&store.changes)));
        Ok(store)
    }

    async fn client(&self) -> StoreResult<Object> {
        self.pool
            .get()
            .await
            .map_err(|e| StoreError::driver(format!("cannot connect to PostgreSQL: {e}"), true, e))
    }

    async fn migrate(&self) -> StoreResult<()> {
        let mut client = self.client().await?;
        let tx = begin(&mut client).await?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .await
            .map_err(pg)?;
        tx.batch_execute("CREATE TABLE IF NOT EXISTS phasm_schema (version BIGINT NOT NULL)")
            .await
            .map_err(pg)?;
        let version: i64 = tx
            .query_one("SELECT COALESCE(MAX(version), 0) FROM phasm_schema", &[])
            .await
            .map_err(pg)?
            .get(0);
        if version > SCHEMA_VERSION {
            return Err(StoreError::TooNew {
                found: version,
                supported: SCHEMA_VERSION,
            });
        }
        for (i, sql) in MIGRATIONS
            .iter()
            .enumerate()
            .skip(usize::try_from(version).unwrap_or(0))
        {
            tx.batch_execute(sql).await.map_err(pg)?;
            tx.execute(
                "INSERT INTO phasm_schema (version) VALUES ($1)",
                &[&(i as i64 + 1)],
            )
            .await
            .map_err(pg)?;
        }
        tx.commit().await.map_err(pg)
    }

    /// Run [`Self::settle`] after a commit, unless one for the instance is already running in
    /// this process: then that one runs once more when it is done.
    async fn settle_coalesced(
        &self,
        instance_id: i64,
        complete: bool,
        now: Micros,
    ) -> StoreResult<()> {
        {
            let mut running = self
                .settling
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some((again, also_complete)) = running.get_mut(&instance_id) {
                *again = true;
                *also_complete |= complete;
                return Ok(());
            }
            running.insert(instance_id, (false, false));
        }
        // Whatever ends this call — a return, or the caller dropping it mid-way — the
        // instance is no longer being settled here (else later commits would wait for a
        // settle that never comes, until the sweep).
        let _settling = SettlingGuard {
            map: &self.settling,
            instance_id,
        };
        let mut complete = complete;
        loop {
            let result = self.settle(instance_id, complete, now).await;
            let mut running = self
                .settling
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            match running.get(&instance_id).copied() {
                Some((true, also_complete)) if result.is_ok() => {
                    running.insert(instance_id, (false, false));
                    complete = also_complete;
                }
                _ => {
                    // Released before the guard takes the lock again.
                    drop(running);
                    return result;
                }
            }
        }
    }

    /// The checks that span an instance's branches, run after a commit (see the module doc):
    /// release its barrier joins if no branch is live, and complete it if nothing is left.
    async fn settle(&self, instance_id: i64, complete: bool, now: Micros) -> StoreResult<()> {
        let client = self.client().await?;
        let release = client
            .prepare_cached(
                "UPDATE tasks SET status = 'ready', due_at = $2
                 WHERE instance_id = $1 AND status = 'waiting'
                   AND NOT EXISTS (SELECT 1 FROM tasks WHERE instance_id = $1 AND status = 'ready')",
            )
            .await
            .map_err(pg)?;
        if client
            .execute(&release, &[&instance_id, &now])
            .await
            .map_err(pg)?
            > 0
        {
            client
                .execute("SELECT pg_notify('phasm', '')", &[])
                .await
                .map_err(pg)?;
            self.changes.notify_waiters();
        }
        if complete {
            let done = client
                .prepare_cached(
                    "UPDATE instances SET status = 'completed', updated_at = $2, ended_at = $2
                     WHERE id = $1 AND status = 'running'
                       AND NOT EXISTS (SELECT 1 FROM tasks WHERE instance_id = $1)
                       AND NOT EXISTS (SELECT 1 FROM items WHERE instance_id = $1)",
                )
                .await
                .map_err(pg)?;
            client
                .execute(&done, &[&instance_id, &now])
                .await
                .map_err(pg)?;
        }
        Ok(())
    }
}

/// Keep a connection that LISTENs for `phasm` notifications, reconnecting when it drops.
async fn listen(config: tokio_postgres::Config, changes: Arc<Notify>) {
    let mut failures = 0u32;
    loop {
        match config.connect(NoTls).await {
            Ok((client, mut connection)) => {
                let mut messages =
                    futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
                let listening = async {
                    client.batch_execute("LISTEN phasm").await?;
                    Ok::<_, tokio_postgres::Error>(())
                };
                // The connection must be driven while LISTEN runs.
                let (listen_result, first) = tokio::join!(listening, messages.next());
                if let Err(e) = listen_result {
                    tracing::warn!(error = %e, "LISTEN failed");
                } else {
                    failures = 0;
                    if matches!(first, Some(Ok(AsyncMessage::Notification(_)))) {
                        changes.notify_waiters();
                    }
                    while let Some(message) = messages.next().await {
                        match message {
                            Ok(AsyncMessage::Notification(_)) => changes.notify_waiters(),
                            Ok(_) => {}
                            Err(e) => {
                                tracing::warn!(error = %e, "the notification connection failed");
                                break;
                            }
                        }
                    }
                }
                drop(client);
            }
            Err(e) => {
                failures += 1;
                if failures == 1 || failures % 10 == 0 {
                    tracing::warn!(error = %e, "cannot connect to PostgreSQL to listen for work; retrying");
                }
            }
        }
        // Whatever was missed while disconnected: let idle workers look.
        changes.notify_waiters();
        tokio::time::sleep(Duration::from_millis(
            200u64.saturating_mul(1 << failures.min(5)),
        ))
        .await;
    }
}

fn task_row(row: &Row, now: Micros) -> StoreResult<(Task, i64, Option<String>)> {
    let kind: String = row.get("kind");
    let token: Option<String> = row.get("token");
    let task = Task {
        id: row.get("id"),
        claim: row.get("claim"),
        instance: row.get("instance"),
        machine: row.get("machine"),
        name: row.get("name"),
        from_state: row.get("from_state"),
        event: row.get("event"),
        kind: TaskKind::parse(&kind)
            .ok_or_else(|| StoreError::Corrupt(format!("task kind `{kind}`")))?,
        context: from_json(row.get("context"))?,
        step: row.get::<_, i64>("step").max(0) as u64,
        branch: row.get("branch"),
        attempt: row.get::<_, i64>("attempts").clamp(0, i64::from(u32::MAX)) as u32,
        first_attempt_at: row.get::<_, Option<i64>>("first_attempt_at").unwrap_or(now),
        queue: row.get("queue"),
        token: token
            .map(|t| serde_json::from_str(&t))
            .transpose()
            .map_err(|e| StoreError::Corrupt(format!("bad token: {e}")))?,
        contexts: Vec::new(),
        next_page_queued: row.get("page_queued"),
    };
    Ok((task, row.get("instance_id"), row.get("grp")))
}

async fn insert_task(
    tx: &Transaction<'_>,
    instance_id: i64,
    t: &NewTask,
    now: Micros,
    lease: Option<(&str, Micros)>,
) -> StoreResult<Option<i64>> {
    let (owner, due_at, claim, attempts, first) = match lease {
        Some((owner, until)) => (Some(owner), until, 1i64, 1i64, Some(now)),
        None => (None, t.due_at, 0, 0, None),
    };
    let token = t.token.as_ref().map(ToString::to_string);
    let row = tx
        .query_opt(
            "INSERT INTO tasks (instance_id, name, kind, from_state, event, context, step, branch,
                                queue, target, status, due_at, created_at, lease_owner, claim,
                                attempts, first_attempt_at, token)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, 'ready', $11, $12, $13, $14, $15, $16, $17)
             ON CONFLICT (instance_id, name) DO NOTHING
             RETURNING id",
            &[
                &instance_id,
                &t.name,
                &t.kind.as_str(),
                &t.from_state,
                &t.event,
                &to_json(&t.context)?,
                &(t.step as i64),
                &t.branch,
                &t.queue,
                &t.target,
                &due_at,
                &now,
                &owner,
                &claim,
                &attempts,
                &first,
                &token,
            ],
        )
        .await
        .map_err(pg)?;
    Ok(row.map(|r| r.get(0)))
}

/// How many more steps each limited queue may start now, across every worker: its
/// `max_concurrent` minus the steps running anywhere, and the tokens its `rate` bucket holds.
/// Claimers of one limited queue take turns (an advisory lock per queue), so two workers
/// cannot both take the last slot.
async fn shared_allowance(
    tx: &Transaction<'_>,
    now: Micros,
    limits: &[(String, crate::machine::QueueLimits)],
) -> StoreResult<Vec<(String, usize)>> {
    let mut allowance = Vec::new();
    for (queue, l) in limits {
        if l.max_concurrent.is_none() && l.rate.is_none() {
            continue;
        }
        tx.execute(
            "SELECT pg_advisory_xact_lock(hashtext('phasm-queue:' || $1))",
            &[queue],
        )
        .await
        .map_err(pg)?;
        let mut allowed = usize::MAX;
        if let Some(max) = l.max_concurrent {
            let running: i64 = tx
                .query_one(
                    "SELECT COUNT(*) FROM tasks
                     WHERE queue = $1 AND lease_owner IS NOT NULL AND status = 'ready' AND due_at > $2",
                    &[queue, &now],
                )
                .await
                .map_err(pg)?
                .get(0);
            allowed = allowed.min((i64::from(max) - running).max(0) as usize);
        }
        if let Some(rate) = l.rate {
            let capacity = f64::from(rate.count);
            let per_micro = capacity / micros(rate.per).max(1) as f64;
            let row = tx
                .query_one(
                    "INSERT INTO queue_rates (queue, tokens, updated_at)
                     VALUES ($1, $2::DOUBLE PRECISION, $3::BIGINT)
                     ON CONFLICT (queue) DO UPDATE
                       SET tokens = LEAST($2::DOUBLE PRECISION,
                             queue_rates.tokens + ($3::BIGINT - queue_rates.updated_at) * $4::DOUBLE PRECISION),
                           updated_at = $3::BIGINT
                     RETURNING tokens",
                    &[queue, &capacity, &now, &per_micro],
                )
                .await
                .map_err(pg)?;
            let tokens: f64 = row.get(0);
            allowed = allowed.min(tokens.floor().max(0.0) as usize);
        }
        allowance.push((queue.clone(), allowed));
    }
    Ok(allowance)
}

/// Insert many unleased tasks in one statement (a step that forks thousands of branches
/// would otherwise pay a round trip per branch).
async fn insert_tasks(
    tx: &Transaction<'_>,
    instance_id: i64,
    tasks: &[&NewTask],
    now: Micros,
) -> StoreResult<()> {
    let mut names = Vec::with_capacity(tasks.len());
    let mut kinds = Vec::with_capacity(tasks.len());
    let mut froms = Vec::with_capacity(tasks.len());
    let mut events = Vec::with_capacity(tasks.len());
    let mut contexts = Vec::with_capacity(tasks.len());
    let mut steps = Vec::with_capacity(tasks.len());
    let mut branches = Vec::with_capacity(tasks.len());
    let mut queues = Vec::with_capacity(tasks.len());
    let mut targets = Vec::with_capacity(tasks.len());
    let mut dues = Vec::with_capacity(tasks.len());
    let mut tokens = Vec::with_capacity(tasks.len());
    for t in tasks {
        names.push(t.name.clone());
        kinds.push(t.kind.as_str().to_string());
        froms.push(t.from_state.clone());
        events.push(t.event.clone());
        contexts.push(to_json(&t.context)?);
        steps.push(t.step as i64);
        branches.push(t.branch.clone());
        queues.push(t.queue.clone());
        targets.push(t.target.clone());
        dues.push(t.due_at);
        tokens.push(t.token.as_ref().map(ToString::to_string));
    }
    tx.execute(
        "INSERT INTO tasks (instance_id, name, kind, from_state, event, context, step, branch, queue,
                            target, status, due_at, created_at, token)
         SELECT $1, n, k, f, e, c, s, b, q, t, 'ready', d, $13, tok
         FROM UNNEST($2::TEXT[], $3::TEXT[], $4::TEXT[], $5::TEXT[], $6::TEXT[], $7::BIGINT[],
                     $8::TEXT[], $9::TEXT[], $10::TEXT[], $11::BIGINT[], $12::TEXT[])
              AS u (n, k, f, e, c, s, b, q, t, d, tok)
         ON CONFLICT (instance_id, name) DO NOTHING",
        &[
            &instance_id,
            &names,
            &kinds,
            &froms,
            &events,
            &contexts,
            &steps,
            &branches,
            &queues,
            &targets,
            &dues,
            &tokens,
            &now,
        ],
    )
    .await
    .map_err(pg)?;
    Ok(())
}

async fn join_items(
    tx: &Transaction<'_>,
    task: &Task,
    instance_id: i64,
    grp: &str,
) -> StoreResult<Vec<Context>> {
    let state = task.from_state.as_deref().unwrap_or_default();
    tx.execute(
        "UPDATE items SET join_task = $1
         WHERE instance_id = $2 AND state = $3 AND grp = $4 AND (join_task IS NULL OR join_task = $1)",
        &[&task.id, &instance_id, &state, &grp],
    )
    .await
    .map_err(pg)?;
    let rows = tx
        .query(
            "SELECT context FROM items WHERE join_task = $1 ORDER BY id",
            &[&task.id],
        )
        .await
        .map_err(pg)?;
    rows.iter().map(|r| from_json(r.get(0))).collect()
}

async fn park(
    tx: &Transaction<'_>,
    instance_id: i64,
    instance: &str,
    p: &Parked,
    now: Micros,
) -> StoreResult<bool> {
    let item: i64 = tx
        .query_one(
            "INSERT INTO items (instance_id, state, grp, context, branch, step, created_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id",
            &[
                &instance_id,
                &p.state,
                &p.group,
                &to_json(&p.context)?,
                &p.branch,
                &(p.step as i64),
                &now,
            ],
        )
        .await
        .map_err(pg)?
        .get(0);
    // A join not yet started takes this branch when it is claimed. For a window, lock it
    // while looking: a claim of it running now either finishes first (then it is started,
    // taking only the branches committed before it, and this branch gets a join of its own)
    // or waits for this commit (then it takes this branch too); a plain read could see the
    // join unstarted while a concurrent claim starts it without this branch, which nothing
    // would then join. A barrier join needs no lock: it starts only once no step of the
    // instance is live, and this parking step is live until this commit.
    let lock = if p.window.is_some() { "FOR UPDATE" } else { "" };
    let pending = !tx
        .query(
            &format!(
                "SELECT id FROM tasks
                 WHERE instance_id = $1 AND kind = 'join' AND from_state = $2 AND grp = $3
                   AND status IN ('ready', 'waiting') AND lease_owner IS NULL
                 {lock}"
            ),
            &[&instance_id, &p.state, &p.group],
        )
        .await
        .map_err(pg)?
        .is_empty();
    if pending {
        return Ok(false);
    }
    let (status, due_at, suffix) = match p.window {
        Some(window) => ("ready", now + window, "window"),
        None => ("waiting", now, "all"),
    };
    tx.execute(
        "INSERT INTO tasks (instance_id, name, kind, from_state, event, context, step, branch,
                            queue, target, status, due_at, created_at, grp)
         VALUES ($1, $2, 'join', $3, 'fan-in', '{}', $4, '', $5, $6, $7, $8, $9, $10)
         ON CONFLICT (instance_id, name) DO NOTHING",
        &[
            &instance_id,
            &format!(
                "{instance}--{}--fan-in--{}--{suffix}-{item}",
                p.state, p.group
            ),
            &p.state,
            &(p.step as i64),
            &p.queue,
            &p.target,
            &status,
            &due_at,
            &now,
            &p.group,
        ],
    )
    .await
    .map_err(pg)?;
    Ok(false)
}

impl Outcome {
    /// A commit refused by its fence: nothing happened.
    fn fenced() -> Self {
        Outcome {
            result: AppliedCommit {
                applied: Applied::Fenced,
                claimed: Vec::new(),
            },
            instance_id: None,
            settle: false,
            complete: false,
            notify: false,
        }
    }
}

/// Removes an instance from the ones being settled when dropped.
struct SettlingGuard<'a> {
    map: &'a std::sync::Mutex<std::collections::HashMap<i64, (bool, bool)>>,
    instance_id: i64,
}

impl Drop for SettlingGuard<'_> {
    fn drop(&mut self) {
        self.map
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&self.instance_id);
    }
}

/// What one commit did, for the follow-ups outside its transaction.
struct Outcome {
    result: AppliedCommit,
    instance_id: Option<i64>,
    /// A branch stopped being live (parked or ended): barrier joins may be released.
    settle: bool,
    /// A branch ended: the instance may be complete.
    complete: bool,
    notify: bool,
}

/// Whether a commit has the common shape of a chain step (finish the task, record at most one
/// transition, queue at most one task, maybe end the branch), which [`apply_simple`] commits
/// in one statement — one round trip instead of one per row.
fn is_simple(c: &Commit) -> bool {
    c.disposition == Disposition::Finished
        && c.new_tasks.len() <= 1
        && c.history.len() <= 1
        && c.parked.is_empty()
        && c.spawns.is_empty()
        && c.logs.is_empty()
        && matches!(
            c.instance_change,
            InstanceChange::None | InstanceChange::BranchEnded(_)
        )
}

const SIMPLE_COMMIT: &str = "
WITH fenced AS (
    DELETE FROM tasks WHERE id = $1 AND claim = $2 AND status = 'ready' AND due_at > $3
    RETURNING instance_id
), joined AS (
    DELETE FROM items WHERE join_task = $1 AND EXISTS (SELECT 1 FROM fenced)
), hist AS (
    INSERT INTO history (instance_id, from_state, event, to_state, attempt, started_at,
                         finished_at, task, branch, ends_branch)
    SELECT instance_id, $4, $5, $6, $7, $8, $9, $10, $11, $12 FROM fenced WHERE $13
), next AS (
    INSERT INTO tasks (instance_id, name, kind, from_state, event, context, step, branch, queue,
                       target, status, due_at, created_at, lease_owner, claim, attempts,
                       first_attempt_at, token)
    SELECT instance_id, $14, $15, $16, $17, $18, $19, $20, $21, $22, 'ready', $23, $3, $24, $25,
           $26, $27, $28
    FROM fenced WHERE $29
    ON CONFLICT (instance_id, name) DO NOTHING
    RETURNING id
), ended AS (
    UPDATE instances SET result = $30
    WHERE $31 AND id = (SELECT instance_id FROM fenced) AND status = 'running'
), notified AS (
    SELECT pg_notify('phasm', '') WHERE $32 AND EXISTS (SELECT 1 FROM next)
)
SELECT (SELECT instance_id FROM fenced), (SELECT id FROM next), (SELECT COUNT(*) FROM notified)";

/// Commit a simple step (see [`is_simple`]) in one statement.
async fn apply_simple(
    client: &Object,
    now: Micros,
    c: &Commit,
    successors: Option<&SuccessorClaim>,
) -> StoreResult<Outcome> {
    let h = c.history.first();
    let t = c.new_tasks.first();
    let lease = t.and_then(|t| {
        successors
            .filter(|s| {
                t.due_at <= now && s.max > 0 && s.takes(&t.queue, &c.machine, t.target.as_deref())
            })
            .map(|s| (s.owner.clone(), now + micros(s.lease)))
    });
    let (owner, due_at, claim, attempts, first) = match (&lease, t) {
        (Some((owner, until)), _) => (Some(owner.clone()), *until, 1i64, 1i64, Some(now)),
        (None, Some(t)) => (None, t.due_at, 0, 0, None),
        (None, None) => (None, 0, 0, 0, None),
    };
    let result = match &c.instance_change {
        InstanceChange::BranchEnded(context) => Some(to_json(context)?),
        _ => None,
    };
    let empty = String::new();
    let task_context = match t {
        Some(t) => to_json(&t.context)?,
        None => String::new(),
    };
    let token = t.and_then(|t| t.token.as_ref().map(ToString::to_string));
    let statement = client.prepare_cached(SIMPLE_COMMIT).await.map_err(pg)?;
    let row = client
        .query_one(
            &statement,
            &[
                &c.task_id,
                &c.claim,
                &now,
                &h.and_then(|h| h.from.clone()),
                h.map_or(&empty, |h| &h.event),
                h.map_or(&empty, |h| &h.to),
                &h.map_or(0, |h| i64::from(h.attempt)),
                &h.map_or(0, |h| h.started_at),
                &h.map_or(0, |h| h.finished_at),
                h.map_or(&empty, |h| &h.task),
                h.map_or(&empty, |h| &h.branch),
                &h.is_some_and(|h| h.ends_branch),
                &h.is_some(),
                t.map_or(&empty, |t| &t.name),
                &t.map_or("", |t| t.kind.as_str()),
                &t.and_then(|t| t.from_state.clone()),
                t.map_or(&empty, |t| &t.event),
                &task_context,
                &t.map_or(0, |t| t.step as i64),
                t.map_or(&empty, |t| &t.branch),
                t.map_or(&empty, |t| &t.queue),
                &t.and_then(|t| t.target.clone()),
                &due_at,
                &owner,
                &claim,
                &attempts,
                &first,
                &token,
                &t.is_some(),
                &result,
                &result.is_some(),
                &lease.is_none(),
            ],
        )
        .await
        .map_err(pg)?;
    let instance_id: Option<i64> = row.get(0);
    let Some(instance_id) = instance_id else {
        return Ok(Outcome::fenced());
    };
    let inserted: Option<i64> = row.get(1);
    let mut claimed = Vec::new();
    if let (Some(id), Some(t), Some(_)) = (inserted, t, &lease) {
        claimed.push(t.claimed(id, &c.instance, &c.machine, now));
    }
    Ok(Outcome {
        result: AppliedCommit {
            applied: Applied::Yes,
            claimed,
        },
        instance_id: Some(instance_id),
        // A branch ended, or the finished task had no successor (a window join left with
        // nothing to join): either may leave no branch live, releasing barrier joins.
        settle: result.is_some() || t.is_none(),
        complete: result.is_some(),
        notify: inserted.is_some() && lease.is_none(),
    })
}

/// A branch's step that ends in a fan-in state: finish the task, record the arrival, park
/// the context, and make sure a join will take it — one statement.
const PARK_COMMIT_TEMPLATE: &str = "
WITH fenced AS (
    DELETE FROM tasks WHERE id = $1 AND claim = $2 AND status = 'ready' AND due_at > $3
    RETURNING instance_id
), hist AS (
    INSERT INTO history (instance_id, from_state, event, to_state, attempt, started_at,
                         finished_at, task, branch, ends_branch)
    SELECT instance_id, $4, $5, $6, $7, $8, $9, $10, $11, FALSE FROM fenced
), item AS (
    INSERT INTO items (instance_id, state, grp, context, branch, step, created_at)
    SELECT instance_id, $12, $13, $14, $15, $16, $3 FROM fenced
    RETURNING id, instance_id
), pending AS (
    -- A join not yet started (for a window, locked while looking: see `park`).
    SELECT t.id FROM tasks t
    WHERE t.instance_id = (SELECT instance_id FROM fenced) AND t.kind = 'join'
      AND t.from_state = $12 AND t.grp = $13 AND t.status IN ('ready', 'waiting')
      AND t.lease_owner IS NULL
    {LOCK}
), joiner AS (
    INSERT INTO tasks (instance_id, name, kind, from_state, event, context, step, branch, queue,
                       target, status, due_at, created_at, grp)
    SELECT item.instance_id, $17 || item.id, 'join', $12, 'fan-in', '{}', $16, '', $18, $19, $20,
           $21, $3, $13
    FROM item
    WHERE NOT EXISTS (SELECT 1 FROM pending)
    ON CONFLICT (instance_id, name) DO NOTHING
    RETURNING id
), notified AS (
    SELECT pg_notify('phasm', '') WHERE $22 AND EXISTS (SELECT 1 FROM joiner)
)
SELECT (SELECT instance_id FROM fenced), (SELECT COUNT(*) FROM notified)";

fn is_simple_park(c: &Commit) -> bool {
    c.disposition == Disposition::Finished
        && c.new_tasks.is_empty()
        && c.history.len() == 1
        && c.parked.len() == 1
        && c.spawns.is_empty()
        && c.logs.is_empty()
        && c.instance_change == InstanceChange::None
}

/// [`PARK_COMMIT_TEMPLATE`] for a window fan-in: the pending join is locked while looking.
static PARK_COMMIT_WINDOW: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| PARK_COMMIT_TEMPLATE.replace("{LOCK}", "FOR UPDATE OF t"));

/// [`PARK_COMMIT_TEMPLATE`] for a barrier (`fan_in: all`): no lock, since a barrier join
/// cannot start while the parking step is live (see `park`).
static PARK_COMMIT_BARRIER: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| PARK_COMMIT_TEMPLATE.replace("{LOCK}", ""));

async fn apply_park(client: &Object, now: Micros, c: &Commit) -> StoreResult<Outcome> {
    let (Some(h), Some(p)) = (c.history.first(), c.parked.first()) else {
        return Err(StoreError::database("not a parking commit"));
    };
    let (status, due_at, suffix) = match p.window {
        Some(window) => ("ready", now + window, "window"),
        None => ("waiting", now, "all"),
    };
    let prefix = format!(
        "{}--{}--fan-in--{}--{suffix}-",
        c.instance, p.state, p.group
    );
    let sql = if p.window.is_some() {
        &*PARK_COMMIT_WINDOW
    } else {
        &*PARK_COMMIT_BARRIER
    };
    let statement = client.prepare_cached(sql).await.map_err(pg)?;
    let row = client
        .query_one(
            &statement,
            &[
                &c.task_id,
                &c.claim,
                &now,
                &h.from,
                &h.event,
                &h.to,
                &i64::from(h.attempt),
                &h.started_at,
                &h.finished_at,
                &h.task,
                &h.branch,
                &p.state,
                &p.group,
                &to_json(&p.context)?,
                &p.branch,
                &(p.step as i64),
                &prefix,
                &p.queue,
                &p.target,
                &status,
                &due_at,
                &p.window.is_some(),
            ],
        )
        .await
        .map_err(pg)?;
    let instance_id: Option<i64> = row.get(0);
    let notified: i64 = row.get(1);
    Ok(Outcome {
        result: AppliedCommit {
            applied: if instance_id.is_some() {
                Applied::Yes
            } else {
                Applied::Fenced
            },
            claimed: Vec::new(),
        },
        settle: instance_id.is_some(),
        complete: false,
        instance_id,
        notify: notified > 0,
    })
}

async fn apply_one(
    client: &mut Object,
    now: Micros,
    c: &Commit,
    successors: Option<&SuccessorClaim>,
) -> StoreResult<Outcome> {
    if is_simple(c) {
        return apply_simple(client, now, c, successors).await;
    }
    if is_simple_park(c) {
        return apply_park(client, now, c).await;
    }
    let tx = begin(client).await?;
    let fence = "AND claim = $2 AND status = 'ready' AND due_at > $3 RETURNING instance_id, kind";
    let found = match &c.disposition {
        Disposition::Finished => {
            tx.query_opt(&format!("DELETE FROM tasks WHERE id = $1 {fence}"), &[&c.task_id, &c.claim, &now])
                .await
        }
        Disposition::Keep => {
            tx.query_opt(
                &format!("UPDATE tasks SET page_queued = TRUE WHERE id = $1 {fence}"),
                &[&c.task_id, &c.claim, &now],
            )
            .await
        }
        Disposition::Retry { due_at, error } => {
            tx.query_opt(
                &format!("UPDATE tasks SET due_at = $4, lease_owner = NULL, last_error = $5 WHERE id = $1 {fence}"),
                &[&c.task_id, &c.claim, &now, due_at, error],
            )
            .await
        }
        Disposition::Failed { error } => {
            tx.query_opt(
                &format!(
                    "UPDATE tasks SET status = 'failed', due_at = $3, lease_owner = NULL, last_error = $4
                     WHERE id = $1 {fence}"
                ),
                &[&c.task_id, &c.claim, &now, error],
            )
            .await
        }
        // The claim did not count: take back the attempt it added.
        Disposition::Postpone { due_at, reason } => {
            tx.query_opt(
                &format!(
                    "UPDATE tasks SET due_at = $4, lease_owner = NULL, last_error = $5,
                            attempts = GREATEST(attempts - 1, 0),
                            first_attempt_at = CASE WHEN attempts <= 1 THEN NULL ELSE first_attempt_at END
                     WHERE id = $1 {fence}"
                ),
                &[&c.task_id, &c.claim, &now, due_at, reason],
            )
            .await
        }
    }
    .map_err(pg)?;
    let Some(row) = found else {
        return Ok(Outcome::fenced());
    };
    let instance_id: i64 = row.get(0);
    let kind: String = row.get(1);
    if kind == TaskKind::Join.as_str() && c.disposition == Disposition::Finished {
        tx.execute("DELETE FROM items WHERE join_task = $1", &[&c.task_id])
            .await
            .map_err(pg)?;
    }
    let mut claimed = Vec::new();
    let mut notify = !matches!(c.disposition, Disposition::Finished | Disposition::Keep);
    let mut bulk = Vec::new();
    for t in &c.new_tasks {
        let lease = successors.filter(|s| {
            t.due_at <= now
                && claimed.len() < s.max
                && s.takes(&t.queue, &c.machine, t.target.as_deref())
        });
        let Some(s) = lease else {
            bulk.push(t);
            continue;
        };
        let until = Some((s.owner.as_str(), now + micros(s.lease)));
        if let Some(id) = insert_task(&tx, instance_id, t, now, until).await? {
            claimed.push(t.claimed(id, &c.instance, &c.machine, now));
        }
    }
    if !bulk.is_empty() {
        notify = true;
        insert_tasks(&tx, instance_id, &bulk, now).await?;
    }
    for h in &c.history {
        tx.execute(
            "INSERT INTO history (instance_id, from_state, event, to_state, attempt, started_at,
                                  finished_at, task, branch, ends_branch)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
            &[
                &instance_id,
                &h.from,
                &h.event,
                &h.to,
                &i64::from(h.attempt),
                &h.started_at,
                &h.finished_at,
                &h.task,
                &h.branch,
                &h.ends_branch,
            ],
        )
        .await
        .map_err(pg)?;
    }
    for p in &c.parked {
        park(&tx, instance_id, &c.instance, p, now).await?;
        notify |= p.window.is_some();
    }
    for child in &c.spawns {
        let inserted = tx
            .query_opt(
                "INSERT INTO instances (name, machine, status, context, parent, created_at, updated_at)
                 VALUES ($1, $2, 'running', $3, $4, $5, $5)
                 ON CONFLICT (name) DO NOTHING RETURNING id",
                &[&child.name, &child.machine, &to_json(&child.context)?, &c.instance, &now],
            )
            .await
            .map_err(pg)?;
        if let Some(row) = inserted {
            insert_task(&tx, row.get(0), &child.start, now, None).await?;
            notify = true;
        }
    }
    for l in &c.logs {
        tx.execute(
            "INSERT INTO logs (instance_id, at, level, message, task) VALUES ($1, $2, $3, $4, $5)",
            &[&instance_id, &l.at, &l.level, &l.message, &l.task],
        )
        .await
        .map_err(pg)?;
    }
    // A branch parked, or the finished task had no successor: either may leave no branch
    // live, releasing barrier joins (as SQLite checks after every commit).
    let mut settle =
        !c.parked.is_empty() || (c.disposition == Disposition::Finished && c.new_tasks.is_empty());
    let mut complete = false;
    match &c.instance_change {
        InstanceChange::None => {}
        InstanceChange::BranchEnded(context) => {
            tx.execute(
                "UPDATE instances SET result = $2 WHERE id = $1 AND status = 'running'",
                &[&instance_id, &to_json(context)?],
            )
            .await
            .map_err(pg)?;
            settle = true;
            complete = true;
        }
        InstanceChange::Halt(reason) => {
            tx.execute("DELETE FROM tasks WHERE instance_id = $1", &[&instance_id])
                .await
                .map_err(pg)?;
            tx.execute("DELETE FROM items WHERE instance_id = $1", &[&instance_id])
                .await
                .map_err(pg)?;
            end_instance(&tx, instance_id, InstanceStatus::Halted, Some(reason), now).await?;
        }
        InstanceChange::Fail(error) => {
            tx.execute(
                "UPDATE tasks SET status = 'held', lease_owner = NULL WHERE instance_id = $1 AND status = 'ready'",
                &[&instance_id],
            )
            .await
            .map_err(pg)?;
            end_instance(&tx, instance_id, InstanceStatus::Failed, Some(error), now).await?;
        }
    }
    if notify {
        tx.execute("SELECT pg_notify('phasm', '')", &[])
            .await
            .map_err(pg)?;
    }
    tx.commit().await.map_err(pg)?;
    Ok(Outcome {
        result: AppliedCommit {
            applied: Applied::Yes,
            claimed,
        },
        instance_id: Some(instance_id),
        settle,
        complete,
        notify,
    })
}

async fn end_instance(
    tx: &Transaction<'_>,
    id: i64,
    status: InstanceStatus,
    error: Option<&String>,
    now: Micros,
) -> StoreResult<()> {
    tx.execute(
        "UPDATE instances SET status = $2, error = $3, updated_at = $4, ended_at = $4 WHERE id = $1",
        &[&id, &status.as_str(), &error, &now],
    )
    .await
    .map_err(pg)?;
    Ok(())
}

#[async_trait]
impl Store for PostgresStore {
    async fn start(&self, now: Micros, new: NewInstance) -> StoreResult<Started> {
        let mut client = self.client().await?;
        let tx = begin(&mut client).await?;
        let inserted = tx
            .query_opt(
                "INSERT INTO instances (name, machine, status, context, created_at, updated_at)
                 VALUES ($1, $2, 'running', $3, $4, $4)
                 ON CONFLICT (name) DO NOTHING RETURNING id",
                &[&new.name, &new.machine, &to_json(&new.context)?, &now],
            )
            .await
            .map_err(pg)?;
        let Some(row) = inserted else {
            let existing = tx
                .query_one(
                    "SELECT machine, status FROM instances WHERE name = $1",
                    &[&new.name],
                )
                .await
                .map_err(pg)?;
            return Ok(Started::Existing {
                machine: existing.get(0),
                status: parse_status(existing.get(1))?,
            });
        };
        insert_task(&tx, row.get(0), &new.start, now, None).await?;
        tx.execute("SELECT pg_notify('phasm', '')", &[])
            .await
            .map_err(pg)?;
        tx.commit().await.map_err(pg)?;
        self.changes.notify_waiters();
        Ok(Started::Created)
    }

    async fn claim(&self, now: Micros, req: &ClaimRequest) -> StoreResult<Vec<Task>> {
        if req.limit == 0 {
            return Ok(Vec::new());
        }
        let mut client = self.client().await?;
        let tx = begin(&mut client).await?;
        let window = (req.limit * 2).max(16) as i64;
        let (any_target, untargeted, only_targets) = match &req.targets {
            super::Targets::Any => (true, false, Vec::new()),
            super::Targets::Untargeted => (false, true, Vec::new()),
            super::Targets::Only(names) => (false, false, names.clone()),
        };
        let rows = tx
            .query(
                "SELECT t.id, t.claim, t.instance_id, i.name AS instance, i.machine, t.name, t.from_state,
                        t.event, t.kind, t.context, t.step, t.branch, t.attempts, t.first_attempt_at,
                        t.queue, t.token, t.grp, t.page_queued, t.target
                 FROM tasks t JOIN instances i ON i.id = t.instance_id
                 WHERE t.status = 'ready' AND t.due_at <= $1
                   AND ($3 OR ($4 AND t.target IS NULL) OR t.target = ANY($5))
                 ORDER BY t.due_at LIMIT $2
                 FOR UPDATE OF t SKIP LOCKED",
                &[&now, &window, &any_target, &untargeted, &only_targets],
            )
            .await
            .map_err(pg)?;
        let until = now + micros(req.lease);
        let mut per_queue = req.queue_limits.clone();
        let shared = shared_allowance(&tx, now, &req.shared_limits).await?;
        for (queue, allowed) in &shared {
            match per_queue.iter_mut().find(|(q, _)| q == queue) {
                Some((_, left)) => *left = (*left).min(*allowed),
                None => per_queue.push((queue.clone(), *allowed)),
            }
        }
        let mut chosen = Vec::new();
        for row in &rows {
            if chosen.len() >= req.limit {
                break;
            }
            let (task, instance_id, grp) = task_row(row, now)?;
            if req
                .queues
                .as_ref()
                .is_some_and(|only| !only.contains(&task.queue))
            {
                continue;
            }
            if let Some((_, left)) = per_queue.iter_mut().find(|(q, _)| *q == task.queue) {
                if *left == 0 {
                    continue;
                }
                *left -= 1;
            }
            chosen.push((task, instance_id, grp));
        }
        // One statement leases them all.
        let ids: Vec<i64> = chosen.iter().map(|(t, _, _)| t.id).collect();
        if !ids.is_empty() {
            tx.execute(
                "UPDATE tasks SET claim = claim + 1, lease_owner = $2, due_at = $3, attempts = attempts + 1,
                                  first_attempt_at = COALESCE(first_attempt_at, $4)
                 WHERE id = ANY($1)",
                &[&ids, &req.owner, &until, &now],
            )
            .await
            .map_err(pg)?;
        }
        for (queue, limits) in &req.shared_limits {
            if limits.rate.is_some() {
                let taken = chosen.iter().filter(|(t, _, _)| &t.queue == queue).count() as f64;
                if taken > 0.0 {
                    tx.execute(
                        "UPDATE queue_rates SET tokens = GREATEST(tokens - $2, 0) WHERE queue = $1",
                        &[queue, &taken],
                    )
                    .await
                    .map_err(pg)?;
                }
            }
        }
        let mut claimed = Vec::with_capacity(chosen.len());
        for (mut task, instance_id, grp) in chosen {
            task.claim += 1;
            if task.kind == TaskKind::Join {
                task.contexts =
                    join_items(&tx, &task, instance_id, grp.as_deref().unwrap_or_default()).await?;
            }
            claimed.push(task);
        }
        tx.commit().await.map_err(pg)?;
        Ok(claimed)
    }

    async fn renew(
        &self,
        now: Micros,
        leases: &[(i64, i64)],
        until: Micros,
    ) -> StoreResult<Vec<bool>> {
        let client = self.client().await?;
        let mut held = Vec::with_capacity(leases.len());
        for (id, claim) in leases {
            let n = client
                .execute(
                    "UPDATE tasks SET due_at = $3 WHERE id = $1 AND claim = $2 AND status = 'ready' AND due_at > $4",
                    &[id, claim, &until, &now],
                )
                .await
                .map_err(pg)?;
            held.push(n == 1);
        }
        Ok(held)
    }

    async fn apply(
        &self,
        now: Micros,
        commits: Vec<Commit>,
        successors: Option<&SuccessorClaim>,
    ) -> StoreResult<Vec<AppliedCommit>> {
        let mut client = self.client().await?;
        let mut results = Vec::with_capacity(commits.len());
        let mut to_settle = Vec::new();
        let mut notify = false;
        for c in &commits {
            let outcome = apply_one(&mut client, now, c, successors).await?;
            if let (true, Some(id)) = (outcome.settle, outcome.instance_id) {
                to_settle.push((id, outcome.complete));
            }
            notify |= outcome.notify;
            results.push(outcome.result);
        }
        drop(client);
        for (id, complete) in to_settle {
            self.settle_coalesced(id, complete, now).await?;
        }
        if notify {
            self.changes.notify_waiters();
        }
        Ok(results)
    }

    async fn next_due(&self) -> StoreResult<Option<Micros>> {
        let client = self.client().await?;
        let row = client
            .query_one("SELECT MIN(due_at) FROM tasks WHERE status = 'ready'", &[])
            .await
            .map_err(pg)?;
        Ok(row.get(0))
    }

    async fn instance(&self, name: &str) -> StoreResult<Option<InstanceView>> {
        let client = self.client().await?;
        let Some(row) = client
            .query_opt(
                "SELECT id, machine, status, context, error, created_at, updated_at, ended_at, result, parent
                 FROM instances WHERE name = $1",
                &[&name],
            )
            .await
            .map_err(pg)?
        else {
            return Ok(None);
        };
        let id: i64 = row.get(0);
        let history = client
            .query(
                "SELECT from_state, event, to_state, attempt, started_at, finished_at, task, branch, ends_branch
                 FROM (SELECT * FROM history WHERE instance_id = $1 ORDER BY id DESC LIMIT $2) h
                 ORDER BY id",
                &[&id, &(VIEW_ROWS as i64)],
            )
            .await
            .map_err(pg)?
            .iter()
            .map(|r| HistoryEntry {
                from: r.get(0),
                event: r.get(1),
                to: r.get(2),
                attempt: r.get::<_, i64>(3).clamp(0, i64::from(u32::MAX)) as u32,
                started_at: r.get(4),
                finished_at: r.get(5),
                task: r.get(6),
                branch: r.get(7),
                ends_branch: r.get(8),
            })
            .collect();
        let task_rows = client
            .query(
                "SELECT name, from_state, event, status, due_at, lease_owner, attempts, last_error, queue, context, target
                 FROM tasks WHERE instance_id = $1 ORDER BY id LIMIT $2",
                &[&id, &(VIEW_ROWS as i64)],
            )
            .await
            .map_err(pg)?;
        let tasks = task_rows
            .iter()
            .map(|r| {
                Ok(TaskView {
                    name: r.get(0),
                    from: r.get(1),
                    event: r.get(2),
                    status: TaskStatus::parse(r.get(3))?,
                    due_at: r.get(4),
                    leased_by: r.get(5),
                    attempts: r.get::<_, i64>(6).clamp(0, i64::from(u32::MAX)) as u32,
                    last_error: r.get(7),
                    queue: r.get(8),
                    target: r.get(10),
                })
            })
            .collect::<StoreResult<Vec<_>>>()?;
        let result: Option<String> = row.get(8);
        let first_context: Option<String> = task_rows.first().map(|r| r.get(9));
        let current_context = match first_context.or(result) {
            Some(c) => Some(from_json(&c)?),
            None => None,
        };
        let children = client
            .query(
                "SELECT name FROM instances WHERE parent = $1 ORDER BY id",
                &[&name],
            )
            .await
            .map_err(pg)?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let counts = client
            .query_one(
                "SELECT
                   (SELECT COUNT(*) FROM tasks WHERE instance_id = $1 AND status = 'ready'
                      AND (kind <> 'join' OR lease_owner IS NOT NULL)),
                   (SELECT COUNT(*) FROM items WHERE instance_id = $1),
                   (SELECT COUNT(*) FROM history WHERE instance_id = $1 AND ends_branch),
                   (SELECT COUNT(*) FROM tasks WHERE instance_id = $1 AND status = 'failed'),
                   (SELECT COUNT(*) FROM tasks WHERE instance_id = $1 AND status = 'held'),
                   (SELECT COUNT(*) FROM history WHERE instance_id = $1),
                   (SELECT COUNT(*) FROM tasks WHERE instance_id = $1)",
                &[&id],
            )
            .await
            .map_err(pg)?;
        let n = |i: usize| counts.get::<_, i64>(i).max(0) as u64;
        let end_states = client
            .query(
                "SELECT to_state FROM history WHERE instance_id = $1 AND ends_branch
                 GROUP BY to_state ORDER BY MAX(id)",
                &[&id],
            )
            .await
            .map_err(pg)?
            .iter()
            .map(|r| r.get(0))
            .collect();
        Ok(Some(InstanceView {
            name: name.to_string(),
            machine: row.get(1),
            status: parse_status(row.get(2))?,
            context: from_json(row.get(3))?,
            error: row.get(4),
            created_at: row.get(5),
            updated_at: row.get(6),
            ended_at: row.get(7),
            history,
            history_total: n(5),
            tasks,
            tasks_total: n(6),
            end_states,
            current_context,
            parent: row.get(9),
            children,
            branches: BranchCounts {
                live: n(0),
                held: n(4),
                parked: n(1),
                ended: n(2),
                failed: n(3),
            },
        }))
    }

    async fn list(&self, filter: &ListFilter) -> StoreResult<Vec<InstanceSummary>> {
        let client = self.client().await?;
        let limit = if filter.limit == 0 { 100 } else { filter.limit } as i64;
        let status = filter.status.map(InstanceStatus::as_str);
        client
            .query(
                "SELECT name, machine, status, created_at, updated_at, error FROM instances
                 WHERE ($1::TEXT IS NULL OR machine = $1) AND ($2::TEXT IS NULL OR status = $2)
                   AND ($4::TEXT IS NULL OR id < (SELECT id FROM instances WHERE name = $4))
                 ORDER BY id DESC LIMIT $3",
                &[&filter.machine, &status, &limit, &filter.before],
            )
            .await
            .map_err(pg)?
            .iter()
            .map(|r| {
                Ok(InstanceSummary {
                    instance: r.get(0),
                    machine: r.get(1),
                    status: parse_status(r.get(2))?,
                    created_at: r.get(3),
                    updated_at: r.get(4),
                    error: r.get(5),
                })
            })
            .collect()
    }

    async fn logs(&self, name: &str) -> StoreResult<Vec<LogLine>> {
        let client = self.client().await?;
        Ok(client
            .query(
                "SELECT l.at, l.level, l.message, l.task FROM logs l
                 JOIN instances i ON i.id = l.instance_id WHERE i.name = $1 ORDER BY l.id",
                &[&name],
            )
            .await
            .map_err(pg)?
            .iter()
            .map(|r| LogLine {
                at: r.get(0),
                level: r.get(1),
                message: r.get(2),
                task: r.get(3),
            })
            .collect())
    }

    async fn history_page(
        &self,
        name: &str,
        page: PageRequest,
    ) -> StoreResult<Option<Page<HistoryEntry>>> {
        let client = self.client().await?;
        let Some(id) = instance_id(&client, name).await? else {
            return Ok(None);
        };
        let limit = i64::try_from(page.limit).unwrap_or(i64::MAX - 1);
        let rows = client
            .query(
                "SELECT id, from_state, event, to_state, attempt, started_at, finished_at, task, branch, ends_branch
                 FROM history WHERE instance_id = $1 AND id > $2 ORDER BY id LIMIT $3",
                &[&id, &page.after, &(limit + 1)],
            )
            .await
            .map_err(pg)?
            .iter()
            .map(|r| {
                (
                    r.get::<_, i64>(0),
                    HistoryEntry {
                        from: r.get(1),
                        event: r.get(2),
                        to: r.get(3),
                        attempt: r.get::<_, i64>(4).clamp(0, i64::from(u32::MAX)) as u32,
                        started_at: r.get(5),
                        finished_at: r.get(6),
                        task: r.get(7),
                        branch: r.get(8),
                        ends_branch: r.get(9),
                    },
                )
            })
            .collect();
        Ok(Some(Page::from_rows(rows, page.limit)))
    }

    async fn logs_page(&self, name: &str, page: PageRequest) -> StoreResult<Option<Page<LogLine>>> {
        let client = self.client().await?;
        let Some(id) = instance_id(&client, name).await? else {
            return Ok(None);
        };
        let limit = i64::try_from(page.limit).unwrap_or(i64::MAX - 1);
        let cut = i32::try_from(MAX_PAGE_MESSAGE_CHARS).unwrap_or(i32::MAX);
        let rows = client
            .query(
                "SELECT id, at, level, left(message, $4), char_length(message)::BIGINT, task
                 FROM logs WHERE instance_id = $1 AND id > $2 ORDER BY id LIMIT $3",
                &[&id, &page.after, &(limit + 1), &cut],
            )
            .await
            .map_err(pg)?
            .iter()
            .map(|r| {
                (
                    r.get::<_, i64>(0),
                    LogLine {
                        at: r.get(1),
                        level: r.get(2),
                        message: cut_message(r.get(3), r.get(4)),
                        task: r.get(5),
                    },
                )
            })
            .collect();
        Ok(Some(Page::from_rows(rows, page.limit)))
    }

    async fn retry(&self, now: Micros, name: &str) -> StoreResult<Control> {
        let mut client = self.client().await?;
        let tx = begin(&mut client).await?;
        let Some((id, status)) = lock_instance_by_name(&tx, name).await? else {
            return Ok(Control::NotFound);
        };
        if status != InstanceStatus::Failed {
            return Ok(Control::NotAllowed(status));
        }
        tx.execute(
            "UPDATE tasks SET status = 'ready', due_at = $2, attempts = 0, first_attempt_at = NULL,
                              lease_owner = NULL, last_error = NULL
             WHERE instance_id = $1 AND status IN ('failed', 'held')",
            &[&id, &now],
        )
        .await
        .map_err(pg)?;
        tx.execute(
            "INSERT INTO logs (instance_id, at, level, message, task) VALUES ($1, $2, 'info', 'resumed by retry', '')",
            &[&id, &now],
        )
        .await
        .map_err(pg)?;
        tx.execute(
            "UPDATE instances SET status = 'running', error = NULL, updated_at = $2, ended_at = NULL WHERE id = $1",
            &[&id, &now],
        )
        .await
        .map_err(pg)?;
        tx.execute("SELECT pg_notify('phasm', '')", &[])
            .await
            .map_err(pg)?;
        tx.commit().await.map_err(pg)?;
        self.changes.notify_waiters();
        Ok(Control::Done)
    }

    async fn cancel(&self, now: Micros, name: &str) -> StoreResult<Control> {
        let mut client = self.client().await?;
        let tx = begin(&mut client).await?;
        let Some((id, status)) = lock_instance_by_name(&tx, name).await? else {
            return Ok(Control::NotFound);
        };
        if !matches!(status, InstanceStatus::Running | InstanceStatus::Failed) {
            return Ok(Control::NotAllowed(status));
        }
        tx.execute("DELETE FROM tasks WHERE instance_id = $1", &[&id])
            .await
            .map_err(pg)?;
        tx.execute("DELETE FROM items WHERE instance_id = $1", &[&id])
            .await
            .map_err(pg)?;
        end_instance(&tx, id, InstanceStatus::Cancelled, None, now).await?;
        tx.commit().await.map_err(pg)?;
        Ok(Control::Done)
    }

    async fn worker_alive(&self, now: Micros, w: &WorkerView) -> StoreResult<()> {
        let list =
            |v: &[String]| serde_json::to_string(v).map_err(|e| StoreError::Corrupt(e.to_string()));
        let queues = w.queues.as_deref().map(list).transpose()?;
        let client = self.client().await?;
        client
            .execute(
                "INSERT INTO workers (owner, machines, targets, queues, started_at, seen_at, expires_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)
                 ON CONFLICT (owner) DO UPDATE SET machines = excluded.machines,
                     targets = excluded.targets, queues = excluded.queues,
                     seen_at = excluded.seen_at, expires_at = excluded.expires_at",
                &[
                    &w.owner,
                    &list(&w.machines)?,
                    &w.targets.to_column(),
                    &queues,
                    &w.started_at,
                    &w.seen_at,
                    &w.expires_at,
                ],
            )
            .await
            .map_err(pg)?;
        client
            .execute(
                "DELETE FROM workers WHERE expires_at < $1",
                &[&(now - WORKERS_KEPT)],
            )
            .await
            .map_err(pg)?;
        Ok(())
    }

    async fn worker_stopped(&self, owner: &str) -> StoreResult<()> {
        self.client()
            .await?
            .execute("DELETE FROM workers WHERE owner = $1", &[&owner])
            .await
            .map_err(pg)?;
        Ok(())
    }

    async fn workers(&self, now: Micros) -> StoreResult<Vec<WorkerView>> {
        self.client()
            .await?
            .query(
                "SELECT owner, machines, targets, queues, started_at, seen_at, expires_at
                 FROM workers WHERE expires_at > $1 ORDER BY started_at, owner",
                &[&now],
            )
            .await
            .map_err(pg)?
            .iter()
            .map(|r| {
                worker_view(
                    r.get(0),
                    r.get(1),
                    r.get(2),
                    r.get(3),
                    [r.get(4), r.get(5), r.get(6)],
                )
            })
            .collect()
    }

    async fn probe_commit_rate(&self, commits: usize) -> StoreResult<f64> {
        let client = self.client().await?;
        client
            .batch_execute(
                "CREATE TABLE IF NOT EXISTS phasm_probe (id BIGSERIAL PRIMARY KEY, at BIGINT)",
            )
            .await
            .map_err(pg)?;
        let started = Instant::now();
        for i in 0..commits {
            client
                .execute("INSERT INTO phasm_probe (at) VALUES ($1)", &[&(i as i64)])
                .await
                .map_err(pg)?;
        }
        let secs = started.elapsed().as_secs_f64();
        client
            .batch_execute("DROP TABLE phasm_probe")
            .await
            .map_err(pg)?;
        Ok(commits as f64 / secs.max(1e-9))
    }

    async fn stats(&self, now: Micros) -> StoreResult<super::StoreStats> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT queue,
       SUM(CASE WHEN lease_owner IS NULL AND due_at <= $1 THEN 1 ELSE 0 END),
       SUM(CASE WHEN lease_owner IS NULL AND due_at > $1 THEN 1 ELSE 0 END),
       SUM(CASE WHEN lease_owner IS NOT NULL AND due_at > $1 THEN 1 ELSE 0 END),
       MIN(CASE WHEN lease_owner IS NULL AND due_at <= $1 THEN due_at END)
FROM tasks WHERE status = 'ready' GROUP BY queue ORDER BY queue",
                &[&now],
            )
            .await
            .map_err(pg)?;
        let queues = rows
            .iter()
            .map(|r| {
                let oldest: Option<i64> = r.get(4);
                super::QueueStats {
                    queue: r.get(0),
                    due: r.get::<_, i64>(1).max(0) as u64,
                    scheduled: r.get::<_, i64>(2).max(0) as u64,
                    running: r.get::<_, i64>(3).max(0) as u64,
                    oldest_due_age_seconds: oldest.map_or(0.0, |t| (now - t).max(0) as f64 / 1e6),
                }
            })
            .collect();
        let parked: i64 = client
            .query_one("SELECT COUNT(*) FROM items", &[])
            .await
            .map_err(pg)?
            .get(0);
        Ok(super::StoreStats {
            queues,
            parked: parked.max(0) as u64,
        })
    }

    async fn scrub(&self, cutoff: Micros, batch: usize) -> StoreResult<u64> {
        let mut client = self.client().await?;
        let tx = begin(&mut client).await?;
        let ids: Vec<i64> = tx
            .query(
                "SELECT id FROM instances
                 WHERE status <> 'running' AND ended_at IS NOT NULL AND ended_at < $1
                 ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED",
                &[&cutoff, &(batch as i64)],
            )
            .await
            .map_err(pg)?
            .iter()
            .map(|r| r.get(0))
            .collect();
        if ids.is_empty() {
            return Ok(0);
        }
        for table in ["history", "logs", "items", "tasks"] {
            tx.execute(
                &format!("DELETE FROM {table} WHERE instance_id = ANY($1)"),
                &[&ids],
            )
            .await
            .map_err(pg)?;
        }
        tx.execute("DELETE FROM instances WHERE id = ANY($1)", &[&ids])
            .await
            .map_err(pg)?;
        tx.commit().await.map_err(pg)?;
        Ok(ids.len() as u64)
    }

    fn changes(&self) -> Arc<Notify> {
        Arc::clone(&self.changes)
    }

    fn notifies_other_processes(&self) -> bool {
        true
    }

    async fn sweep(&self, now: Micros) -> StoreResult<()> {
        let client = self.client().await?;
        let released = client
            .execute(
                "UPDATE tasks w SET status = 'ready', due_at = $1
                 WHERE w.status = 'waiting'
                   AND NOT EXISTS (SELECT 1 FROM tasks r WHERE r.instance_id = w.instance_id AND r.status = 'ready')",
                &[&now],
            )
            .await
            .map_err(pg)?;
        if released > 0 {
            client
                .execute("SELECT pg_notify('phasm', '')", &[])
                .await
                .map_err(pg)?;
        }
        client
            .execute(
                "UPDATE instances i SET status = 'completed', updated_at = $1, ended_at = $1
                 WHERE i.status = 'running' AND i.result IS NOT NULL
                   AND NOT EXISTS (SELECT 1 FROM tasks WHERE instance_id = i.id)
                   AND NOT EXISTS (SELECT 1 FROM items WHERE instance_id = i.id)",
                &[&now],
            )
            .await
            .map_err(pg)?;
        Ok(())
    }
}

/// An instance's id by name.
async fn instance_id(client: &deadpool_postgres::Object, name: &str) -> StoreResult<Option<i64>> {
    Ok(client
        .query_opt("SELECT id FROM instances WHERE name = $1", &[&name])
        .await
        .map_err(pg)?
        .map(|r| r.get(0)))
}
