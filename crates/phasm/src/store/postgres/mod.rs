//! The shared store: one PostgreSQL database that workers on any number of hosts use at once.
//!
//! Claims take due tasks with `FOR UPDATE SKIP LOCKED`, so workers never wait for each other.
//! Every commit is one transaction, fenced like SQLite's (claim number and unexpired lease).
//! Two checks that span an instance's branches — "is the instance complete?" and "may its
//! barrier joins run?" — run as single statements right *after* the commit that could make
//! them true: whichever of two concurrent commits finishes last then sees both, which a check
//! inside either transaction (under READ COMMITTED) could not. [`WorkStore::sweep`] repeats them
//! now and then in case a worker died between its commit and the check. Idle workers wait for
//! `NOTIFY phasm`, sent by commits that queue work, instead of polling.
//!
//! The modules carry the SQLite store's names, and hold SQL and row mapping only: the
//! algorithms are the store's own, written once. `schema` (migrations), `claim` (the
//! `store::claim::ClaimTx` of the one claim planner), `apply` (starting
//! instances, and the `store::execute::PlanTx` the one executor carries each
//! commit's [`plan`](crate::store::plan) out over — chain steps and parks optionally as one
//! statement each, see [`PostgresOptions::fused_commits`]), `read`, `admin` (retry, cancel,
//! scrub, workers, sweep), `deliver`, `schedule` and `versions`; this file holds the
//! connection pool, the after-commit checks and the `Store` implementation, which hands each
//! call to its module.

mod admin;
mod apply;
mod claim;
mod deliver;
mod read;
mod schedule;
mod schema;
mod versions;

use apply::SettlingGuard;
use schema::{MIGRATIONS, MIGRATION_LOCK, SCHEMA_VERSION};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use crate::store::{AdminStore, ReadStore, WorkStore};
use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod};
use futures_util::StreamExt;
use tokio::sync::Notify;
use tokio_postgres::types::ToSql;
use tokio_postgres::{AsyncMessage, NoTls, Row};

use super::convert::bigint;
use super::{
    AppliedCommit, ClaimRequest, Control, Delivered, Delivery, InstanceStatus, InstanceSummary,
    InstanceView, ListFilter, NewInstance, Page, PageRequest, Started, StoreError, StoreResult,
    SuccessorClaim, WorkerView,
};
use crate::clock::Micros;
use crate::engine::{Commit, LogLine, NewTask, Task};

/// How to open a PostgreSQL store.
#[derive(Debug, Clone)]
pub struct PostgresOptions {
    /// Most connections in the pool (size it a little above the worker's concurrency).
    pub pool_size: usize,
    /// How many times a read or an administrative call (retry, reset, cancel, scrub) that
    /// met a passing failure — a connection the server ended (`57P01` on a restart), a
    /// deadlock — is tried again, after 100 ms, 200 ms, …. A one-shot command (`phasm
    /// status`, `cancel`) wants a few; a worker, which retries its own calls and must notice
    /// an outage at once, none (the default). Writing such a call again is safe: each is one
    /// transaction, and one that did commit answers as done, or as not allowed any more.
    pub transient_retries: u32,
    /// Whether to listen for other processes' work (`LISTEN phasm` on a connection of its
    /// own, waking [`WorkStore::changes`]): what workers and servers need, and a one-shot
    /// command does not.
    pub listen: bool,
    /// Whether chain steps and branches parking at a fan-in commit as one statement each
    /// (the default: one round trip instead of one per row) rather than through the
    /// general transaction every other commit takes. Both leave the same rows (a test checks
    /// it); off is for measuring the difference and for that test.
    pub fused_commits: bool,
}

impl Default for PostgresOptions {
    fn default() -> Self {
        Self {
            pool_size: 16,
            transient_retries: 0,
            listen: true,
            fused_commits: true,
        }
    }
}

/// The PostgreSQL store. Cheap to clone.
#[derive(Clone)]
pub struct PostgresStore {
    pool: Pool,
    changes: Arc<Notify>,
    /// Instances whose settle check is running in this process, and whether another commit
    /// asked for one meanwhile (then it runs again, for the latest of those commits):
    /// thousands of branches parking at once cost a few checks, not thousands, and a check
    /// still starts after every commit.
    settling: Arc<std::sync::Mutex<std::collections::HashMap<i64, Settling>>>,
    /// The task that listens for `NOTIFY phasm` on a connection of its own; stopped (and its
    /// connection closed) when the last clone of the store goes.
    _listener: Arc<StopOnDrop>,
    /// The wait-token key, once read (it never changes).
    wait_key: Arc<super::WaitKeyCache>,
    /// See [`PostgresOptions::transient_retries`].
    transient_retries: u32,
    /// See [`PostgresOptions::fused_commits`].
    fused_commits: bool,
}

