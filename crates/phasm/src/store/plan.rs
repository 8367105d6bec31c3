//! The commit algorithm, written once for every backend: what applying a [`Commit`] does to
//! the stored rows.
//!
//! [`plan`] is pure. It turns a commit (and the successor claim the committing worker offers)
//! into a [`WritePlan`]: every row operation and every decision — which successors come back
//! leased, what join task a parked branch needs, whether barrier joins may be released,
//! whether the instance may be complete, whether other processes must be woken. A backend
//! only runs the plan's operations as SQL, in this order, in one transaction per commit:
//!
//! 1. **Fence** ([`WritePlan::fence`]): change the claimed task *only if* its claim number still
//!    matches and its lease is unexpired, in the same statement that finishes or reschedules
//!    it. If no row matches, stop: nothing of the commit happens ([`Applied::Fenced`]).
//! 2. **Joined items**: if the fenced task was a join and is deleted, delete the parked
//!    contexts it joined ([`Fence::clears_join_items`]; the task's kind comes back from the
//!    fence, since a commit does not carry it).
//! 3. **Successors** ([`WritePlan::successors`]): insert each (a task of that name already pending
//!    is left alone), leased to the committing worker where [`Successor::lease`] says so.
//! 4. **Waits** ([`WritePlan::waits`]): for each branch starting to wait, take the oldest
//!    buffered event of the instance it accepts, if any — delete it and insert its dispatch
//!    ([`WaitStart::take`]) — else insert the wait task with its `accepts`. PostgreSQL first
//!    locks the instance row, as delivering an event does, so that an event sent at the same
//!    time is either seen here or sees the wait task.
//! 5. **History**, 6. **parks** ([`WritePlan::parks`]: the item, then its join task unless one not
//!    yet started is pending), 7. **spawns** (an instance of that name already existing is
//!    left alone), 8. **logs**.
//! 9. **Instance** ([`WritePlan::instance`]): record a branch's result, halt (drop every pending
//!    task and parked branch), or fail (hold every other ready task).
//! 10. **Settle** ([`WritePlan::settle`]): release the instance's barrier joins if no branch is
//!     live, and complete the instance if nothing of it is pending.
//!
//! ## Where PostgreSQL differs, and why
//!
//! SQLite runs step 10 inside the commit's transaction: its one writer sees every commit in
//! order. PostgreSQL runs step 10 as separate statements right *after* the transaction (and
//! again in [`WorkStore::sweep`]): under READ COMMITTED, two branches ending in concurrent
//! transactions would each see the other still pending and neither would complete the
//! instance, while the statement after the commit of whichever finishes last sees both. The
//! conformance suite checks both ways reach the same end.
//!
//! [`WorkStore::sweep`]: super::WorkStore::sweep
//! [`Applied::Fenced`]: super::Applied::Fenced

use crate::clock::{micros, Micros};
use crate::engine::{
    Commit, Context, Disposition, HistoryEntry, InstanceChange, LogLine, NewTask, NewWait, Parked,
    Spawned,
};

use super::{SuccessorClaim, TaskStatus};

/// Every row operation and decision of one commit, in the order a backend runs them (see the
/// module doc).
#[derive(Debug, Clone, PartialEq)]
pub struct WritePlan<'c> {
    /// The commit planned.
    pub commit: &'c Commit,
    /// What becomes of the claimed task, if its claim still holds.
    pub fence: Fence<'c>,
    /// Tasks to insert.
    pub successors: Vec<Successor<'c>>,
    /// Transitions to record.
    pub history: &'c [HistoryEntry],
    /// Branches to park at fan-in states.
    pub parks: Vec<Park<'c>>,
    /// Branches starting to wait for events from outside.
    pub waits: Vec<WaitStart<'c>>,
    /// Instances to start.
    pub spawns: &'c [Spawned],
    /// Log lines to keep.
    pub logs: &'c [LogLine],
    /// What becomes of the instance.
    pub instance: InstanceWrite<'c>,
    /// The checks that span the instance's branches.
    pub settle: Settle,
    /// Whether the commit may queue work nobody holds yet, so idle workers (of this process
    /// and others) should look for it. A backend may skip the wake-up when nothing was
    /// inserted after all.
    pub wakes_others: bool,
    /// The commit's shape, for backends with a faster way to run common ones.
    pub shape: Shape,
}

