//! The runtime: claim due tasks, run their actions, commit, renew leases, shut down cleanly.
//!
//! A [`Worker`] claims tasks with a lease, runs each on its own tokio task (up to
//! `concurrency` at once, and within each queue's `max_concurrent` and `rate`), renews the
//! leases of running tasks on a heartbeat, and commits each step through the store, which
//! batches concurrent commits into one transaction. A panic in an action is a failed
//! attempt, never a crashed worker. On shutdown it stops claiming and lets running steps
//! finish and commit.

mod hosted;
mod limits;
mod schedules;
mod versions;

// Ordered maps and sets: what the worker asks the store must not depend on a hash seed, so
// a simulation on a paused clock replays exactly.
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::FutureExt;
use tokio::sync::mpsc::UnboundedSender;
use tokio::task::JoinSet;

use crate::action::{keeps_logs, ActionContext, Registry};
use crate::clock::{micros, Clock, Micros};
use crate::engine::{self, Commit, Disposition, InstanceChange, Limits, Outcome, Task};
use crate::machine::{ActionRole, Config, Machine};
use crate::store::{
    Applied, ClaimRequest, InstanceStatus, Store, StoreError, SuccessorClaim, Targets, WorkerView,
};
use limits::QueueGate;

/// How a worker runs.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// Name of this worker in leases (default: host, process id and a random suffix).
    pub owner: String,
    /// Most steps running at once.
    pub concurrency: usize,
    /// Lease length; leases are renewed every third of it while a step runs.
    pub lease: Duration,
    /// Longest sleep when idle before looking for work again (other processes may queue
    /// work this one is not told about).
    pub poll_interval: Duration,
    /// Only tasks of these queues (`None`: all).
    pub queues: Option<Vec<String>>,
    /// Which worker pools' tasks (`target`) to take.
    pub targets: Targets,
    /// Limits on what actions produce.
    pub limits: Limits,
    /// Longest a Rust action may run before its attempt fails (actions with their own
    /// limit, like `exec`, use that instead). An action that blocks its thread instead of
    /// awaiting cannot be interrupted: keep blocking work in `spawn_blocking`.
    pub action_timeout: Duration,
    /// Seed of the random numbers (countdown ranges); `None` for a random seed.
    pub seed: Option<u64>,
    /// When to stop on its own.
    pub stop: StopWhen,
    /// Where to report progress.
    pub events: Option<UnboundedSender<WorkerEvent>>,
    /// Fire the configuration's schedules (`schedules:`) at their ticks. Each tick starts one
    /// instance however many workers fire it; `phasm run` turns this off.
    pub schedules: bool,
    /// The deployed definition hash ([`crate::config::Definition::hash`]) of each machine of
    /// the worker's configuration, by machine, as the file loaded (before Python hosts
    /// resolve its event constants). Steps of instances pinned to a version with that hash
    /// run on the worker's own configuration; other versions are read from the store. Empty:
    /// computed from the configuration, which is right unless it has a `python:` section.
    pub own_hashes: HashMap<String, String>,
}

impl Default for WorkerOptions {
    fn default() -> Self {
        Self {
            owner: default_owner(),
            concurrency: 64,
            lease: Duration::from_secs(30),
            poll_interval: Duration::from_millis(500),
            queues: None,
            targets: Targets::Any,
            limits: Limits::default(),
            action_timeout: Duration::from_secs(300),
            seed: None,
            stop: StopWhen::Never,
            events: None,
            schedules: true,
            own_hashes: HashMap::new(),
        }
    }
}

fn default_owner() -> String {
    format!(
        "{}-{}-{:04x}",
        host_name(),
        std::process::id(),
        fastrand::u16(..)
    )
}

/// This host's name (`host` where the system does not say).
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map_or_else(|_| "host".into(), |h| h.trim().to_string())
}

/// When a worker stops by itself (it always stops when its shutdown future completes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopWhen {
    /// Never.
    Never,
    /// When every one of these instances has ended.
    Ended(Vec<String>),
    /// When no task is pending at all.
    Idle,
}

/// Progress a worker reports.
#[derive(Debug, Clone, PartialEq)]
pub enum WorkerEvent {
    /// A step committed.
    Step {
        /// Instance.
        instance: String,
        /// State left (`None`: the start).
        from: Option<String>,
        /// Event.
        event: String,
        /// State entered.
        to: String,
        /// Attempt that succeeded.
        attempt: u32,
    },
    /// An attempt failed and will be retried.
    Retry {
        /// Instance.
        instance: String,
        /// The task.
        task: String,
        /// Why.
        error: String,
        /// When it runs again.
        due_at: Micros,
    },
    /// A step could not start for lack of the worker's resources (file descriptors,
    /// processes) and waits; the attempt does not count.
    Postponed {
        /// Instance.
        instance: String,
        /// Why.
        reason: String,
        /// When it runs again.
        due_at: Micros,
    },
    /// An instance ended (or a branch of it did).
    Changed {
        /// Instance.
        instance: String,
    },
}