/// Aborts a task when dropped.
#[derive(Debug, Default)]
struct StopOnDrop(Option<tokio::task::JoinHandle<()>>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        if let Some(task) = self.0.take() {
            task.abort();
        }
    }
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore").finish_non_exhaustive()
    }
}

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
            let io = e
                .source()
                .is_some_and(<dyn std::error::Error + 'static>::is::<std::io::Error>);
            (e.to_string(), e.is_closed() || io)
        }
    };
    StoreError::driver(message, transient, e)
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
            _listener: Arc::default(),
            wait_key: Arc::default(),
            transient_retries: options.transient_retries,
            fused_commits: options.fused_commits,
        };
        store.again(|| store.migrate()).await?;
        if !options.listen {
            return Ok(store);
        }
        let listener = tokio::spawn(listen(config, Arc::clone(&store.changes)));
        Ok(Self {
            _listener: Arc::new(StopOnDrop(Some(listener))),
            ..store
        })
    }

    /// Run `call`, again after a passing failure, up to [`PostgresOptions::transient_retries`]
    /// times.
    async fn again<T, F, Fut>(&self, call: F) -> StoreResult<T>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = StoreResult<T>>,
    {
        let mut tries = 0;
        loop {
            match call().await {
                Err(e) if e.is_transient() && tries < self.transient_retries => {
                    tries += 1;
                    tracing::debug!(error = %e, "trying again after a passing failure");
                    tokio::time::sleep(std::time::Duration::from_millis(50 << tries)).await;
                }
                other => return other,
            }
        }
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
                &[&(bigint(i) + 1)],
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
            if let Some(asked) = running.get_mut(&instance_id) {
                asked.again = true;
                asked.complete |= complete;
                asked.now = asked.now.max(now);
                return Ok(());
            }
            running.insert(instance_id, Settling::default());
        }
        // Whatever ends this call — a return, or the caller dropping it mid-way — the
        // instance is no longer being settled here (else later commits would wait for a
        // settle that never comes, until the sweep).
        let _settling = SettlingGuard {
            map: &self.settling,
            instance_id,
        };
        let (mut complete, mut now) = (complete, now);
        loop {
            let result = self.settle(instance_id, complete, now).await;
            let mut running = self
                .settling
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            match running.get(&instance_id).copied() {
                Some(asked) if asked.again && result.is_ok() => {
                    running.insert(instance_id, Settling::default());
                    complete = asked.complete;
                    now = now.max(asked.now);
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
                   AND NOT EXISTS (SELECT 1 FROM tasks WHERE instance_id = $1 AND status IN ('ready', 'held', 'failed'))",
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
            // Checked: the note its commits left goes (a later commit's note stays, for its
            // own check).
            let unqueue = client
                .prepare_cached(
                    "DELETE FROM settle_queue WHERE instance_id = $1 AND queued_at <= $2",
                )
                .await
                .map_err(pg)?;
            client
                .execute(&unqueue, &[&instance_id, &now])
                .await
                .map_err(pg)?;
        }
        Ok(())
    }
}

/// A settle check asked for while one for the same instance was running.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Settling {
    /// Run the check again when the running one ends.
    pub(super) again: bool,
    /// Check completion too.
    pub(super) complete: bool,
    /// The latest commit's time.
    pub(super) now: Micros,
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

#[async_trait]
impl WorkStore for PostgresStore {
    async fn start_many(
        &self,
        now: Micros,
        instances: Vec<NewInstance>,
    ) -> StoreResult<Vec<Started>> {
        if self.transient_retries == 0 {
            return apply::start_many(self, now, instances).await;
        }
        self.again(|| apply::start_many(self, now, instances.clone()))
            .await
    }

    async fn claim(&self, now: Micros, req: &ClaimRequest) -> StoreResult<Vec<Task>> {
        claim::claim(self, now, req).await
    }

    async fn renew(
        &self,
        now: Micros,
        leases: &[(i64, i64)],
        until: Micros,
    ) -> StoreResult<Vec<bool>> {
        claim::renew(self, now, leases, until).await
    }

    async fn apply(
        &self,
        now: Micros,
        commit: std::sync::Arc<Commit>,
        successors: Option<&SuccessorClaim>,
    ) -> StoreResult<AppliedCommit> {
        apply::apply(self, now, &Commit::storable_shared(commit), successors).await
    }

    async fn fire_schedule(
        &self,
        now: Micros,
        tick: &super::ScheduleTick,
    ) -> StoreResult<super::Fired> {
        schedule::fire_schedule(self, now, tick).await
    }

    async fn deliver(&self, now: Micros, delivery: &Delivery) -> StoreResult<Delivered> {
        deliver::deliver(self, now, &delivery.storable()).await
    }

    async fn wait_key(&self) -> StoreResult<Vec<u8>> {
        self.wait_key.get(deliver::wait_key(self)).await
    }

    async fn next_due(&self) -> StoreResult<Option<Micros>> {
        read::next_due(self).await
    }

    async fn worker_alive(&self, now: Micros, w: &WorkerView) -> StoreResult<()> {
        admin::worker_alive(self, now, w).await
    }

    async fn worker_stopped(&self, owner: &str) -> StoreResult<()> {
        admin::worker_stopped(self, owner).await
    }

    fn changes(&self) -> Arc<Notify> {
        Arc::clone(&self.changes)
    }

