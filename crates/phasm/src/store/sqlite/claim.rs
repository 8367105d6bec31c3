//! Claiming due tasks (within queue limits shared by every claimer), gathering a join's contexts, renewing leases.

use super::*;

/// A claimable task as read from the database.
pub(super) struct ClaimRow {
    id: i64,
    claim: i64,
    instance_id: i64,
    instance: String,
    machine: String,
    name: String,
    from_state: Option<String>,
    event: String,
    kind: String,
    context: String,
    step: i64,
    branch: String,
    attempts: i64,
    first: Option<i64>,
    queue: String,
    token: Option<String>,
    grp: Option<String>,
    page_queued: bool,
    version: Option<i64>,
}

/// How many more tasks of each limited queue may start now, whoever claims them: its
/// `max_concurrent` less the tasks of it running, and the tokens of its `rate` bucket (topped
/// up for the time since it was last drawn from).
pub(super) fn shared_allowance(
    tx: &Transaction<'_>,
    now: Micros,
    limits: &[(String, crate::machine::QueueLimits)],
) -> StoreResult<Vec<(String, usize)>> {
    let mut allowance = Vec::new();
    for (queue, l) in limits {
        if l.max_concurrent.is_none() && l.rate.is_none() {
            continue;
        }
        let mut allowed = usize::MAX;
        if let Some(max) = l.max_concurrent {
            let running: i64 = tx
                .prepare_cached(
                    "SELECT COUNT(*) FROM tasks
                     WHERE queue = ?1 AND lease_owner IS NOT NULL AND status = 'ready' AND due_at > ?2",
                )
                .map_err(db)?
                .query_row(params![queue, now], |r| r.get(0))
                .map_err(db)?;
            allowed = allowed.min(usize::try_from(i64::from(max) - running).unwrap_or(0));
        }
        if let Some(rate) = l.rate {
            let capacity = f64::from(rate.count);
            let per_micro = capacity / micros(rate.per).max(1) as f64;
            let tokens: f64 = tx
                .prepare_cached(
                    "INSERT INTO queue_rates (queue, tokens, updated_at) VALUES (?1, ?2, ?3)
                     ON CONFLICT (queue) DO UPDATE
                       SET tokens = MIN(?2, queue_rates.tokens + (?3 - queue_rates.updated_at) * ?4),
                           updated_at = ?3
                     RETURNING tokens",
                )
                .map_err(db)?
                .query_row(params![queue, capacity, now, per_micro], |r| r.get(0))
                .map_err(db)?;
            allowed = allowed.min(whole(tokens));
        }
        allowance.push((queue.clone(), allowed));
    }
    Ok(allowance)
}

/// A claim's filters as the claim statement's parameters (lists as JSON arrays).
struct ClaimFilter {
    any_target: bool,
    untargeted: bool,
    targets: String,
    queues: Option<String>,
    full_queues: String,
}

impl ClaimFilter {
    fn of(req: &ClaimRequest, room: &[(String, usize)]) -> Self {
        let json = |names: &[String]| serde_json::Value::from(names.to_vec()).to_string();
        let (any_target, untargeted, targets) = req.targets.filter();
        Self {
            any_target,
            untargeted,
            targets: json(targets),
            queues: req.queues.as_deref().map(json),
            full_queues: json(&crate::store::full_queues(room)),
        }
    }
}

