//! The persistence boundary: the [`Store`] trait, and one implementation per backend.
//!
//! Everything a worker or a command needs from a database goes through this trait, so the
//! engine and the worker never see SQL. What a commit does to the rows is decided once, by
//! [`plan`], for every backend. Every implementation must pass the conformance suite
//! `store::conformance` (the `conformance` feature), which the library ships for that purpose.

// Values from a database are converted with `convert`, never a lossy `as`: a corrupt row must
// not wrap around silently.
#![deny(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_possible_wrap
)]

pub(crate) mod claim;
#[cfg(feature = "conformance")]
pub mod conformance;
mod convert;
pub(crate) mod deliver;
pub(crate) mod execute;
pub(crate) mod listing;
pub mod plan;
#[cfg(feature = "postgres")]
pub mod postgres;
pub(crate) mod sql;
pub mod sqlite;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::Serialize;

use crate::clock::Micros;
use crate::engine::{Commit, Context, HistoryEntry, LogLine, NewTask, Task};

#[cfg(feature = "postgres")]
pub use postgres::{PostgresOptions, PostgresStore};

pub use listing::DURATION_WINDOW;
pub use sqlite::{Access, SqliteOptions, SqliteStore, Synchronous, Threads};

/// Where an instance is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum InstanceStatus {
    /// Has pending work.
    Running,
    /// Every branch ended in a final state.
    Completed,
    /// A step failed for good; resumable with `retry`.
    Failed,
    /// An action halted the machine.
    Halted,
    /// Cancelled by a user.
    Cancelled,
}

impl InstanceStatus {
    /// Whether `retry` may resume an instance in this status: only a failed one.
    pub fn may_retry(self) -> bool {
        self == InstanceStatus::Failed
    }

    /// Whether `cancel` may end an instance in this status, and `upgrade` may move it: a
    /// running or a failed one (an ended instance has nothing left to stop or move).
    pub fn may_cancel(self) -> bool {
        matches!(self, InstanceStatus::Running | InstanceStatus::Failed)
    }

    /// The stored spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            InstanceStatus::Running => "running",
            InstanceStatus::Completed => "completed",
            InstanceStatus::Failed => "failed",
            InstanceStatus::Halted => "halted",
            InstanceStatus::Cancelled => "cancelled",
        }
    }

    /// Parse the stored spelling.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "running" => InstanceStatus::Running,
            "completed" => InstanceStatus::Completed,
            "failed" => InstanceStatus::Failed,
            "halted" => InstanceStatus::Halted,
            "cancelled" => InstanceStatus::Cancelled,
            _ => return None,
        })
    }

    /// True for every status but `running`.
    pub fn is_end(self) -> bool {
        self != InstanceStatus::Running
    }
}

impl std::fmt::Display for InstanceStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a pending task (a step to run, or a join) is. Finished tasks are deleted by the
/// commit that finishes them, so a task row exists only in one of these states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskStatus {
    /// To run once due. Moved in by the commit that queues the task (or a countdown's, a
    /// retry's or a postponement's reschedule), by `retry` (from `failed` and `held`), and by
    /// the release of a barrier join (from `waiting`). A worker's claim leases it — it stays
    /// `ready`, *running* while the lease is unexpired — and moves it out by deleting it
    /// (finished) or marking it `failed`; a failure elsewhere in the instance moves it to
    /// `held`; halt and cancel delete it.
    Ready,
    /// A barrier join (`fan_in: all`) waiting for every branch of its instance to park or end.
    /// Moved in when the first branch parks; moved to `ready` by the commit (or, on
    /// PostgreSQL, the check right after it, or the periodic sweep) that leaves no task of
    /// the instance `ready`, `held` or `failed` (stopped branches resume on `phasm retry`
    /// and are waited for too).
    Waiting,
    /// Failed for good (retries or age used up, or a mistake in the machine); its instance is
    /// failed. Moved in by that attempt's commit; moved to `ready` by `phasm retry`.
    Failed,
    /// Stopped because another branch failed the instance. Moved in by that failure's commit;
    /// moved to `ready` by `phasm retry`.
    Held,
}

impl TaskStatus {
    /// The stored spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskStatus::Ready => "ready",
            TaskStatus::Waiting => "waiting",
            TaskStatus::Failed => "failed",
            TaskStatus::Held => "held",
        }
    }

    /// Parse the stored spelling.
    ///
    /// # Errors
    /// [`StoreError::Corrupt`] for anything else.
    pub fn parse(s: &str) -> StoreResult<Self> {
        Ok(match s {
            "ready" => TaskStatus::Ready,
            "waiting" => TaskStatus::Waiting,
            "failed" => TaskStatus::Failed,
            "held" => TaskStatus::Held,
            _ => return Err(StoreError::Corrupt(format!("task status `{s}`"))),
        })
    }
}

impl std::fmt::Display for TaskStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An instance to create, with the task that starts it.
#[derive(Debug, Clone)]
pub struct NewInstance {
    /// Unique name.
    pub name: String,
    /// Its machine.
    pub machine: String,
    /// The context it starts with.
    pub context: Context,
    /// The start task (from [`crate::engine::start_task`]).
    pub start: NewTask,
    /// The version of its machine it starts on (`None`: the latest deployed, if any). A
    /// number that is not stored pins it to none: callers check it first
    /// ([`crate::control::start_instance`] does).
    pub version: Option<u32>,
}

/// What [`WorkStore::start`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Started {
    /// A new instance was created.
    Created,
    /// An instance of that name already existed; nothing was changed.
    Existing {
        /// Its machine.
        machine: String,
        /// Its status.
        status: InstanceStatus,
    },
}

/// An event sent to an instance from outside (`phasm send`, `POST
/// /api/instances/{name}/events`, `POST /api/waits/{token}`).
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    /// The instance.
    pub instance: String,
    /// The event.
    pub event: String,
    /// Merged into the context of each branch that takes the event (top-level keys replace).
    pub data: Context,
    /// The sender's id for this event: an id already accepted for the instance is answered
    /// [`Delivered::Duplicate`] and changes nothing, so a sender may safely send again.
    pub id: Option<String>,
    /// Only the branch whose wait task has this name (a wait token's): the event is not
    /// buffered when that wait is over.
    pub wait: Option<String>,
    /// What the store checks in the delivery's transaction before it changes anything.
    pub checks: DeliveryChecks,
}

/// What a delivery must respect, checked by the store in the delivery's own transaction
/// (so an answer is true when given: nothing is changed when a check refuses).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DeliveryChecks {
    /// The largest context (bytes of JSON) a branch may have once the event's data is merged
    /// into it: a delivery that would pass it is refused ([`Delivered::TooLarge`]).
    pub max_context_bytes: Option<usize>,
    /// The most events kept for an instance: one more is refused
    /// ([`Delivered::TooManyKept`]).
    pub max_kept_events: Option<usize>,
    /// Where the event could still be taken, for keeping it: kept only while a pending step
    /// of the instance can reach a waiting state that accepts it, else refused
    /// ([`Delivered::CannotWait`]). `None`: kept whenever the instance runs.
    pub reachable: Option<Reachable>,
}

/// The steps of a machine from which a waiting state accepting one event can be reached.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Reachable {
    /// States from which such a wait can be reached (the waits themselves included): a wait,
    /// a join or a parked branch in one of them can still take the event.
    pub states: Vec<String>,
    /// Dispatches into those states, each `FROM\u{1f}EVENT` (`FROM` empty for an
    /// instance's start task).
    pub dispatches: Vec<String>,
}

