//! The connection threads: requests queued to a connection run in batches, one transaction each, and are answered once it commits.

use std::sync::{mpsc, Arc};
use std::time::Instant;

use rusqlite::{Connection, Transaction};

use super::admin::{cancel, reset, retry, scrub, worker_alive};
use super::apply::{apply, start, Settles};
use super::claim::{claim, renew};
use super::deliver::{deliver, wait_key};
use super::read::{
    children, history_page, instance, list, logs, logs_page, machine_overview, next_due,
    recent_steps, stats, status, step, workers, workers_gone,
};
use super::schedule::{fire_schedule, schedules};
use super::versions::{
    deploy, scrub_versions, upgrade, version, version_by_id, version_counts, versions,
};
use super::{db, Reply, Request, Threads};
use crate::store::convert::bigint;
use crate::store::{StoreError, StoreResult};

/// Where requests for one connection go.
#[derive(Debug, Clone)]
pub(super) enum Lane {
    /// To the connection's thread, which runs them in batches.
    Thread(mpsc::Sender<Request>),
    /// Run at once on the calling thread (see [`Threads::Caller`]).
    Caller(Arc<std::sync::Mutex<Batcher>>),
}

impl Lane {
    /// A lane for `conn`: a thread of its own named `name`, or the caller's. A lane that
    /// writes (given the store's `changes` to wake its idle workers) opens each batch's
    /// transaction with `BEGIN IMMEDIATE`.
    pub(super) fn new(
        name: &str,
        conn: Connection,
        threads: Threads,
        changes: Option<Arc<tokio::sync::Notify>>,
    ) -> StoreResult<Self> {
        let batcher = Batcher {
            conn,
            writes: changes.is_some(),
            changes,
        };
        if threads == Threads::Caller {
            return Ok(Lane::Caller(Arc::new(std::sync::Mutex::new(batcher))));
        }
        let (requests, receiver) = mpsc::channel();
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || batcher.run(receiver))
            .map_err(|e| StoreError::database(format!("cannot start the SQLite thread: {e}")))?;
        Ok(Lane::Thread(requests))
    }

    /// Hand `request` over; its reply comes on its channel.
    pub(super) fn send(&self, request: Request) -> StoreResult<()> {
        match self {
            Lane::Thread(requests) => requests.send(request).map_err(|_| StoreError::Closed),
            Lane::Caller(batcher) => {
                batcher
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .serve(vec![request]);
                Ok(())
            }
        }
    }
}

/// Sends a request's result once the batch it ran in has committed.
pub(super) type Pending = Box<dyn FnOnce(Option<&StoreError>) + Send>;

/// A request's own error is its answer; a request that succeeded is answered with the
/// batch's error when the batch could not commit.
pub(super) fn pending<T: Send + 'static>(reply: Reply<T>, result: StoreResult<T>) -> Pending {
    Box::new(move |batch_error| {
        let result = match (batch_error, result) {
            (_, Err(e)) => Err(e),
            (Some(e), Ok(_)) => Err(e.during("commit failed")),
            (None, r) => r,
        };
        let _ = reply.send(result);
    })
}

/// Runs requests on one connection (the writer's, or the reader's), all that queued up
/// while the last batch ran in one transaction.
#[derive(Debug)]
pub(super) struct Batcher {
    conn: Connection,
    /// Whether this is the writer's connection: its transactions take the write lock when
    /// they begin (`BEGIN IMMEDIATE`), so one never fails upgrading a read to a write while
    /// another process writes — the busy timeout covers waiting for the lock at `BEGIN`,
    /// but an upgrade that would deadlock fails at once with "database is locked".
    writes: bool,
    /// The writer's: idle workers of this process, woken when a batch's settling released
    /// barrier joins.
    changes: Option<Arc<tokio::sync::Notify>>,
}

