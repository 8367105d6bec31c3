//! Claiming due tasks with `FOR UPDATE SKIP LOCKED` (within queue limits shared by every
//! claimer), gathering a join's contexts, renewing leases.

use super::*;

pub(super) fn task_row(row: &Row, now: Micros) -> StoreResult<(Task, i64, Option<String>)> {
    let kind: String = row.get("kind");
    let token: Option<String> = row.get("token");
    let task = Task {
        id: row.get("id"),
        claim: row.get("claim"),
        instance: row.get("instance"),
        machine: row.get("machine"),
        name: row.get("name"),
        from_state: row.get("from_state"),
        event: row.get("event"),
        kind: TaskKind::parse(&kind)
            .ok_or_else(|| StoreError::Corrupt(format!("task kind `{kind}`")))?,
        context: from_json(row.get("context"))?,
        step: count(row.get::<_, i64>("step")),
        branch: row.get("branch"),
        attempt: attempt(row.get::<_, i64>("attempts")),
        first_attempt_at: row.get::<_, Option<i64>>("first_attempt_at").unwrap_or(now),
        queue: row.get("queue"),
        token: token
            .map(|t| serde_json::from_str(&t))
            .transpose()
            .map_err(|e| StoreError::Corrupt(format!("bad token: {e}")))?,
        contexts: Vec::new(),
        next_page_queued: row.get("page_queued"),
        version: row.get("version"),
    };
    Ok((task, row.get("instance_id"), row.get("grp")))
}

/// How many more steps each limited queue may start now, across every worker: its
/// `max_concurrent` minus the steps running anywhere, and the tokens its `rate` bucket holds.
/// Claimers of one limited queue take turns (an advisory lock per queue), so two workers
/// cannot both take the last slot.
pub(super) async fn shared_allowance(
    tx: &Transaction<'_>,
    now: Micros,
    limits: &[(String, crate::machine::QueueLimits)],
) -> StoreResult<Vec<(String, usize)>> {
    let mut allowance = Vec::new();
    for (queue, l) in limits {
        if l.max_concurrent.is_none() && l.rate.is_none() {
            continue;
        }
        tx.execute(
            "SELECT pg_advisory_xact_lock(hashtext('phasm-queue:' || $1))",
            &[queue],
        )
        .await
        .map_err(pg)?;
        let mut allowed = usize::MAX;
        if let Some(max) = l.max_concurrent {
            let running: i64 = tx
                .query_one(
                    "SELECT COUNT(*) FROM tasks
                     WHERE queue = $1 AND lease_owner IS NOT NULL AND status = 'ready' AND due_at > $2",
                    &[queue, &now],
                )
                .await
                .map_err(pg)?
                .get(0);
            allowed = allowed.min(size(i64::from(max) - running));
        }
        if let Some(rate) = l.rate {
            let capacity = f64::from(rate.count);
            let per_micro = capacity / micros(rate.per).max(1) as f64;
            let row = tx
                .query_one(
                    "INSERT INTO queue_rates (queue, tokens, updated_at)
                     VALUES ($1, $2::DOUBLE PRECISION, $3::BIGINT)
                     ON CONFLICT (queue) DO UPDATE
                       SET tokens = LEAST($2::DOUBLE PRECISION,
                             queue_rates.tokens + ($3::BIGINT - queue_rates.updated_at) * $4::DOUBLE PRECISION),
                           updated_at = $3::BIGINT
                     RETURNING tokens",
                    &[queue, &capacity, &now, &per_micro],
                )
                .await
                .map_err(pg)?;
            let tokens: f64 = row.get(0);
            allowed = allowed.min(whole(tokens));
        }
        allowance.push((queue.clone(), allowed));
    }
    Ok(allowance)
}

pub(super) async fn join_items(
    tx: &Transaction<'_>,
    task: &Task,
    instance_id: i64,
    grp: &str,
) -> StoreResult<Vec<Context>> {
    let state = task.from_state.as_deref().unwrap_or_default();
    tx.execute(
        "UPDATE items SET join_task = $1
         WHERE instance_id = $2 AND state = $3 AND grp = $4 AND (join_task IS NULL OR join_task = $1)",
        &[&task.id, &instance_id, &state, &grp],
    )
    .await
    .map_err(pg)?;
    let rows = tx
        .query(
            "SELECT context FROM items WHERE join_task = $1 ORDER BY id",
            &[&task.id],
        )
        .await
        .map_err(pg)?;
    rows.iter().map(|r| from_json(r.get(0))).collect()
}