/// What a worker did, returned when it stops.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WorkerReport {
    /// Steps committed.
    pub steps: u64,
    /// Attempts failed and rescheduled.
    pub retries: u64,
    /// Tasks failed for good.
    pub failures: u64,
    /// Steps whose lease was lost (another attempt ran or runs the step, or the instance was
    /// cancelled or failed): stopped when a renewal found out, or their commit refused.
    pub fenced: u64,
    /// Steps that could not start for lack of the worker's resources (file descriptors,
    /// processes), postponed without counting an attempt.
    pub postponed: u64,
    /// Commits given up because the database kept failing (or the worker was stopping while
    /// it failed); those steps run again once their lease expires.
    pub given_up: u64,
}

/// Why a worker cannot run.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// Some action names have no implementation.
    #[error("machine `{machine}` uses actions that are bound to nothing:\n  {}\nbind them under `actions:` with an `exec:` program, add a `python:` section for Python actions, or register Rust handlers", missing.join("\n  "))]
    Unbound {
        /// The machine.
        machine: String,
        /// Descriptions of the unbound names.
        missing: Vec<String>,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Python actions cannot run.
    #[error(transparent)]
    Python(#[from] crate::action::python::PythonError),
}

/// A worker for one configuration and registry.
pub struct Worker {
    inner: Arc<Inner>,
    adopted: tokio::sync::mpsc::UnboundedReceiver<Task>,
}

struct Inner {
    store: Arc<dyn Store>,
    config: Arc<Config>,
    clock: Arc<dyn Clock>,
    options: WorkerOptions,
    rng: Mutex<fastrand::Rng>,
    /// The leases of running steps, by task id.
    leases: Mutex<BTreeMap<i64, Lease>>,
    machines: Vec<String>,
    /// What this worker says of itself at each heartbeat, but for the steps it runs (read
    /// once: the host name is a file read).
    about: crate::store::WorkerAbout,
    successors: SuccessorClaim,
    /// Tasks handed back by intermediate commits (a continuation's next page), to be run.
    adopt: UnboundedSender<Task>,
    /// The machine versions steps run on.
    versions: versions::Versions,
    /// Shutdown was asked for: a commit that fails is given up at once (the step runs again
    /// elsewhere) instead of being retried, so a worker stops promptly even while its
    /// database is failing.
    shutting_down: std::sync::atomic::AtomicBool,
}

/// Check that every machine of a configuration can run (see [`check_machine`]).
///
/// # Errors
/// The first machine's problem.
pub fn check_bindings(config: &Config, registry: &Registry) -> Result<(), WorkerError> {
    config
        .machines
        .iter()
        .try_for_each(|m| check_machine(m, registry))
}

/// Check that a machine can run: every action bound.
///
/// # Errors
/// [`WorkerError::Unbound`].
pub fn check_machine(m: &Machine, registry: &Registry) -> Result<(), WorkerError> {
    let missing = registry.unbound(m);
    if missing.is_empty() {
        Ok(())
    } else {
        Err(WorkerError::Unbound {
            machine: m.name.clone(),
            missing,
        })
    }
}

impl Worker {
    /// A worker. Fails if any action name of the configuration is bound to nothing.
    ///
    /// # Errors
    /// [`WorkerError::Unbound`].
    pub fn new(
        store: Arc<dyn Store>,
        config: Arc<Config>,
        registry: Arc<Registry>,
        clock: Arc<dyn Clock>,
        options: WorkerOptions,
    ) -> Result<Self, WorkerError> {
        check_bindings(&config, &registry)?;
        let rng = options
            .seed
            .map_or_else(fastrand::Rng::new, fastrand::Rng::with_seed);
        let machines: Vec<String> = config.machines.iter().map(|m| m.name.clone()).collect();
        let (adopt, adopted) = tokio::sync::mpsc::unbounded_channel();
        let successors = SuccessorClaim {
            owner: options.owner.clone(),
            lease: options.lease,
            queues: options.queues.clone(),
            // Queues with limits are counted by the claim loop's gate.
            exclude: config.queues.keys().cloned().collect(),
            machines: machines.clone(),
            targets: options.targets.clone(),
            max: 1,
        };
        let about = crate::store::WorkerAbout {
            host: host_name(),
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            concurrency: u32::try_from(options.concurrency).unwrap_or(u32::MAX),
            running: 0,
            cannot_run: Vec::new(),
        };
        let own_hashes = if options.own_hashes.is_empty() && config.python.is_none() {
            crate::config::definitions(&config)
                .into_iter()
                .map(|d| (d.machine, d.hash))
                .collect()
        } else {
            options.own_hashes.clone()
        };
        let versions = versions::Versions::new(Arc::clone(&config), registry, own_hashes);
        Ok(Self {
            inner: Arc::new(Inner {
                store,
                config,
                clock,
                options,
                rng: Mutex::new(rng),
                leases: Mutex::new(BTreeMap::new()),
                machines,
                about,
                successors,
                adopt,
                versions,
                shutting_down: std::sync::atomic::AtomicBool::new(false),
            }),
            adopted,
        })
    }

    /// Work until `shutdown` completes (then finish running steps) or the stop condition
    /// holds.
    ///
    /// # Errors
    /// Only for store failures that persist; passing ones are logged and retried.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<WorkerReport, WorkerError> {
        let inner = self.inner;
        let mut adopted = self.adopted;
        let opts = &inner.options;
        let changes = inner.store.changes();
        let mut gate = QueueGate::new(&inner.config);
        let mut running: JoinSet<Executed> = JoinSet::new();
        let mut report = WorkerReport::default();
        let mut heartbeat = tokio::time::interval((opts.lease / 3).max(Duration::from_millis(10)));
        let started_at = inner.clock.now();
        // A worker starting up sweeps at its first heartbeat: it may be the one that replaces
        // a worker that crashed, and one that crashes again and again would never sweep.
        let mut last_sweep = started_at.saturating_sub(micros(SWEEP_EVERY));
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut watching: BTreeSet<String> = match &opts.stop {
            StopWhen::Ended(names) => names.iter().cloned().collect(),
            _ => BTreeSet::new(),
        };
        let mut stopping = false;
        let mut store_failures = 0u32;
        let mut firing = schedules::Firing::new(&inner);
        tokio::pin!(shutdown);
        loop {
            if stopping && running.is_empty() {
                break;
            }
            if !stopping {
                firing.fire_due(&inner, inner.clock.now()).await;
            }
            let mut claimed_any = false;
            let free = opts.concurrency.saturating_sub(running.len());
            let notified = changes.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            // Claim when enough slots are free to make the round trip worth it (or when
            // nothing runs at all), so a busy worker claims in batches.
            let worth_claiming = running.is_empty() || free >= (opts.concurrency / 8).max(1);
            if !stopping && free > 0 && worth_claiming {
                let now = inner.clock.now();
                let request = ClaimRequest {
                    owner: opts.owner.clone(),
                    lease: opts.lease,
                    limit: free.min(gate.budget(now)),
                    queue_limits: gate.queue_limits(now),
                    queues: opts.queues.clone(),
                    targets: opts.targets.clone(),
                    shared_limits: inner
                        .config
                        .queues
                        .iter()
                        .map(|(q, l)| (q.clone(), *l))
                        .collect(),
                };
                match claim(&inner, now, &request).await {
                    Ok(tasks) => {
                        store_failures = 0;
                        claimed_any = !tasks.is_empty();
                        for task in tasks {
                            gate.started(&task.queue, now);
                            hold(&inner, &task);
                            running.spawn(execute(Arc::clone(&inner), task));
                        }
                    }
                    Err(e) => {
                        store_failures += 1;
                        let wait = backoff(store_failures);
                        tracing::warn!(error = %e, "claiming tasks failed; trying again in {wait:?}");
                        // Keep listening for shutdown while the database is failing.
                        tokio::select! {
                            biased;
                            () = tokio::time::sleep(wait) => {}
                            () = &mut shutdown => {
                                stopping = true;
                                begin_shutdown(&inner, running.len());
                            }
                        }
                        continue;
                    }
                }
            }
            if claimed_any && running.len() < opts.concurrency {
                continue; // more may be due right now
            }
            let mut wake = if stopping || running.len() >= opts.concurrency {
                inner.clock.now() + micros(opts.poll_interval)
            } else {
                next_wake(&inner, &gate).await
            };
            if let Some(tick) = firing.next_at().filter(|_| !stopping) {
                wake = wake.min(tick);
            }
            let sleep = tokio::time::sleep(Duration::from_micros(
                u64::try_from((wake - inner.clock.now()).max(0)).unwrap_or(0),
            ));
            // In this order (not at random, tokio's default): the heartbeat first, so leases are
            // renewed however busy the worker is, and adopted steps (already leased) before
            // finished ones; a fixed order also lets a simulation replay exactly.
            tokio::select! {
                biased;
                () = &mut shutdown, if !stopping => {
                    stopping = true;
                    begin_shutdown(&inner, running.len());
                }
                _ = heartbeat.tick() => {
                    renew(&inner).await;
                    announce(&inner, started_at, running.len()).await;
                    // Another worker may have ended the watched instances; with a heartbeat
                    // shorter than the idle sleep, the sleep never runs out to look.
                    stopping |= stop_condition_holds(&inner, &mut watching, running.is_empty()).await;
                    let now = inner.clock.now();
                    if now - last_sweep >= micros(SWEEP_EVERY) {
                        last_sweep = now;
                        if let Err(e) = inner.store.sweep(now).await {
                            tracing::warn!(error = %e, "sweeping the store failed");
                        }
                    }
                }
                Some(task) = adopted.recv() => {
                    gate.started(&task.queue, inner.clock.now());
                    hold(&inner, &task);
                    running.spawn(execute(Arc::clone(&inner), task));
                }
                Some(first) = running.join_next() => {
                    // Take every step that has finished, then claim for all the freed slots
                    // at once (one claim per finished step would cost a round trip each).
                    let mut finished = vec![first];
                    while let Some(more) = running.try_join_next() {
                        finished.push(more);
                    }
                    let mut changed = false;
                    for done in finished {
                        let done = match done {
                            Ok(done) => done,
                            Err(e) => {
                                tracing::error!(error = %e, "a step's task was lost");
                                continue;
                            }
                        };
                        gate.finished(&done.queue);
                        report.steps += done.steps;
                        report.retries += done.retries;
                        report.failures += done.failures;
                        report.fenced += done.fenced;
                        report.given_up += done.given_up;
                        report.postponed += done.postponed;
                        changed |= done.instance_changed && watching.contains(&done.instance);
                    }
                    if changed {
                        check_watched(&inner, &mut watching).await;
                        if watching.is_empty() {
                            stopping = true;
                        }
                    }
                    if opts.stop == StopWhen::Idle
                        && running.is_empty()
                        && matches!(inner.store.next_due().await, Ok(None))
                    {
                        stopping = true;
                    }
                }
                () = &mut notified => {}
                () = sleep => {
                    stopping |= stop_condition_holds(&inner, &mut watching, running.is_empty()).await;
                }
            }
        }
        if let Err(e) = inner.store.worker_stopped(&opts.owner).await {
            tracing::debug!(error = %e, "could not say that this worker stopped");
        }
        inner.versions.close(Duration::from_secs(10)).await;
        Ok(report)
    }
}

