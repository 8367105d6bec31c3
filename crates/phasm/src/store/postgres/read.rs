//! Reading: an instance, lists, logs and history pages, metrics, live workers, the next due
//! time.

use deadpool_postgres::Object;
use tokio_postgres::types::ToSql;

use super::{pg, PostgresStore};
use crate::clock::Micros;
use crate::engine::{HistoryEntry, LogLine};
use crate::store::convert::{attempt, bigint, count, from_json, parse_status};
use crate::store::{
    cut_message, worker_view, BranchCounts, BufferedEvent, InstanceStatus, InstanceSummary,
    InstanceView, ListFilter, Page, PageRequest, StoreResult, TaskStatus, TaskView, WaitView,
    WorkerView, MAX_PAGE_MESSAGE_CHARS, VIEW_ROWS,
};

/// An instance's id by name.
pub(super) async fn instance_id(
    client: &deadpool_postgres::Object,
    name: &str,
) -> StoreResult<Option<i64>> {
    Ok(client
        .query_opt("SELECT id FROM instances WHERE name = $1", &[&name])
        .await
        .map_err(pg)?
        .map(|r| r.get(0)))
}

pub(super) async fn next_due(store: &PostgresStore) -> StoreResult<Option<Micros>> {
    let client = store.client().await?;
    let row = client
        .query_one(
            "SELECT MIN(due_at) FROM tasks WHERE status = 'ready' AND due_at < $1",
            &[&crate::engine::NEVER],
        )
        .await
        .map_err(pg)?;
    Ok(row.get(0))
}

pub(super) async fn instance(
    store: &PostgresStore,
    name: &str,
) -> StoreResult<Option<InstanceView>> {
    let client = store.client().await?;
    let Some(row) = client
        .query_opt(
            "SELECT id, machine, status, context, error, created_at, updated_at, ended_at, result, parent,
                    (SELECT v.version FROM machine_versions v WHERE v.id = instances.version)
             FROM instances WHERE name = $1",
            &[&name],
        )
        .await
        .map_err(pg)?
    else {
        return Ok(None);
    };
    let id: i64 = row.get(0);
    let history = client
        .query(
            "SELECT id, from_state, event, to_state, attempt, started_at, finished_at, task, branch,
                    ends_branch, step
             FROM (SELECT * FROM history WHERE instance_id = $1 ORDER BY id DESC LIMIT $2) h
             ORDER BY id",
            &[&id, &bigint(VIEW_ROWS)],
        )
        .await
        .map_err(pg)?
        .iter()
        .map(history_row)
        .collect();
    let task_rows = client
        .query(
            "SELECT name, from_state, event, status, due_at, lease_owner, attempts, last_error, queue, context, target,
                    branch
             FROM tasks WHERE instance_id = $1 ORDER BY id LIMIT $2",
            &[&id, &bigint(VIEW_ROWS)],
        )
        .await
        .map_err(pg)?;
    let tasks = task_rows
        .iter()
        .map(|r| {
            Ok(TaskView {
                name: r.get(0),
                from: r.get(1),
                event: r.get(2),
                status: TaskStatus::parse(r.get(3))?,
                due_at: r.get(4),
                leased_by: r.get(5),
                attempts: attempt(r.get::<_, i64>(6)),
                last_error: r.get(7),
                queue: r.get(8),
                target: r.get(10),
                branch: r.get(11),
            })
        })
        .collect::<StoreResult<Vec<_>>>()?;
    let result: Option<String> = row.get(8);
    let first_context: Option<String> = task_rows.first().map(|r| r.get(9));
    let current_context = match first_context.or(result) {
        Some(c) => Some(from_json(&c)?),
        None => None,
    };
    let children = children_of(&client, name).await?;
    let counts = client
        .query_one(
            "SELECT
               (SELECT COUNT(*) FROM tasks WHERE instance_id = $1 AND status = 'ready'
                  AND (kind NOT IN ('join', 'wait') OR lease_owner IS NOT NULL)),
               (SELECT COUNT(*) FROM items WHERE instance_id = $1),
               (SELECT COUNT(*) FROM history WHERE instance_id = $1 AND ends_branch
                  AND id > (SELECT reset_after FROM instances WHERE id = $1)),
               (SELECT COUNT(*) FROM tasks WHERE instance_id = $1 AND status = 'failed'),
               (SELECT COUNT(*) FROM tasks WHERE instance_id = $1 AND status = 'held'),
               (SELECT COUNT(*) FROM history WHERE instance_id = $1),
               (SELECT COUNT(*) FROM tasks WHERE instance_id = $1),
               (SELECT COUNT(*) FROM tasks WHERE instance_id = $1 AND status = 'ready'
                  AND kind = 'wait' AND lease_owner IS NULL)",
            &[&id],
        )
        .await
        .map_err(pg)?;
    let n = |i: usize| count(counts.get::<_, i64>(i));
    let end_states = client
        .query(
            "SELECT to_state FROM history WHERE instance_id = $1 AND ends_branch
               AND id > (SELECT reset_after FROM instances WHERE id = $1)
             GROUP BY to_state ORDER BY MAX(id)",
            &[&id],
        )
        .await
        .map_err(pg)?
        .iter()
        .map(|r| r.get(0))
        .collect();
    Ok(Some(InstanceView {
        name: name.to_string(),
        machine: row.get(1),
        version: row
            .get::<_, Option<i32>>(10)
            .and_then(|v| u32::try_from(v).ok()),
        status: parse_status(row.get(2))?,
        context: from_json(row.get(3))?,
        error: row.get(4),
        created_at: row.get(5),
        updated_at: row.get(6),
        ended_at: row.get(7),
        history,
        history_total: n(5),
        tasks,
        tasks_total: n(6),
        end_states,
        current_context,
        parent: row.get(9),
        children,
        branches: BranchCounts {
            live: n(0),
            held: n(4),
            parked: n(1),
            ended: n(2),
            failed: n(3),
            waiting: n(7),
        },
        waiting: waits(&client, id).await?,
        buffered: buffered(&client, id).await?,
    }))
}

