//! Writing: starting instances and applying commits (fenced by the task's lease), parking branches and releasing barrier joins.

use rusqlite::{params, OptionalExtension, Transaction};

use super::db;
use crate::clock::Micros;
use crate::engine::{Commit, Context, HistoryEntry, LogLine, NewTask, Parked, Spawned};
use crate::store::convert::{bigint, from_json, parse_status, to_json};
use crate::store::execute::{self, Fenced, PlanTx};
use crate::store::plan::{Fence, JoinTask, Lease, Settle};
use crate::store::sql;
use crate::store::{
    AppliedCommit, InstanceStatus, NewInstance, Started, StoreError, StoreResult, SuccessorClaim,
};

/// Create an instance and its start task, unless one of that name exists (then say which).
pub(super) fn start(tx: &Transaction<'_>, now: Micros, new: &NewInstance) -> StoreResult<Started> {
    let inserted = tx
        .prepare_cached(
            "INSERT INTO instances (name, machine, status, context, created_at, updated_at, version)
             VALUES (?1, ?2, 'running', ?3, ?4, ?4,
                     (SELECT id FROM machine_versions WHERE machine = ?2
                        AND (?5 IS NULL OR version = ?5)
                      ORDER BY version DESC LIMIT 1))
             ON CONFLICT (name) DO NOTHING",
        )
        .map_err(db)?
        .execute(params![
            new.name,
            new.machine,
            to_json(&new.context)?,
            now,
            new.version.map(i64::from)
        ])
        .map_err(db)?;
    if inserted == 0 {
        let (machine, status) = tx
            .prepare_cached("SELECT machine, status FROM instances WHERE name = ?1")
            .map_err(db)?
            .query_row([&new.name], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
            })
            .map_err(db)?;
        return Ok(Started::Existing {
            machine,
            status: parse_status(&status)?,
        });
    }
    let id = tx.last_insert_rowid();
    insert_task(tx, id, &new.start, now, None)?;
    Ok(Started::Created)
}

/// Insert a task (a task of that name already pending is left as it is), leased to the
/// committing worker when `lease` says so; returns its id when inserted.
pub(super) fn insert_task(
    tx: &Transaction<'_>,
    instance_id: i64,
    t: &NewTask,
    now: Micros,
    lease: Option<&Lease<'_>>,
) -> StoreResult<Option<i64>> {
    insert_row(tx, instance_id, t, now, lease, None)
}

/// [`insert_task`], with a wait task's `accepts` column.
fn insert_row(
    tx: &Transaction<'_>,
    instance_id: i64,
    t: &NewTask,
    now: Micros,
    lease: Option<&Lease<'_>>,
    accepts: Option<&str>,
) -> StoreResult<Option<i64>> {
    let (owner, due_at, claim, attempts, first) = Lease::columns(lease, t.due_at, now);
    let inserted = tx
        .prepare_cached(sql::INSERT_TASK.sqlite())
        .map_err(db)?
        .execute(params![
            instance_id,
            t.name,
            t.kind.as_str(),
            t.from_state,
            t.event,
            to_json(&t.context)?,
            bigint(t.step),
            t.branch,
            t.queue,
            t.target,
            due_at,
            now,
            owner,
            claim,
            attempts,
            first,
            t.token.as_ref().map(ToString::to_string),
            accepts
        ])
        .map_err(db)?;
    Ok((inserted == 1).then(|| tx.last_insert_rowid()))
}

/// Apply one commit: run its [`plan`](crate::store::plan) (every step of it, settling
/// included, in this transaction) with the one [`execute`](crate::store::execute); returns
/// the answer and whether idle workers should look for work.
pub(super) fn apply(
    tx: &Transaction<'_>,
    now: Micros,
    c: &Commit,
    successors: Option<&SuccessorClaim>,
    settles: &mut Settles,
) -> StoreResult<(AppliedCommit, bool)> {
    let mut plan_tx = SqliteTx(tx, Some(settles));
    let executed = execute::ready(execute::apply(&mut plan_tx, c, successors, now))??;
    Ok((executed.result, executed.wakes))
}

/// The plan's operations as SQLite statements in the batch's transaction. Each runs before
/// it returns: SQLite's one writer sees every commit in order, so nothing here waits or locks.
pub(super) struct SqliteTx<'a, 'c>(
    pub(super) &'a Transaction<'c>,
    /// The batch's settling checks, where a commit's are gathered (`None`: run at once).
    pub(super) Option<&'a mut Settles>,
);

/// The settling checks of a batch's commits (see `store::plan`), gathered per instance and
/// run once each at the end of the batch, before it commits: a hundred branches of one
/// instance parking in one batch cost one check, not a hundred. The batch is one
/// transaction on the one writer, so the checks see every commit of it, as the last
/// commit's own check would, and no one sees the batch before they ran.
#[derive(Debug, Default)]
pub(super) struct Settles(std::collections::BTreeMap<i64, (Settle, Micros)>);

