//! Acting on instances: `retry`, `cancel`, `scrub`, and the workers' announcements.

use rusqlite::{params, OptionalExtension, Transaction};

use super::apply::{drop_pending, end_instance, insert_log, insert_task};
use super::db;
use crate::clock::Micros;
use crate::engine::{LogLine, NewTask};
use crate::store::convert::parse_status;
use crate::store::{Control, InstanceStatus, StoreError, StoreResult, WorkerView, WORKERS_KEPT};

pub(super) fn worker_alive(tx: &Transaction<'_>, now: Micros, w: &WorkerView) -> StoreResult<()> {
    let list =
        |v: &[String]| serde_json::to_string(v).map_err(|e| StoreError::Corrupt(e.to_string()));
    let queues = w.queues.as_deref().map(list).transpose()?;
    tx.prepare_cached(
        "INSERT INTO workers (owner, machines, targets, queues, started_at, seen_at, expires_at, about)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
         ON CONFLICT (owner) DO UPDATE SET machines = excluded.machines, targets = excluded.targets,
             queues = excluded.queues, seen_at = excluded.seen_at, expires_at = excluded.expires_at,
             about = excluded.about",
    )
    .map_err(db)?
    .execute(params![
        w.owner,
        list(&w.machines)?,
        w.targets.to_column(),
        queues,
        w.started_at,
        w.seen_at,
        w.expires_at,
        serde_json::to_string(&w.about).map_err(|e| StoreError::Corrupt(e.to_string()))?
    ])
    .map_err(db)?;
    tx.prepare_cached("DELETE FROM workers WHERE expires_at < ?1")
        .map_err(db)?
        .execute([now - WORKERS_KEPT])
        .map_err(db)?;
    Ok(())
}

pub(super) fn lookup(
    tx: &Transaction<'_>,
    name: &str,
) -> StoreResult<Option<(i64, InstanceStatus)>> {
    let row = tx
        .query_row(
            "SELECT id, status FROM instances WHERE name = ?1",
            [name],
            |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)),
        )
        .optional()
        .map_err(db)?;
    row.map(|(id, s)| Ok((id, parse_status(&s)?))).transpose()
}

pub(super) fn retry(tx: &Transaction<'_>, now: Micros, name: &str) -> StoreResult<Control> {
    let Some((id, status)) = lookup(tx, name)? else {
        return Ok(Control::NotFound);
    };
    if !status.may_retry() {
        return Ok(Control::NotAllowed(status));
    }
    tx.execute(
        "UPDATE tasks SET status = 'ready', due_at = CASE WHEN kind = 'wait' THEN due_at ELSE ?2 END, attempts = 0, first_attempt_at = NULL,
                          lease_owner = NULL, last_error = NULL
         WHERE instance_id = ?1 AND status IN ('failed', 'held')",
        params![id, now],
    )
    .map_err(db)?;
    tx.execute(
        "INSERT INTO logs (instance_id, at, level, message, task) VALUES (?1, ?2, 'info', 'resumed by retry', '')",
        params![id, now],
    )
    .map_err(db)?;
    tx.execute(
        "UPDATE instances SET status = 'running', error = NULL, updated_at = ?2, ended_at = NULL WHERE id = ?1",
        params![id, now],
    )
    .map_err(db)?;
    Ok(Control::Done)
}

/// See [`AdminStore::reset`].
pub(super) fn reset(
    tx: &Transaction<'_>,
    now: Micros,
    name: &str,
    task: &NewTask,
    note: &str,
) -> StoreResult<Control> {
    let Some((id, _)) = lookup(tx, name)? else {
        return Ok(Control::NotFound);
    };
    drop_pending(tx, id).map_err(db)?;
    tx.execute(
        "UPDATE instances SET status = 'running', error = NULL, result = NULL, ended_at = NULL,
                              updated_at = ?2,
                              reset_after = (SELECT COALESCE(MAX(id), 0) FROM history
                                             WHERE instance_id = ?1)
         WHERE id = ?1",
        params![id, now],
    )
    .map_err(db)?;
    insert_task(tx, id, task, now, None)?;
    insert_log(
        tx,
        id,
        &LogLine {
            at: now,
            level: "info".into(),
            message: note.to_string(),
            task: String::new(),
        },
    )?;
    Ok(Control::Done)
}

pub(super) fn scrub(tx: &Transaction<'_>, cutoff: Micros, batch: usize) -> StoreResult<u64> {
    // Foreign keys cascade to tasks, history, logs and items.
    // The batch is written into the SQL, so the planner knows it (see `read::recent_steps`).
    let deleted = tx
        .execute(
            &format!(
                "DELETE FROM instances WHERE id IN (
                     SELECT id FROM instances
                     WHERE status <> 'running' AND ended_at IS NOT NULL AND ended_at < ?1
                     ORDER BY id LIMIT {batch})"
            ),
            params![cutoff],
        )
        .map_err(db)?;
    Ok(deleted as u64)
}

pub(super) fn cancel(
    tx: &Transaction<'_>,
    now: Micros,
    name: &str,
    reason: Option<&str>,
) -> StoreResult<Control> {
    let Some((id, status)) = lookup(tx, name)? else {
        return Ok(Control::NotFound);
    };
    if !status.may_cancel() {
        return Ok(Control::NotAllowed(status));
    }
    drop_pending(tx, id).map_err(db)?;
    end_instance(tx, id, InstanceStatus::Cancelled, reason, now)?;
    Ok(Control::Done)
}
