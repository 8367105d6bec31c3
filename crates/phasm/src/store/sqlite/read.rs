//! Reading: an instance, lists, logs and history pages, metrics, live workers, the next due time.

use rusqlite::{params, OptionalExtension, Transaction};

use super::admin::lookup;
use super::db;
use crate::clock::Micros;
use crate::engine::{HistoryEntry, LogLine};
use crate::store::convert::{bigint, count, from_json, parse_status};
use crate::store::{
    cut_message, worker_view, BranchCounts, BufferedEvent, InstanceStatus, InstanceSummary,
    InstanceView, ListFilter, Page, PageRequest, StoreResult, TaskStatus, TaskView, WaitView,
    WorkerView, MAX_PAGE_MESSAGE_CHARS, VIEW_ROWS,
};

pub(super) fn workers(tx: &Transaction<'_>, now: Micros) -> StoreResult<Vec<WorkerView>> {
    worker_rows(
        tx,
        "SELECT owner, machines, targets, queues, started_at, seen_at, expires_at, about
         FROM workers WHERE expires_at > ?1 ORDER BY started_at, owner",
        now,
    )
}

pub(super) fn workers_gone(tx: &Transaction<'_>, now: Micros) -> StoreResult<Vec<WorkerView>> {
    worker_rows(
        tx,
        "SELECT owner, machines, targets, queues, started_at, seen_at, expires_at, about
         FROM workers WHERE expires_at <= ?1 ORDER BY seen_at DESC, owner",
        now,
    )
}

fn worker_rows(tx: &Transaction<'_>, sql: &str, now: Micros) -> StoreResult<Vec<WorkerView>> {
    let rows = tx
        .prepare_cached(sql)
        .map_err(db)?
        .query_map([now], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, Option<String>>(2)?,
                r.get::<_, Option<String>>(3)?,
                [
                    r.get::<_, i64>(4)?,
                    r.get::<_, i64>(5)?,
                    r.get::<_, i64>(6)?,
                ],
                r.get::<_, Option<String>>(7)?,
            ))
        })
        .map_err(db)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(db)?;
    rows.into_iter()
        .map(|(owner, machines, targets, queues, times, about)| {
            worker_view(
                owner,
                &machines,
                targets.as_deref(),
                queues.as_deref(),
                times,
                about.as_deref(),
            )
        })
        .collect()
}

pub(super) fn next_due(tx: &Transaction<'_>) -> StoreResult<Option<Micros>> {
    tx.prepare_cached("SELECT MIN(due_at) FROM tasks WHERE status = 'ready' AND due_at < ?1")
        .map_err(db)?
        .query_row([crate::engine::NEVER], |r| r.get(0))
        .map_err(db)
}