impl Delivery {
    /// This delivery with its sender's id as a store keeps it (a NUL written `\0`; see
    /// [`crate::engine::text`]), copied only when the id has a NUL: each store applies this
    /// before it writes.
    pub fn storable(&self) -> std::borrow::Cow<'_, Self> {
        match self.id.as_deref().map(crate::engine::text::without_nul) {
            Some(std::borrow::Cow::Owned(id)) => std::borrow::Cow::Owned(Self {
                id: Some(id),
                ..self.clone()
            }),
            _ => std::borrow::Cow::Borrowed(self),
        }
    }
}

/// A machine's definition for [`AdminStore::deploy`] to store as a version (see
/// [`crate::config::Definition`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewVersion {
    /// The machine.
    pub machine: String,
    /// The definition's content hash: a machine whose latest version has it changed nothing.
    pub hash: String,
    /// The self-contained machine file.
    pub definition: String,
    /// The text of the file it was deployed from, as written.
    pub source: String,
    /// That file's path.
    pub path: String,
    /// Store it only if no version of the machine holds this definition yet; a version that
    /// does is answered as the machine's version (not new). A worker deploying its file uses
    /// this, so a worker started with an older file (one left running during a rolling
    /// deploy, restarted) does not make old content the latest again; `phasm deploy` does
    /// not, so deploying earlier content is how it is made live again.
    pub if_unknown: bool,
}

/// What a deploy did with one machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deployed {
    /// The machine.
    pub machine: String,
    /// Its version now (from 1).
    pub version: u32,
    /// Whether this deploy stored it (`false`: its latest version held this definition).
    pub new: bool,
}

/// A stored version of a machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionRecord {
    /// The machine.
    pub machine: String,
    /// Its number, from 1.
    pub version: u32,
    /// The definition's content hash.
    pub hash: String,
    /// The file it was deployed from.
    pub path: String,
    /// When.
    pub deployed_at: Micros,
}

/// The live instances of one version of a machine.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct VersionCounts {
    /// The machine.
    pub machine: String,
    /// The version.
    pub version: u32,
    /// Instances running on it (those waiting for an event included).
    pub running: u64,
    /// Of those, the ones with a branch waiting for an event.
    pub waiting: u64,
    /// Failed instances on it (they may be retried, so they still need it).
    pub failed: u64,
}

/// A stored version with its texts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredVersion {
    /// Which.
    pub record: VersionRecord,
    /// The self-contained machine file.
    pub definition: String,
    /// The file it was deployed from, as written.
    pub source: String,
}

/// Moving one instance to a later version of its machine ([`AdminStore::upgrade`]).
#[derive(Debug, Clone)]
pub struct UpgradeRequest {
    /// The instance.
    pub instance: String,
    /// The version it is on now; an instance found on another (moved meanwhile) is not
    /// touched.
    pub from: u32,
    /// The version it moves to.
    pub to: u32,
    /// That version's machine.
    pub target: crate::machine::Machine,
    /// States renamed on the way (`OLD → NEW`).
    pub map: std::collections::BTreeMap<String, String>,
    /// Check only: answer as if it moved, and write nothing.
    pub dry_run: bool,
}

/// What [`AdminStore::upgrade`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Upgraded {
    /// It moved (or, on a dry run, would move): its pending tasks and parked branches now
    /// belong to the target version.
    Moved {
        /// Pending tasks rewritten.
        tasks: usize,
        /// Parked branches whose state was renamed.
        parked: usize,
    },
    /// No instance has that name.
    NotFound,
    /// It has ended (completed, halted or cancelled): there is nothing to move.
    Ended(InstanceStatus),
    /// It is not on the version the request moves it from (its version now).
    OnVersion(Option<u32>),
    /// A step of it is running: it is not moved under the step (try again once it commits).
    StepRunning,
    /// A place its branches are in is not in the target (each reason names it, and the map
    /// that would fix it).
    Refused(Vec<String>),
}

/// What [`WorkStore::deliver`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivered {
    /// Taken by this many waiting branches: each wait task was replaced by the dispatch of the
    /// event (a timeout being run at the same time is refused at its commit).
    Dispatched(u32),
    /// No branch waits for the event now: it is kept, in order, and taken by the next wait
    /// of the instance that accepts it.
    Buffered,
    /// An event with this id was accepted for the instance before; nothing was done.
    Duplicate,
    /// No instance has that name.
    NotFound,
    /// The instance has ended (or failed): events are not accepted.
    NotRunning(InstanceStatus),
    /// The wait the event was addressed to ([`Delivery::wait`]) is over or does not accept
    /// the event (a token never ends its wait with the wait's timeout event); nothing was
    /// done.
    WaitOver,
    /// Merged into a waiting branch's context, the event's data would make it this many
    /// bytes, over [`DeliveryChecks::max_context_bytes`]; nothing was done.
    TooLarge(usize),
    /// The instance already keeps [`DeliveryChecks::max_kept_events`] events; nothing was
    /// done.
    TooManyKept(usize),
    /// No branch waits for the event, and none of the instance's pending steps can reach a
    /// state that would (see [`DeliveryChecks::reachable`]): nothing was kept.
    CannotWait,
}

/// A schedule's tick to fire (see [`WorkStore::fire_schedule`]).
#[derive(Debug, Clone)]
pub struct ScheduleTick {
    /// The schedule's name.
    pub schedule: String,
    /// The tick (see [`crate::schedule::Schedule::latest_tick`]).
    pub tick: Micros,
    /// Start nothing while the schedule's last instance still runs (`overlap: skip`).
    pub skip_if_running: bool,
    /// The instance the tick starts (named by
    /// [`crate::schedule::Schedule::instance_name`]).
    pub instance: NewInstance,
}

/// What [`WorkStore::fire_schedule`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fired {
    /// The store had not seen the schedule: this tick is recorded as its last and nothing
    /// starts (a new schedule begins with its next tick, not with one from the past).
    Registered,
    /// The tick's instance was started ([`Started::Existing`] if its name existed already).
    Started(Started),
    /// This tick, or a later one, fired already (another worker fired it).
    AlreadyFired,
    /// `overlap: skip` and the schedule's last instance still runs: nothing started, and the
    /// tick counts as fired.
    Skipped {
        /// The instance still running.
        running: String,
    },
}

/// What the store knows of a schedule: the last tick that fired.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ScheduleRecord {
    /// The schedule's name.
    pub name: String,
    /// The last tick fired (or skipped, or the tick at which the schedule was first seen).
    pub last_tick: Micros,
    /// The instance the last started tick started.
    pub last_instance: Option<String>,
    /// That instance's status (`None`: no instance yet, or it was scrubbed).
    pub last_status: Option<InstanceStatus>,
    /// When the record last changed.
    pub updated_at: Micros,
}

/// A branch waiting for an event, as shown by `phasm status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WaitView {
    /// The waiting state.
    pub state: String,
    /// The branch (`""` for an instance's first branch).
    pub branch: String,
    /// The events it accepts.
    pub events: Vec<String>,
    /// When its timeout fires (`None`: it waits for ever).
    pub deadline: Option<Micros>,
    /// The event its timeout dispatches.
    pub timeout_event: Option<String>,
    /// Its wait task's name (what a wait token addresses).
    pub task: String,
    /// Since when it waits.
    pub since: Micros,
}

/// An event accepted for an instance but not taken yet: no branch waited for it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BufferedEvent {
    /// The event.
    pub event: String,
    /// The sender's id, if it gave one.
    pub id: Option<String>,
    /// The size of its data, in bytes of JSON (a view never carries the data itself: a
    /// hundred kept events of a megabyte each would make one view 100 MB).
    pub bytes: u64,
    /// When it was accepted.
    pub at: Micros,
}