impl Settles {
    fn add(&mut self, instance_id: i64, settle: Settle, now: Micros) {
        let (s, at) = self
            .0
            .entry(instance_id)
            .or_insert((Settle::default(), now));
        s.release_barriers |= settle.release_barriers;
        s.complete |= settle.complete;
        *at = (*at).max(now);
    }

    /// Run every check gathered; whether barrier joins were released.
    pub(super) fn run(self, tx: &Transaction<'_>) -> StoreResult<bool> {
        let mut released = false;
        for (instance_id, (settle, now)) in self.0 {
            released |= settle_now(tx, instance_id, settle, now)?;
        }
        Ok(released)
    }
}

/// Both settling checks of one instance (see `store::plan`); whether barrier joins were
/// released.
fn settle_now(
    tx: &Transaction<'_>,
    instance_id: i64,
    settle: Settle,
    now: Micros,
) -> StoreResult<bool> {
    let released = settle.release_barriers && release_barriers(tx, instance_id, now)? > 0;
    if settle.complete {
        tx.prepare_cached(
            "UPDATE instances SET status = 'completed', updated_at = ?2, ended_at = ?2
             WHERE id = ?1 AND status = 'running'
               AND NOT EXISTS (SELECT 1 FROM tasks WHERE instance_id = ?1)
               AND NOT EXISTS (SELECT 1 FROM items WHERE instance_id = ?1)",
        )
        .map_err(db)?
        .execute(params![instance_id, now])
        .map_err(db)?;
    }
    Ok(released)
}

impl PlanTx for SqliteTx<'_, '_> {
    async fn fence(
        &mut self,
        task_id: i64,
        claim: i64,
        fence: Fence<'_>,
        now: Micros,
    ) -> StoreResult<Option<Fenced>> {
        let (sql, extra) = sql::fence(fence, now);
        let mut stmt = self.0.prepare_cached(sql.sqlite()).map_err(db)?;
        let row = |r: &rusqlite::Row<'_>| {
            Ok(Fenced {
                instance_id: r.get(0)?,
                is_join: r.get(1)?,
                given: r.get(2)?,
                step: r.get(3)?,
            })
        };
        match extra {
            None => stmt.query_row(params![task_id, claim, now], row),
            Some((due_at, text)) => stmt.query_row(params![task_id, claim, now, due_at, text], row),
        }
        .optional()
        .map_err(db)
    }

    async fn delete_join_items(&mut self, join_task: i64) -> StoreResult<()> {
        self.0
            .prepare_cached(sql::DELETE_JOIN_ITEMS.sqlite())
            .map_err(db)?
            .execute([join_task])
            .map_err(db)?;
        Ok(())
    }

    async fn insert_task(
        &mut self,
        instance_id: i64,
        task: &NewTask,
        lease: Option<&Lease<'_>>,
        accepts: Option<&str>,
        now: Micros,
    ) -> StoreResult<Option<i64>> {
        insert_row(self.0, instance_id, task, now, lease, accepts)
    }

    async fn take_buffered(
        &mut self,
        instance_id: i64,
        events: &[&str],
    ) -> StoreResult<Option<(String, Context)>> {
        let events =
            serde_json::to_string(events).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let taken: Option<(String, String)> = self
            .0
            .prepare_cached(
                "DELETE FROM events WHERE id = (
                     SELECT id FROM events
                     WHERE instance_id = ?1 AND event IN (SELECT value FROM json_each(?2))
                     ORDER BY id LIMIT 1)
                 RETURNING event, data",
            )
            .map_err(db)?
            .query_row(params![instance_id, events], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()
            .map_err(db)?;
        taken
            .map(|(event, data)| Ok((event, from_json(&data)?)))
            .transpose()
    }

    async fn insert_history(
        &mut self,
        instance_id: i64,
        entries: &[HistoryEntry],
        given: Option<&str>,
        step: i64,
    ) -> StoreResult<()> {
        let mut stmt = self
            .0
            .prepare_cached(sql::INSERT_HISTORY.sqlite())
            .map_err(db)?;
        for h in entries {
            stmt.execute(params![
                instance_id,
                h.from,
                h.event,
                h.to,
                h.attempt,
                h.started_at,
                h.finished_at,
                h.task,
                h.branch,
                h.ends_branch,
                given,
                step
            ])
            .map_err(db)?;
        }
        Ok(())
    }

    async fn insert_item(&mut self, instance_id: i64, p: &Parked, now: Micros) -> StoreResult<i64> {
        self.0
            .prepare_cached(sql::INSERT_ITEM.sqlite())
            .map_err(db)?
            .execute(params![
                instance_id,
                p.state,
                p.group,
                to_json(&p.context)?,
                p.branch,
                bigint(p.step),
                now
            ])
            .map_err(db)?;
        Ok(self.0.last_insert_rowid())
    }

    /// One statement; SQLite's one writer needs no lock while looking.
    async fn join_unless_pending(
        &mut self,
        instance_id: i64,
        p: &Parked,
        join: &JoinTask,
        item: i64,
        now: Micros,
    ) -> StoreResult<()> {
        self.0
            .prepare_cached(
                "INSERT INTO tasks (instance_id, name, kind, from_state, event, context, step, branch,
                                    queue, target, status, due_at, created_at, grp)
                 SELECT ?1, ?2, 'join', ?3, 'fan-in', '{}', ?4, '', ?5, ?6, ?7, ?8, ?9, ?10
                 WHERE NOT EXISTS (
                     SELECT 1 FROM tasks
                     WHERE instance_id = ?1 AND kind = 'join' AND from_state = ?3 AND grp = ?10
                       AND status IN ('ready', 'waiting') AND lease_owner IS NULL)
                 ON CONFLICT (instance_id, name) DO NOTHING",
            )
            .map_err(db)?
            .execute(params![
                instance_id,
                format!("{}{item}", join.name_prefix),
                p.state,
                bigint(p.step),
                p.queue,
                p.target,
                join.status.as_str(),
                join.due_at,
                now,
                p.group
            ])
            .map_err(db)?;
        Ok(())
    }

    async fn insert_child(
        &mut self,
        parent: &str,
        child: &Spawned,
        now: Micros,
    ) -> StoreResult<Option<i64>> {
        let inserted = self
            .0
            .prepare_cached(sql::INSERT_CHILD.sqlite())
            .map_err(db)?
            .execute(params![
                child.name,
                child.machine,
                to_json(&child.context)?,
                parent,
                now
            ])
            .map_err(db)?;
        Ok((inserted == 1).then(|| self.0.last_insert_rowid()))
    }

    async fn insert_log(&mut self, instance_id: i64, line: &LogLine) -> StoreResult<()> {
        insert_log(self.0, instance_id, line)
    }

    async fn set_result(
        &mut self,
        instance_id: i64,
        result: &Context,
        now: Micros,
    ) -> StoreResult<()> {
        self.0
            .prepare_cached(sql::SET_RESULT.sqlite())
            .map_err(db)?
            .execute(params![instance_id, to_json(result)?, now])
            .map_err(db)?;
        Ok(())
    }

    async fn drop_pending(&mut self, instance_id: i64) -> StoreResult<()> {
        drop_pending(self.0, instance_id).map_err(db)?;
        Ok(())
    }

    async fn hold_ready(&mut self, instance_id: i64) -> StoreResult<()> {
        self.0
            .prepare_cached(sql::HOLD_READY.sqlite())
            .map_err(db)?
            .execute([instance_id])
            .map_err(db)?;
        Ok(())
    }

    async fn end_instance(
        &mut self,
        instance_id: i64,
        status: InstanceStatus,
        error: Option<&str>,
        now: Micros,
    ) -> StoreResult<()> {
        end_instance(self.0, instance_id, status, error, now)
    }

    /// Gathered for the end of the batch (see [`Settles`]), or run at once.
    async fn settle(&mut self, instance_id: i64, settle: Settle, now: Micros) -> StoreResult<bool> {
        match &mut self.1 {
            Some(batch) => {
                batch.add(instance_id, settle, now);
                Ok(false)
            }
            None => settle_now(self.0, instance_id, settle, now),
        }
    }

    /// Every worker of an SQLite store lives in this process: the batch wakes them after
    /// the commit.
    async fn wake_others(&mut self) -> StoreResult<()> {
        Ok(())
    }
}

