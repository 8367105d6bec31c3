//! Writing: starting instances and applying commits (fenced by the task's lease), parking branches and releasing barrier joins.

use super::*;

pub(super) fn start(tx: &Transaction<'_>, now: Micros, new: &NewInstance) -> StoreResult<Started> {
    let existing = tx
        .query_row(
            "SELECT machine, status FROM instances WHERE name = ?1",
            [&new.name],
            |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)),
        )
        .optional()
        .map_err(db)?;
    if let Some((machine, status)) = existing {
        return Ok(Started::Existing {
            machine,
            status: parse_status(&status)?,
        });
    }
    tx.execute(
        "INSERT INTO instances (name, machine, status, context, created_at, updated_at)
         VALUES (?1, ?2, 'running', ?3, ?4, ?4)",
        params![new.name, new.machine, to_json(&new.context)?, now],
    )
    .map_err(db)?;
    let id = tx.last_insert_rowid();
    insert_task(tx, id, &new.start, now, None)?;
    Ok(Started::Created)
}

/// Insert a task (a task of that name already pending is left as it is). With a lease
/// (owner, expiry), the task is inserted already claimed; returns its id when inserted.
pub(super) fn insert_task(
    tx: &Transaction<'_>,
    instance_id: i64,
    t: &NewTask,
    now: Micros,
    lease: Option<(&str, Micros)>,
) -> StoreResult<Option<i64>> {
    let (owner, due_at, claim, attempts, first) = match lease {
        Some((owner, until)) => (Some(owner), until, 1, 1, Some(now)),
        None => (None, t.due_at, 0, 0, None),
    };
    let mut stmt = tx
        .prepare_cached(
            "INSERT INTO tasks (instance_id, name, kind, from_state, event, context, step, branch,
                                queue, target, status, due_at, created_at, lease_owner, claim,
                                attempts, first_attempt_at, token)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, 'ready', ?11, ?12, ?13, ?14, ?15, ?16, ?17)
             ON CONFLICT (instance_id, name) DO NOTHING",
        )
        .map_err(db)?;
    let inserted = stmt
        .execute(params![
            instance_id,
            t.name,
            t.kind.as_str(),
            t.from_state,
            t.event,
            to_json(&t.context)?,
            t.step as i64,
            t.branch,
            t.queue,
            t.target,
            due_at,
            now,
            owner,
            claim,
            attempts,
            first,
            t.token.as_ref().map(ToString::to_string)
        ])
        .map_err(db)?;
    Ok((inserted == 1).then(|| tx.last_insert_rowid()))
}

