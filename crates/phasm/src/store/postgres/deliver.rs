//! Events from outside: delivering one to the waiting branches that accept it (or buffering
//! it), and the key that signs wait tokens.

use super::admin::lock_instance_by_name;
use super::apply::insert_task;
use super::{begin, pg, PostgresStore, Transaction};
use crate::clock::Micros;
use crate::store::convert::{count, from_json, to_json};
use crate::store::{Delivered, Delivery, InstanceStatus, StoreResult};

/// Deliver an event (see [`WorkStore::deliver`]). The instance's row is locked first, as a
/// commit beginning a wait locks it (see `PlanTx::take_buffered`).
pub(super) async fn deliver(
    store: &PostgresStore,
    now: Micros,
    d: &Delivery,
) -> StoreResult<Delivered> {
    let mut client = store.client().await?;
    let tx = begin(&mut client).await?;
    let Some((instance_id, status)) = lock_instance_by_name(&tx, &d.instance).await? else {
        return Ok(Delivered::NotFound);
    };
    if let Some(id) = &d.id {
        let seen = tx
            .query_opt(
                "SELECT 1 FROM deliveries WHERE instance_id = $1 AND event_id = $2",
                &[&instance_id, id],
            )
            .await
            .map_err(pg)?;
        if seen.is_some() {
            return Ok(Delivered::Duplicate);
        }
    }
    if status != InstanceStatus::Running {
        return Ok(Delivered::NotRunning(status));
    }
    let waits = tx
        .query(
            "SELECT id, name, from_state, context, step, branch, accepts, event FROM tasks
             WHERE instance_id = $1 AND kind = 'wait' AND status = 'ready' AND lease_owner IS NULL
               AND ($2::TEXT IS NULL OR name = $2)
             ORDER BY id",
            &[&instance_id, &d.wait],
        )
        .await
        .map_err(pg)?;
    let mut dispatches = Vec::new();
    for row in &waits {
        // A token's holder may end its wait only with an event the wait accepts from
        // outside, never with the wait's own timeout event.
        let timeout_event: String = row.get("event");
        if d.wait.is_some() && !timeout_event.is_empty() && timeout_event == d.event {
            continue;
        }
        let wait = super::super::stored_wait(
            row.get(1),
            row.get(2),
            from_json(row.get(3))?,
            count(row.get(4)),
            row.get(5),
            row.get(6),
        )?;
        if let Some(dispatch) = wait.dispatch(&d.event, &d.data, now) {
            dispatches.push((row.get::<_, i64>(0), dispatch));
        }
    }
    // Every check before anything changes: a refused delivery leaves the instance as it was
    // (the transaction is dropped, so rolled back).
    if let Some(max) = d.checks.max_context_bytes {
        for (_, dispatch) in &dispatches {
            let bytes = to_json(&dispatch.context)?.len();
            if bytes > max {
                return Ok(Delivered::TooLarge(bytes));
            }
        }
    }
    let mut taken = 0u32;
    for (id, dispatch) in dispatches {
        // A claim committed meanwhile (the timeout began) makes this match nothing: then the
        // timeout wins and the event is buffered below.
        let deleted = tx
            .execute(
                "DELETE FROM tasks WHERE id = $1 AND lease_owner IS NULL",
                &[&id],
            )
            .await
            .map_err(pg)?;
        if deleted == 1 {
            insert_task(&tx, instance_id, &dispatch, now, None).await?;
            taken += 1;
        }
    }
    let answer = match (taken, &d.wait) {
        (0, Some(_)) => return Ok(Delivered::WaitOver),
        (0, None) => {
            if let Some(refused) = keep_refused(&tx, instance_id, d).await? {
                return Ok(refused);
            }
            tx.execute(
                "INSERT INTO events (instance_id, event, data, event_id, created_at)
                 VALUES ($1, $2, $3, $4, $5)",
                &[&instance_id, &d.event, &to_json(&d.data)?, &d.id, &now],
            )
            .await
            .map_err(pg)?;
            Delivered::Buffered
        }
        (n, _) => {
            tx.execute("SELECT pg_notify('phasm', '')", &[])
                .await
                .map_err(pg)?;
            Delivered::Dispatched(n)
        }
    };
    if let Some(id) = &d.id {
        tx.execute(
            "INSERT INTO deliveries (instance_id, event_id, created_at) VALUES ($1, $2, $3)",
            &[&instance_id, id, &now],
        )
        .await
        .map_err(pg)?;
    }
    tx.commit().await.map_err(pg)?;
    Ok(answer)
}

/// Why an event no branch waits for may not be kept, if it may not: the instance keeps as
/// many as it may, or none of its pending steps can reach a state that would wait for it.
/// (The instance's row is locked: no commit of it runs meanwhile.)
async fn keep_refused(
    tx: &Transaction<'_>,
    instance_id: i64,
    d: &Delivery,
) -> StoreResult<Option<Delivered>> {
    if let Some(max) = d.checks.max_kept_events {
        let kept: i64 = tx
            .query_one(
                "SELECT COUNT(*) FROM events WHERE instance_id = $1",
                &[&instance_id],
            )
            .await
            .map_err(pg)?
            .get(0);
        let kept = usize::try_from(kept).unwrap_or(usize::MAX);
        if kept >= max {
            return Ok(Some(Delivered::TooManyKept(kept)));
        }
    }
    if let Some(reachable) = &d.checks.reachable {
        let possible: bool = tx
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM tasks WHERE instance_id = $1 AND (
                          (kind IN ('wait', 'join') AND from_state = ANY($2))
                       OR (kind = 'dispatch'
                           AND (COALESCE(from_state, '') || chr(31) || event) = ANY($3))))
                     OR EXISTS (SELECT 1 FROM items WHERE instance_id = $1 AND state = ANY($2))",
                &[&instance_id, &reachable.states, &reachable.dispatches],
            )
            .await
            .map_err(pg)?
            .get(0);
        if !possible {
            return Ok(Some(Delivered::CannotWait));
        }
    }
    Ok(None)
}

/// The key that signs wait tokens.
pub(super) async fn wait_key(store: &PostgresStore) -> StoreResult<Vec<u8>> {
    let client = store.client().await?;
    let row = client
        .query_one(
            "SELECT value FROM phasm_keys WHERE name = 'wait_token'",
            &[],
        )
        .await
        .map_err(pg)?;
    Ok(row.get::<_, String>(0).into_bytes())
}