pub(super) async fn claim(
    store: &PostgresStore,
    now: Micros,
    req: &ClaimRequest,
) -> StoreResult<Vec<Task>> {
    if req.limit == 0 {
        return Ok(Vec::new());
    }
    let mut client = store.client().await?;
    let tx = begin(&mut client).await?;
    let window = bigint((req.limit * 2).max(16));
    let (any_target, untargeted, only_targets) = req.targets.filter();
    let until = now.saturating_add(micros(req.lease));
    let mut per_queue = req.room(shared_allowance(&tx, now, &req.shared_limits).await?);
    // Only tasks this worker may take are read (its queues and targets, and none of a queue
    // with no room left), so a backlog it may not take never hides the work it may.
    let full_queues = crate::store::full_queues(&per_queue);
    let rows = tx
        .query(
            "SELECT t.id, t.claim, t.instance_id, i.name AS instance, i.machine, t.name, t.from_state,
                    t.event, t.kind, t.context, t.step, t.branch, t.attempts, t.first_attempt_at,
                    t.queue, t.token, t.grp, t.page_queued, t.target, i.version
             FROM tasks t JOIN instances i ON i.id = t.instance_id
             WHERE t.status = 'ready' AND t.due_at <= $1
               AND ($3 OR ($4 AND t.target IS NULL) OR t.target = ANY($5))
               AND ($6::TEXT[] IS NULL OR t.queue = ANY($6))
               AND NOT (t.queue = ANY($7))
             ORDER BY t.due_at LIMIT $2
             FOR UPDATE OF t SKIP LOCKED",
            &[
                &now,
                &window,
                &any_target,
                &untargeted,
                &only_targets,
                &req.queues,
                &full_queues,
            ],
        )
        .await
        .map_err(pg)?;
    let mut chosen = Vec::new();
    for row in &rows {
        if chosen.len() >= req.limit {
            break;
        }
        let (task, instance_id, grp) = task_row(row, now)?;
        if let Some((_, left)) = per_queue.iter_mut().find(|(q, _)| *q == task.queue) {
            if *left == 0 {
                continue;
            }
            *left -= 1;
        }
        chosen.push((task, instance_id, grp));
    }
    // One statement leases them all. It reads each instance's version again: the select
    // above re-reads a task row an upgrade changed meanwhile, but not its instance row, while
    // this statement sees every commit before it (and no upgrade moves a leased task).
    let ids: Vec<i64> = chosen.iter().map(|(t, _, _)| t.id).collect();
    if !ids.is_empty() {
        let versions: std::collections::HashMap<i64, Option<i64>> = tx
            .query(
                "UPDATE tasks t SET claim = claim + 1, lease_owner = $2, due_at = $3,
                                    attempts = attempts + 1,
                                    first_attempt_at = COALESCE(first_attempt_at, $4)
                 WHERE id = ANY($1)
                 RETURNING t.id, (SELECT i.version FROM instances i WHERE i.id = t.instance_id)",
                &[&ids, &req.owner, &until, &now],
            )
            .await
            .map_err(pg)?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        for (task, _, _) in &mut chosen {
            if let Some(version) = versions.get(&task.id) {
                task.version = *version;
            }
        }
    }
    for (queue, limits) in &req.shared_limits {
        if limits.rate.is_some() {
            let taken = chosen.iter().filter(|(t, _, _)| &t.queue == queue).count() as f64;
            if taken > 0.0 {
                tx.execute(
                    "UPDATE queue_rates SET tokens = GREATEST(tokens - $2, 0) WHERE queue = $1",
                    &[queue, &taken],
                )
                .await
                .map_err(pg)?;
            }
        }
    }
    let mut claimed = Vec::with_capacity(chosen.len());
    for (mut task, instance_id, grp) in chosen {
        task.claim += 1;
        if task.kind == TaskKind::Join {
            task.contexts =
                join_items(&tx, &task, instance_id, grp.as_deref().unwrap_or_default()).await?;
        }
        claimed.push(task);
    }
    tx.commit().await.map_err(pg)?;
    Ok(claimed)
}

pub(super) async fn renew(
    store: &PostgresStore,
    now: Micros,
    leases: &[(i64, i64)],
    until: Micros,
) -> StoreResult<Vec<bool>> {
    let client = store.client().await?;
    let mut held = Vec::with_capacity(leases.len());
    for (id, claim) in leases {
        let n = client
            .execute(
                "UPDATE tasks SET due_at = $3 WHERE id = $1 AND claim = $2 AND status = 'ready' AND due_at > $4",
                &[id, claim, &until, &now],
            )
            .await
            .map_err(pg)?;
        held.push(n == 1);
    }
    Ok(held)
}