pub(super) fn apply(
    tx: &Transaction<'_>,
    now: Micros,
    c: &Commit,
    successors: Option<&SuccessorClaim>,
) -> StoreResult<AppliedCommit> {
    // The fence: the task must still be ours and our lease unexpired. Finishing or
    // rescheduling the task and checking the fence are one statement.
    let fence = "AND claim = ?2 AND status = 'ready' AND due_at > ?3 RETURNING instance_id, kind";
    let (sql, extra): (String, Option<(Micros, &String)>) = match &c.disposition {
        Disposition::Finished => (format!("DELETE FROM tasks WHERE id = ?1 {fence}"), None),
        Disposition::Keep => (format!("UPDATE tasks SET page_queued = 1 WHERE id = ?1 {fence}"), None),
        Disposition::Retry { due_at, error } => (
            format!("UPDATE tasks SET due_at = ?4, lease_owner = NULL, last_error = ?5 WHERE id = ?1 {fence}"),
            Some((*due_at, error)),
        ),
        Disposition::Failed { error } => (
            format!(
                "UPDATE tasks SET status = 'failed', due_at = ?3, lease_owner = NULL, last_error = ?5
                 WHERE id = ?1 {fence}"
            ),
            Some((now, error)),
        ),
        // The claim did not count: take back the attempt it added.
        Disposition::Postpone { due_at, reason } => (
            format!(
                "UPDATE tasks SET due_at = ?4, lease_owner = NULL, last_error = ?5,
                        attempts = MAX(attempts - 1, 0),
                        first_attempt_at = CASE WHEN attempts <= 1 THEN NULL ELSE first_attempt_at END
                 WHERE id = ?1 {fence}"
            ),
            Some((*due_at, reason)),
        ),
    };
    let mut stmt = tx.prepare_cached(&sql).map_err(db)?;
    let row = |r: &rusqlite::Row<'_>| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?));
    let found: Option<(i64, String)> = match extra {
        None => stmt.query_row(params![c.task_id, c.claim, now], row),
        Some((due_at, error)) => {
            stmt.query_row(params![c.task_id, c.claim, now, due_at, error], row)
        }
    }
    .optional()
    .map_err(db)?;
    drop(stmt);
    let found = match found {
        Some((instance_id, kind)) => {
            if kind == TaskKind::Join.as_str() && c.disposition == Disposition::Finished {
                // The join's outcome is committed: the contexts it joined are gone with it.
                tx.prepare_cached("DELETE FROM items WHERE join_task = ?1")
                    .map_err(db)?
                    .execute([c.task_id])
                    .map_err(db)?;
            }
            Some(instance_id)
        }
        None => None,
    };
    let Some(instance_id) = found else {
        return Ok(AppliedCommit {
            applied: Applied::Fenced,
            claimed: Vec::new(),
        });
    };
    let machine = &c.machine;
    let mut claimed = Vec::new();
    for t in &c.new_tasks {
        let lease = successors.filter(|s| {
            t.due_at <= now
                && claimed.len() < s.max
                && s.takes(&t.queue, machine, t.target.as_deref())
        });
        let until = lease.map(|s| (s.owner.as_str(), now + micros(s.lease)));
        if let (Some(id), Some(_)) = (insert_task(tx, instance_id, t, now, until)?, until) {
            claimed.push(t.claimed(id, &c.instance, machine, now));
        }
    }
    for h in &c.history {
        tx.prepare_cached(
            "INSERT INTO history (instance_id, from_state, event, to_state, attempt, started_at,
                                  finished_at, task, branch, ends_branch)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
        )
        .map_err(db)?
        .execute(params![
            instance_id,
            h.from,
            h.event,
            h.to,
            h.attempt,
            h.started_at,
            h.finished_at,
            h.task,
            h.branch,
            h.ends_branch
        ])
        .map_err(db)?;
    }
    for p in &c.parked {
        park(tx, instance_id, &c.instance, p, now)?;
    }
    for child in &c.spawns {
        let inserted = tx
            .prepare_cached(
                "INSERT INTO instances (name, machine, status, context, parent, created_at, updated_at)
                 VALUES (?1, ?2, 'running', ?3, ?4, ?5, ?5)
                 ON CONFLICT (name) DO NOTHING",
            )
            .map_err(db)?
            .execute(params![child.name, child.machine, to_json(&child.context)?, c.instance, now])
            .map_err(db)?;
        if inserted == 1 {
            let child_id = tx.last_insert_rowid();
            insert_task(tx, child_id, &child.start, now, None)?;
        }
    }
    for l in &c.logs {
        insert_log(tx, instance_id, l)?;
    }
    match &c.instance_change {
        InstanceChange::None => {}
        InstanceChange::BranchEnded(context) => {
            // The last branch to end leaves its context as the instance's result; the
            // instance is completed when no task and no parked branch of it is left.
            tx.prepare_cached(
                "UPDATE instances SET result = ?3,
                        status = CASE WHEN NOT EXISTS (SELECT 1 FROM tasks WHERE instance_id = ?1)
                                       AND NOT EXISTS (SELECT 1 FROM items WHERE instance_id = ?1)
                                      THEN 'completed' ELSE status END,
                        updated_at = ?2,
                        ended_at = CASE WHEN NOT EXISTS (SELECT 1 FROM tasks WHERE instance_id = ?1)
                                         AND NOT EXISTS (SELECT 1 FROM items WHERE instance_id = ?1)
                                        THEN ?2 ELSE ended_at END
                 WHERE id = ?1 AND status = 'running'",
            )
            .map_err(db)?
            .execute(params![instance_id, now, to_json(context)?])
            .map_err(db)?;
        }
        InstanceChange::Halt(reason) => {
            drop_pending(tx, instance_id).map_err(db)?;
            end_instance(tx, instance_id, InstanceStatus::Halted, Some(reason), now)?;
        }
        InstanceChange::Fail(error) => {
            tx.execute(
                "UPDATE tasks SET status = 'held', lease_owner = NULL
                 WHERE instance_id = ?1 AND status = 'ready'",
                [instance_id],
            )
            .map_err(db)?;
            end_instance(tx, instance_id, InstanceStatus::Failed, Some(error), now)?;
        }
    }
    if c.disposition != Disposition::Keep {
        release_barriers(tx, instance_id, now)?;
    }
    Ok(AppliedCommit {
        applied: Applied::Yes,
        claimed,
    })
}