/// What the fence does to the claimed task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fence<'c> {
    /// The step is done: delete the task.
    Delete,
    /// A continuation queued its next page: keep the task leased, mark the page queued.
    MarkPageQueued,
    /// The attempt failed with retries left: due again at `due_at`, lease released.
    Reschedule {
        /// When it runs again.
        due_at: Micros,
        /// Why the attempt failed.
        error: &'c str,
    },
    /// Failed for good: status `failed`, lease released (kept for `phasm retry`).
    Fail {
        /// Why.
        error: &'c str,
    },
    /// Not run: due again at `due_at`, lease released, and the attempt the claim counted is
    /// given back (`attempts - 1`, `first_attempt_at` cleared when it was the first).
    GiveBack {
        /// When it runs again.
        due_at: Micros,
        /// Why it could not run.
        reason: &'c str,
    },
}

impl Fence<'_> {
    /// Whether a join task the fence matched takes its parked contexts with it (only when it
    /// is deleted: a join that fails or retries keeps them for its next attempt).
    pub fn clears_join_items(&self) -> bool {
        matches!(self, Fence::Delete)
    }
}

/// A task to insert.
#[derive(Debug, Clone, PartialEq)]
pub struct Successor<'c> {
    /// The task.
    pub task: &'c NewTask,
    /// Inserted already claimed by the committing worker (claim 1, attempt 1, lease until
    /// `until`), and handed back in [`AppliedCommit::claimed`](super::AppliedCommit) if inserted.
    pub lease: Option<Lease<'c>>,
}

/// A lease given to a successor at its insertion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease<'c> {
    /// The worker.
    pub owner: &'c str,
    /// Until when.
    pub until: Micros,
}

impl Lease<'_> {
    /// The columns of a task inserted with this lease (or without one, `due_at` given):
    /// `(lease_owner, due_at, claim, attempts, first_attempt_at)`.
    pub fn columns<'a>(
        lease: Option<&Lease<'a>>,
        due_at: Micros,
        now: Micros,
    ) -> (Option<&'a str>, Micros, i64, i64, Option<Micros>) {
        match lease {
            Some(l) => (Some(l.owner), l.until, 1, 1, Some(now)),
            None => (None, due_at, 0, 0, None),
        }
    }
}

/// A branch starting to wait: its wait task, unless a buffered event it accepts is taken
/// instead.
#[derive(Debug, Clone, PartialEq)]
pub struct WaitStart<'c> {
    /// The wait.
    pub wait: &'c NewWait,
    /// The events it accepts, to look for among the instance's buffered events.
    pub events: Vec<&'c str>,
    /// The stored form of its `accepts` (a JSON list).
    pub accepts_column: String,
}

impl WaitStart<'_> {
    /// The dispatch that replaces the wait when `event` (one of [`WaitStart::events`]) is
    /// found buffered with `data`.
    pub fn take(&self, event: &str, data: &Context, now: Micros) -> Option<NewTask> {
        self.wait.dispatch(event, data, now)
    }
}

/// The stored form of a wait task's `accepts`.
pub fn accepts_column(wait: &NewWait) -> String {
    serde_json::to_string(&wait.accepts).unwrap_or_else(|_| "[]".into())
}

/// A branch to park, and the join task to create for it unless one not yet started is pending.
#[derive(Debug, Clone, PartialEq)]
pub struct Park<'c> {
    /// The branch.
    pub parked: &'c Parked,
    /// The join to create when none is pending.
    pub join: JoinTask,
}

/// The join task a parked branch needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinTask {
    /// Its name is this followed by the parked item's id (unique per arrival that created one).
    pub name_prefix: String,
    /// `ready` for a window (runs when due), `waiting` for a barrier (released by settling).
    pub status: TaskStatus,
    /// A window's end; for a barrier, the time of parking (the release sets it again).
    pub due_at: Micros,
    /// Lock the pending join while looking for it (windows only): a claim running at the same
    /// time either finishes first — then the join is started, takes only the branches committed
    /// before it, and this branch gets a join of its own — or waits for this commit and takes
    /// this branch too. An unlocked look could see the join unstarted while a concurrent claim
    /// starts it without this branch, which nothing would then join. A barrier's join starts
    /// only once no branch is live, and the parking step is live until this commit: no lock.
    pub lock_pending: bool,
}

