//! Claiming due tasks ([`store::claim`](crate::store::claim)'s operations as SQLite
//! statements), renewing leases.

use std::collections::HashMap;

use rusqlite::{params, OptionalExtension, Transaction};

use super::apply::SqliteTx;
use super::db;
use crate::clock::Micros;
use crate::engine::{Context, Task};
use crate::store::claim::{self, Candidate, ClaimFilter, ClaimTx};
use crate::store::convert::{attempt, bigint, count, from_json, parse_token, task_kind};
use crate::store::sql;
use crate::store::{ClaimRequest, StoreResult};

/// Claim for `req` at `now` in the batch's transaction.
pub(super) fn claim(
    tx: &Transaction<'_>,
    now: Micros,
    req: &ClaimRequest,
) -> StoreResult<Vec<Task>> {
    crate::store::execute::ready(claim::claim(&mut SqliteTx(tx, None), now, req))?
}

/// A claim's operations in the batch's transaction. SQLite's one writer runs claims one at a
/// time: nothing is locked or skipped.
impl ClaimTx for SqliteTx<'_, '_> {
    async fn lock_queue(&mut self, _queue: &str) -> StoreResult<()> {
        Ok(())
    }

    async fn running(&mut self, queue: &str, now: Micros) -> StoreResult<i64> {
        self.0
            .prepare_cached(sql::RUNNING_IN_QUEUE.sqlite())
            .map_err(db)?
            .query_row(params![queue, now], |r| r.get(0))
            .map_err(db)
    }

    async fn read_bucket(&mut self, queue: &str) -> StoreResult<Option<(f64, Micros)>> {
        self.0
            .prepare_cached(sql::READ_BUCKET.sqlite())
            .map_err(db)?
            .query_row([queue], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()
            .map_err(db)
    }

    async fn write_bucket(&mut self, queue: &str, tokens: f64, now: Micros) -> StoreResult<()> {
        self.0
            .prepare_cached(sql::WRITE_BUCKET.sqlite())
            .map_err(db)?
            .execute(params![queue, tokens, now])
            .map_err(db)?;
        Ok(())
    }

    async fn candidates(
        &mut self,
        now: Micros,
        window: usize,
        filter: &ClaimFilter,
    ) -> StoreResult<Vec<Candidate>> {
        let json = |names: &[String]| serde_json::Value::from(names.to_vec()).to_string();
        let mut stmt = self
            .0
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
            .map_err(db)?;
        let mut rows = stmt
            .query(params![
                now,
                bigint(window),
                filter.any_target,
                filter.untargeted,
                json(&filter.targets),
                filter.queues.as_deref().map(json),
                json(&filter.full_queues)
            ])
            .map_err(db)?;
        let mut candidates = Vec::new();
        while let Some(r) = rows.next().map_err(db)? {
            let kind: String = r.get(8).map_err(db)?;
            let context: String = r.get(9).map_err(db)?;
            let token: Option<String> = r.get(15).map_err(db)?;
            let first: Option<i64> = r.get(13).map_err(db)?;
            candidates.push(Candidate {
                task: Task {
                    id: r.get(0).map_err(db)?,
                    claim: r.get(1).map_err(db)?,
                    instance: r.get(3).map_err(db)?,
                    machine: r.get(4).map_err(db)?,
                    name: r.get(5).map_err(db)?,
                    from_state: r.get(6).map_err(db)?,
                    event: r.get(7).map_err(db)?,
                    kind: task_kind(&kind)?,
                    context: from_json(&context)?,
                    step: count(r.get(10).map_err(db)?),
                    branch: r.get(11).map_err(db)?,
                    attempt: attempt(r.get(12).map_err(db)?),
                    first_attempt_at: first.unwrap_or(now),
                    queue: r.get(14).map_err(db)?,
                    token: parse_token(token)?,
                    contexts: Vec::new(),
                    next_page_queued: r.get(17).map_err(db)?,
                    version: r.get(18).map_err(db)?,
                },
                instance_id: r.get(2).map_err(db)?,
                group: r.get(16).map_err(db)?,
            });
        }
        Ok(candidates)
    }

    /// One statement for all. The instances' versions are the candidates': nothing else
    /// writes between that read and this one.
    async fn lease(
        &mut self,
        ids: &[i64],
        owner: &str,
        until: Micros,
        now: Micros,
    ) -> StoreResult<HashMap<i64, Option<i64>>> {
        let ids = serde_json::Value::from(ids.to_vec()).to_string();
        self.0
            .prepare_cached(
                "UPDATE tasks SET claim = claim + 1, lease_owner = ?2, due_at = ?3,
                                  attempts = attempts + 1,
                                  first_attempt_at = COALESCE(first_attempt_at, ?4)
                 WHERE id IN (SELECT value FROM json_each(?1))",
            )
            .map_err(db)?
            .execute(params![ids, owner, until, now])
            .map_err(db)?;
        Ok(HashMap::new())
    }

    async fn take_items(
        &mut self,
        join: i64,
        instance_id: i64,
        state: &str,
        group: &str,
    ) -> StoreResult<Vec<Context>> {
        self.0
            .prepare_cached(sql::TAKE_ITEMS.sqlite())
            .map_err(db)?
            .execute(params![join, instance_id, state, group])
            .map_err(db)?;
        let texts = self
            .0
            .prepare_cached(sql::JOIN_CONTEXTS.sqlite())
            .map_err(db)?
            .query_map([join], |r| r.get::<_, String>(0))
            .map_err(db)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(db)?;
        texts.iter().map(|t| from_json(t)).collect()
    }
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