/// The instance's waiting branches, oldest first.
async fn waits(client: &Object, id: i64) -> StoreResult<Vec<WaitView>> {
    client
        .query(
            "SELECT name, from_state, branch, event, due_at, accepts, created_at FROM tasks
             WHERE instance_id = $1 AND kind = 'wait' AND status = 'ready' AND lease_owner IS NULL
             ORDER BY id LIMIT $2",
            &[&id, &bigint(VIEW_ROWS)],
        )
        .await
        .map_err(pg)?
        .iter()
        .map(|r| {
            super::super::wait_view(
                r.get(0),
                r.get(1),
                r.get(2),
                r.get(3),
                r.get(4),
                r.get(5),
                r.get(6),
            )
        })
        .collect()
}

/// The instance's buffered events, oldest first.
async fn buffered(client: &Object, id: i64) -> StoreResult<Vec<BufferedEvent>> {
    client
        .query(
            "SELECT event, event_id, OCTET_LENGTH(data)::BIGINT, created_at FROM events
             WHERE instance_id = $1 ORDER BY id LIMIT $2",
            &[&id, &bigint(VIEW_ROWS)],
        )
        .await
        .map_err(pg)?
        .iter()
        .map(|r| {
            Ok(BufferedEvent {
                event: r.get(0),
                id: r.get(1),
                bytes: u64::try_from(r.get::<_, i64>(2)).unwrap_or(0),
                at: r.get(3),
            })
        })
        .collect()
}

pub(super) async fn list(
    store: &PostgresStore,
    filter: &ListFilter,
) -> StoreResult<Vec<InstanceSummary>> {
    use crate::store::listing::{self, Dialect, Param};
    let q = listing::query(filter, Dialect::Postgres);
    let params: Vec<Box<dyn ToSql + Sync + Send>> = q
        .params
        .into_iter()
        .map(|p| -> Box<dyn ToSql + Sync + Send> {
            match p {
                Param::Text(t) => Box::new(t),
                Param::Int(i) => Box::new(i),
            }
        })
        .collect();
    let refs: Vec<&(dyn ToSql + Sync)> = params
        .iter()
        .map(|p| p.as_ref() as &(dyn ToSql + Sync))
        .collect();
    let client = store.client().await?;
    client
        .query(&q.sql, &refs)
        .await
        .map_err(pg)?
        .iter()
        .map(|r| {
            let event: Option<String> = r.get(10);
            let queued_at: Option<i64> = r.get(12);
            Ok(InstanceSummary {
                instance: r.get(0),
                machine: r.get(1),
                status: parse_status(r.get(2))?,
                created_at: r.get(3),
                updated_at: r.get(4),
                error: r.get(5),
                parent: r.get(6),
                ended_at: r.get(7),
                steps: count(r.get::<_, i64>(8)),
                pending: match (event, queued_at) {
                    (Some(event), Some(queued_at)) => Some(crate::store::PendingStep {
                        from: r.get(9),
                        event,
                        waiting: r.get::<_, Option<bool>>(11).unwrap_or(false),
                        queued_at,
                    }),
                    _ => None,
                },
            })
        })
        .collect()
}