/// Which tasks a worker wants.
#[derive(Debug, Clone)]
pub struct ClaimRequest {
    /// Who claims (shown in task views; fencing uses the claim number).
    pub owner: String,
    /// How long the lease lasts unless renewed.
    pub lease: Duration,
    /// Most tasks to claim.
    pub limit: usize,
    /// Most tasks to claim per queue, for queues with a concurrency limit.
    pub queue_limits: Vec<(String, usize)>,
    /// Only tasks of these queues (`None`: every queue).
    pub queues: Option<Vec<String>>,
    /// Which worker pools' tasks (a transition's `target`).
    pub targets: Targets,
    /// The configured limits of queues (`queues:`), for stores shared by several workers to
    /// enforce across all of them. `queue_limits` already holds this worker's own share.
    pub shared_limits: Vec<(String, crate::machine::QueueLimits)>,
}

impl ClaimRequest {
    /// How many more tasks of each limited queue this claim may take: this worker's own
    /// share ([`ClaimRequest::queue_limits`]) tightened by `shared`, the room every worker's
    /// claims leave (each store reads it from its own counts).
    pub(crate) fn room(&self, shared: Vec<(String, usize)>) -> Vec<(String, usize)> {
        let mut room = self.queue_limits.clone();
        for (queue, allowed) in shared {
            match room.iter_mut().find(|(q, _)| *q == queue) {
                Some((_, left)) => *left = (*left).min(allowed),
                None => room.push((queue, allowed)),
            }
        }
        room
    }
}

/// Which tasks a worker takes by their `target` (Fantasm's App Engine target: a pool of
/// workers for heavy steps).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Targets {
    /// Every task, targeted or not (`phasm run`, immediate mode).
    #[default]
    Any,
    /// Only tasks without a target (a plain `phasm worker`).
    Untargeted,
    /// Only tasks with one of these targets (`phasm worker --target NAME`).
    Only(Vec<String>),
}

impl Targets {
    /// As a claim's filter: (any target, only untargeted, only these targets).
    pub(crate) fn filter(&self) -> (bool, bool, &[String]) {
        match self {
            Targets::Any => (true, false, &[]),
            Targets::Untargeted => (false, true, &[]),
            Targets::Only(names) => (false, false, names),
        }
    }

    /// Whether a task with this target is taken.
    pub fn takes(&self, target: Option<&str>) -> bool {
        match (self, target) {
            (Targets::Any, _) => true,
            (Targets::Untargeted, t) => t.is_none(),
            (Targets::Only(names), Some(t)) => names.iter().any(|n| n == t),
            (Targets::Only(_), None) => false,
        }
    }
}

impl Targets {
    /// The stored form: `None` for [`Targets::Any`], else a JSON list (empty for
    /// [`Targets::Untargeted`]).
    pub fn to_column(&self) -> Option<String> {
        match self {
            Targets::Any => None,
            Targets::Untargeted => Some("[]".into()),
            Targets::Only(names) => serde_json::to_string(names).ok(),
        }
    }

    /// Read the stored form back (see [`Targets::to_column`]).
    pub fn from_column(column: Option<&str>) -> StoreResult<Self> {
        let Some(text) = column else {
            return Ok(Targets::Any);
        };
        let names: Vec<String> = serde_json::from_str(text)
            .map_err(|e| StoreError::Corrupt(format!("worker targets `{text}`: {e}")))?;
        Ok(if names.is_empty() {
            Targets::Untargeted
        } else {
            Targets::Only(names)
        })
    }
}

impl Serialize for Targets {
    /// `"any"`, `"untargeted"`, or the list of target names.
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Targets::Any => s.serialize_str("any"),
            Targets::Untargeted => s.serialize_str("untargeted"),
            Targets::Only(names) => names.serialize(s),
        }
    }
}

/// A running worker process, as it announces itself (see [`WorkStore::worker_alive`]), so that
/// `phasm status` can tell when no worker will take a step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WorkerView {
    /// Its name: the lease owner shown on the steps it runs.
    pub owner: String,
    /// The machines it knows (it takes no step of another machine).
    pub machines: Vec<String>,
    /// Which worker pools' steps it takes (`target`).
    pub targets: Targets,
    /// Only these queues (`None`: every queue).
    pub queues: Option<Vec<String>>,
    /// When it started.
    pub started_at: Micros,
    /// When it last said it was alive.
    pub seen_at: Micros,
    /// When it counts as gone unless it says so again (a killed worker says nothing).
    pub expires_at: Micros,
    /// What it says of itself besides.
    pub about: WorkerAbout,
}

/// What a worker says of itself at each heartbeat, for operators (`/workers`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, serde::Deserialize)]
#[serde(default)]
pub struct WorkerAbout {
    /// The host it runs on.
    pub host: String,
    /// Its process id.
    pub pid: u32,
    /// The phasm version it runs.
    pub version: String,
    /// Most steps it runs at once.
    pub concurrency: u32,
    /// Steps it was running at its last heartbeat.
    pub running: u32,
    /// The machine versions it met and cannot run (an action bound to nothing in it, say),
    /// each with why: their steps wait for a worker that can.
    pub cannot_run: Vec<String>,
}

impl WorkerView {
    /// Whether this worker takes steps of `machine` on `queue` for pool `target`.
    pub fn takes(&self, machine: &str, queue: &str, target: Option<&str>) -> bool {
        self.targets.takes(target)
            && self.machines.iter().any(|m| m == machine)
            && self
                .queues
                .as_ref()
                .is_none_or(|q| q.iter().any(|x| x == queue))
    }
}

/// How long the row of a worker that stopped saying it is alive (killed, its host gone) is
/// kept: a day.
pub(crate) const WORKERS_KEPT: Micros = 24 * 3600 * 1_000_000;

/// A worker's row read back: `times` are its start, last announcement and expiry.
pub(crate) fn worker_view(
    owner: String,
    machines: &str,
    targets: Option<&str>,
    queues: Option<&str>,
    times: [Micros; 3],
    about: Option<&str>,
) -> StoreResult<WorkerView> {
    let list = |text: &str| -> StoreResult<Vec<String>> {
        serde_json::from_str(text)
            .map_err(|e| StoreError::Corrupt(format!("worker `{owner}`: `{text}`: {e}")))
    };
    let [started_at, seen_at, expires_at] = times;
    Ok(WorkerView {
        machines: list(machines)?,
        targets: Targets::from_column(targets)?,
        queues: queues.map(list).transpose()?,
        started_at,
        seen_at,
        expires_at,
        about: about
            .and_then(|a| serde_json::from_str(a).ok())
            .unwrap_or_default(),
        owner,
    })
}

/// Pending work of one queue, for metrics.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct QueueStats {
    /// The queue.
    pub queue: String,
    /// Steps due now and not running.
    pub due: u64,
    /// Steps waiting for a countdown or a retry backoff.
    pub scheduled: u64,
    /// Steps a worker holds.
    pub running: u64,
    /// How long the oldest due step has waited, in seconds (0 with none due).
    pub oldest_due_age_seconds: f64,
}

/// A snapshot of the store's pending work, for metrics.
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct StoreStats {
    /// Per queue.
    pub queues: Vec<QueueStats>,
    /// Branches parked at fan-in states.
    pub parked: u64,
}