/// What a commit does to its instance row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InstanceWrite<'c> {
    /// Nothing.
    None,
    /// A branch ended: its context is the instance's result (the last to end wins).
    BranchResult(&'c Context),
    /// Halted: delete every pending task and parked branch, end the instance `halted`.
    Halt(&'c str),
    /// Failed: every other `ready` task becomes `held` (lease released), the instance `failed`.
    Fail(&'c str),
}

/// The checks that span an instance's branches, run only when the commit may have made them
/// true (each costs a statement).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Settle {
    /// A branch stopped being live (it parked or ended, or a task finished without a
    /// successor): if no task of the instance is `ready`, `held` or `failed` now, its
    /// `waiting` barrier joins become `ready`, due now.
    pub release_barriers: bool,
    /// Something of the instance ended without a successor: if no task and no parked branch
    /// of it is left, and it is still running, it is `completed`.
    pub complete: bool,
}

/// The shape of a commit, for backends that run common shapes faster (PostgreSQL runs
/// [`Shape::Chain`] and [`Shape::Park`] as one statement each).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// A chain step: the task deleted, at most one transition, at most one successor, maybe
    /// a branch's result; no park, spawn or log.
    Chain,
    /// A branch arriving at a fan-in: the task deleted, one transition, one park; nothing else.
    Park,
    /// Anything else.
    General,
}

/// Plan `commit`, applied at `now`; `successors` is what the committing worker offers to take
/// of the tasks it creates.
pub fn plan<'c>(
    commit: &'c Commit,
    successors: Option<&'c SuccessorClaim>,
    now: Micros,
) -> WritePlan<'c> {
    let fence = match &commit.disposition {
        Disposition::Finished => Fence::Delete,
        Disposition::Keep => Fence::MarkPageQueued,
        Disposition::Retry { due_at, error } => Fence::Reschedule {
            due_at: *due_at,
            error,
        },
        Disposition::Failed { error } => Fence::Fail { error },
        Disposition::Postpone { due_at, reason } => Fence::GiveBack {
            due_at: *due_at,
            reason,
        },
    };
    let successors = lease_successors(commit, successors, now);
    let parks: Vec<Park<'c>> = commit
        .parked
        .iter()
        .map(|p| Park {
            parked: p,
            join: join_task(&commit.instance, p, now),
        })
        .collect();
    let waits: Vec<WaitStart<'c>> = commit
        .waits
        .iter()
        .map(|w| WaitStart {
            wait: w,
            events: w.accepts.iter().map(|a| a.event.as_str()).collect(),
            accepts_column: accepts_column(w),
        })
        .collect();
    let instance = match &commit.instance_change {
        InstanceChange::None => InstanceWrite::None,
        InstanceChange::BranchEnded(context) => InstanceWrite::BranchResult(context),
        InstanceChange::Halt(reason) => InstanceWrite::Halt(reason),
        InstanceChange::Fail(error) => InstanceWrite::Fail(error),
    };
    let ended =
        fence == Fence::Delete && successors.is_empty() && parks.is_empty() && waits.is_empty();
    let settle = match instance {
        // Halting leaves nothing to settle; failing holds every branch.
        InstanceWrite::Halt(_) | InstanceWrite::Fail(_) => Settle::default(),
        InstanceWrite::BranchResult(_) => Settle {
            release_barriers: true,
            complete: true,
        },
        // A task that finished with nothing after it (an empty window join, or a step whose
        // successor was taken by a retry) may have been the last thing pending.
        InstanceWrite::None => Settle {
            release_barriers: ended || !parks.is_empty(),
            complete: ended,
        },
    };
    let wakes_others = matches!(
        fence,
        Fence::Reschedule { .. } | Fence::Fail { .. } | Fence::GiveBack { .. }
    ) || successors.iter().any(|s| s.lease.is_none())
        || parks.iter().any(|p| p.join.status == TaskStatus::Ready)
        || !waits.is_empty()
        || !commit.spawns.is_empty();
    let shape = shape(commit);
    let plan = WritePlan {
        commit,
        fence,
        successors,
        history: &commit.history,
        parks,
        waits,
        spawns: &commit.spawns,
        logs: &commit.logs,
        instance,
        settle,
        wakes_others,
        shape,
    };
    plan.check();
    plan
}

/// Which new tasks the committing worker takes at once: those due now, of its queues,
/// machines and pool, at most `max` per commit (counted in the commit's order; a task whose
/// insertion is skipped because one of its name is pending still counts).
fn lease_successors<'c>(
    commit: &'c Commit,
    claim: Option<&'c SuccessorClaim>,
    now: Micros,
) -> Vec<Successor<'c>> {
    let mut leased = 0;
    commit
        .new_tasks
        .iter()
        .map(|task| {
            let lease = claim
                .filter(|s| {
                    task.due_at <= now
                        && leased < s.max
                        && s.takes(&task.queue, &commit.machine, task.target.as_deref())
                })
                .map(|s| Lease {
                    owner: &s.owner,
                    until: now + micros(s.lease),
                });
            leased += usize::from(lease.is_some());
            Successor { task, lease }
        })
        .collect()
}

