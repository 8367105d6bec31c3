//! Schedules: firing a tick behind the fence of its schedule's last tick, and listing them.

use super::apply::start_in;
use super::{begin, pg, PostgresStore};
use crate::clock::Micros;
use crate::store::convert::parse_status;
use crate::store::{Fired, ScheduleRecord, ScheduleTick, Started, StoreError, StoreResult};

/// Fire a schedule's tick (see [`WorkStore::fire_schedule`]). The schedule's row is locked
/// (`FOR UPDATE`) before the fence is read, so workers firing the same tick take turns and
/// the second finds the tick fired.
pub(super) async fn fire_schedule(
    store: &PostgresStore,
    now: Micros,
    t: &ScheduleTick,
) -> StoreResult<Fired> {
    let mut client = store.client().await?;
    let tx = begin(&mut client).await?;
    let registered = tx
        .execute(
            "INSERT INTO schedules (name, last_tick, last_instance, updated_at)
             VALUES ($1, $2, NULL, $3) ON CONFLICT (name) DO NOTHING",
            &[&t.schedule, &t.tick, &now],
        )
        .await
        .map_err(pg)?;
    if registered == 1 {
        tx.commit().await.map_err(pg)?;
        return Ok(Fired::Registered);
    }
    let row = tx
        .query_one(
            "SELECT last_tick, last_instance FROM schedules WHERE name = $1 FOR UPDATE",
            &[&t.schedule],
        )
        .await
        .map_err(pg)?;
    let last_tick: i64 = row.get(0);
    let last_instance: Option<String> = row.get(1);
    if last_tick >= t.tick {
        return Ok(Fired::AlreadyFired);
    }
    if t.skip_if_running {
        if let Some(last) = last_instance {
            let running = tx
                .query_opt(
                    "SELECT 1 FROM instances WHERE name = $1 AND status = 'running'",
                    &[&last],
                )
                .await
                .map_err(pg)?;
            if running.is_some() {
                tx.execute(
                    "UPDATE schedules SET last_tick = $2, updated_at = $3 WHERE name = $1",
                    &[&t.schedule, &t.tick, &now],
                )
                .await
                .map_err(pg)?;
                tx.commit().await.map_err(pg)?;
                return Ok(Fired::Skipped { running: last });
            }
        }
    }
    let started = start_in(&tx, now, std::slice::from_ref(&t.instance))
        .await?
        .pop()
        .ok_or_else(|| StoreError::database("starting a schedule's instance answered nothing"))?;
    tx.execute(
        "UPDATE schedules SET last_tick = $2, last_instance = $3, updated_at = $4 WHERE name = $1",
        &[&t.schedule, &t.tick, &t.instance.name, &now],
    )
    .await
    .map_err(pg)?;
    if started == Started::Created {
        tx.execute("SELECT pg_notify('phasm', '')", &[])
            .await
            .map_err(pg)?;
    }
    tx.commit().await.map_err(pg)?;
    if started == Started::Created {
        store.changes.notify_waiters();
    }
    Ok(Fired::Started(started))
}

/// Every schedule recorded, by name, with its last instance's status.
pub(super) async fn schedules(store: &PostgresStore) -> StoreResult<Vec<ScheduleRecord>> {
    let client = store.client().await?;
    client
        .query(
            "SELECT s.name, s.last_tick, s.last_instance, i.status, s.updated_at
             FROM schedules s LEFT JOIN instances i ON i.name = s.last_instance
             ORDER BY s.name",
            &[],
        )
        .await
        .map_err(pg)?
        .iter()
        .map(|r| {
            Ok(ScheduleRecord {
                name: r.get(0),
                last_tick: r.get(1),
                last_instance: r.get(2),
                last_status: r.get::<_, Option<&str>>(3).map(parse_status).transpose()?,
                updated_at: r.get(4),
            })
        })
        .collect()
}