/// What the console's machine page shows of one machine's instances. Every figure is read
/// through an index, so the cost does not grow with the number of instances that ended long
/// ago.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct MachineOverview {
    /// Instances running now.
    pub running: u64,
    /// Instances failed and held (until retried or cancelled).
    pub failed: u64,
    /// Instances that ended since the `hour` given to [`ReadStore::machine_overview`], by
    /// status.
    pub ended_last_hour: Vec<(InstanceStatus, u64)>,
    /// … and since its `day`.
    pub ended_last_day: Vec<(InstanceStatus, u64)>,
    /// Where running and failed instances are: their pending steps by the state they leave
    /// and the event they dispatch (the machine says which state that leads into).
    pub states: Vec<StateCount>,
    /// The latest 1,000 failed instances grouped by their error, most common first (at most
    /// 10 groups).
    pub failures: Vec<FailureGroup>,
    /// Steps committed since `hour`: how long they took and how many needed retries.
    pub steps_last_hour: StepTimes,
    /// … and since `day`.
    pub steps_last_day: StepTimes,
}

/// How long a machine's steps took over a time window: the steps committed in the window by
/// the [`STEP_TIMES_INSTANCES`] instances of the machine that ended last in it and its
/// newest running ones, at most [`STEP_TIMES_SAMPLE`] steps (so reading it is bounded however
/// busy the machine, and no index on history's times costs each step a write).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct StepTimes {
    /// Steps measured (at most [`STEP_TIMES_SAMPLE`]).
    pub steps: u64,
    /// The instances read had more steps in the window than were measured.
    pub sampled: bool,
    /// Of the steps measured, those that committed on a retry (a failed attempt before).
    pub retried: u64,
    /// The median time of the committing attempt.
    pub p50: Micros,
    /// The 99th percentile.
    pub p99: Micros,
}

/// Steps committed lately (see [`ReadStore::recent_steps`]).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RecentSteps {
    /// When the window counted starts: the `since` asked for, or later when more steps than
    /// [`RECENT_STEPS_SAMPLE`] were committed since (the oldest of those counted).
    pub window_start: Micros,
    /// The steps, by machine and transition.
    pub groups: Vec<RecentGroup>,
}

/// Steps of one machine's transition committed in a [`RecentSteps`] window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecentGroup {
    /// The machine.
    pub machine: String,
    /// The state left (`None`: starting).
    pub from: Option<String>,
    /// The event.
    pub event: String,
    /// The state entered.
    pub to: String,
    /// How many.
    pub steps: u64,
}

/// [`ReadStore::recent_steps`] counts at most this many of the latest steps.
pub const RECENT_STEPS_SAMPLE: usize = 5_000;

/// Where a [`RecentSteps`] window starts: `since`, unless the sample of the latest `sample`
/// steps was full and all in the window (then more steps than that were committed since, and
/// the window counted starts at the oldest sampled).
pub(crate) fn recent_window(
    since: Micros,
    counted: i64,
    sample: i64,
    oldest: Option<Micros>,
) -> Micros {
    match oldest {
        Some(oldest) if counted >= sample && oldest > since => oldest,
        _ => since,
    }
}

/// At most this many steps are measured for [`StepTimes`].
pub const STEP_TIMES_SAMPLE: usize = 10_000;

/// [`StepTimes`] reads the steps of at most this many ended instances of the machine, and as
/// many running ones.
pub const STEP_TIMES_INSTANCES: usize = 1_000;

impl StepTimes {
    /// The figures of some steps: `(duration, attempt)` of each, in any order.
    pub fn measure(mut steps: Vec<(Micros, u32)>, sampled: bool) -> Self {
        steps.sort_unstable_by_key(|(d, _)| *d);
        // Nearest rank: the smallest duration at or above `percent` % of the steps.
        let rank = |percent: usize| -> Micros {
            let i = (percent * steps.len())
                .div_ceil(100)
                .clamp(1, steps.len().max(1))
                - 1;
            steps.get(i).map_or(0, |(d, _)| *d)
        };
        Self {
            steps: steps.len() as u64,
            sampled,
            retried: steps.iter().filter(|(_, a)| *a > 0).count() as u64,
            p50: rank(50),
            p99: rank(99),
        }
    }
}

/// Pending steps of one machine that leave one state on one event (see
/// [`MachineOverview::states`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StateCount {
    /// The state the steps leave (`None`: starting, before the initial state).
    pub state: Option<String>,
    /// The event they dispatch (a wait's: its timeout event, or none).
    pub event: String,
    /// The steps are waits for events: the branches are in `state`, not past it.
    pub waiting: bool,
    /// Steps of running instances.
    pub running: u64,
    /// Steps of failed instances (held, or the one that failed).
    pub failed: u64,
    /// When the oldest of them was queued.
    pub oldest: Micros,
}

/// Failed instances that share an error.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FailureGroup {
    /// The error (cut at 500 characters).
    pub error: String,
    /// How many.
    pub instances: u64,
    /// The latest of them to fail.
    pub latest: String,
    /// When it failed.
    pub latest_at: Micros,
}

/// The result of applying one commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// Applied.
    Yes,
    /// Refused: the lease was lost (expired, or the task was claimed again, cancelled or
    /// finished by someone else). Nothing of the commit was applied.
    Fenced,
}

/// Lets a commit hand the tasks it creates straight back to its worker, already leased, so a
/// chain of steps continues without a separate claim (one store round trip per step).
#[derive(Debug, Clone)]
pub struct SuccessorClaim {
    /// Who claims.
    pub owner: String,
    /// Lease length.
    pub lease: Duration,
    /// Only tasks of these queues (`None`: every queue)...
    pub queues: Option<Vec<String>>,
    /// ...except these (queues with limits the worker must count).
    pub exclude: Vec<String>,
    /// Only instances of these machines.
    pub machines: Vec<String>,
    /// Only tasks of these worker pools.
    pub targets: Targets,
    /// At most this many per commit.
    pub max: usize,
}

impl SuccessorClaim {
    /// Whether a new task on `queue` of `machine`, for pool `target`, may be claimed.
    pub fn takes(&self, queue: &str, machine: &str, target: Option<&str>) -> bool {
        self.targets.takes(target)
            && self
                .queues
                .as_ref()
                .is_none_or(|q| q.iter().any(|x| x == queue))
            && !self.exclude.iter().any(|x| x == queue)
            && self.machines.iter().any(|m| m == machine)
    }
}

/// The result of applying one commit.
#[derive(Debug, Clone, PartialEq)]
pub struct AppliedCommit {
    /// Applied or fenced.
    pub applied: Applied,
    /// Tasks the commit created that are due now, leased to the committing worker (see
    /// [`SuccessorClaim`]).
    pub claimed: Vec<Task>,
}

/// A pending task, as shown by `phasm status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TaskView {
    /// Task name.
    pub name: String,
    /// The state it leaves (`null` for the start task).
    pub from: Option<String>,
    /// The event it dispatches.
    pub event: String,
    /// Where it is (see [`TaskStatus`]).
    pub status: TaskStatus,
    /// When it is due, or when its lease expires if a worker holds it.
    pub due_at: Micros,
    /// Whether a worker holds it now.
    pub leased_by: Option<String>,
    /// Attempts so far.
    pub attempts: u32,
    /// The last attempt's error.
    pub last_error: Option<String>,
    /// Its queue.
    pub queue: String,
    /// The worker pool it is for (`target`); only `phasm worker --target NAME` takes it.
    pub target: Option<String>,
    /// The branch it runs on (`""`: the main line).
    pub branch: String,
}

/// The longest log message a page carries; longer ones are cut, with a note of how much.
pub const MAX_PAGE_MESSAGE_CHARS: usize = 16 * 1024;

/// Which rows of an instance's history or log to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRequest {
    /// Rows after this cursor (0: from the first; else the `next` of the previous page).
    pub after: i64,
    /// At most this many rows.
    pub limit: usize,
}