/// The join a branch parking at `p` needs if none is pending: a window's runs `window` after
/// this first arrival; a barrier's waits.
fn join_task(instance: &str, p: &Parked, now: Micros) -> JoinTask {
    let (status, due_at, suffix) = match p.window {
        Some(window) => (TaskStatus::Ready, now + window, "window"),
        None => (TaskStatus::Waiting, now, "all"),
    };
    JoinTask {
        name_prefix: format!("{instance}--{}--fan-in--{}--{suffix}-", p.state, p.group),
        status,
        due_at,
        lock_pending: p.window.is_some(),
    }
}

fn shape(c: &Commit) -> Shape {
    let bare = c.disposition == Disposition::Finished && c.spawns.is_empty() && c.logs.is_empty();
    if bare
        && c.new_tasks.len() <= 1
        && c.history.len() <= 1
        && c.parked.is_empty()
        && c.waits.is_empty()
        && matches!(
            c.instance_change,
            InstanceChange::None | InstanceChange::BranchEnded(_)
        )
    {
        Shape::Chain
    } else if bare
        && c.new_tasks.is_empty()
        && c.history.len() == 1
        && c.parked.len() == 1
        && c.waits.is_empty()
        && c.instance_change == InstanceChange::None
    {
        Shape::Park
    } else {
        Shape::General
    }
}

