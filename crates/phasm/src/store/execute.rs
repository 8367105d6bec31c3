//! Carrying out a [`WritePlan`], written once for every backend.
//!
//! [`plan`](super::plan) decides what a commit writes; [`execute`] runs those decisions, in the
//! order the plan's module doc gives, over a [`PlanTx`]: one storage transaction with an
//! operation per kind of row the plan touches. A backend implements [`PlanTx`] with its SQL
//! and row mapping, and nothing of the algorithm: which operations run, in which order, and
//! what each result decides next live here only.
//!
//! The trait's methods are `async` because PostgreSQL's are. SQLite's never wait: its
//! [`PlanTx`] runs each statement before returning, and [`ready`] drives the whole execution
//! to its end in one poll.

use std::future::Future;

use crate::clock::Micros;
use crate::engine::{Commit, Context, HistoryEntry, LogLine, NewTask, Parked, Spawned};

use super::plan::{self, Fence, InstanceWrite, JoinTask, Lease, Settle, WritePlan};
use super::{Applied, AppliedCommit, InstanceStatus, StoreError, StoreResult, SuccessorClaim};

/// What the fence returns of the task it changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Fenced {
    /// The task's instance.
    pub instance_id: i64,
    /// Whether the task was a join (whose parked branches go with it when it is deleted).
    pub is_join: bool,
    /// The context the step was given, as stored, kept in its history (`None` for a join,
    /// whose given context is its items).
    pub given: Option<String>,
    /// The task's step number.
    pub step: i64,
}

/// One storage transaction, as the plan's operations (see [`plan`](super::plan) for what
/// each step means). Each method is one statement or a few, in the transaction the backend
/// opened; none decides anything the plan or [`execute`] decides.
pub(crate) trait PlanTx {
    /// Step 1: change the claimed task as `fence` says, only if its claim is `claim` and its
    /// lease unexpired at `now`; `None` when no row matched.
    async fn fence(
        &mut self,
        task_id: i64,
        claim: i64,
        fence: Fence<'_>,
        now: Micros,
    ) -> StoreResult<Option<Fenced>>;

    /// Step 2: delete the parked branches the join task `join_task` took.
    async fn delete_join_items(&mut self, join_task: i64) -> StoreResult<()>;

    /// Insert a task (one of that name already pending is left alone), leased when `lease`
    /// says so, with a wait task's stored `accepts`; its id when inserted.
    async fn insert_task(
        &mut self,
        instance_id: i64,
        task: &NewTask,
        lease: Option<&Lease<'_>>,
        accepts: Option<&str>,
        now: Micros,
    ) -> StoreResult<Option<i64>>;

    /// Insert unleased tasks of one instance (a fork of thousands of branches: a backend may
    /// do it in one statement).
    async fn insert_unleased(
        &mut self,
        instance_id: i64,
        tasks: &[&NewTask],
        now: Micros,
    ) -> StoreResult<()> {
        for task in tasks {
            self.insert_task(instance_id, task, None, None, now).await?;
        }
        Ok(())
    }

    /// Step 4: take (delete and return) the oldest buffered event of the instance among
    /// `events`. A backend whose transactions run side by side first locks what a delivery
    /// locks, so that an event sent meanwhile either is seen here or sees the wait task.
    async fn take_buffered(
        &mut self,
        instance_id: i64,
        events: &[&str],
    ) -> StoreResult<Option<(String, Context)>>;

    /// Step 5: record transitions; each keeps the step's given context and number.
    async fn insert_history(
        &mut self,
        instance_id: i64,
        entries: &[HistoryEntry],
        given: Option<&str>,
        step: i64,
    ) -> StoreResult<()>;

    /// Step 6: park a branch; the item's id.
    async fn insert_item(
        &mut self,
        instance_id: i64,
        parked: &Parked,
        now: Micros,
    ) -> StoreResult<i64>;

    /// Step 6: create the join task for the branch parked as item `item`, unless a join not
    /// yet started is pending for its fan-in (looked for under a lock when the join says
    /// so: see [`JoinTask::lock_pending`]).
    async fn join_unless_pending(
        &mut self,
        instance_id: i64,
        parked: &Parked,
        join: &JoinTask,
        item: i64,
        now: Micros,
    ) -> StoreResult<()>;

    /// Step 7: create a child instance on its machine's latest version (none if one of that
    /// name exists); its id when created.
    async fn insert_child(
        &mut self,
        parent: &str,
        child: &Spawned,
        now: Micros,
    ) -> StoreResult<Option<i64>>;

    /// Step 8: keep a log line.
    async fn insert_log(&mut self, instance_id: i64, line: &LogLine) -> StoreResult<()>;

    /// Step 9: a branch's result becomes the instance's (if it still runs).
    async fn set_result(
        &mut self,
        instance_id: i64,
        result: &Context,
        now: Micros,
    ) -> StoreResult<()>;

    /// Step 9: drop every pending task and parked branch of the instance.
    async fn drop_pending(&mut self, instance_id: i64) -> StoreResult<()>;

    /// Step 9: every `ready` task of the instance becomes `held`, lease released.
    async fn hold_ready(&mut self, instance_id: i64) -> StoreResult<()>;

    /// Step 9: end the instance.
    async fn end_instance(
        &mut self,
        instance_id: i64,
        status: InstanceStatus,
        error: Option<&str>,
        now: Micros,
    ) -> StoreResult<()>;

    /// Step 10, as far as this backend runs it inside the transaction (see the plan's module
    /// doc); whether barrier joins were released.
    async fn settle(&mut self, instance_id: i64, settle: Settle, now: Micros) -> StoreResult<bool>;

    /// Tell other processes' idle workers, when the transaction commits, that work is queued
    /// (a backend whose workers all live in one process has nothing to send).
    async fn wake_others(&mut self) -> StoreResult<()>;
}