/// One page of rows and the cursor of the next page.
#[derive(Debug, Clone, PartialEq)]
pub struct Page<T> {
    /// The rows, oldest first.
    pub items: Vec<T>,
    /// The cursor of the next page; `None` when this page is the last.
    pub next: Option<i64>,
}

impl<T> Page<T> {
    /// A page from up to `limit + 1` rows with their cursors: the extra row only says that
    /// there is a next page.
    pub fn from_rows(mut rows: Vec<(i64, T)>, limit: usize) -> Self {
        let more = rows.len() > limit;
        rows.truncate(limit);
        let next = if more {
            rows.last().map(|(id, _)| *id)
        } else {
            None
        };
        Self {
            items: rows.into_iter().map(|(_, item)| item).collect(),
            next,
        }
    }
}

/// A message cut for a page: `text` was read cut at [`MAX_PAGE_MESSAGE_CHARS`] characters of
/// a message `full_chars` long.
pub fn cut_message(text: String, full_chars: i64) -> String {
    let full = usize::try_from(full_chars).unwrap_or(0);
    if full > MAX_PAGE_MESSAGE_CHARS {
        format!(
            "{text}… [cut: {} more characters; `phasm logs` shows all]",
            full - MAX_PAGE_MESSAGE_CHARS
        )
    } else {
        text
    }
}

/// Call `each` with every committed transition of instance `name`, oldest first, reading
/// them [`ReadStore::history_page`] by page so memory stays bounded however long it ran.
/// Nothing is called for an unknown instance.
///
/// # Errors
/// The store's, from any page.
pub async fn for_each_transition<S: ReadStore + ?Sized>(
    store: &S,
    name: &str,
    mut each: impl FnMut(&HistoryRow),
) -> StoreResult<()> {
    let mut page = PageRequest {
        after: 0,
        limit: 1000,
    };
    while let Some(rows) = store.history_page(name, page, None).await? {
        rows.items.iter().for_each(&mut each);
        match rows.next {
            Some(next) => page.after = next,
            None => return Ok(()),
        }
    }
    Ok(())
}

/// One committed step as history pages read it: the transition, its row id (the cursor, and
/// how [`ReadStore::step`] finds it) and its step number on its branch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryRow {
    /// The row's id, increasing in commit order within an instance.
    pub id: i64,
    /// The step number of the task that ran (`None`: recorded before history kept step numbers).
    pub step: Option<u64>,
    /// The transition.
    pub entry: HistoryEntry,
}

/// A row reads as its transition (`row.to`, `row.event`, …).
impl std::ops::Deref for HistoryRow {
    type Target = HistoryEntry;

    fn deref(&self) -> &HistoryEntry {
        &self.entry
    }
}

/// One step in full: what the console's step page and `GET
/// /api/instances/{name}/history/{id}` show.
#[derive(Debug, Clone, PartialEq)]
pub struct StepDetail {
    /// The step.
    pub row: HistoryRow,
    /// The context the step was given (`None` for a join, whose input is the parked branches,
    /// or for a step recorded before phasm kept contexts).
    pub given: Option<Context>,
    /// What the step passed on along its branch.
    pub passed_on: PassedOn,
    /// The log lines of the step's task (its failed attempts' errors among them), oldest
    /// first, at most [`VIEW_ROWS`].
    pub logs: Vec<LogLine>,
}

/// Where the context a step produced went (see [`StepDetail::passed_on`]).
#[derive(Debug, Clone, PartialEq)]
pub enum PassedOn {
    /// The next step of the branch ran with it (that step's history id).
    Step(i64, Option<Context>),
    /// The branch's next step is pending with it.
    Pending(Context),
    /// Nothing on the branch followed: it ended, parked at a fan-in, or the instance stopped.
    Nothing,
}

/// How many transitions and pending tasks an [`InstanceView`] carries at most, so that
/// reading an instance takes bounded memory however long it ran or however wide it forked.
pub const VIEW_ROWS: usize = 100;

/// Everything known about one instance.
#[derive(Debug, Clone, PartialEq)]
pub struct InstanceView {
    /// Name.
    pub name: String,
    /// Machine.
    pub machine: String,
    /// The version of its machine it started on (`None`: it started before its machine was
    /// ever deployed; the first deploy adopts it as version 1).
    pub version: Option<u32>,
    /// Status.
    pub status: InstanceStatus,
    /// The context it started with.
    pub context: Context,
    /// Why it failed or halted.
    pub error: Option<String>,
    /// Created.
    pub created_at: Micros,
    /// Last status change.
    pub updated_at: Micros,
    /// Ended.
    pub ended_at: Option<Micros>,
    /// The latest [`VIEW_ROWS`] committed transitions, oldest first ([`ReadStore::history_page`]
    /// reads them all).
    pub history: Vec<HistoryRow>,
    /// How many transitions were committed in all.
    pub history_total: u64,
    /// The first [`VIEW_ROWS`] pending tasks, oldest first.
    pub tasks: Vec<TaskView>,
    /// How many tasks are pending in all.
    pub tasks_total: u64,
    /// The states its branches ended in, each once, in the order they were last ended in.
    pub end_states: Vec<String>,
    /// The latest context: that of the oldest pending task, else the context the last
    /// branch ended with.
    pub current_context: Option<Context>,
    /// The instance whose action spawned this one.
    pub parent: Option<String>,
    /// Instances this one spawned.
    pub children: Vec<String>,
    /// Where its branches are.
    pub branches: BranchCounts,
    /// The branches waiting for events from outside (at most [`VIEW_ROWS`]).
    pub waiting: Vec<WaitView>,
    /// Events accepted but not taken yet, oldest first (at most [`VIEW_ROWS`]).
    pub buffered: Vec<BufferedEvent>,
}

impl InstanceView {
    /// Whether a pending task is the wait of a branch listed in [`InstanceView::waiting`],
    /// rather than a step for a worker to run.
    pub fn is_wait(&self, task: &TaskView) -> bool {
        self.waiting.iter().any(|w| w.task == task.name)
    }
}

/// Where an instance's branches are, counted from its pending tasks, parked items and
/// history (no counter row that every branch would have to update).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct BranchCounts {
    /// Pending steps (due, waiting for a countdown, or running).
    pub live: u64,
    /// Steps stopped because another branch failed the instance: a failed branch fails the
    /// whole instance and its sibling branches stop where they are; `phasm retry` resumes
    /// them with the failed one. (A step that was running when the instance failed has its
    /// commit refused and is held too: it runs again after a retry.)
    pub held: u64,
    /// Branches parked at fan-in states, waiting for a join.
    pub parked: u64,
    /// Branches that ended in a final state.
    pub ended: u64,
    /// Steps that failed for good.
    pub failed: u64,
    /// Branches waiting for an event from outside (a wait whose timeout is being run counts
    /// as live).
    pub waiting: u64,
}

/// A store's wait-token key once read (it never changes after the database is made), so a
/// worker entering waits and a server checking tokens read it once. Its `Debug` shows no key.
#[derive(Default)]
pub(crate) struct WaitKeyCache(std::sync::OnceLock<Vec<u8>>);

impl WaitKeyCache {
    /// The key, read with `read` the first time.
    pub(crate) async fn get(
        &self,
        read: impl std::future::Future<Output = StoreResult<Vec<u8>>>,
    ) -> StoreResult<Vec<u8>> {
        if let Some(key) = self.0.get() {
            return Ok(key.clone());
        }
        let key = read.await?;
        Ok(self.0.get_or_init(|| key).clone())
    }
}

impl std::fmt::Debug for WaitKeyCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.get().is_some() {
            "WaitKeyCache(read)"
        } else {
            "WaitKeyCache(unread)"
        })
    }
}

