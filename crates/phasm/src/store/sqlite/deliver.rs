//! Events from outside: delivering one to the waiting branches that accept it (or buffering
//! it), and the key that signs wait tokens.

use rusqlite::{params, Transaction};

use super::admin::lookup;
use super::apply::insert_task;
use super::db;
use crate::clock::Micros;
use crate::engine::{Context, NewTask};
use crate::store::convert::{count, from_json, to_json};
use crate::store::{Delivered, Delivery, InstanceStatus, StoreResult};

/// Deliver an event (see [`WorkStore::deliver`]).
pub(super) fn deliver(tx: &Transaction<'_>, now: Micros, d: &Delivery) -> StoreResult<Delivered> {
    let Some((instance_id, status)) = lookup(tx, &d.instance)? else {
        return Ok(Delivered::NotFound);
    };
    if let Some(id) = &d.id {
        let seen: bool = tx
            .prepare_cached(
                "SELECT EXISTS (SELECT 1 FROM deliveries WHERE instance_id = ?1 AND event_id = ?2)",
            )
            .map_err(db)?
            .query_row(params![instance_id, id], |r| r.get(0))
            .map_err(db)?;
        if seen {
            return Ok(Delivered::Duplicate);
        }
    }
    if status != InstanceStatus::Running {
        return Ok(Delivered::NotRunning(status));
    }
    let waits = tx
        .prepare_cached(
            "SELECT id, name, from_state, context, step, branch, accepts, event FROM tasks
             WHERE instance_id = ?1 AND kind = 'wait' AND status = 'ready' AND lease_owner IS NULL
               AND (?2 IS NULL OR name = ?2)
             ORDER BY id",
        )
        .map_err(db)?
        .query_map(params![instance_id, d.wait], |r| {
            Ok(WaitRow {
                id: r.get(0)?,
                name: r.get(1)?,
                from_state: r.get(2)?,
                context: r.get(3)?,
                step: r.get(4)?,
                branch: r.get(5)?,
                accepts: r.get(6)?,
                timeout_event: r.get(7)?,
            })
        })
        .map_err(db)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(db)?;
    let mut dispatches = Vec::new();
    for row in waits {
        // A token's holder may end its wait only with an event the wait accepts from
        // outside, never with the wait's own timeout event.
        if d.wait.is_some() && !row.timeout_event.is_empty() && row.timeout_event == d.event {
            continue;
        }
        let id = row.id;
        if let Some(dispatch) = row.dispatch(&d.event, &d.data, now)? {
            dispatches.push((id, dispatch));
        }
    }
    // Every check before anything changes: a refused delivery leaves the instance as it was.
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
        tx.prepare_cached("DELETE FROM tasks WHERE id = ?1 AND lease_owner IS NULL")
            .map_err(db)?
            .execute([id])
            .map_err(db)?;
        insert_task(tx, instance_id, &dispatch, now, None)?;
        taken += 1;
    }
    let answer = match (taken, &d.wait) {
        (0, Some(_)) => return Ok(Delivered::WaitOver),
        (0, None) => {
            if let Some(refused) = keep_refused(tx, instance_id, d)? {
                return Ok(refused);
            }
            tx.prepare_cached(
                "INSERT INTO events (instance_id, event, data, event_id, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )
            .map_err(db)?
            .execute(params![instance_id, d.event, to_json(&d.data)?, d.id, now])
            .map_err(db)?;
            Delivered::Buffered
        }
        (n, _) => Delivered::Dispatched(n),
    };
    if let Some(id) = &d.id {
        tx.prepare_cached(
            "INSERT INTO deliveries (instance_id, event_id, created_at) VALUES (?1, ?2, ?3)",
        )
        .map_err(db)?
        .execute(params![instance_id, id, now])
        .map_err(db)?;
    }
    Ok(answer)
}

/// Why an event no branch waits for may not be kept, if it may not: the instance keeps as
/// many as it may, or none of its pending steps can reach a state that would wait for it.
fn keep_refused(
    tx: &Transaction<'_>,
    instance_id: i64,
    d: &Delivery,
) -> StoreResult<Option<Delivered>> {
    if let Some(max) = d.checks.max_kept_events {
        let kept: i64 = tx
            .prepare_cached("SELECT COUNT(*) FROM events WHERE instance_id = ?1")
            .map_err(db)?
            .query_row([instance_id], |r| r.get(0))
            .map_err(db)?;
        let kept = usize::try_from(kept).unwrap_or(usize::MAX);
        if kept >= max {
            return Ok(Some(Delivered::TooManyKept(kept)));
        }
    }
    if let Some(reachable) = &d.checks.reachable {
        let json = |names: &[String]| serde_json::Value::from(names.to_vec()).to_string();
        let possible: bool = tx
            .prepare_cached(
                "SELECT EXISTS (SELECT 1 FROM tasks WHERE instance_id = ?1 AND (
                          (kind IN ('wait', 'join') AND from_state IN (SELECT value FROM json_each(?2)))
                       OR (kind = 'dispatch'
                           AND (COALESCE(from_state, '') || char(31) || event)
                               IN (SELECT value FROM json_each(?3)))))
                     OR EXISTS (SELECT 1 FROM items WHERE instance_id = ?1
                                  AND state IN (SELECT value FROM json_each(?2)))",
            )
            .map_err(db)?
            .query_row(
                params![
                    instance_id,
                    json(&reachable.states),
                    json(&reachable.dispatches)
                ],
                |r| r.get(0),
            )
            .map_err(db)?;
        if !possible {
            return Ok(Some(Delivered::CannotWait));
        }
    }
    Ok(None)
}

/// A wait task as read for a delivery.
struct WaitRow {
    id: i64,
    name: String,
    from_state: Option<String>,
    context: String,
    step: i64,
    branch: String,
    accepts: Option<String>,
    /// The wait's timeout event (`""` without a timeout).
    timeout_event: String,
}

impl WaitRow {
    /// The dispatch of `event` that replaces this wait, if it accepts the event.
    fn dispatch(self, event: &str, data: &Context, now: Micros) -> StoreResult<Option<NewTask>> {
        let wait = super::super::stored_wait(
            self.name,
            self.from_state,
            from_json(&self.context)?,
            count(self.step),
            self.branch,
            self.accepts.as_deref(),
        )?;
        Ok(wait.dispatch(event, data, now))
    }
}

/// The key that signs wait tokens.
pub(super) fn wait_key(tx: &Transaction<'_>) -> StoreResult<Vec<u8>> {
    let hex: String = tx
        .query_row(
            "SELECT value FROM phasm_keys WHERE name = 'wait_token'",
            [],
            |r| r.get(0),
        )
        .map_err(db)?;
    Ok(hex.into_bytes())
}
