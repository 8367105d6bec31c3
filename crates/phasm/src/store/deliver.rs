//! Delivering an event from outside, written once for every backend.
//!
//! In one transaction:
//!
//! 1. **Instance**: find it, locked where transactions run side by side (a commit beginning
//!    a wait locks it too, so an event sent meanwhile is either seen by that commit or sees
//!    its wait task). Unknown: [`Delivered::NotFound`].
//! 2. **Once**: an event `id` delivered before answers [`Delivered::Duplicate`], and nothing
//!    happens again. An instance that is not running answers [`Delivered::NotRunning`].
//! 3. **Waits**: every unleased wait task of the instance (or the one a token names) that
//!    accepts the event becomes its dispatch — except that a token's holder cannot send the
//!    wait's own timeout event. Every dispatch is checked against the context limit
//!    *before* anything changes ([`Delivered::TooLarge`]).
//! 4. **Take**: each wait still unleased (a timeout claimed meanwhile wins) is deleted and
//!    its dispatch queued: [`Delivered::Dispatched`]. None taken for a token:
//!    [`Delivered::WaitOver`].
//! 5. **Keep**: none taken for the instance: the event is buffered for the next wait that
//!    accepts it ([`Delivered::Buffered`]), unless the instance keeps as many as it may
//!    ([`Delivered::TooManyKept`]) or none of its pending steps can reach a state that would
//!    wait for it ([`Delivered::CannotWait`]).
//! 6. **Remember** the event's `id`, so that sending it again does nothing.

use crate::clock::Micros;
use crate::engine::{NewTask, NewWait};

use super::convert::to_json;
use super::execute::PlanTx;
use super::{Delivered, Delivery, InstanceStatus, Reachable, StoreResult};

/// A wait task as a delivery reads it.
#[derive(Debug, Clone)]
pub(crate) struct WaitRow {
    /// The task's id.
    pub id: i64,
    /// The wait, rebuilt from its row.
    pub wait: NewWait,
    /// Its timeout event (`""` without a timeout).
    pub timeout_event: String,
}

/// A delivery's operations on one storage transaction (see the module doc for the order,
/// which only [`deliver`] decides). Inserting a dispatch and waking workers are the
/// [`PlanTx`] operations.
pub(crate) trait DeliverTx {
    /// Step 1: the instance's row id and status, locked where transactions run side by side.
    async fn instance(&mut self, name: &str) -> StoreResult<Option<(i64, InstanceStatus)>>;

    /// Step 2: whether an event of this `id` was delivered to the instance before.
    async fn delivered_before(&mut self, instance_id: i64, id: &str) -> StoreResult<bool>;

    /// Step 3: the instance's unleased wait tasks (only the one named `wait`, if given), in
    /// id order.
    async fn waits(&mut self, instance_id: i64, wait: Option<&str>) -> StoreResult<Vec<WaitRow>>;

    /// Step 4: delete the wait task `id` if it is still unleased; whether it was.
    async fn take_wait(&mut self, id: i64) -> StoreResult<bool>;

    /// Step 5: how many events the instance keeps.
    async fn kept_events(&mut self, instance_id: i64) -> StoreResult<usize>;

    /// Step 5: whether a pending step of the instance (a task or a parked branch) is in one
    /// of the states, or is one of the dispatches, that `reachable` lists.
    async fn may_reach(&mut self, instance_id: i64, reachable: &Reachable) -> StoreResult<bool>;

    /// Step 5: keep the event for the next wait that accepts it.
    async fn buffer(&mut self, instance_id: i64, d: &Delivery, now: Micros) -> StoreResult<()>;

    /// Step 6: remember that the event `id` was delivered.
    async fn remember(&mut self, instance_id: i64, id: &str, now: Micros) -> StoreResult<()>;
}

/// Deliver `d` at `now` over `tx` (see the module doc). A refusal writes nothing.
pub(crate) async fn deliver<T: DeliverTx + PlanTx>(
    tx: &mut T,
    now: Micros,
    d: &Delivery,
) -> StoreResult<Delivered> {
    // 1. Instance, 2. once.
    let Some((instance_id, status)) = tx.instance(&d.instance).await? else {
        return Ok(Delivered::NotFound);
    };
    if let Some(id) = &d.id {
        if tx.delivered_before(instance_id, id).await? {
            return Ok(Delivered::Duplicate);
        }
    }
    if status != InstanceStatus::Running {
        return Ok(Delivered::NotRunning(status));
    }
    // 3. Waits, every check before anything changes.
    let mut dispatches: Vec<(i64, NewTask)> = Vec::new();
    for row in tx.waits(instance_id, d.wait.as_deref()).await? {
        // A token's holder may end its wait only with an event the wait accepts from
        // outside, never with the wait's own timeout event.
        if d.wait.is_some() && !row.timeout_event.is_empty() && row.timeout_event == d.event {
            continue;
        }
        if let Some(dispatch) = row.wait.dispatch(&d.event, &d.data, now) {
            dispatches.push((row.id, dispatch));
        }
    }
    if let Some(max) = d.checks.max_context_bytes {
        for (_, dispatch) in &dispatches {
            let bytes = to_json(&dispatch.context)?.len();
            if bytes > max {
                return Ok(Delivered::TooLarge(bytes));
            }
        }
    }
    // 4. Take.
    let mut taken = 0u32;
    for (id, dispatch) in dispatches {
        // A claim committed meanwhile (the timeout began) makes this take nothing: then the
        // timeout wins and the event is buffered below.
        if tx.take_wait(id).await? {
            tx.insert_task(instance_id, &dispatch, None, None, now)
                .await?;
            taken += 1;
        }
    }
    // 5. Keep.
    let answer = match (taken, &d.wait) {
        (0, Some(_)) => return Ok(Delivered::WaitOver),
        (0, None) => {
            if let Some(max) = d.checks.max_kept_events {
                let kept = tx.kept_events(instance_id).await?;
                if kept >= max {
                    return Ok(Delivered::TooManyKept(kept));
                }
            }
            if let Some(reachable) = &d.checks.reachable {
                if !tx.may_reach(instance_id, reachable).await? {
                    return Ok(Delivered::CannotWait);
                }
            }
            tx.buffer(instance_id, d, now).await?;
            Delivered::Buffered
        }
        (n, _) => {
            tx.wake_others().await?;
            Delivered::Dispatched(n)
        }
    };
    // 6. Remember.
    if let Some(id) = &d.id {
        tx.remember(instance_id, id, now).await?;
    }
    Ok(answer)
}