/// Say in the store that this worker is alive and what it takes, for one lease length (three
/// heartbeats: a worker that stops announcing is gone once its leases could have run out; see [`WorkStore::worker_alive`](crate::store::WorkStore::worker_alive)).
async fn announce(inner: &Inner, started_at: Micros, running: usize) {
    let now = inner.clock.now();
    let opts = &inner.options;
    let view = WorkerView {
        owner: opts.owner.clone(),
        machines: inner.machines.clone(),
        targets: opts.targets.clone(),
        queues: opts.queues.clone(),
        started_at,
        seen_at: now,
        expires_at: now + micros(opts.lease),
        about: crate::store::WorkerAbout {
            running: u32::try_from(running).unwrap_or(u32::MAX),
            cannot_run: inner.versions.unavailable(),
            ..inner.about.clone()
        },
    };
    if let Err(e) = inner.store.worker_alive(now, &view).await {
        tracing::debug!(error = %e, "could not say that this worker is alive");
    }
}

/// Whether the worker's own stop condition ([`StopWhen`]) holds now: the watched instances
/// have ended (anyone's commits may have ended them), or nothing is pending at all.
async fn stop_condition_holds(inner: &Inner, watching: &mut BTreeSet<String>, idle: bool) -> bool {
    match &inner.options.stop {
        StopWhen::Ended(_) => {
            check_watched(inner, watching).await;
            watching.is_empty()
        }
        StopWhen::Idle if idle => matches!(inner.store.next_due().await, Ok(None)),
        _ => false,
    }
}