/// What [`execute`] did.
#[derive(Debug)]
pub(crate) struct Executed {
    /// The answer to the committing worker.
    pub result: AppliedCommit,
    /// The instance, when the fence let the commit through.
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    pub instance_id: Option<i64>,
    /// The checks that span the instance's branches (what the backend has not run inside the
    /// transaction, it runs after it).
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    pub settle: Settle,
    /// Whether idle workers should look for work once the transaction is committed.
    pub wakes: bool,
}

impl Executed {
    /// A commit refused by its fence: nothing happened.
    pub(crate) fn fenced() -> Self {
        Executed {
            result: AppliedCommit {
                applied: Applied::Fenced,
                claimed: Vec::new(),
            },
            instance_id: None,
            settle: Settle::default(),
            wakes: false,
        }
    }
}

/// Plan `commit` and carry the plan out over `tx`, in the plan's order (see
/// [`plan`](super::plan)).
pub(crate) async fn apply<T: PlanTx>(
    tx: &mut T,
    commit: &Commit,
    successors: Option<&SuccessorClaim>,
    now: Micros,
) -> StoreResult<Executed> {
    execute(tx, &plan::plan(commit, successors, now), now).await
}

/// Carry `plan` out over `tx`. Nothing is written when the fence refuses.
pub(crate) async fn execute<T: PlanTx>(
    tx: &mut T,
    plan: &WritePlan<'_>,
    now: Micros,
) -> StoreResult<Executed> {
    let c = plan.commit;
    // 1. Fence.
    let Some(fenced) = tx.fence(c.task_id, c.claim, plan.fence, now).await? else {
        return Ok(Executed::fenced());
    };
    let instance_id = fenced.instance_id;
    // 2. Joined items.
    if fenced.is_join && plan.fence.clears_join_items() {
        tx.delete_join_items(c.task_id).await?;
    }
    // 3. Successors: the leased ones one by one (their ids go back to the worker), the rest
    // together.
    let mut claimed = Vec::new();
    let mut unleased = Vec::new();
    for s in &plan.successors {
        match &s.lease {
            Some(lease) => {
                if let Some(id) = tx
                    .insert_task(instance_id, s.task, Some(lease), None, now)
                    .await?
                {
                    claimed.push(s.task.claimed(id, c, now));
                }
            }
            None => unleased.push(s.task),
        }
    }
    if !unleased.is_empty() {
        tx.insert_unleased(instance_id, &unleased, now).await?;
    }
    // 4. Waits: a buffered event accepted is taken instead of waiting.
    for w in &plan.waits {
        let taken = tx.take_buffered(instance_id, &w.events).await?;
        let dispatch = taken.and_then(|(event, data)| w.take(&event, &data, now));
        match dispatch {
            Some(dispatch) => {
                tx.insert_task(instance_id, &dispatch, None, None, now)
                    .await?
            }
            None => {
                tx.insert_task(
                    instance_id,
                    &w.wait.task,
                    None,
                    Some(&w.accepts_column),
                    now,
                )
                .await?
            }
        };
    }
    // 5. History.
    if !plan.history.is_empty() {
        tx.insert_history(
            instance_id,
            plan.history,
            fenced.given.as_deref(),
            fenced.step,
        )
        .await?;
    }
    // 6. Parks, each with its join unless one not yet started is pending.
    for p in &plan.parks {
        let item = tx.insert_item(instance_id, p.parked, now).await?;
        tx.join_unless_pending(instance_id, p.parked, &p.join, item, now)
            .await?;
    }
    // 7. Spawns.
    for child in plan.spawns {
        if let Some(child_id) = tx.insert_child(&c.instance, child, now).await? {
            tx.insert_task(child_id, &child.start, None, None, now)
                .await?;
        }
    }
    // 8. Logs.
    for line in plan.logs {
        tx.insert_log(instance_id, line).await?;
    }
    // 9. Instance.
    match plan.instance {
        InstanceWrite::None => {}
        InstanceWrite::BranchResult(context) => tx.set_result(instance_id, context, now).await?,
        InstanceWrite::Halt(reason) => {
            tx.drop_pending(instance_id).await?;
            tx.end_instance(instance_id, InstanceStatus::Halted, Some(reason), now)
                .await?;
        }
        InstanceWrite::Fail(error) => {
            tx.hold_ready(instance_id).await?;
            tx.end_instance(instance_id, InstanceStatus::Failed, Some(error), now)
                .await?;
        }
    }
    // 10. Settle.
    let released = tx.settle(instance_id, plan.settle, now).await?;
    let wakes = plan.wakes_others || released;
    if wakes {
        tx.wake_others().await?;
    }
    Ok(Executed {
        result: AppliedCommit {
            applied: Applied::Yes,
            claimed,
        },
        instance_id: Some(instance_id),
        settle: plan.settle,
        wakes,
    })
}

/// Run a future that never waits (one over SQLite's [`PlanTx`]) to its end, in one poll.
/// A future that does wait is a bug, answered as an error rather than blocking the writer.
pub(crate) fn ready<F: Future>(future: F) -> StoreResult<F::Output> {
    let mut future = std::pin::pin!(future);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match future.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(out) => Ok(out),
        std::task::Poll::Pending => Err(StoreError::database(
            "a synchronous store operation waited (a bug in phasm: please report it)",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_future_that_never_waits_is_run_in_one_poll() {
        assert_eq!(ready(async { 7 }).ok(), Some(7));
    }

    #[test]
    fn a_future_that_waits_is_an_error_not_a_hang() {
        let waits = std::future::pending::<()>();
        let err = ready(waits).expect_err("pending");
        assert!(err.to_string().contains("waited"), "{err}");
    }
}