pub(super) fn instance(tx: &Transaction<'_>, name: &str) -> StoreResult<Option<InstanceView>> {
    let row = tx
        .query_row(
            "SELECT id, machine, status, context, error, created_at, updated_at, ended_at, result
             FROM instances WHERE name = ?1",
            [name],
            |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, Option<String>>(4)?,
                    r.get::<_, i64>(5)?,
                    r.get::<_, i64>(6)?,
                    r.get::<_, Option<i64>>(7)?,
                    r.get::<_, Option<String>>(8)?,
                ))
            },
        )
        .optional()
        .map_err(db)?;
    let Some((id, machine, status, context, error, created_at, updated_at, ended_at, result)) = row
    else {
        return Ok(None);
    };
    let history = tx
        .prepare_cached(
            "SELECT id, from_state, event, to_state, attempt, started_at, finished_at, task, branch,
                    ends_branch, step
             FROM (SELECT * FROM history WHERE instance_id = ?1 ORDER BY id DESC LIMIT ?2)
             ORDER BY id",
        )
        .map_err(db)?
        .query_map(params![id, bigint(VIEW_ROWS)], history_row)
        .map_err(db)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(db)?;
    let mut contexts = Vec::new();
    let rows = tx
        .prepare_cached(
            "SELECT name, from_state, event, status, due_at, lease_owner, attempts, last_error, queue, context, target,
                    branch
             FROM tasks WHERE instance_id = ?1 ORDER BY id LIMIT ?2",
        )
        .map_err(db)?
        .query_map(params![id, bigint(VIEW_ROWS)], |r| {
            Ok((
                TaskView {
                    name: r.get(0)?,
                    from: r.get(1)?,
                    event: r.get(2)?,
                    status: TaskStatus::Ready,
                    due_at: r.get(4)?,
                    leased_by: r.get(5)?,
                    attempts: r.get(6)?,
                    last_error: r.get(7)?,
                    queue: r.get(8)?,
                    target: r.get(10)?,
                    branch: r.get(11)?,
                },
                r.get::<_, String>(9)?,
                r.get::<_, String>(3)?,
            ))
        })
        .map_err(db)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(db)?;
    let mut tasks = Vec::with_capacity(rows.len());
    for (mut view, ctx, status) in rows {
        if contexts.is_empty() {
            contexts.push(ctx);
        }
        view.status = TaskStatus::parse(&status)?;
        tasks.push(view);
    }
    let current_context = match contexts.first().or(result.as_ref()) {
        Some(c) => Some(from_json(c)?),
        None => None,
    };
    let (parent, version): (Option<String>, Option<i64>) = tx
        .prepare_cached(
            "SELECT parent, (SELECT v.version FROM machine_versions v WHERE v.id = instances.version)
             FROM instances WHERE id = ?1",
        )
        .map_err(db)?
        .query_row([id], |r| Ok((r.get(0)?, r.get(1)?)))
        .map_err(db)?;
    let children = children(tx, name)?;
    let count = |sql: &str| -> StoreResult<u64> {
        tx.prepare_cached(sql)
            .map_err(db)?
            .query_row([id], |r| r.get::<_, i64>(0))
            .map(count)
            .map_err(db)
    };
    let branches = BranchCounts {
        live: count("SELECT COUNT(*) FROM tasks WHERE instance_id = ?1 AND status = 'ready' AND kind NOT IN ('join', 'wait')")?
            + count("SELECT COUNT(*) FROM tasks WHERE instance_id = ?1 AND status = 'ready' AND kind = 'wait' AND lease_owner IS NOT NULL")?
            + count("SELECT COUNT(*) FROM tasks WHERE instance_id = ?1 AND status = 'ready' AND kind = 'join' AND lease_owner IS NOT NULL")?,
        held: count("SELECT COUNT(*) FROM tasks WHERE instance_id = ?1 AND status = 'held'")?,
        parked: count("SELECT COUNT(*) FROM items WHERE instance_id = ?1")?,
        ended: count(
            "SELECT COUNT(*) FROM history WHERE instance_id = ?1 AND ends_branch = 1
               AND id > (SELECT reset_after FROM instances WHERE id = ?1)",
        )?,
        failed: count("SELECT COUNT(*) FROM tasks WHERE instance_id = ?1 AND status = 'failed'")?,
        waiting: count("SELECT COUNT(*) FROM tasks WHERE instance_id = ?1 AND status = 'ready' AND kind = 'wait' AND lease_owner IS NULL")?,
    };
    let waiting = waits(tx, id)?;
    let buffered = buffered(tx, id)?;
    let history_total = count("SELECT COUNT(*) FROM history WHERE instance_id = ?1")?;
    let tasks_total = count("SELECT COUNT(*) FROM tasks WHERE instance_id = ?1")?;
    let end_states = tx
        .prepare_cached(
            "SELECT to_state FROM history WHERE instance_id = ?1 AND ends_branch = 1
               AND id > (SELECT reset_after FROM instances WHERE id = ?1)
             GROUP BY to_state ORDER BY MAX(id)",
        )
        .map_err(db)?
        .query_map([id], |r| r.get::<_, String>(0))
        .map_err(db)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(db)?;
    Ok(Some(InstanceView {
        parent,
        version: version.and_then(|v| u32::try_from(v).ok()),
        children,
        branches,
        name: name.to_string(),
        machine,
        status: parse_status(&status)?,
        context: from_json(&context)?,
        error,
        created_at,
        updated_at,
        ended_at,
        history,
        history_total,
        tasks,
        tasks_total,
        end_states,
        current_context,
        waiting,
        buffered,
    }))
}