/// A log line from `at, level, message, task`.
fn log_line(r: &tokio_postgres::Row) -> LogLine {
    LogLine {
        at: r.get(0),
        level: r.get(1),
        message: r.get(2),
        task: r.get(3),
    }
}

pub(super) async fn logs(store: &PostgresStore, name: &str) -> StoreResult<Vec<LogLine>> {
    let client = store.client().await?;
    Ok(client
        .query(
            "SELECT l.at, l.level, l.message, l.task FROM logs l
             JOIN instances i ON i.id = l.instance_id WHERE i.name = $1 ORDER BY l.id",
            &[&name],
        )
        .await
        .map_err(pg)?
        .iter()
        .map(log_line)
        .collect())
}

pub(super) async fn history_page(
    store: &PostgresStore,
    name: &str,
    page: PageRequest,
    branch: Option<&str>,
) -> StoreResult<Option<Page<super::super::HistoryRow>>> {
    let client = store.client().await?;
    let Some(id) = instance_id(&client, name).await? else {
        return Ok(None);
    };
    let limit = i64::try_from(page.limit).unwrap_or(i64::MAX - 1);
    let rows = client
        .query(
            "SELECT id, from_state, event, to_state, attempt, started_at, finished_at, task, branch,
                    ends_branch, step
             FROM history
             WHERE instance_id = $1 AND id > $2 AND ($4::TEXT IS NULL OR branch = $4)
             ORDER BY id LIMIT $3",
            &[&id, &page.after, &(limit + 1), &branch],
        )
        .await
        .map_err(pg)?
        .iter()
        .map(|r| {
            let row = history_row(r);
            (row.id, row)
        })
        .collect();
    Ok(Some(Page::from_rows(rows, page.limit)))
}

/// A history row from `id, from_state, event, to_state, attempt, started_at, finished_at,
/// task, branch, ends_branch, step`.
fn history_row(r: &tokio_postgres::Row) -> super::super::HistoryRow {
    super::super::HistoryRow {
        id: r.get(0),
        step: r.get::<_, Option<i64>>(10).map(count),
        entry: HistoryEntry {
            from: r.get(1),
            event: r.get(2),
            to: r.get(3),
            attempt: attempt(r.get::<_, i64>(4)),
            started_at: r.get(5),
            finished_at: r.get(6),
            task: r.get(7),
            branch: r.get(8),
            ends_branch: r.get(9),
        },
    }
}