/// Shutdown was asked for: say so, and make failing commits give up from now on.
fn begin_shutdown(inner: &Inner, running: usize) {
    tracing::info!(running, "shutting down: finishing running steps");
    inner
        .shutting_down
        .store(true, std::sync::atomic::Ordering::SeqCst);
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn backoff(failures: u32) -> Duration {
    Duration::from_millis(100u64.saturating_mul(1 << failures.min(6)))
}

async fn claim(
    inner: &Inner,
    now: Micros,
    request: &ClaimRequest,
) -> Result<Vec<Task>, StoreError> {
    if request.limit == 0 {
        return Ok(Vec::new());
    }
    let tasks = inner.store.claim(now, request).await?;
    // Tasks of machines this worker does not know are left alone: release them at once.
    let (mine, foreign): (Vec<Task>, Vec<Task>) = tasks
        .into_iter()
        .partition(|t| inner.machines.contains(&t.machine));
    for t in foreign {
        tracing::warn!(instance = %t.instance, machine = %t.machine, "task of a machine this worker does not know; leaving it for another worker");
        // Not this task's failure: its attempt is not counted.
        let release = Commit {
            disposition: Disposition::Postpone {
                due_at: now + micros(inner.options.lease),
                reason: format!(
                    "worker {} does not know machine `{}`",
                    inner.options.owner, t.machine
                ),
            },
            ..Commit::finishing(&t)
        };
        let _ = inner.store.apply(now, release.into(), None).await;
    }
    Ok(mine)
}

/// How often a worker repairs what crashed workers left half done ([`WorkStore::sweep`](crate::store::WorkStore::sweep)).
const SWEEP_EVERY: Duration = Duration::from_secs(10);

/// How long an idle worker sleeps when the store tells it about other processes' work.
const NOTIFIED_POLL: Duration = Duration::from_secs(5);

/// When to look for work next: the next due task, the next rate-limit refill, or the poll
/// interval, whichever is first.
async fn next_wake(inner: &Inner, gate: &QueueGate) -> Micros {
    let now = inner.clock.now();
    let poll = if inner.store.notifies_other_processes() {
        inner.options.poll_interval.max(NOTIFIED_POLL)
    } else {
        inner.options.poll_interval
    };
    let mut wake = now + micros(poll);
    if let Ok(Some(due)) = inner.store.next_due().await {
        wake = wake.min(due.max(now));
    }
    if let Some(refill) = gate.next_refill(now) {
        wake = wake.min(refill);
    }
    wake
}

/// Forget watched instances that ended, and watch the instances they spawned instead (so
/// `phasm run` waits for the children of the instance it started).
async fn check_watched(inner: &Inner, watching: &mut BTreeSet<String>) {
    let mut queue: Vec<String> = watching.iter().cloned().collect();
    while let Some(name) = queue.pop() {
        // The status alone (one row), not the instance's view, which counts its branches.
        match inner.store.status(&name).await {
            Ok(Some(status)) if status != InstanceStatus::Running => {
                watching.remove(&name);
                for child in inner.store.children(&name).await.unwrap_or_default() {
                    if watching.insert(child.clone()) {
                        queue.push(child);
                    }
                }
            }
            Ok(None) => {
                watching.remove(&name);
            }
            _ => {}
        }
    }
}

/// A running step's lease.
struct Lease {
    /// The claim that fences the step's commit.
    claim: i64,
    /// Told when renewing finds the lease lost: the step is stopped, since its commit would
    /// be refused.
    lost: Arc<tokio::sync::Notify>,
}

/// Track a claimed task's lease while its step runs.
fn hold(inner: &Inner, task: &Task) {
    lock(&inner.leases).insert(
        task.id,
        Lease {
            claim: task.claim,
            lost: Arc::new(tokio::sync::Notify::new()),
        },
    );
}

/// Renew the leases of running steps; stop the steps whose lease is lost (expired and taken
/// by another worker, or the task cancelled, held or finished by someone else): their
/// commits would be refused.
async fn renew(inner: &Inner) {
    let leases: Vec<(i64, i64)> = lock(&inner.leases)
        .iter()
        .map(|(id, lease)| (*id, lease.claim))
        .collect();
    if leases.is_empty() {
        return;
    }
    let now = inner.clock.now();
    match inner
        .store
        .renew(now, &leases, now + micros(inner.options.lease))
        .await
    {
        Ok(held) => {
            let running = lock(&inner.leases);
            for ((id, claim), ok) in leases.iter().zip(held) {
                match running.get(id) {
                    Some(lease) if !ok && lease.claim == *claim => lease.lost.notify_one(),
                    _ => {}
                }
            }
        }
        Err(e) => tracing::warn!(error = %e, "renewing leases failed"),
    }
}

/// What one execution (a task and the successors it went on with) did.
#[derive(Default)]
struct Executed {
    instance: String,
    queue: String,
    instance_changed: bool,
    steps: u64,
    retries: u64,
    failures: u64,
    fenced: u64,
    given_up: u64,
    postponed: u64,
}

/// Run a task, commit it, and go on with the successors the commit handed back (a chain
/// continues in this tokio task without another claim).
async fn execute(inner: Arc<Inner>, task: Task) -> Executed {
    let mut done = Executed {
        instance: task.instance.clone(),
        queue: task.queue.clone(),
        ..Executed::default()
    };
    let mut queue = vec![task];
    while let Some(task) = queue.pop() {
        let claimed = execute_one(&inner, &task, &mut done).await;
        for t in &claimed {
            hold(&inner, t);
        }
        queue.extend(claimed);
    }
    done
}

async fn execute_one(inner: &Inner, task: &Task, done: &mut Executed) -> Vec<Task> {
    use tracing::Instrument;
    let started = inner.clock.now();
    // Every log line of the step (phasm's and the actions') carries where it happened.
    let span = tracing::info_span!(
        "step",
        instance = %task.instance,
        machine = %task.machine,
        state = task.from_state.as_deref().unwrap_or(engine::PSEUDO_INIT),
        event = %task.event,
        task = %task.name,
        attempt = task.attempt
    );
    let lost = lock(&inner.leases)
        .get(&task.id)
        .map(|lease| Arc::clone(&lease.lost));
    let lost = async {
        match lost {
            Some(lost) => lost.notified().await,
            None => std::future::pending().await,
        }
    };
    // A step whose lease is lost is stopped: dropping it kills an `exec` program's process
    // group and cancels a Rust action at its next await (a Python call runs on in its host,
    // and its answer is ignored).
    let commit = tokio::select! {
        biased;
        commit = step(inner, task, started).instrument(span.clone()) => Some(commit),
        () = lost => None,
    };
    lock(&inner.leases).remove(&task.id);
    let Some(commit) = commit else {
        metrics::counter!("phasm_leases_lost_total").increment(1);
        span.in_scope(|| {
            tracing::warn!("lease lost (the step ran past its lease and another worker took it, or the instance was cancelled or failed): stopped the step, its commit would be refused");
        });
        done.fenced += 1;
        return Vec::new();
    };
    // Shared, not copied, with each try of the commit (a fork's commit holds every branch).
    let commit = Arc::new(commit);
    let changed = commit.instance_change != InstanceChange::None;
    let event = progress_event(&commit);
    let successors = inner.successors.clone();
    let mut failures = 0;
    loop {
        let applied = inner
            .store
            .apply(inner.clock.now(), Arc::clone(&commit), Some(&successors))
            .await;
        match applied {
            Ok(result) if result.applied == Applied::Yes => {
                record_metrics(task, &commit, started, inner.clock.now());
                done.steps += u64::from(!commit.history.is_empty());
                done.retries += u64::from(matches!(commit.disposition, Disposition::Retry { .. }));
                done.failures +=
                    u64::from(matches!(commit.disposition, Disposition::Failed { .. }));
                done.postponed +=
                    u64::from(matches!(commit.disposition, Disposition::Postpone { .. }));
                if changed {
                    done.instance_changed = true;
                    done.instance.clone_from(&task.instance);
                }
                if let (Some(tx), Some(e)) = (&inner.options.events, event) {
                    let _ = tx.send(e);
                    if changed {
                        let _ = tx.send(WorkerEvent::Changed {
                            instance: task.instance.clone(),
                        });
                    }
                }
                return result.claimed;
            }
            Ok(_) => {
                metrics::counter!("phasm_commits_refused_total", "machine" => task.machine.clone())
                    .increment(1);
                tracing::warn!(task = %task.name, "commit refused: the lease was lost (another worker runs this step) or the instance ended while it ran (a failed instance holds it until `phasm retry`)");
                done.fenced += 1;
                return Vec::new();
            }
            Err(e) => {
                failures += 1;
                let wait = backoff(failures);
                if !e.is_transient() {
                    tracing::error!(task = %task.name, error = %e, "the database refuses this commit, and would again: giving up on it; the step will run again once its lease expires");
                    done.given_up += 1;
                    return Vec::new();
                }
                if inner
                    .shutting_down
                    .load(std::sync::atomic::Ordering::SeqCst)
                {
                    tracing::error!(task = %task.name, error = %e, "shutting down: giving up on a commit; the step will run again");
                    done.given_up += 1;
                    return Vec::new();
                }
                if inner.clock.now() + micros(wait) > started + micros(inner.options.lease) * 2 {
                    tracing::error!(task = %task.name, error = %e, "giving up on a commit; the step will run again");
                    done.given_up += 1;
                    return Vec::new();
                }
                tracing::warn!(task = %task.name, error = %e, "commit failed; trying again in {wait:?}");
                tokio::time::sleep(wait).await;
            }
        }
    }
}

/// Count a committed step for `GET /metrics` (a no-op unless a recorder is installed).
fn record_metrics(task: &Task, commit: &Commit, started: Micros, now: Micros) {
    let outcome = match &commit.disposition {
        Disposition::Retry { .. } => "retried",
        Disposition::Failed { .. } => "failed",
        Disposition::Postpone { .. } => "postponed",
        Disposition::Keep => return,
        Disposition::Finished => "committed",
    };
    let state = commit
        .history
        .first()
        .map(|h| h.to.clone())
        .or_else(|| task.from_state.clone())
        .unwrap_or_default();
    metrics::counter!(
        "phasm_steps_total",
        "machine" => task.machine.clone(),
        "state" => state.clone(),
        "outcome" => outcome
    )
    .increment(1);
    metrics::histogram!("phasm_step_seconds", "machine" => task.machine.clone(), "state" => state)
        .record((now - started).max(0) as f64 / 1e6);
}

fn progress_event(commit: &Commit) -> Option<WorkerEvent> {
    if let Some(h) = commit.history.first() {
        return Some(WorkerEvent::Step {
            instance: commit.instance.clone(),
            from: h.from.clone(),
            event: h.event.clone(),
            to: h.to.clone(),
            attempt: h.attempt,
        });
    }
    match &commit.disposition {
        Disposition::Retry { due_at, error } => Some(WorkerEvent::Retry {
            instance: commit.instance.clone(),
            task: String::new(),
            error: error.clone(),
            due_at: *due_at,
        }),
        Disposition::Postpone { due_at, reason } => Some(WorkerEvent::Postponed {
            instance: commit.instance.clone(),
            reason: reason.clone(),
            due_at: *due_at,
        }),
        _ => None,
    }
}

async fn step(inner: &Inner, task: &Task, started: Micros) -> Commit {
    let pinned = match inner.versions.of(&*inner.store, task).await {
        Ok(pinned) => pinned,
        Err(e) => {
            let reason = format!("reading the instance's machine version failed: {e}");
            return engine::postponed(task, reason, started, engine::POSTPONE_DELAY, Vec::new());
        }
    };
    let (config, registry) = match &*pinned {
        versions::Pinned::Run { config, registry } => (config, registry),
        versions::Pinned::Unavailable(reason) => {
            // Recorded as the task's last error, not logged: the step comes back here every
            // few seconds until a worker that can run it takes it.
            let mut commit =
                engine::postponed(task, reason.clone(), started, UNAVAILABLE_DELAY, Vec::new());
            commit.logs.clear();
            return commit;
        }
    };
    let env = StepEnv {
        store: &*inner.store,
        successors: Some(&inner.successors),
        adopt: Some(&inner.adopt),
        action_timeout: inner.options.action_timeout,
        config,
        spawnable: &inner.config,
        registry,
        clock: &inner.clock,
        limits: &inner.options.limits,
        rng: &inner.rng,
    };
    run_task(&env, task, started).await
}

/// How long a step of a machine version this worker cannot run waits before it is claimed
/// again (by any worker).
const UNAVAILABLE_DELAY: Duration = Duration::from_secs(5);

/// What running one task needs.
pub(crate) struct StepEnv<'a> {
    /// Where a continuation queues its next page before processing the current one.
    pub store: &'a dyn Store,
    /// Lets that commit hand the next page straight back...
    pub successors: Option<&'a SuccessorClaim>,
    /// ...to be run concurrently by the worker.
    pub adopt: Option<&'a UnboundedSender<Task>>,
    pub action_timeout: Duration,
    /// The configuration of the task's machine version.
    pub config: &'a Config,
    /// Where the machines a step spawns are found (the worker's own configuration).
    pub spawnable: &'a Config,
    pub registry: &'a Registry,
    pub clock: &'a Arc<dyn Clock>,
    pub limits: &'a Limits,
    pub rng: &'a Mutex<fastrand::Rng>,
}