/// A wait task's stored `accepts` column (see [`crate::engine::Accept`]); `task` names the
/// task in the error when it does not read back.
fn parse_accepts(task: &str, accepts: Option<&str>) -> StoreResult<Vec<crate::engine::Accept>> {
    match accepts {
        Some(text) => serde_json::from_str(text)
            .map_err(|e| StoreError::Corrupt(format!("wait task `{task}`: accepts: {e}"))),
        None => Ok(Vec::new()),
    }
}

/// A wait task read back from its row, as the wait the commit that began it queued: the
/// columns a delivery needs (the others do not shape the event's dispatch).
pub(crate) fn stored_wait(
    name: String,
    from_state: Option<String>,
    context: Context,
    step: u64,
    branch: String,
    accepts: Option<&str>,
) -> StoreResult<crate::engine::NewWait> {
    let accepts = parse_accepts(&name, accepts)?;
    Ok(crate::engine::NewWait {
        task: NewTask {
            name,
            from_state,
            event: String::new(),
            kind: crate::engine::TaskKind::Wait,
            context,
            step,
            branch,
            queue: String::new(),
            target: None,
            due_at: crate::engine::NEVER,
            token: None,
        },
        accepts,
    })
}

/// A wait task's row as a [`WaitView`]: `event` is its timeout event (`""` without one),
/// `accepts` its stored [`crate::engine::Accept`] list.
pub(crate) fn wait_view(
    task: String,
    state: Option<String>,
    branch: String,
    event: String,
    due_at: Micros,
    accepts: Option<&str>,
    since: Micros,
) -> StoreResult<WaitView> {
    let accepts = parse_accepts(&task, accepts)?;
    Ok(WaitView {
        state: state.unwrap_or_default(),
        branch,
        events: accepts.into_iter().map(|a| a.event).collect(),
        deadline: (due_at != crate::engine::NEVER).then_some(due_at),
        timeout_event: (!event.is_empty()).then_some(event),
        task,
        since,
    })
}

/// One line of `phasm list`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InstanceSummary {
    /// Name.
    pub instance: String,
    /// Machine.
    pub machine: String,
    /// Status.
    pub status: InstanceStatus,
    /// Created.
    pub created_at: Micros,
    /// Last status change.
    pub updated_at: Micros,
    /// Why it failed or halted.
    pub error: Option<String>,
    /// The instance that spawned it.
    pub parent: Option<String>,
    /// When it ended.
    pub ended_at: Option<Micros>,
    /// Transitions committed.
    pub steps: u64,
    /// Its oldest pending step (`None`: nothing pending).
    pub pending: Option<PendingStep>,
}

/// Which instances `list` returns, and in which order. Every condition narrows the list.
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    /// Only this machine.
    pub machine: Option<String>,
    /// Only instances on this version of their machine (with `machine`, its version; else
    /// that version of each machine).
    pub version: Option<u32>,
    /// Only this status.
    pub status: Option<InstanceStatus>,
    /// At most this many; 0 means 100.
    pub limit: usize,
    /// Only instances after this one (the last of the previous page) in the list's order:
    /// cursor paging.
    pub before: Option<String>,
    /// Only names that start with this text (case matters). The list is then in name order,
    /// descending (with [`ListOrder::Created`]), which is newest first for phasm's
    /// generated `MACHINE-YYYYMMDDHHMMSS-…` names.
    pub prefix: Option<String>,
    /// Only instances with a pending step of one of these kinds (the steps that put a branch
    /// in one state: see [`crate::control::steps_into`]). An empty list matches nothing.
    pub steps: Option<Vec<StepMatch>>,
    /// Only instances with a pending step (of `steps`, when given) queued before this time:
    /// "stuck for more than an hour".
    pub queued_before: Option<Micros>,
    /// Only instances created at or after this time.
    pub created_after: Option<Micros>,
    /// Only instances created before this time.
    pub created_before: Option<Micros>,
    /// Only instances that ended at or after this time.
    pub ended_after: Option<Micros>,
    /// Only instances that ended before this time.
    pub ended_before: Option<Micros>,
    /// The order.
    pub order: ListOrder,
}

/// The order of [`ReadStore::list`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ListOrder {
    /// Newest first (the default); in name order, descending, with a name prefix.
    #[default]
    Created,
    /// Most recently ended first; only instances that ended.
    Ended,
    /// Longest first (from creation to end), among the [`DURATION_WINDOW`] instances that
    /// ended last (of [`ListFilter::machine`], in the ended range when given): bounded
    /// reading, and no index of durations for every ending to write.
    Duration,
    /// Oldest first (a running instance's age is its duration so far).
    Oldest,
}

/// A kind of pending step (see [`ListFilter::steps`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepMatch {
    /// The state the step leaves (`None`: a start step).
    pub from: Option<String>,
    /// The event it dispatches; `None`: a wait for events in `from`.
    pub event: Option<String>,
}

/// A pending step of a listed instance: its oldest one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PendingStep {
    /// The state it leaves (`None`: the start step).
    pub from: Option<String>,
    /// The event it dispatches.
    pub event: String,
    /// It is a wait for events (the branch is in `from`).
    pub waiting: bool,
    /// When it was queued.
    pub queued_at: Micros,
}

/// What `retry` or `cancel` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Control {
    /// Done.
    Done,
    /// No instance has that name.
    NotFound,
    /// The instance's status does not allow it.
    NotAllowed(InstanceStatus),
}

/// Why a store operation failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The database reported an error, could not be reached, or cannot be used as asked.
    #[error("database error: {message}")]
    Database {
        /// What went wrong, for people.
        message: String,
        /// Whether trying again may succeed — a lost connection, a busy or locked database, a
        /// full disk, a conflict between transactions — rather than fail the same way.
        transient: bool,
        /// The driver's error, when there is one.
        #[source]
        source: Option<Arc<dyn std::error::Error + Send + Sync>>,
    },
    /// Stored data could not be read back.
    #[error("corrupt data in the store: {0}")]
    Corrupt(String),
    /// The store has shut down.
    #[error("the store is closed")]
    Closed,
    /// The database was written by a newer phasm.
    #[error("the database has schema version {found}, newer than this phasm understands ({supported}); upgrade phasm")]
    TooNew {
        /// Version found.
        found: i64,
        /// Newest version this build knows.
        supported: i64,
    },
}

impl StoreError {
    /// An error of phasm's own finding (a missing file, a refused schema): not transient.
    pub fn database(message: impl Into<String>) -> Self {
        StoreError::Database {
            message: message.into(),
            transient: false,
            source: None,
        }
    }

    /// A driver's error, kept as the source.
    pub fn driver(
        message: impl Into<String>,
        transient: bool,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        StoreError::Database {
            message: message.into(),
            transient,
            source: Some(Arc::new(source)),
        }
    }

    /// Whether trying the operation again may succeed (see [`StoreError::Database`]).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            StoreError::Database {
                transient: true,
                ..
            }
        )
    }

    /// The same error, its message led by `what` (what was being done).
    pub fn during(&self, what: &str) -> Self {
        match self {
            StoreError::Database {
                message,
                transient,
                source,
            } => StoreError::Database {
                message: format!("{what}: {message}"),
                transient: *transient,
                source: source.clone(),
            },
            other => other.clone(),
        }
    }
}

/// Result of a store operation.
pub type StoreResult<T> = Result<T, StoreError>;