/// The instance's waiting branches, oldest first.
fn waits(tx: &Transaction<'_>, id: i64) -> StoreResult<Vec<WaitView>> {
    let rows = tx
        .prepare_cached(
            "SELECT name, from_state, branch, event, due_at, accepts, created_at FROM tasks
             WHERE instance_id = ?1 AND kind = 'wait' AND status = 'ready' AND lease_owner IS NULL
             ORDER BY id LIMIT ?2",
        )
        .map_err(db)?
        .query_map(params![id, bigint(VIEW_ROWS)], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, Option<String>>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, i64>(4)?,
                r.get::<_, Option<String>>(5)?,
                r.get::<_, i64>(6)?,
            ))
        })
        .map_err(db)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(db)?;
    rows.into_iter()
        .map(|(task, state, branch, event, due_at, accepts, since)| {
            super::super::wait_view(
                task,
                state,
                branch,
                event,
                due_at,
                accepts.as_deref(),
                since,
            )
        })
        .collect()
}

/// The instance's buffered events, oldest first.
fn buffered(tx: &Transaction<'_>, id: i64) -> StoreResult<Vec<BufferedEvent>> {
    let rows = tx
        .prepare_cached(
            "SELECT event, event_id, LENGTH(CAST(data AS BLOB)), created_at FROM events
             WHERE instance_id = ?1 ORDER BY id LIMIT ?2",
        )
        .map_err(db)?
        .query_map(params![id, bigint(VIEW_ROWS)], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, Option<String>>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, i64>(3)?,
            ))
        })
        .map_err(db)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(db)?;
    Ok(rows
        .into_iter()
        .map(|(event, id, bytes, at)| BufferedEvent {
            event,
            id,
            bytes: u64::try_from(bytes).unwrap_or(0),
            at,
        })
        .collect())
}

pub(super) fn list(tx: &Transaction<'_>, filter: &ListFilter) -> StoreResult<Vec<InstanceSummary>> {
    use crate::store::listing::{self, Dialect, Param};
    let q = listing::query(filter, Dialect::Sqlite);
    let params: Vec<rusqlite::types::Value> = q
        .params
        .into_iter()
        .map(|p| match p {
            Param::Text(t) => rusqlite::types::Value::Text(t),
            Param::Int(i) => rusqlite::types::Value::Integer(i),
        })
        .collect();
    let mut stmt = tx.prepare_cached(&q.sql).map_err(db)?;
    let rows = stmt
        .query_map(rusqlite::params_from_iter(params), |r| {
            Ok((
                (
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, i64>(4)?,
                    r.get::<_, Option<String>>(5)?,
                ),
                (
                    r.get::<_, Option<String>>(6)?,
                    r.get::<_, Option<i64>>(7)?,
                    r.get::<_, i64>(8)?,
                    r.get::<_, Option<String>>(9)?,
                    r.get::<_, Option<String>>(10)?,
                    r.get::<_, Option<bool>>(11)?,
                    r.get::<_, Option<i64>>(12)?,
                ),
            ))
        })
        .map_err(db)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(db)?;
    rows.into_iter()
        .map(
            |(
                (instance, machine, status, created_at, updated_at, error),
                (parent, ended_at, steps, from, event, waiting, queued_at),
            )| {
                Ok(InstanceSummary {
                    instance,
                    machine,
                    status: parse_status(&status)?,
                    created_at,
                    updated_at,
                    error,
                    parent,
                    ended_at,
                    steps: count(steps),
                    pending: match (event, queued_at) {
                        (Some(event), Some(queued_at)) => Some(crate::store::PendingStep {
                            from,
                            event,
                            waiting: waiting.unwrap_or(false),
                            queued_at,
                        }),
                        _ => None,
                    },
                })
            },
        )
        .collect()
}