/// Barrier joins (`fan_in: all`) run once no branch of their instance is live: when the
/// instance has no ready, held or failed task left, its waiting joins become due. Returns
/// how many were released.
fn release_barriers(tx: &Transaction<'_>, instance_id: i64, now: Micros) -> StoreResult<usize> {
    tx.prepare_cached(
        "UPDATE tasks SET status = 'ready', due_at = ?2
         WHERE instance_id = ?1 AND status = 'waiting'
           AND NOT EXISTS (SELECT 1 FROM tasks WHERE instance_id = ?1 AND status IN ('ready', 'held', 'failed'))",
    )
    .map_err(db)?
    .execute(params![instance_id, now])
    .map_err(db)
}

/// Drop an instance's pending tasks and parked branches (it was halted or cancelled).
pub(super) fn drop_pending(tx: &Transaction<'_>, instance_id: i64) -> rusqlite::Result<usize> {
    tx.prepare_cached(sql::DROP_ITEMS.sqlite())?
        .execute([instance_id])?;
    tx.prepare_cached(sql::DROP_TASKS.sqlite())?
        .execute([instance_id])
}

pub(super) fn insert_log(tx: &Transaction<'_>, instance_id: i64, l: &LogLine) -> StoreResult<()> {
    tx.prepare_cached(sql::INSERT_LOG.sqlite())
        .map_err(db)?
        .execute(params![instance_id, l.at, l.level, l.message, l.task])
        .map_err(db)?;
    Ok(())
}

pub(super) fn end_instance(
    tx: &Transaction<'_>,
    id: i64,
    status: InstanceStatus,
    error: Option<&str>,
    now: Micros,
) -> StoreResult<()> {
    tx.prepare_cached(sql::END_INSTANCE.sqlite())
        .map_err(db)?
        .execute(params![id, status.as_str(), error, now])
        .map_err(db)?;
    Ok(())
}