/// Apply the commit that queues a continuation's next page (fenced by the current page's
/// lease, see [`engine::Step::next_page`]) before the current page is processed; the next page
/// may come straight back to run alongside this one.
async fn queue_next_page(env: &StepEnv<'_>, page: Commit) -> Result<(), String> {
    let applied = env
        .store
        .apply(env.clock.now(), page.into(), env.successors)
        .await
        .map_err(|e| format!("queueing the next page failed: {e}"))?;
    if applied.applied != Applied::Yes {
        return Err("the lease was lost before the next page could be queued".into());
    }
    if let Some(adopt) = env.adopt {
        for t in applied.claimed {
            let _ = adopt.send(t);
        }
    }
    Ok(())
}

/// Queue the next page if `step` says it is not queued yet.
async fn report_token(
    env: &StepEnv<'_>,
    step: &mut engine::Step<'_>,
    token: serde_json::Value,
) -> Result<(), StepFailure> {
    match step.next_page(token, env.clock.now()) {
        Some(page) => queue_next_page(env, page)
            .await
            .map_err(StepFailure::Failed),
        None => Ok(()),
    }
}

/// Why a step's calls stopped.
enum StepFailure {
    /// An action failed: the attempt counts.
    Failed(String),
    /// An action could not start for lack of the worker's resources: the step is postponed
    /// and the attempt does not count.
    Unavailable(String),
}

