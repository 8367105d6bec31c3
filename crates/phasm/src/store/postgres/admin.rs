//! Acting on instances: `retry`, `cancel`, `scrub`, the workers' announcements, the periodic
//! sweep and the commit-rate probe.

use std::time::Instant;

use super::apply::{drop_pending, end_instance, insert_task};
use super::{begin, pg, PostgresStore, Transaction};
use crate::clock::{micros, Micros};
use crate::engine::NewTask;
use crate::store::convert::{bigint, parse_status};
use crate::store::{Control, InstanceStatus, StoreError, StoreResult, WorkerView, WORKERS_KEPT};

/// Lock an instance's row for the rest of `tx` (so a worker cannot end or advance it
/// meanwhile) and return its id and status; `None` when no instance has that name.
pub(super) async fn lock_instance_by_name(
    tx: &Transaction<'_>,
    name: &str,
) -> StoreResult<Option<(i64, InstanceStatus)>> {
    let Some(row) = tx
        .query_opt(
            "SELECT id, status FROM instances WHERE name = $1 FOR UPDATE",
            &[&name],
        )
        .await
        .map_err(pg)?
    else {
        return Ok(None);
    };
    Ok(Some((row.get(0), parse_status(row.get(1))?)))
}

pub(super) async fn retry(store: &PostgresStore, now: Micros, name: &str) -> StoreResult<Control> {
    let mut client = store.client().await?;
    let tx = begin(&mut client).await?;
    let Some((id, status)) = lock_instance_by_name(&tx, name).await? else {
        return Ok(Control::NotFound);
    };
    if !status.may_retry() {
        return Ok(Control::NotAllowed(status));
    }
    tx.execute(
        "UPDATE tasks SET status = 'ready', due_at = CASE WHEN kind = 'wait' THEN due_at ELSE $2 END, attempts = 0, first_attempt_at = NULL,
                          lease_owner = NULL, last_error = NULL
         WHERE instance_id = $1 AND status IN ('failed', 'held')",
        &[&id, &now],
    )
    .await
    .map_err(pg)?;
    tx.execute(
        "INSERT INTO logs (instance_id, at, level, message, task) VALUES ($1, $2, 'info', 'resumed by retry', '')",
        &[&id, &now],
    )
    .await
    .map_err(pg)?;
    tx.execute(
        "UPDATE instances SET status = 'running', error = NULL, updated_at = $2, ended_at = NULL WHERE id = $1",
        &[&id, &now],
    )
    .await
    .map_err(pg)?;
    commit_waking(store, tx).await
}

/// Commit an instance's pending work made ready again (a retry, a reset), and wake idle
/// workers: this process's, and other processes' through `LISTEN phasm`.
async fn commit_waking(store: &PostgresStore, tx: Transaction<'_>) -> StoreResult<Control> {
    tx.execute("SELECT pg_notify('phasm', '')", &[])
        .await
        .map_err(pg)?;
    tx.commit().await.map_err(pg)?;
    store.changes.notify_waiters();
    Ok(Control::Done)
}

/// See [`AdminStore::reset`].
pub(super) async fn reset(
    store: &PostgresStore,
    now: Micros,
    name: &str,
    task: &NewTask,
    note: &str,
) -> StoreResult<Control> {
    let mut client = store.client().await?;
    let tx = begin(&mut client).await?;
    let Some((id, _)) = lock_instance_by_name(&tx, name).await? else {
        return Ok(Control::NotFound);
    };
    drop_pending(&tx, id).await?;
    tx.execute(
        "UPDATE instances SET status = 'running', error = NULL, result = NULL, ended_at = NULL,
                              updated_at = $2,
                              reset_after = (SELECT COALESCE(MAX(id), 0) FROM history
                                             WHERE instance_id = $1)
         WHERE id = $1",
        &[&id, &now],
    )
    .await
    .map_err(pg)?;
    insert_task(&tx, id, task, now, None).await?;
    tx.execute(
        "INSERT INTO logs (instance_id, at, level, message, task) VALUES ($1, $2, 'info', $3, '')",
        &[&id, &now, &note],
    )
    .await
    .map_err(pg)?;
    commit_waking(store, tx).await
}

pub(super) async fn cancel(
    store: &PostgresStore,
    now: Micros,
    name: &str,
    reason: Option<&str>,
) -> StoreResult<Control> {
    let mut client = store.client().await?;
    let tx = begin(&mut client).await?;
    let Some((id, status)) = lock_instance_by_name(&tx, name).await? else {
        return Ok(Control::NotFound);
    };
    if !status.may_cancel() {
        return Ok(Control::NotAllowed(status));
    }
    drop_pending(&tx, id).await?;
    end_instance(&tx, id, InstanceStatus::Cancelled, reason, now).await?;
    tx.commit().await.map_err(pg)?;
    Ok(Control::Done)
}