/// See [`ReadStore::step`].
pub(super) async fn step(
    store: &PostgresStore,
    name: &str,
    step: i64,
) -> StoreResult<Option<super::super::StepDetail>> {
    use super::super::{PassedOn, StepDetail};
    let client = store.client().await?;
    let Some(instance) = instance_id(&client, name).await? else {
        return Ok(None);
    };
    let Some(found) = client
        .query_opt(
            "SELECT id, from_state, event, to_state, attempt, started_at, finished_at, task, branch,
                    ends_branch, step, context
             FROM history WHERE instance_id = $1 AND id = $2",
            &[&instance, &step],
        )
        .await
        .map_err(pg)?
    else {
        return Ok(None);
    };
    let row = history_row(&found);
    let given: Option<String> = found.get(11);
    let next = client
        .query_opt(
            // The same task's other rows (a step that ran, then arrived at a fan-in) are
            // this step, not the next.
            "SELECT id, context FROM history
             WHERE instance_id = $1 AND id > $2 AND branch = $3 AND task <> $4
             ORDER BY id LIMIT 1",
            &[&instance, &step, &row.entry.branch, &row.entry.task],
        )
        .await
        .map_err(pg)?;
    let passed_on = match next {
        Some(r) => PassedOn::Step(
            r.get(0),
            r.get::<_, Option<String>>(1)
                .as_deref()
                .map(from_json)
                .transpose()?,
        ),
        None => match client
            .query_opt(
                "SELECT context FROM tasks
                 WHERE instance_id = $1 AND branch = $2 AND kind <> 'join' ORDER BY id LIMIT 1",
                &[&instance, &row.entry.branch],
            )
            .await
            .map_err(pg)?
        {
            Some(r) => PassedOn::Pending(from_json(r.get(0))?),
            None => PassedOn::Nothing,
        },
    };
    let limit = i64::try_from(VIEW_ROWS).unwrap_or(i64::MAX);
    let logs = client
        .query(
            "SELECT at, level, message, task FROM logs
             WHERE instance_id = $1 AND task = $2 ORDER BY id LIMIT $3",
            &[&instance, &row.entry.task, &limit],
        )
        .await
        .map_err(pg)?
        .iter()
        .map(log_line)
        .collect();
    Ok(Some(StepDetail {
        given: given.as_deref().map(from_json).transpose()?,
        row,
        passed_on,
        logs,
    }))
}

pub(super) async fn logs_page(
    store: &PostgresStore,
    name: &str,
    page: PageRequest,
) -> StoreResult<Option<Page<LogLine>>> {
    let client = store.client().await?;
    let Some(id) = instance_id(&client, name).await? else {
        return Ok(None);
    };
    let limit = i64::try_from(page.limit).unwrap_or(i64::MAX - 1);
    let cut = i32::try_from(MAX_PAGE_MESSAGE_CHARS).unwrap_or(i32::MAX);
    let rows = client
        .query(
            "SELECT id, at, level, left(message, $4), char_length(message)::BIGINT, task
             FROM logs WHERE instance_id = $1 AND id > $2 ORDER BY id LIMIT $3",
            &[&id, &page.after, &(limit + 1), &cut],
        )
        .await
        .map_err(pg)?
        .iter()
        .map(|r| {
            (
                r.get::<_, i64>(0),
                LogLine {
                    at: r.get(1),
                    level: r.get(2),
                    message: cut_message(r.get(3), r.get(4)),
                    task: r.get(5),
                },
            )
        })
        .collect();
    Ok(Some(Page::from_rows(rows, page.limit)))
}

pub(super) async fn workers(store: &PostgresStore, now: Micros) -> StoreResult<Vec<WorkerView>> {
    worker_rows(
        store,
        "SELECT owner, machines, targets, queues, started_at, seen_at, expires_at, about
         FROM workers WHERE expires_at > $1 ORDER BY started_at, owner",
        now,
    )
    .await
}

pub(super) async fn workers_gone(
    store: &PostgresStore,
    now: Micros,
) -> StoreResult<Vec<WorkerView>> {
    worker_rows(
        store,
        "SELECT owner, machines, targets, queues, started_at, seen_at, expires_at, about
         FROM workers WHERE expires_at <= $1 ORDER BY seen_at DESC, owner",
        now,
    )
    .await
}

async fn worker_rows(
    store: &PostgresStore,
    sql: &str,
    now: Micros,
) -> StoreResult<Vec<WorkerView>> {
    store
        .client()
        .await?
        .query(sql, &[&now])
        .await
        .map_err(pg)?
        .iter()
        .map(|r| {
            worker_view(
                r.get(0),
                r.get(1),
                r.get(2),
                r.get(3),
                [r.get(4), r.get(5), r.get(6)],
                r.get(7),
            )
        })
        .collect()
}