/// A log line from `at, level, message, task`.
fn log_line(r: &rusqlite::Row<'_>) -> rusqlite::Result<LogLine> {
    Ok(LogLine {
        at: r.get(0)?,
        level: r.get(1)?,
        message: r.get(2)?,
        task: r.get(3)?,
    })
}

pub(super) fn logs(tx: &Transaction<'_>, name: &str) -> StoreResult<Vec<LogLine>> {
    tx.prepare_cached(
        "SELECT l.at, l.level, l.message, l.task FROM logs l
         JOIN instances i ON i.id = l.instance_id WHERE i.name = ?1 ORDER BY l.id",
    )
    .map_err(db)?
    .query_map([name], log_line)
    .map_err(db)?
    .collect::<Result<Vec<_>, _>>()
    .map_err(db)
}

pub(super) fn history_page(
    tx: &Transaction<'_>,
    name: &str,
    page: PageRequest,
    branch: Option<&str>,
) -> StoreResult<Option<Page<super::super::HistoryRow>>> {
    let Some((id, _)) = lookup(tx, name)? else {
        return Ok(None);
    };
    let limit = i64::try_from(page.limit).unwrap_or(i64::MAX - 1);
    let rows = tx
        .prepare_cached(
            "SELECT id, from_state, event, to_state, attempt, started_at, finished_at, task, branch,
                    ends_branch, step
             FROM history WHERE instance_id = ?1 AND id > ?2 AND (?4 IS NULL OR branch = ?4)
             ORDER BY id LIMIT ?3",
        )
        .map_err(db)?
        .query_map(params![id, page.after, limit + 1, branch], |r| {
            let row = history_row(r)?;
            Ok((row.id, row))
        })
        .map_err(db)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(db)?;
    Ok(Some(Page::from_rows(rows, page.limit)))
}

/// A history row from `id, from_state, event, to_state, attempt, started_at, finished_at,
/// task, branch, ends_branch, step`.
fn history_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<super::super::HistoryRow> {
    Ok(super::super::HistoryRow {
        id: r.get(0)?,
        step: r.get::<_, Option<i64>>(10)?.map(count),
        entry: HistoryEntry {
            from: r.get(1)?,
            event: r.get(2)?,
            to: r.get(3)?,
            attempt: r.get(4)?,
            started_at: r.get(5)?,
            finished_at: r.get(6)?,
            task: r.get(7)?,
            branch: r.get(8)?,
            ends_branch: r.get(9)?,
        },
    })
}

/// See [`ReadStore::step`].
pub(super) fn step(
    tx: &Transaction<'_>,
    name: &str,
    step: i64,
) -> StoreResult<Option<super::super::StepDetail>> {
    use super::super::{PassedOn, StepDetail};
    let Some((instance, _)) = lookup(tx, name)? else {
        return Ok(None);
    };
    let found = tx
        .prepare_cached(
            "SELECT id, from_state, event, to_state, attempt, started_at, finished_at, task, branch,
                    ends_branch, step, context
             FROM history WHERE instance_id = ?1 AND id = ?2",
        )
        .map_err(db)?
        .query_row(params![instance, step], |r| {
            Ok((history_row(r)?, r.get::<_, Option<String>>(11)?))
        })
        .optional()
        .map_err(db)?;
    let Some((row, given)) = found else {
        return Ok(None);
    };
    let next = tx
        .prepare_cached(
            // The same task's other rows (a step that ran, then arrived at a fan-in) are
            // this step, not the next.
            "SELECT id, context FROM history
             WHERE instance_id = ?1 AND id > ?2 AND branch = ?3 AND task <> ?4
             ORDER BY id LIMIT 1",
        )
        .map_err(db)?
        .query_row(
            params![instance, step, row.entry.branch, row.entry.task],
            |r| Ok((r.get::<_, i64>(0)?, r.get::<_, Option<String>>(1)?)),
        )
        .optional()
        .map_err(db)?;
    let passed_on = match next {
        Some((id, context)) => PassedOn::Step(id, context.as_deref().map(from_json).transpose()?),
        None => tx
            .prepare_cached(
                "SELECT context FROM tasks
                 WHERE instance_id = ?1 AND branch = ?2 AND kind <> 'join' ORDER BY id LIMIT 1",
            )
            .map_err(db)?
            .query_row(params![instance, row.entry.branch], |r| {
                r.get::<_, String>(0)
            })
            .optional()
            .map_err(db)?
            .map_or(Ok(PassedOn::Nothing), |c| {
                from_json(&c).map(PassedOn::Pending)
            })?,
    };
    let limit = i64::try_from(VIEW_ROWS).unwrap_or(i64::MAX);
    let logs = tx
        .prepare_cached(
            "SELECT at, level, message, task FROM logs
             WHERE instance_id = ?1 AND task = ?2 ORDER BY id LIMIT ?3",
        )
        .map_err(db)?
        .query_map(params![instance, row.entry.task, limit], log_line)
        .map_err(db)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(db)?;
    Ok(Some(StepDetail {
        given: given.as_deref().map(from_json).transpose()?,
        row,
        passed_on,
        logs,
    }))
}