pub(super) async fn worker_alive(
    store: &PostgresStore,
    now: Micros,
    w: &WorkerView,
) -> StoreResult<()> {
    let list =
        |v: &[String]| serde_json::to_string(v).map_err(|e| StoreError::Corrupt(e.to_string()));
    let queues = w.queues.as_deref().map(list).transpose()?;
    let client = store.client().await?;
    client
        .execute(
            "INSERT INTO workers (owner, machines, targets, queues, started_at, seen_at, expires_at, about)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
             ON CONFLICT (owner) DO UPDATE SET machines = excluded.machines,
                 targets = excluded.targets, queues = excluded.queues,
                 seen_at = excluded.seen_at, expires_at = excluded.expires_at,
                 about = excluded.about",
            &[
                &w.owner,
                &list(&w.machines)?,
                &w.targets.to_column(),
                &queues,
                &w.started_at,
                &w.seen_at,
                &w.expires_at,
                &serde_json::to_string(&w.about).map_err(|e| StoreError::Corrupt(e.to_string()))?,
            ],
        )
        .await
        .map_err(pg)?;
    client
        .execute(
            "DELETE FROM workers WHERE expires_at < $1",
            &[&(now - WORKERS_KEPT)],
        )
        .await
        .map_err(pg)?;
    Ok(())
}

pub(super) async fn worker_stopped(store: &PostgresStore, owner: &str) -> StoreResult<()> {
    store
        .client()
        .await?
        .execute("DELETE FROM workers WHERE owner = $1", &[&owner])
        .await
        .map_err(pg)?;
    Ok(())
}

pub(super) async fn probe_commit_rate(store: &PostgresStore, commits: usize) -> StoreResult<f64> {
    let client = store.client().await?;
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS phasm_probe (id BIGSERIAL PRIMARY KEY, at BIGINT)",
        )
        .await
        .map_err(pg)?;
    let started = Instant::now();
    for i in 0..commits {
        client
            .execute("INSERT INTO phasm_probe (at) VALUES ($1)", &[&bigint(i)])
            .await
            .map_err(pg)?;
    }
    let secs = started.elapsed().as_secs_f64();
    client
        .batch_execute("DROP TABLE phasm_probe")
        .await
        .map_err(pg)?;
    Ok(commits as f64 / secs.max(1e-9))
}

pub(super) async fn scrub(store: &PostgresStore, cutoff: Micros, batch: usize) -> StoreResult<u64> {
    let mut client = store.client().await?;
    let tx = begin(&mut client).await?;
    let ids: Vec<i64> = tx
        .query(
            "SELECT id FROM instances
             WHERE status <> 'running' AND ended_at IS NOT NULL AND ended_at < $1
             ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED",
            &[&cutoff, &bigint(batch)],
        )
        .await
        .map_err(pg)?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if ids.is_empty() {
        return Ok(0);
    }
    for table in ["history", "logs", "items", "tasks", "events", "deliveries"] {
        tx.execute(
            &format!("DELETE FROM {table} WHERE instance_id = ANY($1)"),
            &[&ids],
        )
        .await
        .map_err(pg)?;
    }
    tx.execute("DELETE FROM instances WHERE id = ANY($1)", &[&ids])
        .await
        .map_err(pg)?;
    tx.commit().await.map_err(pg)?;
    Ok(ids.len() as u64)
}

/// How long a commit's settle note may wait for the check after the commit before the sweep
/// takes it as left by a dead worker.
const SETTLE_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// Most noted instances one sweep settles.
const SWEEP_BATCH: i64 = 1000;

/// Redo the checks a dead worker left undone: release barrier joins with no branch live
/// (only `waiting` joins are looked at, through their index), and settle the instances still
/// noted in `settle_queue` a while after their commit. Nothing scans every running instance.
pub(super) async fn sweep(store: &PostgresStore, now: Micros) -> StoreResult<()> {
    let client = store.client().await?;
    let released = client
        .execute(
            "UPDATE tasks w SET status = 'ready', due_at = $1
             WHERE w.status = 'waiting'
               AND NOT EXISTS (SELECT 1 FROM tasks r WHERE r.instance_id = w.instance_id AND r.status IN ('ready', 'held', 'failed'))",
            &[&now],
        )
        .await
        .map_err(pg)?;
    if released > 0 {
        client
            .execute("SELECT pg_notify('phasm', '')", &[])
            .await
            .map_err(pg)?;
    }
    let noted: Vec<(i64, i64)> = client
        .query(
            "SELECT instance_id, queued_at FROM settle_queue WHERE queued_at < $1
             ORDER BY queued_at LIMIT $2",
            &[&(now - micros(SETTLE_GRACE)), &SWEEP_BATCH],
        )
        .await
        .map_err(pg)?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    drop(client);
    for (instance_id, queued_at) in noted {
        store.settle_coalesced(instance_id, true, queued_at).await?;
    }
    Ok(())
}