pub(super) async fn stats(
    store: &PostgresStore,
    now: Micros,
) -> StoreResult<crate::store::StoreStats> {
    let client = store.client().await?;
    let rows = client
        .query(
            "SELECT queue,
   SUM(CASE WHEN lease_owner IS NULL AND due_at <= $1 THEN 1 ELSE 0 END),
   SUM(CASE WHEN lease_owner IS NULL AND due_at > $1 THEN 1 ELSE 0 END),
   SUM(CASE WHEN lease_owner IS NOT NULL AND due_at > $1 THEN 1 ELSE 0 END),
   MIN(CASE WHEN lease_owner IS NULL AND due_at <= $1 THEN due_at END)
FROM tasks WHERE status = 'ready' GROUP BY queue ORDER BY queue",
            &[&now],
        )
        .await
        .map_err(pg)?;
    let queues = rows
        .iter()
        .map(|r| {
            let oldest: Option<i64> = r.get(4);
            crate::store::QueueStats {
                queue: r.get(0),
                due: count(r.get::<_, i64>(1)),
                scheduled: count(r.get::<_, i64>(2)),
                running: count(r.get::<_, i64>(3)),
                oldest_due_age_seconds: oldest.map_or(0.0, |t| (now - t).max(0) as f64 / 1e6),
            }
        })
        .collect();
    let parked: i64 = client
        .query_one("SELECT COUNT(*) FROM items", &[])
        .await
        .map_err(pg)?
        .get(0);
    Ok(crate::store::StoreStats {
        queues,
        parked: count(parked),
    })
}

/// A machine's instances at a glance (see [`ReadStore::machine_overview`]).
pub(super) async fn machine_overview(
    store: &PostgresStore,
    machine: &str,
    hour: Micros,
    day: Micros,
) -> StoreResult<super::super::MachineOverview> {
    let client = store.client().await?;
    let mut overview = super::super::MachineOverview::default();
    for r in client
        .query(
            "SELECT status, COUNT(*) FROM instances
             WHERE machine = $1 AND status IN ('running', 'failed') GROUP BY status",
            &[&machine],
        )
        .await
        .map_err(pg)?
    {
        let n = count(r.get::<_, i64>(1));
        match parse_status(r.get(0))? {
            InstanceStatus::Running => overview.running = n,
            _ => overview.failed = n,
        }
    }
    for (since, into) in [
        (hour, &mut overview.ended_last_hour),
        (day, &mut overview.ended_last_day),
    ] {
        for r in client
            .query(
                "SELECT status, COUNT(*) FROM instances
                 WHERE ended_at >= $2 AND status <> 'running' AND machine = $1
                 GROUP BY status ORDER BY status",
                &[&machine, &since],
            )
            .await
            .map_err(pg)?
        {
            into.push((parse_status(r.get(0))?, count(r.get::<_, i64>(1))));
        }
    }
    overview.states = client
        .query(
            "SELECT t.from_state, t.event, t.kind = 'wait',
                    SUM(CASE WHEN i.status = 'running' THEN 1 ELSE 0 END)::BIGINT,
                    SUM(CASE WHEN i.status = 'failed' THEN 1 ELSE 0 END)::BIGINT,
                    MIN(t.created_at)
             FROM instances i JOIN tasks t ON t.instance_id = i.id
             WHERE i.machine = $1 AND i.status IN ('running', 'failed')
             GROUP BY 1, 2, 3 ORDER BY 1 NULLS FIRST, 2, 3",
            &[&machine],
        )
        .await
        .map_err(pg)?
        .iter()
        .map(|r| super::super::StateCount {
            state: r.get(0),
            event: r.get(1),
            waiting: r.get(2),
            running: count(r.get::<_, i64>(3)),
            failed: count(r.get::<_, i64>(4)),
            oldest: r.get(5),
        })
        .collect();
    overview.failures = client
        .query(
            "SELECT e, COUNT(*), MAX(updated_at),
                    (ARRAY_AGG(name ORDER BY updated_at DESC))[1]
             FROM (SELECT LEFT(COALESCE(error, ''), 500) AS e, updated_at, name FROM instances
                   WHERE machine = $1 AND status = 'failed' ORDER BY id DESC LIMIT 1000) f
             GROUP BY e ORDER BY 2 DESC, 3 DESC LIMIT 10",
            &[&machine],
        )
        .await
        .map_err(pg)?
        .iter()
        .map(|r| super::super::FailureGroup {
            error: r.get(0),
            instances: count(r.get::<_, i64>(1)),
            latest_at: r.get(2),
            latest: r.get(3),
        })
        .collect();
    overview.steps_last_hour = step_times(&client, machine, hour).await?;
    overview.steps_last_day = step_times(&client, machine, day).await?;
    Ok(overview)
}

