//! The embedded store: one SQLite file in WAL mode, driven by threads this store owns.
//!
//! Every write travels over a channel to the writer thread, which drains whatever has
//! queued up and runs it all in one transaction (group commit): with `synchronous=FULL` each
//! transaction costs one fsync, so many concurrent steps share one. Replies are sent only
//! after the transaction is durable. Each request runs inside its own savepoint, so one
//! failing request never undoes another's work. Reads go to a read-only connection of their
//! own and never wait behind a batch of commits.
//!
//! The modules hold SQL and row mapping only (the algorithms are the store's own, written
//! once): `schema` (migrations; opening a file, and what is refused before anything is
//! touched), `batch` (the connection threads), `claim` (the
//! `store::claim::ClaimTx` of the one claim planner), `apply` (starting instances,
//! and the `store::execute::PlanTx` the one executor carries each commit's
//! [`plan`](crate::store::plan) out over, settling included, in the batch's transaction),
//! `read`, `admin` (retry, cancel, scrub, workers), `deliver`, `schedule`, `versions` and
//! `watch`.

mod admin;
mod apply;
mod batch;
mod claim;
mod deliver;
mod read;
mod schedule;
mod schema;
mod versions;
mod watch;

use batch::Lane;
use schema::{open_connection, open_reader};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use watch::spawn_watcher;

use crate::store::{AdminStore, ReadStore, WorkStore};
use async_trait::async_trait;
use tokio::sync::{oneshot, Notify};

use super::{
    AppliedCommit, ClaimRequest, Control, Delivered, Delivery, InstanceStatus, InstanceSummary,
    InstanceView, ListFilter, NewInstance, Page, PageRequest, Started, StoreError, StoreResult,
    SuccessorClaim, WorkerView,
};
use crate::clock::Micros;
use crate::engine::{Commit, LogLine, NewTask, Task};

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
    /// Where the statements run.
    pub threads: Threads,
}

/// Where a SQLite store runs its statements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Threads {
    /// On threads of its own: a writer that commits whatever queued up in one transaction
    /// (group commit), and a reader (the default).
    #[default]
    Own,
    /// On the calling thread, one transaction per call, blocking the caller while it runs: no
    /// group commit (slow on a disk), but every call completes without waiting for another
    /// thread, so a single-threaded runtime on a paused clock replays exactly (the
    /// simulation's use). Reads use the writer's connection.
    Caller,
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
    requests: Lane,
    /// Reads go to a connection of their own, so they never wait behind a batch of commits
    /// (the same lane as `requests` for an in-memory database, or on the caller's thread).
    reads: Lane,
    changes: Arc<Notify>,
    /// Commits of other processes wake `changes` too (see `watch`).
    watched: bool,
    path: PathBuf,
    /// The wait-token key, once read (it never changes).
    wait_key: Arc<super::WaitKeyCache>,
}

type Reply<T> = oneshot::Sender<StoreResult<T>>;

enum Request {
    Start(Micros, Vec<NewInstance>, Reply<Vec<Started>>),
    Claim(Micros, ClaimRequest, Reply<Vec<Task>>),
    Renew(Micros, Vec<(i64, i64)>, Micros, Reply<Vec<bool>>),
    /// A commit; the reply says whether it queued work nobody holds yet.
    Apply(
        Micros,
        Arc<Commit>,
        Option<SuccessorClaim>,
        Reply<(AppliedCommit, bool)>,
    ),
    NextDue(Reply<Option<Micros>>),
    Deliver(Micros, Box<Delivery>, Reply<Delivered>),
    WaitKey(Reply<Vec<u8>>),
    FireSchedule(Micros, Box<super::ScheduleTick>, Reply<super::Fired>),
    Schedules(Reply<Vec<super::ScheduleRecord>>),
    MachineOverview(String, Micros, Micros, Reply<super::MachineOverview>),
    Instance(String, Reply<Option<InstanceView>>),
    Status(String, Reply<Option<InstanceStatus>>),
    Children(String, Reply<Vec<String>>),
    List(ListFilter, Reply<Vec<InstanceSummary>>),
    Logs(String, Reply<Vec<LogLine>>),
    HistoryPage(
        String,
        PageRequest,
        Option<String>,
        Reply<Option<Page<super::HistoryRow>>>,
    ),
    Step(String, i64, Reply<Option<super::StepDetail>>),
    LogsPage(String, PageRequest, Reply<Option<Page<LogLine>>>),
    Retry(Micros, String, Reply<Control>),
    Reset(Micros, String, Box<NewTask>, String, Reply<Control>),
    Cancel(Micros, String, Option<String>, Reply<Control>),
    Probe(usize, Reply<f64>),
    Scrub(Micros, usize, Reply<u64>),
    Stats(Micros, Reply<super::StoreStats>),
    RecentSteps(Micros, Reply<super::RecentSteps>),
    WorkerAlive(Micros, Box<WorkerView>, Reply<()>),
    WorkerStopped(String, Reply<()>),
    Workers(Micros, Reply<Vec<WorkerView>>),
    WorkersGone(Micros, Reply<Vec<WorkerView>>),
    Deploy(Micros, Vec<super::NewVersion>, Reply<Vec<super::Deployed>>),
    Versions(Option<String>, Reply<Vec<super::VersionRecord>>),
    Version(String, u32, Reply<Option<super::StoredVersion>>),
    VersionById(i64, Reply<Option<super::StoredVersion>>),
    VersionCounts(Option<String>, Reply<Vec<super::VersionCounts>>),
    Upgrade(Micros, Box<super::UpgradeRequest>, Reply<super::Upgraded>),
    ScrubVersions(Reply<Vec<(String, u32)>>),
}