/// The hot path: what workers do on every step — start, claim, renew, commit — and what
/// keeps them going (wake-ups, the sweep, saying they are alive). Every method is atomic;
/// `apply` is fenced by leases.
#[async_trait]
pub trait WorkStore: Send + Sync + std::fmt::Debug {
    /// Create an instance and its start task, unless one of that name exists (idempotent).
    async fn start(&self, now: Micros, instance: NewInstance) -> StoreResult<Started> {
        self.start_many(now, vec![instance])
            .await?
            .pop()
            .ok_or_else(|| StoreError::database("starting an instance answered nothing"))
    }

    /// Create many instances, each with its start task, in one transaction: all of them or
    /// none (an error). An instance whose name exists already — in the store, or earlier in
    /// `instances` — is left as it is and answered [`Started::Existing`]. The answers are in
    /// the order of `instances`.
    async fn start_many(
        &self,
        now: Micros,
        instances: Vec<NewInstance>,
    ) -> StoreResult<Vec<Started>>;

    /// Claim due tasks of running instances with a lease until `now + request.lease`.
    async fn claim(&self, now: Micros, request: &ClaimRequest) -> StoreResult<Vec<Task>>;

    /// Extend leases still held (`(task id, claim)`) to `until`; `false` where lost.
    async fn renew(
        &self,
        now: Micros,
        leases: &[(i64, i64)],
        until: Micros,
    ) -> StoreResult<Vec<bool>>;

    /// Apply one commit — its [`plan`] — all or nothing, and only if its lease is still held
    /// at `now` (else [`Applied::Fenced`], and nothing of it happened). The commit is shared,
    /// so that a caller that may try again keeps it without a copy. With `successors`,
    /// new tasks that are due at once are leased to that worker and returned. An error means
    /// nothing of the commit was applied, unless the reply was lost after the database
    /// committed it: a retry is then refused by the fence, which is safe.
    async fn apply(
        &self,
        now: Micros,
        commit: std::sync::Arc<Commit>,
        successors: Option<&SuccessorClaim>,
    ) -> StoreResult<AppliedCommit>;

    /// Deliver an event sent from outside, in one transaction: every waiting branch of the
    /// instance that accepts it takes it (its wait task is replaced by the event's dispatch),
    /// or, with none, the event is buffered for the next wait that accepts it. See
    /// [`Delivered`] for the answers.
    async fn deliver(&self, now: Micros, delivery: &Delivery) -> StoreResult<Delivered>;

    /// Fire a schedule's tick, in one transaction that every worker of every process goes
    /// through: a tick fires only if it is later than the last one recorded for the schedule
    /// (the fence), so each tick starts at most one instance however many workers fire it,
    /// and a tick earlier than one already fired never does. See [`Fired`] for the answers.
    async fn fire_schedule(&self, now: Micros, tick: &ScheduleTick) -> StoreResult<Fired>;

    /// The key that signs wait tokens (see [`crate::token`]): random, made when the database
    /// was created, the same for every process using it.
    async fn wait_key(&self) -> StoreResult<Vec<u8>>;

    /// The earliest time a task becomes due (or a lease expires), if any task is pending;
    /// waits without a timeout ([`crate::engine::NEVER`]) do not count.
    async fn next_due(&self) -> StoreResult<Option<Micros>>;

    /// Say that a worker is alive until `worker.expires_at` (insert or refresh its row); rows
    /// of workers gone for a day are removed.
    async fn worker_alive(&self, now: Micros, worker: &WorkerView) -> StoreResult<()>;

    /// A worker stopped: remove its row.
    async fn worker_stopped(&self, owner: &str) -> StoreResult<()>;

    /// Notified whenever this process creates or reschedules a task, so an idle worker in
    /// the same process wakes at once. (A shared database also notifies for other
    /// processes' work.)
    fn changes(&self) -> Arc<tokio::sync::Notify>;

    /// Whether [`WorkStore::changes`] also reports work queued by other processes, so an idle
    /// worker may poll rarely.
    fn notifies_other_processes(&self) -> bool {
        false
    }

    /// Repair what a crash between a commit and its follow-up could leave undone (an
    /// instance whose last branch ended but was not marked completed, a barrier join not
    /// released). Workers call it now and then; a no-op where commits do it all atomically.
    async fn sweep(&self, _now: Micros) -> StoreResult<()> {
        Ok(())
    }
}

/// What operators and the API read: instances, lists, logs and history pages, metrics and
/// the live workers. Memory per call is bounded, except for [`ReadStore::logs`].
#[async_trait]
pub trait ReadStore: Send + Sync + std::fmt::Debug {
    /// The stored versions of `machine` (every machine's with `None`), by machine, oldest
    /// first.
    async fn versions(&self, machine: Option<&str>) -> StoreResult<Vec<VersionRecord>>;

    /// The live instances on each version of `machine` (of every machine with `None`), by
    /// machine and version; versions without any are left out. Read through the
    /// `(version, status)` index of live instances and the index of waits.
    async fn version_counts(&self, machine: Option<&str>) -> StoreResult<Vec<VersionCounts>>;

    /// One version of a machine with its texts.
    async fn version(&self, machine: &str, version: u32) -> StoreResult<Option<StoredVersion>>;

    /// One version with its texts, by its store id (an instance's [`crate::engine::Task::version`]).
    async fn version_by_id(&self, id: i64) -> StoreResult<Option<StoredVersion>>;

    /// One instance: its status, counts, latest transitions and first pending tasks (at most
    /// [`VIEW_ROWS`] of each; memory per call is bounded).
    async fn instance(&self, name: &str) -> StoreResult<Option<InstanceView>>;

    /// One instance's status, without the rest of its view: one row read, however many
    /// branches, tasks and transitions it has (a worker watching instances asks often).
    async fn status(&self, name: &str) -> StoreResult<Option<InstanceStatus>> {
        Ok(self.instance(name).await?.map(|v| v.status))
    }

    /// The instances an instance spawned, oldest first.
    async fn children(&self, name: &str) -> StoreResult<Vec<String>> {
        Ok(self
            .instance(name)
            .await?
            .map(|v| v.children)
            .unwrap_or_default())
    }

    /// Instances, newest first.
    async fn list(&self, filter: &ListFilter) -> StoreResult<Vec<InstanceSummary>>;

    /// An instance's log lines, oldest first.
    async fn logs(&self, name: &str) -> StoreResult<Vec<LogLine>>;

    /// A page of an instance's history, oldest first, of one branch when `branch` is given
    /// (`None`: no such instance). Memory per call is bounded by `page.limit`.
    async fn history_page(
        &self,
        name: &str,
        page: PageRequest,
        branch: Option<&str>,
    ) -> StoreResult<Option<Page<HistoryRow>>>;

    /// One step of an instance's history by its id, in full (`None`: no such instance, or
    /// no such step of it).
    async fn step(&self, name: &str, id: i64) -> StoreResult<Option<StepDetail>>;

    /// A page of an instance's log, oldest first (`None`: no such instance). Each message is
    /// cut at [`MAX_PAGE_MESSAGE_CHARS`] (the cut is said at its end), so memory per call is
    /// bounded by `page.limit`.
    async fn logs_page(&self, name: &str, page: PageRequest) -> StoreResult<Option<Page<LogLine>>>;

    /// The workers alive at `now` (their announcement not expired), oldest first.
    async fn workers(&self, now: Micros) -> StoreResult<Vec<WorkerView>>;

    /// Workers whose announcement expired before `now` without their saying they stopped
    /// (killed, or cut off), within the last day; latest seen first.
    async fn workers_gone(&self, now: Micros) -> StoreResult<Vec<WorkerView>>;

    /// Pending work per queue and parked branches, for metrics.
    async fn stats(&self, now: Micros) -> StoreResult<StoreStats>;