pub(super) fn logs_page(
    tx: &Transaction<'_>,
    name: &str,
    page: PageRequest,
) -> StoreResult<Option<Page<LogLine>>> {
    let Some((id, _)) = lookup(tx, name)? else {
        return Ok(None);
    };
    let limit = i64::try_from(page.limit).unwrap_or(i64::MAX - 1);
    let cut = i64::try_from(MAX_PAGE_MESSAGE_CHARS).unwrap_or(i64::MAX);
    let rows = tx
        .prepare_cached(
            "SELECT id, at, level, substr(message, 1, ?4), length(message), task
             FROM logs WHERE instance_id = ?1 AND id > ?2 ORDER BY id LIMIT ?3",
        )
        .map_err(db)?
        .query_map(params![id, page.after, limit + 1, cut], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                LogLine {
                    at: r.get(1)?,
                    level: r.get(2)?,
                    message: cut_message(r.get(3)?, r.get(4)?),
                    task: r.get(5)?,
                },
            ))
        })
        .map_err(db)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(db)?;
    Ok(Some(Page::from_rows(rows, page.limit)))
}

pub(super) fn stats(tx: &Transaction<'_>, now: Micros) -> StoreResult<crate::store::StoreStats> {
    let sql = "SELECT queue,
       SUM(CASE WHEN lease_owner IS NULL AND due_at <= ?1 THEN 1 ELSE 0 END),
       SUM(CASE WHEN lease_owner IS NULL AND due_at > ?1 THEN 1 ELSE 0 END),
       SUM(CASE WHEN lease_owner IS NOT NULL AND due_at > ?1 THEN 1 ELSE 0 END),
       MIN(CASE WHEN lease_owner IS NULL AND due_at <= ?1 THEN due_at END)
FROM tasks WHERE status = 'ready' GROUP BY queue ORDER BY queue";
    let queues = tx
        .prepare_cached(sql)
        .map_err(db)?
        .query_map([now], |r| {
            let oldest: Option<i64> = r.get(4)?;
            Ok(crate::store::QueueStats {
                queue: r.get(0)?,
                due: count(r.get::<_, i64>(1)?),
                scheduled: count(r.get::<_, i64>(2)?),
                running: count(r.get::<_, i64>(3)?),
                oldest_due_age_seconds: oldest.map_or(0.0, |t| (now - t).max(0) as f64 / 1e6),
            })
        })
        .map_err(db)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(db)?;
    let parked: i64 = tx
        .query_row("SELECT COUNT(*) FROM items", [], |r| r.get(0))
        .map_err(db)?;
    Ok(crate::store::StoreStats {
        queues,
        parked: count(parked),
    })
}