/// Most requests run in one transaction.
pub(super) const MAX_BATCH: usize = 512;

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
            self.serve(batch);
        }
    }

    /// Run `batch` in one transaction (probes, which time transactions of their own, after it).
    fn serve(&mut self, batch: Vec<Request>) {
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

    fn run_batch(&mut self, batch: Vec<Request>) {
        let behavior = if self.writes {
            rusqlite::TransactionBehavior::Immediate
        } else {
            rusqlite::TransactionBehavior::Deferred
        };
        let tx = match self.conn.transaction_with_behavior(behavior) {
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
        let mut first_error = None;
        let mut settles = Settles::default();
        for request in batch {
            replies.push(handle(&tx, request, &mut first_error, &mut settles));
        }
        // The settling checks of the batch's commits, once per instance (see `Settles`).
        let settled = if tx.is_autocommit() {
            Ok(false)
        } else {
            settles.run(&tx)
        };
        let committed = if let Err(e) = &settled {
            Err(e.during("settling the batch's instances"))
        } else if tx.is_autocommit() {
            // An error such as SQLITE_FULL or an I/O error rolled the whole transaction back:
            // committing would only say "no transaction is active". Every request is answered
            // with the error that ended it.
            Err(first_error
                .unwrap_or_else(|| StoreError::database("SQLite rolled the transaction back")))
        } else {
            tx.commit().map_err(db)
        };
        if let (Ok(()), Ok(true), Some(changes)) = (&committed, &settled, &self.changes) {
            changes.notify_waiters();
        }
        match committed {
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
            tx.execute("INSERT INTO phasm_probe (at) VALUES (?1)", [bigint(i)])
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

pub(super) fn fail_request(request: Request, e: &StoreError) {
    let err = || e.clone();
    match request {
        Request::Start(_, _, r) => drop(r.send(Err(err()))),
        Request::Claim(_, _, r) => drop(r.send(Err(err()))),
        Request::Renew(_, _, _, r) => drop(r.send(Err(err()))),
        Request::Apply(_, _, _, r) => drop(r.send(Err(err()))),
        Request::NextDue(r) => drop(r.send(Err(err()))),
        Request::Deliver(_, _, r) => drop(r.send(Err(err()))),
        Request::WaitKey(r) => drop(r.send(Err(err()))),
        Request::FireSchedule(_, _, r) => drop(r.send(Err(err()))),
        Request::Schedules(r) => drop(r.send(Err(err()))),
        Request::MachineOverview(_, _, _, r) => drop(r.send(Err(err()))),
        Request::Instance(_, r) => drop(r.send(Err(err()))),
        Request::Status(_, r) => drop(r.send(Err(err()))),
        Request::Children(_, r) => drop(r.send(Err(err()))),
        Request::List(_, r) => drop(r.send(Err(err()))),
        Request::Logs(_, r) => drop(r.send(Err(err()))),
        Request::HistoryPage(_, _, _, r) => drop(r.send(Err(err()))),
        Request::Step(_, _, r) => drop(r.send(Err(err()))),
        Request::LogsPage(_, _, r) => drop(r.send(Err(err()))),
        Request::Retry(_, _, r) | Request::Cancel(_, _, _, r) | Request::Reset(_, _, _, _, r) => {
            drop(r.send(Err(err())));
        }
        Request::Probe(_, r) => drop(r.send(Err(err()))),
        Request::Scrub(_, _, r) => drop(r.send(Err(err()))),
        Request::Stats(_, r) => drop(r.send(Err(err()))),
        Request::RecentSteps(_, r) => drop(r.send(Err(err()))),
        Request::WorkerAlive(_, _, r) | Request::WorkerStopped(_, r) => drop(r.send(Err(err()))),
        Request::Workers(_, r) | Request::WorkersGone(_, r) => drop(r.send(Err(err()))),
        Request::Deploy(_, _, r) => drop(r.send(Err(err()))),
        Request::Versions(_, r) => drop(r.send(Err(err()))),
        Request::Version(_, _, r) | Request::VersionById(_, r) => drop(r.send(Err(err()))),
        Request::VersionCounts(_, r) => drop(r.send(Err(err()))),
        Request::Upgrade(_, _, r) => drop(r.send(Err(err()))),
        Request::ScrubVersions(r) => drop(r.send(Err(err()))),
    }
}

/// Run one request inside a savepoint of the batch's transaction; the first error any
/// request met is kept in `first_error`, the cause to report if the batch cannot commit.
pub(super) fn handle(
    tx: &Transaction<'_>,
    request: Request,
    first_error: &mut Option<StoreError>,
    settles: &mut Settles,
) -> Pending {
    fn scoped<T>(
        tx: &Transaction<'_>,
        ended_by: &mut Option<StoreError>,
        f: impl FnOnce(&Transaction<'_>) -> StoreResult<T>,
    ) -> StoreResult<T> {
        // Cached statements: these run around every request of every batch.
        let run = |sql: &str| -> StoreResult<()> {
            tx.prepare_cached(sql)
                .and_then(|mut s| s.execute([]))
                .map(drop)
                .map_err(db)
        };
        run("SAVEPOINT request")?;
        let result = f(tx);
        if let Err(first) = &result {
            // When the error rolled the transaction back (SQLITE_FULL, an I/O error), the
            // savepoint is gone too: the request's answer is its own error, not the
            // rollback's "no such savepoint".
            if tx.is_autocommit() {
                ended_by.get_or_insert_with(|| first.clone());
                return result;
            }
            if let Err(e) = run("ROLLBACK TO request") {
                return Err(first.clone().during(&format!("then {e}")));
            }
        }
        run("RELEASE request")?;
        result
    }
    match request {
        Request::Start(now, instances, reply) => pending(
            reply,
            scoped(tx, first_error, |tx| {
                instances
                    .iter()
                    .map(|new| start(tx, now, new))
                    .collect::<StoreResult<Vec<_>>>()
            }),
        ),
        Request::Claim(now, req, reply) => {
            pending(reply, scoped(tx, first_error, |tx| claim(tx, now, &req)))
        }
        Request::Renew(now, leases, until, reply) => pending(
            reply,
            scoped(tx, first_error, |tx| renew(tx, now, &leases, until)),
        ),
        Request::Apply(now, commit, successors, reply) => pending(
            reply,
            scoped(tx, first_error, |tx| {
                apply(tx, now, &commit, successors.as_ref(), settles)
            }),
        ),
        Request::NextDue(reply) => pending(reply, next_due(tx)),
        Request::Deliver(now, delivery, reply) => pending(
            reply,
            scoped(tx, first_error, |tx| deliver(tx, now, &delivery)),
        ),
        Request::WaitKey(reply) => pending(reply, wait_key(tx)),
        Request::FireSchedule(now, tick, reply) => pending(
            reply,
            scoped(tx, first_error, |tx| fire_schedule(tx, now, &tick)),
        ),
        Request::Schedules(reply) => pending(reply, schedules(tx)),
        Request::MachineOverview(machine, hour, day, reply) => {
            pending(reply, machine_overview(tx, &machine, hour, day))
        }
        Request::Instance(name, reply) => pending(reply, instance(tx, &name)),
        Request::Status(name, reply) => pending(reply, status(tx, &name)),
        Request::Children(name, reply) => pending(reply, children(tx, &name)),
        Request::List(filter, reply) => pending(reply, list(tx, &filter)),
        Request::Logs(name, reply) => pending(reply, logs(tx, &name)),
        Request::HistoryPage(name, page, branch, reply) => {
            pending(reply, history_page(tx, &name, page, branch.as_deref()))
        }
        Request::Step(name, id, reply) => pending(reply, step(tx, &name, id)),
        Request::LogsPage(name, page, reply) => pending(reply, logs_page(tx, &name, page)),
        Request::Retry(now, name, reply) => {
            pending(reply, scoped(tx, first_error, |tx| retry(tx, now, &name)))
        }
        Request::Reset(now, name, task, note, reply) => pending(
            reply,
            scoped(tx, first_error, |tx| reset(tx, now, &name, &task, &note)),
        ),
        Request::Cancel(now, name, reason, reply) => pending(
            reply,
            scoped(tx, first_error, |tx| {
                cancel(tx, now, &name, reason.as_deref())
            }),
        ),
        Request::Stats(now, reply) => pending(reply, stats(tx, now)),
        Request::RecentSteps(since, reply) => pending(reply, recent_steps(tx, since)),
        Request::WorkerAlive(now, worker, reply) => pending(
            reply,
            scoped(tx, first_error, |tx| worker_alive(tx, now, &worker)),
        ),
        Request::WorkerStopped(owner, reply) => pending(
            reply,
            tx.execute("DELETE FROM workers WHERE owner = ?1", [owner])
                .map(drop)
                .map_err(db),
        ),
        Request::Workers(now, reply) => pending(reply, workers(tx, now)),
        Request::WorkersGone(now, reply) => pending(reply, workers_gone(tx, now)),
        Request::Scrub(cutoff, batch, reply) => pending(
            reply,
            scoped(tx, first_error, |tx| scrub(tx, cutoff, batch)),
        ),
        Request::Deploy(now, versions, reply) => pending(
            reply,
            scoped(tx, first_error, |tx| deploy(tx, now, &versions)),
        ),
        Request::Versions(machine, reply) => pending(reply, versions(tx, machine.as_deref())),
        Request::Version(machine, number, reply) => pending(reply, version(tx, &machine, number)),
        Request::VersionById(id, reply) => pending(reply, version_by_id(tx, id)),
        Request::VersionCounts(machine, reply) => {
            pending(reply, version_counts(tx, machine.as_deref()))
        }
        Request::ScrubVersions(reply) => pending(reply, scoped(tx, first_error, scrub_versions)),
        Request::Upgrade(now, request, reply) => pending(
            reply,
            scoped(tx, first_error, |tx| upgrade(tx, now, &request)),
        ),
        Request::Probe(_, reply) => {
            pending(reply, Err(StoreError::database("probe inside a batch")))
        }
    }
}
