//! Schedules: firing a tick behind the fence of its schedule's last tick, and listing them.

use rusqlite::{params, OptionalExtension, Transaction};

use super::apply::start;
use super::db;
use crate::clock::Micros;
use crate::store::convert::parse_status;
use crate::store::{Fired, InstanceStatus, ScheduleRecord, ScheduleTick, StoreResult};

/// Fire a schedule's tick (see [`WorkStore::fire_schedule`]). The first statement writes, so
/// the transaction holds the database's write lock before it reads the fence.
pub(super) fn fire_schedule(
    tx: &Transaction<'_>,
    now: Micros,
    t: &ScheduleTick,
) -> StoreResult<Fired> {
    let registered = tx
        .prepare_cached(
            "INSERT INTO schedules (name, last_tick, last_instance, updated_at)
             VALUES (?1, ?2, NULL, ?3) ON CONFLICT (name) DO NOTHING",
        )
        .map_err(db)?
        .execute(params![t.schedule, t.tick, now])
        .map_err(db)?;
    if registered == 1 {
        return Ok(Fired::Registered);
    }
    let (last_tick, last_instance): (i64, Option<String>) = tx
        .prepare_cached("SELECT last_tick, last_instance FROM schedules WHERE name = ?1")
        .map_err(db)?
        .query_row([&t.schedule], |r| Ok((r.get(0)?, r.get(1)?)))
        .map_err(db)?;
    if last_tick >= t.tick {
        return Ok(Fired::AlreadyFired);
    }
    if t.skip_if_running {
        if let Some(last) = last_instance {
            let status: Option<String> = tx
                .prepare_cached("SELECT status FROM instances WHERE name = ?1")
                .map_err(db)?
                .query_row([&last], |r| r.get(0))
                .optional()
                .map_err(db)?;
            if status.as_deref() == Some(InstanceStatus::Running.as_str()) {
                tx.prepare_cached(
                    "UPDATE schedules SET last_tick = ?2, updated_at = ?3 WHERE name = ?1",
                )
                .map_err(db)?
                .execute(params![t.schedule, t.tick, now])
                .map_err(db)?;
                return Ok(Fired::Skipped { running: last });
            }
        }
    }
    let started = start(tx, now, &t.instance)?;
    tx.prepare_cached(
        "UPDATE schedules SET last_tick = ?2, last_instance = ?3, updated_at = ?4 WHERE name = ?1",
    )
    .map_err(db)?
    .execute(params![t.schedule, t.tick, t.instance.name, now])
    .map_err(db)?;
    Ok(Fired::Started(started))
}

/// Every schedule recorded, by name, with its last instance's status.
pub(super) fn schedules(tx: &Transaction<'_>) -> StoreResult<Vec<ScheduleRecord>> {
    let rows = tx
        .prepare_cached(
            "SELECT s.name, s.last_tick, s.last_instance, i.status, s.updated_at
             FROM schedules s LEFT JOIN instances i ON i.name = s.last_instance
             ORDER BY s.name",
        )
        .map_err(db)?
        .query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, Option<String>>(2)?,
                r.get::<_, Option<String>>(3)?,
                r.get::<_, i64>(4)?,
            ))
        })
        .map_err(db)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(db)?;
    rows.into_iter()
        .map(|(name, last_tick, last_instance, status, updated_at)| {
            Ok(ScheduleRecord {
                name,
                last_tick,
                last_instance,
                last_status: status.as_deref().map(parse_status).transpose()?,
                updated_at,
            })
        })
        .collect()
}