/// A machine's instances at a glance (see [`ReadStore::machine_overview`]).
pub(super) fn machine_overview(
    tx: &Transaction<'_>,
    machine: &str,
    hour: Micros,
    day: Micros,
) -> StoreResult<super::super::MachineOverview> {
    let mut overview = super::super::MachineOverview::default();
    let mut stmt = tx
        .prepare_cached(
            "SELECT status, COUNT(*) FROM instances
             WHERE machine = ?1 AND status IN ('running', 'failed') GROUP BY status",
        )
        .map_err(db)?;
    let live = stmt
        .query_map([machine], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))
        })
        .map_err(db)?;
    for row in live {
        let (status, n) = row.map_err(db)?;
        match parse_status(&status)? {
            InstanceStatus::Running => overview.running = count(n),
            _ => overview.failed = count(n),
        }
    }
    for (since, into) in [
        (hour, &mut overview.ended_last_hour),
        (day, &mut overview.ended_last_day),
    ] {
        let mut stmt = tx
            .prepare_cached(
                // The planner may prefer (machine, status), which reads every instance of
                // the machine; this index reads only what ended since `since`.
                "SELECT status, COUNT(*) FROM instances INDEXED BY instances_ended_by_machine
                 WHERE machine = ?1 AND ended_at >= ?2 AND status <> 'running'
                 GROUP BY status ORDER BY status",
            )
            .map_err(db)?;
        let rows = stmt
            .query_map(params![machine, since], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))
            })
            .map_err(db)?;
        for row in rows {
            let (status, n) = row.map_err(db)?;
            into.push((parse_status(&status)?, count(n)));
        }
    }
    let mut stmt = tx
        .prepare_cached(
            "SELECT t.from_state, t.event, t.kind = 'wait',
                    SUM(CASE WHEN i.status = 'running' THEN 1 ELSE 0 END),
                    SUM(CASE WHEN i.status = 'failed' THEN 1 ELSE 0 END),
                    MIN(t.created_at)
             FROM instances i JOIN tasks t ON t.instance_id = i.id
             WHERE i.machine = ?1 AND i.status IN ('running', 'failed')
             GROUP BY 1, 2, 3 ORDER BY 1, 2, 3",
        )
        .map_err(db)?;
    overview.states = stmt
        .query_map([machine], |r| {
            Ok(super::super::StateCount {
                state: r.get(0)?,
                event: r.get(1)?,
                waiting: r.get(2)?,
                running: count(r.get::<_, i64>(3)?),
                failed: count(r.get::<_, i64>(4)?),
                oldest: r.get(5)?,
            })
        })
        .map_err(db)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(db)?;
    let mut stmt = tx
        .prepare_cached(
            // With one MAX(), SQLite takes the bare column `name` from the row of the max.
            "SELECT e, COUNT(*), MAX(updated_at), name
             FROM (SELECT substr(COALESCE(error, ''), 1, 500) AS e, updated_at, name
                   FROM instances WHERE machine = ?1 AND status = 'failed'
                   ORDER BY id DESC LIMIT 1000)
             GROUP BY e ORDER BY 2 DESC, 3 DESC LIMIT 10",
        )
        .map_err(db)?;
    overview.failures = stmt
        .query_map([machine], |r| {
            Ok(super::super::FailureGroup {
                error: r.get(0)?,
                instances: count(r.get::<_, i64>(1)?),
                latest_at: r.get(2)?,
                latest: r.get::<_, Option<String>>(3)?.unwrap_or_default(),
            })
        })
        .map_err(db)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(db)?;
    overview.steps_last_hour = step_times(tx, machine, hour)?;
    overview.steps_last_day = step_times(tx, machine, day)?;
    Ok(overview)
}