impl SqliteStore {
    /// Open (creating if needed) the database at `path`, migrate its schema, and start the
    /// writer thread.
    ///
    /// # Errors
    /// When the file cannot be opened, is not a phasm database, or is from a newer phasm.
    pub fn open(path: impl AsRef<Path>, options: &SqliteOptions) -> StoreResult<Self> {
        let path = path.as_ref().to_path_buf();
        let conn = open_connection(&path, options)?;
        let writes = options.access != Access::ReadOnly;
        let changes = Arc::new(Notify::new());
        let requests = Lane::new(
            "phasm-sqlite",
            conn,
            options.threads,
            writes.then(|| Arc::clone(&changes)),
        )?;
        let reader = match options.threads {
            Threads::Own => open_reader(&path),
            Threads::Caller => None,
        };
        let reads = match reader {
            Some(conn) => Lane::new("phasm-sqlite-read", conn, options.threads, None)?,
            None => requests.clone(),
        };
        let watched = options.threads == Threads::Own
            && options.access != Access::ReadOnly
            && spawn_watcher(&path, Arc::downgrade(&changes));
        Ok(Self {
            requests,
            reads,
            changes,
            watched,
            path,
            wait_key: Arc::default(),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Request) -> StoreResult<T> {
        let (tx, rx) = oneshot::channel();
        self.requests.send(make(tx))?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// A request that only reads, on the reading connection. It sees every commit whose
    /// caller has had its answer (WAL: each read transaction starts from the latest commit).
    async fn read<T>(&self, make: impl FnOnce(Reply<T>) -> Request) -> StoreResult<T> {
        let (tx, rx) = oneshot::channel();
        self.reads.send(make(tx))?;
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

#[async_trait]
impl WorkStore for SqliteStore {
    async fn start_many(
        &self,
        now: Micros,
        instances: Vec<NewInstance>,
    ) -> StoreResult<Vec<Started>> {
        let started = self.call(|r| Request::Start(now, instances, r)).await?;
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
        commit: std::sync::Arc<Commit>,
        successors: Option<&SuccessorClaim>,
    ) -> StoreResult<AppliedCommit> {
        let successors = successors.cloned();
        let (applied, queued) = self
            .call(|r| Request::Apply(now, Commit::storable_shared(commit), successors, r))
            .await?;
        // Wake idle workers of this process when work was queued that nobody holds yet.
        if queued {
            self.changes.notify_waiters();
        }
        Ok(applied)
    }

    async fn deliver(&self, now: Micros, delivery: &Delivery) -> StoreResult<Delivered> {
        let delivery = Box::new(delivery.storable().into_owned());
        let delivered = self.call(|r| Request::Deliver(now, delivery, r)).await?;
        if matches!(delivered, Delivered::Dispatched(_)) {
            self.changes.notify_waiters();
        }
        Ok(delivered)
    }

    async fn fire_schedule(
        &self,
        now: Micros,
        tick: &super::ScheduleTick,
    ) -> StoreResult<super::Fired> {
        let tick = Box::new(tick.clone());
        let fired = self.call(|r| Request::FireSchedule(now, tick, r)).await?;
        if matches!(fired, super::Fired::Started(Started::Created)) {
            self.changes.notify_waiters();
        }
        Ok(fired)
    }

    async fn wait_key(&self) -> StoreResult<Vec<u8>> {
        self.wait_key.get(self.read(Request::WaitKey)).await
    }

    async fn next_due(&self) -> StoreResult<Option<Micros>> {
        self.read(Request::NextDue).await
    }

    async fn worker_alive(&self, now: Micros, worker: &WorkerView) -> StoreResult<()> {
        let worker = Box::new(worker.clone());
        self.call(|r| Request::WorkerAlive(now, worker, r)).await
    }

    async fn worker_stopped(&self, owner: &str) -> StoreResult<()> {
        let owner = owner.to_string();
        self.call(|r| Request::WorkerStopped(owner, r)).await
    }

    fn changes(&self) -> Arc<Notify> {
        Arc::clone(&self.changes)
    }

    fn notifies_other_processes(&self) -> bool {
        self.watched
    }
}

#[async_trait]
impl ReadStore for SqliteStore {
    async fn versions(&self, machine: Option<&str>) -> StoreResult<Vec<super::VersionRecord>> {
        let machine = machine.map(str::to_string);
        self.read(|r| Request::Versions(machine, r)).await
    }

    async fn version(
        &self,
        machine: &str,
        version: u32,
    ) -> StoreResult<Option<super::StoredVersion>> {
        let machine = machine.to_string();
        self.read(|r| Request::Version(machine, version, r)).await
    }

    async fn version_by_id(&self, id: i64) -> StoreResult<Option<super::StoredVersion>> {
        self.read(|r| Request::VersionById(id, r)).await
    }

    async fn version_counts(
        &self,
        machine: Option<&str>,
    ) -> StoreResult<Vec<super::VersionCounts>> {
        let machine = machine.map(str::to_string);
        self.read(|r| Request::VersionCounts(machine, r)).await
    }

    async fn instance(&self, name: &str) -> StoreResult<Option<InstanceView>> {
        let name = name.to_string();
        self.read(|r| Request::Instance(name, r)).await
    }

    async fn status(&self, name: &str) -> StoreResult<Option<InstanceStatus>> {
        let name = name.to_string();
        self.read(|r| Request::Status(name, r)).await
    }

    async fn children(&self, name: &str) -> StoreResult<Vec<String>> {
        let name = name.to_string();
        self.read(|r| Request::Children(name, r)).await
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
        branch: Option<&str>,
    ) -> StoreResult<Option<Page<super::HistoryRow>>> {
        let name = name.to_string();
        let branch = branch.map(str::to_string);
        self.read(|r| Request::HistoryPage(name, page, branch, r))
            .await
    }

    async fn step(&self, name: &str, id: i64) -> StoreResult<Option<super::StepDetail>> {
        let name = name.to_string();
        self.read(|r| Request::Step(name, id, r)).await
    }

    async fn logs_page(&self, name: &str, page: PageRequest) -> StoreResult<Option<Page<LogLine>>> {
        let name = name.to_string();
        self.read(|r| Request::LogsPage(name, page, r)).await
    }

    async fn schedules(&self) -> StoreResult<Vec<super::ScheduleRecord>> {
        self.read(Request::Schedules).await
    }

    async fn machine_overview(
        &self,
        machine: &str,
        hour: Micros,
        day: Micros,
    ) -> StoreResult<super::MachineOverview> {
        let machine = machine.to_string();
        self.read(|r| Request::MachineOverview(machine, hour, day, r))
            .await
    }

    async fn workers(&self, now: Micros) -> StoreResult<Vec<WorkerView>> {
        self.read(|r| Request::Workers(now, r)).await
    }

    async fn workers_gone(&self, now: Micros) -> StoreResult<Vec<WorkerView>> {
        self.read(|r| Request::WorkersGone(now, r)).await
    }

    async fn stats(&self, now: Micros) -> StoreResult<super::StoreStats> {
        self.read(|r| Request::Stats(now, r)).await
    }

    async fn recent_steps(&self, since: Micros) -> StoreResult<super::RecentSteps> {
        self.read(|r| Request::RecentSteps(since, r)).await
    }
}

#[async_trait]
impl AdminStore for SqliteStore {
    async fn deploy(
        &self,
        now: Micros,
        versions: &[super::NewVersion],
    ) -> StoreResult<Vec<super::Deployed>> {
        let versions = versions.to_vec();
        self.call(|r| Request::Deploy(now, versions, r)).await
    }

    async fn scrub_versions(&self) -> StoreResult<Vec<(String, u32)>> {
        self.call(Request::ScrubVersions).await
    }

    async fn upgrade(
        &self,
        now: Micros,
        request: &super::UpgradeRequest,
    ) -> StoreResult<super::Upgraded> {
        let request = Box::new(request.clone());
        self.call(|r| Request::Upgrade(now, request, r)).await
    }

    async fn retry(&self, now: Micros, name: &str) -> StoreResult<Control> {
        let name = name.to_string();
        let done = self.call(|r| Request::Retry(now, name, r)).await?;
        self.changes.notify_waiters();
        Ok(done)
    }

    async fn reset(
        &self,
        now: Micros,
        name: &str,
        task: &NewTask,
        note: &str,
    ) -> StoreResult<Control> {
        let (name, task, note) = (name.to_string(), Box::new(task.clone()), note.to_string());
        let done = self
            .call(|r| Request::Reset(now, name, task, note, r))
            .await?;
        self.changes.notify_waiters();
        Ok(done)
    }

    async fn cancel_because(
        &self,
        now: Micros,
        name: &str,
        reason: Option<&str>,
    ) -> StoreResult<Control> {
        let name = name.to_string();
        let reason = reason.map(|r| crate::engine::text::storable(r.to_string()));
        self.call(|r| Request::Cancel(now, name, reason, r)).await
    }

    async fn probe_commit_rate(&self, commits: usize) -> StoreResult<f64> {
        self.call(|r| Request::Probe(commits, r)).await
    }

    async fn scrub(&self, cutoff: Micros, batch: usize) -> StoreResult<u64> {
        self.call(|r| Request::Scrub(cutoff, batch, r)).await
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