/// The machine's steps committed since `since` (see [`StepTimes`](super::super::StepTimes)):
/// through the indexes of its instances, so that no index on history's times costs every
/// step a write.
async fn step_times(
    client: &Object,
    machine: &str,
    since: Micros,
) -> StoreResult<super::super::StepTimes> {
    let sample = i64::try_from(super::super::STEP_TIMES_SAMPLE).unwrap_or(i64::MAX - 1);
    let instances = i64::try_from(super::super::STEP_TIMES_INSTANCES).unwrap_or(i64::MAX);
    let mut steps: Vec<(Micros, u32)> = client
        .query(
            "SELECT h.finished_at - h.started_at, h.attempt
             FROM ((SELECT id FROM instances
                    WHERE machine = $1 AND ended_at >= $2 AND status <> 'running'
                    ORDER BY ended_at DESC LIMIT $4)
                   UNION ALL
                   (SELECT id FROM instances WHERE machine = $1 AND status = 'running'
                    ORDER BY id DESC LIMIT $4)) i
             JOIN history h ON h.instance_id = i.id
             WHERE h.finished_at >= $2
             LIMIT $3",
            &[&machine, &since, &(sample + 1), &instances],
        )
        .await
        .map_err(pg)?
        .iter()
        .map(|r| (r.get::<_, i64>(0), attempt(r.get::<_, i64>(1))))
        .collect();
    let sampled = steps.len() > super::super::STEP_TIMES_SAMPLE;
    steps.truncate(super::super::STEP_TIMES_SAMPLE);
    Ok(super::super::StepTimes::measure(steps, sampled))
}

/// See [`ReadStore::recent_steps`].
pub(super) async fn recent_steps(
    store: &PostgresStore,
    since: Micros,
) -> StoreResult<super::super::RecentSteps> {
    let client = store.client().await?;
    let sample = i64::try_from(super::super::RECENT_STEPS_SAMPLE).unwrap_or(i64::MAX);
    let head = client
        .query_one(
            "SELECT COUNT(*), MIN(finished_at)
             FROM (SELECT finished_at FROM history ORDER BY id DESC LIMIT $1) h",
            &[&sample],
        )
        .await
        .map_err(pg)?;
    let groups = client
        .query(
            "SELECT i.machine, h.from_state, h.event, h.to_state, COUNT(*)
             FROM (SELECT instance_id, from_state, event, to_state, finished_at FROM history
                   ORDER BY id DESC LIMIT $1) h
             JOIN instances i ON i.id = h.instance_id
             WHERE h.finished_at >= $2
             GROUP BY 1, 2, 3, 4",
            &[&sample, &since],
        )
        .await
        .map_err(pg)?
        .iter()
        .map(|r| super::super::RecentGroup {
            machine: r.get(0),
            from: r.get(1),
            event: r.get(2),
            to: r.get(3),
            steps: count(r.get::<_, i64>(4)),
        })
        .collect();
    Ok(super::super::RecentSteps {
        window_start: super::super::recent_window(since, head.get(0), sample, head.get(1)),
        groups,
    })
}

/// An instance's status (see [`ReadStore::status`](crate::store::ReadStore::status)).
pub(super) async fn status(
    store: &PostgresStore,
    name: &str,
) -> StoreResult<Option<InstanceStatus>> {
    let client = store.client().await?;
    let row = client
        .query_opt("SELECT status FROM instances WHERE name = $1", &[&name])
        .await
        .map_err(pg)?;
    row.map(|r| parse_status(r.get(0))).transpose()
}

/// The instances `name` spawned, oldest first.
pub(super) async fn children(store: &PostgresStore, name: &str) -> StoreResult<Vec<String>> {
    children_of(&store.client().await?, name).await
}

/// [`children`] on a connection the caller holds.
async fn children_of(client: &Object, name: &str) -> StoreResult<Vec<String>> {
    Ok(client
        .query(
            "SELECT name FROM instances WHERE parent = $1 ORDER BY id",
            &[&name],
        )
        .await
        .map_err(pg)?
        .iter()
        .map(|r| r.get(0))
        .collect())
}
