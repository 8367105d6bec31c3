//! Events from outside ([`store::deliver`](crate::store::deliver)'s operations as SQLite
//! statements), and the key that signs wait tokens.

use rusqlite::{params, Transaction};

use super::admin::lookup;
use super::apply::SqliteTx;
use super::db;
use crate::clock::Micros;
use crate::store::convert::{count, from_json, to_json};
use crate::store::deliver::{self, DeliverTx, WaitRow};
use crate::store::execute::ready;
use crate::store::{stored_wait, Delivered, Delivery, InstanceStatus, Reachable, StoreResult};

/// Deliver an event (see [`WorkStore::deliver`](crate::store::WorkStore::deliver)) in the
/// batch's transaction.
pub(super) fn deliver(tx: &Transaction<'_>, now: Micros, d: &Delivery) -> StoreResult<Delivered> {
    ready(deliver::deliver(&mut SqliteTx(tx, None), now, d))?
}

/// SQLite's one writer runs deliveries one at a time: nothing is locked.
impl DeliverTx for SqliteTx<'_, '_> {
    async fn instance(&mut self, name: &str) -> StoreResult<Option<(i64, InstanceStatus)>> {
        lookup(self.0, name)
    }

    async fn delivered_before(&mut self, instance_id: i64, id: &str) -> StoreResult<bool> {
        self.0
            .prepare_cached(
                "SELECT EXISTS (SELECT 1 FROM deliveries WHERE instance_id = ?1 AND event_id = ?2)",
            )
            .map_err(db)?
            .query_row(params![instance_id, id], |r| r.get(0))
            .map_err(db)
    }

    async fn waits(&mut self, instance_id: i64, wait: Option<&str>) -> StoreResult<Vec<WaitRow>> {
        type Row = (
            i64,
            String,
            Option<String>,
            String,
            i64,
            String,
            Option<String>,
            String,
        );
        let rows: Vec<Row> = self
            .0
            .prepare_cached(
                "SELECT id, name, from_state, context, step, branch, accepts, event FROM tasks
                 WHERE instance_id = ?1 AND kind = 'wait' AND status = 'ready' AND lease_owner IS NULL
                   AND (?2 IS NULL OR name = ?2)
                 ORDER BY id",
            )
            .map_err(db)?
            .query_map(params![instance_id, wait], |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                    r.get(6)?,
                    r.get(7)?,
                ))
            })
            .map_err(db)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(db)?;
        rows.into_iter()
            .map(
                |(id, name, from, context, step, branch, accepts, timeout_event)| {
                    let context = from_json(&context)?;
                    let wait =
                        stored_wait(name, from, context, count(step), branch, accepts.as_deref())?;
                    Ok(WaitRow {
                        id,
                        wait,
                        timeout_event,
                    })
                },
            )
            .collect()
    }

    async fn take_wait(&mut self, id: i64) -> StoreResult<bool> {
        let deleted = self
            .0
            .prepare_cached("DELETE FROM tasks WHERE id = ?1 AND lease_owner IS NULL")
            .map_err(db)?
            .execute([id])
            .map_err(db)?;
        Ok(deleted == 1)
    }

    async fn kept_events(&mut self, instance_id: i64) -> StoreResult<usize> {
        let kept: i64 = self
            .0
            .prepare_cached("SELECT COUNT(*) FROM events WHERE instance_id = ?1")
            .map_err(db)?
            .query_row([instance_id], |r| r.get(0))
            .map_err(db)?;
        Ok(usize::try_from(kept).unwrap_or(usize::MAX))
    }

    async fn may_reach(&mut self, instance_id: i64, reachable: &Reachable) -> StoreResult<bool> {
        let json = |names: &[String]| serde_json::Value::from(names.to_vec()).to_string();
        self.0
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
            .map_err(db)
    }

    async fn buffer(&mut self, instance_id: i64, d: &Delivery, now: Micros) -> StoreResult<()> {
        self.0
            .prepare_cached(
                "INSERT INTO events (instance_id, event, data, event_id, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )
            .map_err(db)?
            .execute(params![instance_id, d.event, to_json(&d.data)?, d.id, now])
            .map_err(db)?;
        Ok(())
    }

    async fn remember(&mut self, instance_id: i64, id: &str, now: Micros) -> StoreResult<()> {
        self.0
            .prepare_cached(
                "INSERT INTO deliveries (instance_id, event_id, created_at) VALUES (?1, ?2, ?3)",
            )
            .map_err(db)?
            .execute(params![instance_id, id, now])
            .map_err(db)?;
        Ok(())
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