    /// The steps committed since `since`, by machine and transition, over at most the latest
    /// [`RECENT_STEPS_SAMPLE`] steps (bounded reading: the queues' throughput).
    async fn recent_steps(&self, since: Micros) -> StoreResult<RecentSteps>;

    /// Every schedule the store has fired (or seen), by name.
    async fn schedules(&self) -> StoreResult<Vec<ScheduleRecord>>;

    /// A machine's instances at a glance: running and failed counts, what ended since `hour`
    /// and since `day` (two times in the past), where running and failed instances are, and
    /// the failures grouped by error.
    async fn machine_overview(
        &self,
        machine: &str,
        hour: Micros,
        day: Micros,
    ) -> StoreResult<MachineOverview>;
}

/// Acting on instances (retry, cancel), housekeeping (scrub) and measuring the backend.
#[async_trait]
pub trait AdminStore: Send + Sync + std::fmt::Debug {
    /// Store each machine's definition as its next version unless its latest version holds
    /// the same content hash, all in one transaction: deploying the same file twice stores
    /// nothing, and deploys at the same time (or one killed part way) leave whole versions
    /// only, numbered 1, 2, … per machine without gaps. Answers in the order of `versions`.
    async fn deploy(&self, now: Micros, versions: &[NewVersion]) -> StoreResult<Vec<Deployed>>;

    /// Move an instance to a later version of its machine, in one transaction: it must be
    /// running or failed, on `request.from`, with no step running (a leased task), and every
    /// place its branches are in must exist in the target ([`crate::engine::plan_upgrade`]
    /// says what that means). Its pending tasks and parked branches are then renamed into the
    /// target (waits keep their deadlines and tokens; their accepted events become the
    /// target's), it records the target version, and the move is logged. A worker that
    /// claims one of its tasks afterwards runs it on the target.
    async fn upgrade(&self, now: Micros, request: &UpgradeRequest) -> StoreResult<Upgraded>;

    /// Resume a failed instance: its failed and held tasks run again from attempt 0.
    async fn retry(&self, now: Micros, name: &str) -> StoreResult<Control>;

    /// Run an instance again from a step of its history (Temporal's reset), whatever its
    /// status: in one transaction its pending work (the tasks of every branch, and branches
    /// parked at fan-ins) is dropped, it is running again with no error or result, `note` is
    /// logged, and `task` (that step again, built by `control::reset`) is queued. History
    /// keeps the earlier run's steps; the instance's branch counts and end states are of the
    /// run since the reset. A worker
    /// running one of the dropped tasks cannot commit it (the fence). Instances it spawned,
    /// and events queued for it, are kept.
    async fn reset(
        &self,
        now: Micros,
        name: &str,
        task: &NewTask,
        note: &str,
    ) -> StoreResult<Control>;

    /// Cancel a running or failed instance: drop its pending tasks.
    async fn cancel(&self, now: Micros, name: &str) -> StoreResult<Control> {
        self.cancel_because(now, name, None).await
    }

    /// [`AdminStore::cancel`], keeping `reason` as the instance's error (what `status` and
    /// the console show for it).
    async fn cancel_because(
        &self,
        now: Micros,
        name: &str,
        reason: Option<&str>,
    ) -> StoreResult<Control>;

    /// Delete up to `batch` instances that ended before `cutoff`, with their history, logs and
    /// any leftovers; returns how many were deleted. Running instances are never touched.
    /// Call it repeatedly until it returns less than `batch` (each call is one short
    /// transaction, so workers are not held up).
    async fn scrub(&self, cutoff: Micros, batch: usize) -> StoreResult<u64>;

    /// Delete every version no instance records, except the latest of each machine (which
    /// new instances start on); the versions deleted, by machine and number. One transaction
    /// that reads which versions instances use in one pass.
    async fn scrub_versions(&self) -> StoreResult<Vec<(String, u32)>>;

    /// Measure the backend's durable single-row commit rate (commits per second), the
    /// physical limit `phasm bench` compares against.
    async fn probe_commit_rate(&self, commits: usize) -> StoreResult<f64>;
}

/// The persistence boundary: everything a backend implements, in three parts — the hot
/// path ([`WorkStore`]), reads ([`ReadStore`]) and administration ([`AdminStore`]). Any type
/// with all three is a `Store`. Bring the parts into scope with `use phasm::store::prelude::*`.
pub trait Store: WorkStore + ReadStore + AdminStore {}

impl<T: WorkStore + ReadStore + AdminStore + ?Sized> Store for T {}

/// The store traits, to call their methods on a `dyn Store`.
pub mod prelude {
    pub use super::{AdminStore, ReadStore, Store, WorkStore};
}

/// What an upgrade of `request.instance`, whose pending tasks are `positions` and whose parked
/// branches are in `parked` states, writes, and its answer; `Err` is the answer when nothing
/// is to be written (refused, or a dry run). The same for every backend.
pub(crate) fn upgrade_plan(
    request: &UpgradeRequest,
    positions: &[crate::engine::Position],
    parked: &[String],
) -> Result<(crate::engine::UpgradePlan, Upgraded), Upgraded> {
    let plan = crate::engine::plan_upgrade(
        &request.instance,
        &request.target,
        request.to,
        &request.map,
        positions,
        parked,
        &mut fastrand::Rng::new(),
    )
    .map_err(Upgraded::Refused)?;
    let moved = Upgraded::Moved {
        tasks: plan.tasks.len(),
        parked: plan.parked.len(),
    };
    if request.dry_run {
        return Err(moved);
    }
    Ok((plan, moved))
}

/// The stored `accepts` of a wait an upgrade rewrote.
pub(crate) fn upgrade_accepts(accepts: &[crate::engine::Accept]) -> String {
    serde_json::to_string(accepts).unwrap_or_else(|_| "[]".into())
}

/// The log line an upgrade leaves in the instance's log.
pub(crate) fn upgrade_log(request: &UpgradeRequest, now: Micros) -> LogLine {
    let renames: Vec<String> = request
        .map
        .iter()
        .map(|(old, new)| format!("{old} → {new}"))
        .collect();
    let renamed = if renames.is_empty() {
        String::new()
    } else {
        format!(" (states renamed: {})", renames.join(", "))
    };
    LogLine {
        at: now,
        level: "info".into(),
        message: format!(
            "upgraded from v{} to v{} of `{}`{renamed}",
            request.from, request.to, request.target.name
        ),
        task: String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::StepTimes;

    #[test]
    fn a_full_sample_of_recent_steps_starts_at_its_oldest() {
        use super::recent_window;
        assert_eq!(recent_window(100, 5, 10, Some(150)), 100, "not full: since");
        assert_eq!(
            recent_window(100, 10, 10, Some(150)),
            150,
            "full: its oldest"
        );
        assert_eq!(
            recent_window(100, 10, 10, Some(90)),
            100,
            "full, older than since"
        );
        assert_eq!(recent_window(100, 0, 10, None), 100);
    }

    #[test]
    fn step_times_take_nearest_rank_percentiles() {
        assert_eq!(StepTimes::measure(Vec::new(), false), StepTimes::default());
        // 1..=100 ms, every tenth on a retry.
        let steps = (1..=100)
            .rev()
            .map(|ms| (ms * 1000, u32::from(ms % 10 == 0)))
            .collect();
        let t = StepTimes::measure(steps, true);
        assert_eq!((t.steps, t.retried, t.sampled), (100, 10, true));
        assert_eq!((t.p50, t.p99), (50_000, 99_000));
        let one = StepTimes::measure(vec![(7, 0)], false);
        assert_eq!((one.p50, one.p99), (7, 7));
    }
}