impl WritePlan<'_> {
    /// The plan's invariants (checked in debug builds).
    fn check(&self) {
        let c = self.commit;
        debug_assert_eq!(self.successors.len(), c.new_tasks.len());
        debug_assert_eq!(self.parks.len(), c.parked.len());
        debug_assert_eq!(self.waits.len(), c.waits.len());
        debug_assert!(
            c.waits.is_empty() || self.fence == Fence::Delete,
            "only a finished step begins a wait"
        );
        debug_assert!(
            c.new_tasks.is_empty() || matches!(self.fence, Fence::Delete | Fence::MarkPageQueued),
            "only a finished step, or a continuation queueing its next page, creates tasks"
        );
        debug_assert!(
            c.history.is_empty() || self.fence == Fence::Delete,
            "only a finished step records transitions"
        );
        debug_assert!(
            !self.settle.complete || self.settle.release_barriers,
            "whatever may complete an instance may also release its barriers"
        );
        debug_assert!(
            self.shape != Shape::Park || self.parks.len() == 1,
            "a parking shape parks one branch"
        );
        debug_assert!(
            self.parks
                .iter()
                .all(|p| p.join.lock_pending == (p.join.status == TaskStatus::Ready)),
            "window joins lock while looking, barrier joins wait"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{Task, TaskKind};
    use crate::store::Targets;
    use std::time::Duration;

    fn task() -> Task {
        Task {
            id: 7,
            claim: 1,
            instance: "i".into(),
            machine: "m".into(),
            name: "i--start".into(),
            from_state: None,
            event: "start".into(),
            kind: TaskKind::Dispatch,
            context: Context::new(),
            step: 0,
            branch: String::new(),
            queue: "default".into(),
            attempt: 0,
            first_attempt_at: 0,
            contexts: Vec::new(),
            token: None,
            next_page_queued: false,
            version: None,
        }
    }

    fn new_task(name: &str, due_at: Micros) -> NewTask {
        NewTask {
            name: name.into(),
            from_state: Some("a".into()),
            event: "next".into(),
            kind: TaskKind::Dispatch,
            context: Context::new(),
            step: 1,
            branch: String::new(),
            queue: "default".into(),
            target: None,
            due_at,
            token: None,
        }
    }

    fn claim(max: usize) -> SuccessorClaim {
        SuccessorClaim {
            owner: "w".into(),
            lease: Duration::from_secs(30),
            queues: None,
            exclude: Vec::new(),
            machines: vec!["m".into()],
            targets: Targets::Any,
            max,
        }
    }

    #[test]
    fn successors_due_now_are_leased_up_to_the_limit() {
        let mut c = Commit::finishing(&task());
        c.new_tasks = vec![
            new_task("a", 100),
            new_task("b", 100),
            new_task("c", 100),
            new_task("later", 500),
        ];
        let offer = claim(2);
        let p = plan(&c, Some(&offer), 100);
        let leased: Vec<_> = p.successors.iter().map(|s| s.lease.is_some()).collect();
        assert_eq!(leased, [true, true, false, false]);
        assert_eq!(
            p.successors[0].lease.map(|l| l.until),
            Some(100 + 30_000_000)
        );
        assert!(p.wakes_others, "unleased successors wake idle workers");
        assert_eq!(p.shape, Shape::General);
        assert_eq!(
            p.settle,
            Settle::default(),
            "a step with successors settles nothing"
        );
    }

    #[test]
    fn without_an_offer_nothing_is_leased() {
        let mut c = Commit::finishing(&task());
        c.new_tasks = vec![new_task("a", 100)];
        let p = plan(&c, None, 100);
        assert!(p.successors[0].lease.is_none());
        assert_eq!(p.shape, Shape::Chain);
        let offer = claim(1);
        let p = plan(&c, Some(&offer), 100);
        assert!(p.successors[0].lease.is_some());
        assert!(!p.wakes_others, "a leased successor is the committer's own");
    }

    #[test]
    fn a_successor_of_another_machine_or_queue_is_not_leased() {
        let mut c = Commit::finishing(&task());
        let mut other = new_task("a", 100);
        other.queue = "slow".into();
        c.new_tasks = vec![other];
        let mut offer = claim(8);
        offer.exclude = vec!["slow".into()];
        assert!(plan(&c, Some(&offer), 100).successors[0].lease.is_none());
        c.machine = "n".into();
        assert!(plan(&c, Some(&claim(8)), 100).successors[0].lease.is_none());
    }

    #[test]
    fn an_ending_branch_settles_and_may_complete() {
        let mut c = Commit::finishing(&task());
        c.instance_change = InstanceChange::BranchEnded(Context::new());
        let p = plan(&c, None, 1);
        assert_eq!(p.shape, Shape::Chain);
        assert_eq!(
            p.settle,
            Settle {
                release_barriers: true,
                complete: true
            }
        );
    }

    #[test]
    fn a_task_finishing_with_nothing_after_it_may_complete_the_instance() {
        // An empty window join: every branch it would have joined was taken by another.
        let c = Commit::finishing(&task());
        let p = plan(&c, None, 1);
        assert_eq!(
            p.settle,
            Settle {
                release_barriers: true,
                complete: true
            }
        );
        assert!(!p.wakes_others);
    }

    #[test]
    fn parks_make_joins_and_release_barriers() {
        let mut c = Commit::finishing(&task());
        c.history = vec![HistoryEntry {
            from: Some("a".into()),
            event: "go".into(),
            to: "join".into(),
            attempt: 0,
            started_at: 0,
            finished_at: 1,
            task: "t".into(),
            branch: "b1".into(),
            ends_branch: false,
        }];
        let parked = |window| Parked {
            state: "join".into(),
            group: "g".into(),
            context: Context::new(),
            branch: "b1".into(),
            step: 3,
            window,
            queue: "default".into(),
            target: None,
        };
        c.parked = vec![parked(Some(5))];
        let p = plan(&c, None, 10);
        assert_eq!(p.shape, Shape::Park);
        assert_eq!(
            p.parks[0].join,
            JoinTask {
                name_prefix: "i--join--fan-in--g--window-".into(),
                status: TaskStatus::Ready,
                due_at: 15,
                lock_pending: true
            }
        );
        assert!(p.wakes_others, "a window join becomes due by itself");
        assert_eq!(
            p.settle,
            Settle {
                release_barriers: true,
                complete: false
            }
        );
        c.parked = vec![parked(None)];
        let p = plan(&c, None, 10);
        assert_eq!(p.parks[0].join.status, TaskStatus::Waiting);
        assert!(!p.parks[0].join.lock_pending);
        assert!(!p.wakes_others, "a barrier join waits for settling");
    }

    #[test]
    fn failures_and_halts_settle_nothing_and_keep_the_fence_reason() {
        let mut c = Commit::finishing(&task());
        c.disposition = Disposition::Failed {
            error: "boom".into(),
        };
        c.instance_change = InstanceChange::Fail("boom".into());
        let p = plan(&c, None, 1);
        assert_eq!(p.fence, Fence::Fail { error: "boom" });
        assert!(!p.fence.clears_join_items());
        assert_eq!(p.settle, Settle::default());
        assert_eq!(p.shape, Shape::General);
        c.disposition = Disposition::Finished;
        c.instance_change = InstanceChange::Halt("stop".into());
        let p = plan(&c, None, 1);
        assert_eq!(p.instance, InstanceWrite::Halt("stop"));
        assert_eq!(p.settle, Settle::default());
        c.disposition = Disposition::Postpone {
            due_at: 9,
            reason: "EMFILE".into(),
        };
        c.instance_change = InstanceChange::None;
        let p = plan(&c, None, 1);
        assert_eq!(
            p.fence,
            Fence::GiveBack {
                due_at: 9,
                reason: "EMFILE"
            }
        );
        assert_eq!(
            p.settle,
            Settle::default(),
            "a postponed task is still live"
        );
        assert!(p.wakes_others);
    }
}
