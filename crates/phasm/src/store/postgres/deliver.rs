//! Events from outside ([`store::deliver`](crate::store::deliver)'s operations as PostgreSQL
//! statements), and the key that signs wait tokens.

use super::admin::lock_instance_by_name;
use super::apply::PgTx;
use super::{begin, pg, PostgresStore};
use crate::clock::Micros;
use crate::store::convert::{count, from_json, to_json};
use crate::store::deliver::{self, DeliverTx, WaitRow};
use crate::store::{stored_wait, Delivered, Delivery, InstanceStatus, Reachable, StoreResult};

/// Deliver an event (see [`WorkStore::deliver`](crate::store::WorkStore::deliver)), in a
/// transaction of its own. A refusal writes nothing, so committing it changes nothing.
pub(super) async fn deliver(
    store: &PostgresStore,
    now: Micros,
    d: &Delivery,
) -> StoreResult<Delivered> {
    let mut client = store.client().await?;
    let mut tx = PgTx(begin(&mut client).await?);
    let answer = deliver::deliver(&mut tx, now, d).await?;
    tx.0.commit().await.map_err(pg)?;
    Ok(answer)
}

impl DeliverTx for PgTx<'_> {
    /// The instance's row is locked, as a commit beginning a wait locks it (see
    /// `PlanTx::take_buffered`).
    async fn instance(&mut self, name: &str) -> StoreResult<Option<(i64, InstanceStatus)>> {
        lock_instance_by_name(&self.0, name).await
    }

    async fn delivered_before(&mut self, instance_id: i64, id: &str) -> StoreResult<bool> {
        let seen = self
            .0
            .query_opt(
                "SELECT 1 FROM deliveries WHERE instance_id = $1 AND event_id = $2",
                &[&instance_id, &id],
            )
            .await
            .map_err(pg)?;
        Ok(seen.is_some())
    }

    async fn waits(&mut self, instance_id: i64, wait: Option<&str>) -> StoreResult<Vec<WaitRow>> {
        let rows = self
            .0
            .query(
                "SELECT id, name, from_state, context, step, branch, accepts, event FROM tasks
                 WHERE instance_id = $1 AND kind = 'wait' AND status = 'ready' AND lease_owner IS NULL
                   AND ($2::TEXT IS NULL OR name = $2)
                 ORDER BY id",
                &[&instance_id, &wait],
            )
            .await
            .map_err(pg)?;
        rows.iter()
            .map(|row| {
                let wait = stored_wait(
                    row.get(1),
                    row.get(2),
                    from_json(row.get(3))?,
                    count(row.get(4)),
                    row.get(5),
                    row.get::<_, Option<&str>>(6),
                )?;
                Ok(WaitRow {
                    id: row.get(0),
                    wait,
                    timeout_event: row.get(7),
                })
            })
            .collect()
    }

    async fn take_wait(&mut self, id: i64) -> StoreResult<bool> {
        let deleted = self
            .0
            .execute(
                "DELETE FROM tasks WHERE id = $1 AND lease_owner IS NULL",
                &[&id],
            )
            .await
            .map_err(pg)?;
        Ok(deleted == 1)
    }

    async fn kept_events(&mut self, instance_id: i64) -> StoreResult<usize> {
        let kept: i64 = self
            .0
            .query_one(
                "SELECT COUNT(*) FROM events WHERE instance_id = $1",
                &[&instance_id],
            )
            .await
            .map_err(pg)?
            .get(0);
        Ok(usize::try_from(kept).unwrap_or(usize::MAX))
    }

    async fn may_reach(&mut self, instance_id: i64, reachable: &Reachable) -> StoreResult<bool> {
        Ok(self
            .0
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
            .get(0))
    }

    async fn buffer(&mut self, instance_id: i64, d: &Delivery, now: Micros) -> StoreResult<()> {
        self.0
            .execute(
                "INSERT INTO events (instance_id, event, data, event_id, created_at)
                 VALUES ($1, $2, $3, $4, $5)",
                &[&instance_id, &d.event, &to_json(&d.data)?, &d.id, &now],
            )
            .await
            .map_err(pg)?;
        Ok(())
    }

    async fn remember(&mut self, instance_id: i64, id: &str, now: Micros) -> StoreResult<()> {
        self.0
            .execute(
                "INSERT INTO deliveries (instance_id, event_id, created_at) VALUES ($1, $2, $3)",
                &[&instance_id, &id, &now],
            )
            .await
            .map_err(pg)?;
        Ok(())
    }
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