impl StepFailure {
    /// The failure an action's error means, described by `message`.
    fn of(e: &crate::action::ActionError, message: String) -> Self {
        if e.is_unavailable() {
            StepFailure::Unavailable(message)
        } else {
            StepFailure::Failed(message)
        }
    }
}

/// Run a task's actions and turn the result into its commit: the engine's [`engine::Step`]
/// decides which calls run, when to stop and when a next page is committed; this only runs
/// the actions and applies what it asks for.
pub(crate) async fn run_task(env: &StepEnv<'_>, task: &Task, started: Micros) -> Commit {
    let mut step = match engine::Step::begin(env.config, task, started) {
        engine::Begin::Run(step) => step,
        engine::Begin::Commit(commit) => return commit,
    };
    let machine = step.machine();
    let mut cx = ActionContext {
        machine: machine.name.clone(),
        instance: task.instance.clone(),
        state: String::new(),
        role: ActionRole::Action,
        event: task.event.clone(),
        task: task.name.clone(),
        attempt: task.attempt,
        context: task.context.clone(),
        obj: HashMap::new(),
        halted: None,
        logs: Vec::new(),
        persistent: keeps_logs(machine),
        clock: Arc::clone(env.clock),
        contexts: task.contexts.clone(),
        token: task.token.clone(),
        next_token: None,
        forks: Vec::new(),
        spawns: Vec::new(),
        early_token: None,
        wait_token: None,
        log_budget: Default::default(),
    };
    if let Some(name) = engine::wait_begun(machine, task) {
        match env.store.wait_key().await {
            Ok(key) => cx.wait_token = Some(crate::token::wait_token(&key, &task.instance, &name)),
            Err(e) => {
                let error = format!("reading the key of wait tokens failed: {e}");
                return engine::failed_attempt(machine, task, error, env.clock.now());
            }
        }
    }
    if let Some(first) = task.contexts.first() {
        cx.context = first.clone();
    }
    let calls = run_calls(env, &mut step, &mut cx);
    let result = AssertUnwindSafe(calls).catch_unwind().await;
    let now = env.clock.now();
    let logs = cx.take_logs();
    match result {
        Ok(Ok(())) => {
            let outcome = Outcome {
                context: cx.context,
                event: None,
                halted: cx.halted,
                logs,
                forks: cx.forks,
                spawns: cx.spawns,
                next_token: cx.next_token,
            };
            let times = engine::StepTimes {
                started_at: started,
                now,
            };
            let mut rng = lock(env.rng);
            step.finish(env.spawnable, outcome, times, &mut rng, env.limits)
        }
        Ok(Err(StepFailure::Unavailable(reason))) => {
            tracing::warn!(task = %task.name, "{reason}; postponed (not counted as an attempt)");
            step.postpone(reason, now, logs)
        }
        Ok(Err(StepFailure::Failed(error))) => step.fail(error, now, logs),
        Err(panic) => {
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            step.fail(format!("an action panicked: {message}"), now, logs)
        }
    }
}