pub(super) fn claim(
    tx: &Transaction<'_>,
    now: Micros,
    req: &ClaimRequest,
) -> StoreResult<Vec<Task>> {
    if req.limit == 0 {
        return Ok(Vec::new());
    }
    let until = now.saturating_add(micros(req.lease));
    // The configured limits hold across every worker process on the file too.
    let mut per_queue = req.room(shared_allowance(tx, now, &req.shared_limits)?);
    // Only tasks this worker may take are read (its queues and targets, and none of a queue
    // with no room left), so a backlog it may not take never hides the work it may.
    let filter = ClaimFilter::of(req, &per_queue);
    // Look at a few more candidates than wanted, so per-queue limits can skip some.
    let window = bigint((req.limit * 2).max(16));
    let rows = tx
        .prepare_cached(
            "SELECT t.id, t.claim, t.instance_id, i.name, i.machine, t.name, t.from_state, t.event,
                    t.kind, t.context, t.step, t.branch, t.attempts, t.first_attempt_at, t.queue,
                    t.token, t.grp, t.page_queued, i.version
             FROM tasks t JOIN instances i ON i.id = t.instance_id
             WHERE t.status = 'ready' AND t.due_at <= ?1
               AND (?3 OR (?4 AND t.target IS NULL) OR t.target IN (SELECT value FROM json_each(?5)))
               AND (?6 IS NULL OR t.queue IN (SELECT value FROM json_each(?6)))
               AND t.queue NOT IN (SELECT value FROM json_each(?7))
             ORDER BY t.due_at LIMIT ?2",
        )
        .map_err(db)?
        .query_map(
            params![
                now,
                window,
                filter.any_target,
                filter.untargeted,
                filter.targets,
                filter.queues,
                filter.full_queues
            ],
            |r| {
                Ok(ClaimRow {
                    id: r.get(0)?,
                    claim: r.get(1)?,
                    instance_id: r.get(2)?,
                    instance: r.get(3)?,
                    machine: r.get(4)?,
                    name: r.get(5)?,
                    from_state: r.get(6)?,
                    event: r.get(7)?,
                    kind: r.get(8)?,
                    context: r.get(9)?,
                    step: r.get(10)?,
                    branch: r.get(11)?,
                    attempts: r.get(12)?,
                    first: r.get(13)?,
                    queue: r.get(14)?,
                    token: r.get(15)?,
                    grp: r.get(16)?,
                    page_queued: r.get(17)?,
                    version: r.get(18)?,
                })
            },
        )
        .map_err(db)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(db)?;
    let mut claimed = Vec::new();
    for row in rows {
        if claimed.len() >= req.limit {
            break;
        }
        if let Some((_, left)) = per_queue.iter_mut().find(|(q, _)| *q == row.queue) {
            if *left == 0 {
                continue;
            }
            *left -= 1;
        }
        tx.prepare_cached(
            "UPDATE tasks SET claim = claim + 1, lease_owner = ?2, due_at = ?3, attempts = attempts + 1,
                              first_attempt_at = COALESCE(first_attempt_at, ?4)
             WHERE id = ?1",
        )
        .map_err(db)?
        .execute(params![row.id, req.owner, until, now])
        .map_err(db)?;
        let kind = TaskKind::parse(&row.kind)
            .ok_or_else(|| StoreError::Corrupt(format!("task kind `{}`", row.kind)))?;
        let contexts = if kind == TaskKind::Join {
            join_items(tx, &row)?
        } else {
            Vec::new()
        };
        claimed.push(Task {
            id: row.id,
            claim: row.claim + 1,
            instance: row.instance,
            machine: row.machine,
            name: row.name,
            from_state: row.from_state,
            event: row.event,
            kind,
            context: from_json(&row.context)?,
            step: count(row.step),
            branch: row.branch,
            attempt: attempt(row.attempts),
            first_attempt_at: row.first.unwrap_or(now),
            queue: row.queue,
            token: row
                .token
                .map(|t| serde_json::from_str(&t))
                .transpose()
                .map_err(|e| StoreError::Corrupt(format!("bad token: {e}")))?,
            contexts,
            next_page_queued: row.page_queued,
            version: row.version,
        });
    }
    // Each start draws a token from its queue's bucket.
    for (queue, limits) in &req.shared_limits {
        let taken = claimed.iter().filter(|t| &t.queue == queue).count();
        if limits.rate.is_some() && taken > 0 {
            tx.prepare_cached(
                "UPDATE queue_rates SET tokens = MAX(tokens - ?2, 0) WHERE queue = ?1",
            )
            .map_err(db)?
            .execute(params![queue, taken as f64])
            .map_err(db)?;
        }
    }
    Ok(claimed)
}

/// A join takes every item parked in its group and not taken by another join (an item
/// taken by an earlier attempt of this same join stays with it).
pub(super) fn join_items(tx: &Transaction<'_>, row: &ClaimRow) -> StoreResult<Vec<Context>> {
    let state = row.from_state.as_deref().unwrap_or_default();
    let grp = row.grp.as_deref().unwrap_or_default();
    tx.prepare_cached(
        "UPDATE items SET join_task = ?1
         WHERE instance_id = ?2 AND state = ?3 AND grp = ?4 AND (join_task IS NULL OR join_task = ?1)",
    )
    .map_err(db)?
    .execute(params![row.id, row.instance_id, state, grp])
    .map_err(db)?;
    let texts = tx
        .prepare_cached("SELECT context FROM items WHERE join_task = ?1 ORDER BY id")
        .map_err(db)?
        .query_map([row.id], |r| r.get::<_, String>(0))
        .map_err(db)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(db)?;
    texts.iter().map(|t| from_json(t)).collect()
}

pub(super) fn renew(
    tx: &Transaction<'_>,
    now: Micros,
    leases: &[(i64, i64)],
    until: Micros,
) -> StoreResult<Vec<bool>> {
    let mut stmt = tx
        .prepare_cached(
            "UPDATE tasks SET due_at = ?3
             WHERE id = ?1 AND claim = ?2 AND status = 'ready' AND due_at > ?4",
        )
        .map_err(db)?;
    leases
        .iter()
        .map(|(id, claim)| Ok(stmt.execute(params![id, claim, until, now]).map_err(db)? == 1))
        .collect()
}
