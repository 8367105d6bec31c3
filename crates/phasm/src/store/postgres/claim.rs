//! Claiming due tasks ([`store::claim`](crate::store::claim)'s operations as PostgreSQL
//! statements, candidates taken `FOR UPDATE SKIP LOCKED`), renewing leases.

use std::collections::HashMap;

use tokio_postgres::Row;

use super::apply::PgTx;
use super::{begin, pg, PostgresStore};
use crate::clock::Micros;
use crate::engine::{Context, Task};
use crate::store::claim::{self, Candidate, ClaimFilter, ClaimTx};
use crate::store::convert::{attempt, bigint, count, from_json, parse_token, task_kind};
use crate::store::sql;
use crate::store::{ClaimRequest, StoreResult};

/// A task row as read by a claim or a view of tasks: the task, its instance's row id and
/// its fan-in group.
pub(super) fn task_row(row: &Row, now: Micros) -> StoreResult<(Task, i64, Option<String>)> {
    let kind: String = row.get("kind");
    let task = Task {
        id: row.get("id"),
        claim: row.get("claim"),
        instance: row.get("instance"),
        machine: row.get("machine"),
        name: row.get("name"),
        from_state: row.get("from_state"),
        event: row.get("event"),
        kind: task_kind(&kind)?,
        context: from_json(row.get("context"))?,
        step: count(row.get::<_, i64>("step")),
        branch: row.get("branch"),
        attempt: attempt(row.get::<_, i64>("attempts")),
        first_attempt_at: row.get::<_, Option<i64>>("first_attempt_at").unwrap_or(now),
        queue: row.get("queue"),
        token: parse_token(row.get("token"))?,
        contexts: Vec::new(),
        next_page_queued: row.get("page_queued"),
        version: row.get("version"),
    };
    Ok((task, row.get("instance_id"), row.get("grp")))
}

/// Claim for `req` at `now`, in a transaction of its own.
pub(super) async fn claim(
    store: &PostgresStore,
    now: Micros,
    req: &ClaimRequest,
) -> StoreResult<Vec<Task>> {
    if req.limit == 0 {
        return Ok(Vec::new());
    }
    let mut client = store.client().await?;
    let mut tx = PgTx(begin(&mut client).await?);
    let claimed = claim::claim(&mut tx, now, req).await?;
    tx.0.commit().await.map_err(pg)?;
    Ok(claimed)
}

/// A claim's operations in one transaction. Claimers run side by side: candidates are
/// locked and others' skipped, and claimers of a limited queue take turns.
impl ClaimTx for PgTx<'_> {
    /// An advisory lock per queue, held until the transaction ends.
    async fn lock_queue(&mut self, queue: &str) -> StoreResult<()> {
        self.0
            .execute(
                "SELECT pg_advisory_xact_lock(hashtext('phasm-queue:' || $1))",
                &[&queue],
            )
            .await
            .map_err(pg)?;
        Ok(())
    }

    async fn running(&mut self, queue: &str, now: Micros) -> StoreResult<i64> {
        Ok(self
            .0
            .query_one(sql::RUNNING_IN_QUEUE.postgres(), &[&queue, &now])
            .await
            .map_err(pg)?
            .get(0))
    }

    async fn read_bucket(&mut self, queue: &str) -> StoreResult<Option<(f64, Micros)>> {
        Ok(self
            .0
            .query_opt(sql::READ_BUCKET.postgres(), &[&queue])
            .await
            .map_err(pg)?
            .map(|r| (r.get(0), r.get(1))))
    }

    async fn write_bucket(&mut self, queue: &str, tokens: f64, now: Micros) -> StoreResult<()> {
        self.0
            .execute(sql::WRITE_BUCKET.postgres(), &[&queue, &tokens, &now])
            .await
            .map_err(pg)?;
        Ok(())
    }

    async fn candidates(
        &mut self,
        now: Micros,
        window: usize,
        filter: &ClaimFilter,
    ) -> StoreResult<Vec<Candidate>> {
        let rows = self
            .0
            .query(
                "SELECT t.id, t.claim, t.instance_id, i.name AS instance, i.machine, t.name,
                        t.from_state, t.event, t.kind, t.context, t.step, t.branch, t.attempts,
                        t.first_attempt_at, t.queue, t.token, t.grp, t.page_queued, t.target,
                        i.version
                 FROM tasks t JOIN instances i ON i.id = t.instance_id
                 WHERE t.status = 'ready' AND t.due_at <= $1
                   AND ($3 OR ($4 AND t.target IS NULL) OR t.target = ANY($5))
                   AND ($6::TEXT[] IS NULL OR t.queue = ANY($6))
                   AND NOT (t.queue = ANY($7))
                 ORDER BY t.due_at, t.id LIMIT $2
                 FOR UPDATE OF t SKIP LOCKED",
                &[
                    &now,
                    &bigint(window),
                    &filter.any_target,
                    &filter.untargeted,
                    &filter.targets,
                    &filter.queues,
                    &filter.full_queues,
                ],
            )
            .await
            .map_err(pg)?;
        rows.iter()
            .map(|row| {
                let (task, instance_id, group) = task_row(row, now)?;
                Ok(Candidate {
                    task,
                    instance_id,
                    group,
                })
            })
            .collect()
    }

    /// One statement for all. Unlike the candidates query, which re-reads a task row an
    /// upgrade changed meanwhile but not its instance row, it sees every commit before it.
    async fn lease(
        &mut self,
        ids: &[i64],
        owner: &str,
        until: Micros,
        now: Micros,
    ) -> StoreResult<HashMap<i64, Option<i64>>> {
        Ok(self
            .0
            .query(
                "UPDATE tasks t SET claim = claim + 1, lease_owner = $2, due_at = $3,
                                    attempts = attempts + 1,
                                    first_attempt_at = COALESCE(first_attempt_at, $4)
                 WHERE id = ANY($1)
                 RETURNING t.id, (SELECT i.version FROM instances i WHERE i.id = t.instance_id)",
                &[&ids, &owner, &until, &now],
            )
            .await
            .map_err(pg)?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect())
    }

    async fn take_items(
        &mut self,
        join: i64,
        instance_id: i64,
        state: &str,
        group: &str,
    ) -> StoreResult<Vec<Context>> {
        self.0
            .execute(
                sql::TAKE_ITEMS.postgres(),
                &[&join, &instance_id, &state, &group],
            )
            .await
            .map_err(pg)?;
        let rows = self
            .0
            .query(sql::JOIN_CONTEXTS.postgres(), &[&join])
            .await
            .map_err(pg)?;
        rows.iter().map(|r| from_json(r.get(0))).collect()
    }
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