    fn notifies_other_processes(&self) -> bool {
        true
    }

    async fn sweep(&self, now: Micros) -> StoreResult<()> {
        admin::sweep(self, now).await
    }
}

#[async_trait]
impl ReadStore for PostgresStore {
    async fn versions(&self, machine: Option<&str>) -> StoreResult<Vec<super::VersionRecord>> {
        self.again(|| versions::versions(self, machine)).await
    }

    async fn version(
        &self,
        machine: &str,
        version: u32,
    ) -> StoreResult<Option<super::StoredVersion>> {
        self.again(|| versions::version(self, machine, version))
            .await
    }

    async fn version_by_id(&self, id: i64) -> StoreResult<Option<super::StoredVersion>> {
        self.again(|| versions::version_by_id(self, id)).await
    }

    async fn version_counts(
        &self,
        machine: Option<&str>,
    ) -> StoreResult<Vec<super::VersionCounts>> {
        self.again(|| versions::version_counts(self, machine)).await
    }

    async fn instance(&self, name: &str) -> StoreResult<Option<InstanceView>> {
        self.again(|| read::instance(self, name)).await
    }

    async fn status(&self, name: &str) -> StoreResult<Option<InstanceStatus>> {
        self.again(|| read::status(self, name)).await
    }

    async fn children(&self, name: &str) -> StoreResult<Vec<String>> {
        self.again(|| read::children(self, name)).await
    }

    async fn list(&self, filter: &ListFilter) -> StoreResult<Vec<InstanceSummary>> {
        self.again(|| read::list(self, filter)).await
    }

    async fn logs(&self, name: &str) -> StoreResult<Vec<LogLine>> {
        self.again(|| read::logs(self, name)).await
    }

    async fn history_page(
        &self,
        name: &str,
        page: PageRequest,
        branch: Option<&str>,
    ) -> StoreResult<Option<Page<super::HistoryRow>>> {
        self.again(|| read::history_page(self, name, page, branch))
            .await
    }

    async fn step(&self, name: &str, id: i64) -> StoreResult<Option<super::StepDetail>> {
        self.again(|| read::step(self, name, id)).await
    }

    async fn logs_page(&self, name: &str, page: PageRequest) -> StoreResult<Option<Page<LogLine>>> {
        self.again(|| read::logs_page(self, name, page)).await
    }

    async fn schedules(&self) -> StoreResult<Vec<super::ScheduleRecord>> {
        self.again(|| schedule::schedules(self)).await
    }

    async fn machine_overview(
        &self,
        machine: &str,
        hour: Micros,
        day: Micros,
    ) -> StoreResult<super::MachineOverview> {
        self.again(|| read::machine_overview(self, machine, hour, day))
            .await
    }

    async fn workers(&self, now: Micros) -> StoreResult<Vec<WorkerView>> {
        self.again(|| read::workers(self, now)).await
    }

    async fn workers_gone(&self, now: Micros) -> StoreResult<Vec<WorkerView>> {
        self.again(|| read::workers_gone(self, now)).await
    }

    async fn stats(&self, now: Micros) -> StoreResult<super::StoreStats> {
        self.again(|| read::stats(self, now)).await
    }

    async fn recent_steps(&self, since: Micros) -> StoreResult<super::RecentSteps> {
        self.again(|| read::recent_steps(self, since)).await
    }
}

#[async_trait]
impl AdminStore for PostgresStore {
    async fn deploy(
        &self,
        now: Micros,
        versions: &[super::NewVersion],
    ) -> StoreResult<Vec<super::Deployed>> {
        self.again(|| versions::deploy(self, now, versions)).await
    }

    async fn scrub_versions(&self) -> StoreResult<Vec<(String, u32)>> {
        self.again(|| versions::scrub_versions(self)).await
    }

    async fn upgrade(
        &self,
        now: Micros,
        request: &super::UpgradeRequest,
    ) -> StoreResult<super::Upgraded> {
        self.again(|| versions::upgrade(self, now, request)).await
    }

    async fn retry(&self, now: Micros, name: &str) -> StoreResult<Control> {
        self.again(|| admin::retry(self, now, name)).await
    }

    async fn reset(
        &self,
        now: Micros,
        name: &str,
        task: &NewTask,
        note: &str,
    ) -> StoreResult<Control> {
        self.again(|| admin::reset(self, now, name, task, note))
            .await
    }

    async fn cancel_because(
        &self,
        now: Micros,
        name: &str,
        reason: Option<&str>,
    ) -> StoreResult<Control> {
        let reason = reason.map(|r| crate::engine::text::storable(r.to_string()));
        self.again(|| admin::cancel(self, now, name, reason.as_deref()))
            .await
    }

    async fn probe_commit_rate(&self, commits: usize) -> StoreResult<f64> {
        admin::probe_commit_rate(self, commits).await
    }

    async fn scrub(&self, cutoff: Micros, batch: usize) -> StoreResult<u64> {
        self.again(|| admin::scrub(self, cutoff, batch)).await
    }
}