/// The machine's steps committed since `since` (see [`StepTimes`](super::super::StepTimes)):
/// through the indexes of its instances, so that no index on history's times costs every
/// step a write.
fn step_times(
    tx: &Transaction<'_>,
    machine: &str,
    since: Micros,
) -> StoreResult<super::super::StepTimes> {
    // The sizes are written into the SQL, so the planner knows them (see `recent_steps`).
    let (sample, instances) = (
        super::super::STEP_TIMES_SAMPLE + 1,
        super::super::STEP_TIMES_INSTANCES,
    );
    let steps = tx
        .prepare_cached(&format!(
            "SELECT h.finished_at - h.started_at, h.attempt
             FROM (SELECT id FROM (SELECT id FROM instances INDEXED BY instances_ended_by_machine
                                   WHERE machine = ?1 AND ended_at >= ?2 AND status <> 'running'
                                   ORDER BY ended_at DESC LIMIT {instances})
                   UNION ALL
                   SELECT id FROM (SELECT id FROM instances
                                   WHERE machine = ?1 AND status = 'running'
                                   ORDER BY id DESC LIMIT {instances})) i
             JOIN history h ON h.instance_id = i.id
             WHERE h.finished_at >= ?2
             LIMIT {sample}"
        ))
        .map_err(db)?
        .query_map(params![machine, since], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, u32>(1)?))
        })
        .map_err(db)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(db)?;
    let sampled = steps.len() > super::super::STEP_TIMES_SAMPLE;
    let mut steps = steps;
    steps.truncate(super::super::STEP_TIMES_SAMPLE);
    Ok(super::super::StepTimes::measure(steps, sampled))
}

/// See [`ReadStore::recent_steps`].
pub(super) fn recent_steps(
    tx: &Transaction<'_>,
    since: Micros,
) -> StoreResult<super::super::RecentSteps> {
    // The sample's size is written into the SQL: with plans that do not look at bound
    // values (see `schema::stable_plans`), a `LIMIT ?` subquery is planned as if large, and
    // SQLite scanned every instance to join it (77 ms instead of 6 at a million instances).
    let sample = super::super::RECENT_STEPS_SAMPLE;
    let (counted, oldest) = tx
        .prepare_cached(&format!(
            "SELECT COUNT(*), MIN(finished_at)
             FROM (SELECT finished_at FROM history ORDER BY id DESC LIMIT {sample})"
        ))
        .map_err(db)?
        .query_row([], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, Option<i64>>(1)?))
        })
        .map_err(db)?;
    let groups = tx
        .prepare_cached(&format!(
            "SELECT i.machine, h.from_state, h.event, h.to_state, COUNT(*)
             FROM (SELECT instance_id, from_state, event, to_state, finished_at FROM history
                   ORDER BY id DESC LIMIT {sample}) h
             JOIN instances i ON i.id = h.instance_id
             WHERE h.finished_at >= ?1
             GROUP BY 1, 2, 3, 4"
        ))
        .map_err(db)?
        .query_map([since], |r| {
            Ok(super::super::RecentGroup {
                machine: r.get(0)?,
                from: r.get(1)?,
                event: r.get(2)?,
                to: r.get(3)?,
                steps: count(r.get::<_, i64>(4)?),
            })
        })
        .map_err(db)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(db)?;
    let sample = i64::try_from(sample).unwrap_or(i64::MAX);
    Ok(super::super::RecentSteps {
        window_start: super::super::recent_window(since, counted, sample, oldest),
        groups,
    })
}

/// An instance's status (see [`ReadStore::status`](crate::store::ReadStore::status)).
pub(super) fn status(tx: &Transaction<'_>, name: &str) -> StoreResult<Option<InstanceStatus>> {
    let status: Option<String> = tx
        .prepare_cached("SELECT status FROM instances WHERE name = ?1")
        .map_err(db)?
        .query_row([name], |r| r.get(0))
        .optional()
        .map_err(db)?;
    status.as_deref().map(parse_status).transpose()
}

/// The instances `name` spawned, oldest first.
pub(super) fn children(tx: &Transaction<'_>, name: &str) -> StoreResult<Vec<String>> {
    tx.prepare_cached("SELECT name FROM instances WHERE parent = ?1 ORDER BY id")
        .map_err(db)?
        .query_map([name], |r| r.get::<_, String>(0))
        .map_err(db)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(db)
}