/// Park a branch at a fan-in state, and make sure a join will take it: a window join due
/// `window` after the first arrival (unless one not yet started is pending), or a waiting
/// barrier join.
pub(super) fn park(
    tx: &Transaction<'_>,
    instance_id: i64,
    instance: &str,
    p: &Parked,
    now: Micros,
) -> StoreResult<()> {
    tx.prepare_cached(
        "INSERT INTO items (instance_id, state, grp, context, branch, step, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )
    .map_err(db)?
    .execute(params![
        instance_id,
        p.state,
        p.group,
        to_json(&p.context)?,
        p.branch,
        p.step as i64,
        now
    ])
    .map_err(db)?;
    let item = tx.last_insert_rowid();
    let pending: bool = tx
        .prepare_cached(
            "SELECT EXISTS (SELECT 1 FROM tasks
                            WHERE instance_id = ?1 AND kind = 'join' AND from_state = ?2 AND grp = ?3
                              AND status IN ('ready', 'waiting') AND lease_owner IS NULL)",
        )
        .map_err(db)?
        .query_row(params![instance_id, p.state, p.group], |r| r.get(0))
        .map_err(db)?;
    if pending {
        return Ok(());
    }
    let (status, due_at, suffix) = match p.window {
        Some(window) => ("ready", now + window, "window"),
        None => ("waiting", now, "all"),
    };
    tx.prepare_cached(
        "INSERT INTO tasks (instance_id, name, kind, from_state, event, context, step, branch,
                            queue, target, status, due_at, created_at, grp)
         VALUES (?1, ?2, 'join', ?3, 'fan-in', '{}', ?4, '', ?5, ?6, ?7, ?8, ?9, ?10)",
    )
    .map_err(db)?
    .execute(params![
        instance_id,
        format!(
            "{instance}--{}--fan-in--{}--{suffix}-{item}",
            p.state, p.group
        ),
        p.state,
        p.step as i64,
        p.queue,
        p.target,
        status,
        due_at,
        now,
        p.group
    ])
    .map_err(db)?;
    Ok(())
}

/// Barrier joins (`fan_in: all`) run once no branch of their instance is live: when the
/// instance has no ready task left, its waiting joins become due.
pub(super) fn release_barriers(
    tx: &Transaction<'_>,
    instance_id: i64,
    now: Micros,
) -> StoreResult<()> {
    tx.prepare_cached(
        "UPDATE tasks SET status = 'ready', due_at = ?2
         WHERE instance_id = ?1 AND status = 'waiting'
           AND NOT EXISTS (SELECT 1 FROM tasks WHERE instance_id = ?1 AND status IN ('ready', 'held', 'failed'))",
    )
    .map_err(db)?
    .execute(params![instance_id, now])
    .map_err(db)?;
    Ok(())
}

/// Drop an instance's pending tasks and parked branches (it was halted or cancelled).
pub(super) fn drop_pending(tx: &Transaction<'_>, instance_id: i64) -> rusqlite::Result<usize> {
    tx.execute("DELETE FROM items WHERE instance_id = ?1", [instance_id])?;
    tx.execute("DELETE FROM tasks WHERE instance_id = ?1", [instance_id])
}

pub(super) fn insert_log(tx: &Transaction<'_>, instance_id: i64, l: &LogLine) -> StoreResult<()> {
    tx.prepare_cached(
        "INSERT INTO logs (instance_id, at, level, message, task) VALUES (?1, ?2, ?3, ?4, ?5)",
    )
    .map_err(db)?
    .execute(params![instance_id, l.at, l.level, l.message, l.task])
    .map_err(db)?;
    Ok(())
}

pub(super) fn end_instance(
    tx: &Transaction<'_>,
    id: i64,
    status: InstanceStatus,
    error: Option<&String>,
    now: Micros,
) -> StoreResult<()> {
    tx.execute(
        "UPDATE instances SET status = ?2, error = ?3, updated_at = ?4, ended_at = ?4 WHERE id = ?1",
        params![id, status.as_str(), error, now],
    )
    .map_err(db)?;
    Ok(())
}