/// Run the calls `step` asks for, in its order, until it has none left.
async fn run_calls(
    env: &StepEnv<'_>,
    step: &mut engine::Step<'_>,
    cx: &mut ActionContext,
) -> Result<(), StepFailure> {
    while let Some(call) = step.pending_calls().first() {
        // Consecutive calls a host carries out (Python actions) go in one request.
        if let Some((pool, _)) = env.registry.hosted(call) {
            let pool = Arc::clone(pool);
            let group: Vec<(engine::Call, String)> = step
                .pending_calls()
                .iter()
                .map_while(|c| env.registry.hosted(c).map(|(_, r)| (c.clone(), r)))
                .collect();
            let event = hosted::run(env, step, &pool, &group, cx).await?;
            step.ran(group.len(), event, cx.halted.is_some());
            continue;
        }
        let call = call.clone();
        let Some(action) = env.registry.resolve(&call) else {
            return Err(StepFailure::Failed(format!(
                "action `{}` is bound to nothing",
                call.action
            )));
        };
        cx.state = call.state.clone();
        cx.role = call.role;
        let asks = step.asks_for_next_page(&call);
        if asks {
            if let Some(next) = action.continuation(cx).await {
                let next = next.map_err(|e| {
                    StepFailure::of(
                        &e,
                        format!(
                            "continuation of `{}` in state `{}` failed: {e}",
                            call.action, call.state
                        ),
                    )
                })?;
                if let Some(token) = next {
                    report_token(env, step, token).await?;
                }
            }
        }
        let limit = action
            .timeout()
            .map_or(env.action_timeout, |own| own + Duration::from_secs(5));
        // A continuation page may report its next token before it finishes: queue the
        // next page then, while the page goes on.
        let mut early = None;
        if asks {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            cx.early_token = Some(tx);
            early = Some(rx);
        }
        let result = {
            let run = tokio::time::timeout(limit, action.run(cx));
            tokio::pin!(run);
            loop {
                let token = async {
                    match early.as_mut() {
                        Some(rx) => rx.recv().await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    biased;
                    done = &mut run => break done,
                    Some(token) = token => report_token(env, step, token).await?,
                }
            }
        };
        cx.early_token = None;
        let result = match result {
            Ok(result) => result,
            Err(_) => Err(crate::action::ActionError::new(format!(
                "timed out after {}s",
                limit.as_secs_f64()
            ))),
        };
        match result {
            Ok(event) => step.ran(1, event, cx.halted.is_some()),
            Err(e) => {
                let slot = match call.role {
                    ActionRole::Action => "action",
                    ActionRole::Entry => "entry action",
                    ActionRole::Exit => "exit action",
                    ActionRole::Transition => "transition action",
                };
                return Err(StepFailure::of(
                    &e,
                    format!(
                        "{slot} `{}` of state `{}` failed: {e}",
                        call.action, call.state
                    ),
                ));
            }
        }
    }
    Ok(())
}
