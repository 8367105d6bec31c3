//! Writing: starting instances and applying commits (fenced by the task's lease) — the
//! single-statement chain step and park, and the general path — parking branches.

use deadpool_postgres::Object;

use super::{begin, pg, PostgresStore, Settling, Transaction};
use crate::clock::Micros;
use crate::engine::{Commit, Context, HistoryEntry, LogLine, NewTask, Parked, Spawned};
use crate::store::convert::{bigint, from_json, parse_status, to_json};
use crate::store::execute::{self, Executed, Fenced, PlanTx};
use crate::store::plan::{self, Fence, InstanceWrite, JoinTask, Lease, Settle, Shape, WritePlan};
use crate::store::sql;
use crate::store::{
    Applied, AppliedCommit, InstanceStatus, NewInstance, Started, StoreError, StoreResult,
    SuccessorClaim,
};

pub(super) async fn insert_task(
    tx: &Transaction<'_>,
    instance_id: i64,
    t: &NewTask,
    now: Micros,
    lease: Option<&Lease<'_>>,
) -> StoreResult<Option<i64>> {
    insert_row(tx, instance_id, t, now, lease, None).await
}

/// [`insert_task`], with a wait task's `accepts` column.
async fn insert_row(
    tx: &Transaction<'_>,
    instance_id: i64,
    t: &NewTask,
    now: Micros,
    lease: Option<&Lease<'_>>,
    accepts: Option<&str>,
) -> StoreResult<Option<i64>> {
    let (owner, due_at, claim, attempts, first) = Lease::columns(lease, t.due_at, now);
    let token = t.token.as_ref().map(ToString::to_string);
    let row = tx
        .query_opt(
            sql::INSERT_TASK.postgres_returning_id(),
            &[
                &instance_id,
                &t.name,
                &t.kind.as_str(),
                &t.from_state,
                &t.event,
                &to_json(&t.context)?,
                &bigint(t.step),
                &t.branch,
                &t.queue,
                &t.target,
                &due_at,
                &now,
                &owner,
                &claim,
                &attempts,
                &first,
                &token,
                &accepts,
            ],
        )
        .await
        .map_err(pg)?;
    Ok(row.map(|r| r.get(0)))
}

/// Removes an instance from the ones being settled when dropped.
pub(super) struct SettlingGuard<'a> {
    pub(super) map: &'a std::sync::Mutex<std::collections::HashMap<i64, Settling>>,
    pub(super) instance_id: i64,
}

impl Drop for SettlingGuard<'_> {
    fn drop(&mut self) {
        self.map
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&self.instance_id);
    }
}

/// A chain step ([`Shape::Chain`]) as one statement: one round trip instead of one per row.
pub(super) const SIMPLE_COMMIT: &str = "
WITH fenced AS (
    DELETE FROM tasks WHERE id = $1 AND claim = $2 AND status = 'ready' AND due_at > $3
    RETURNING instance_id, CASE WHEN kind = 'join' THEN NULL ELSE context END AS given, step
), joined AS (
    DELETE FROM items WHERE join_task = $1 AND EXISTS (SELECT 1 FROM fenced)
), hist AS (
    INSERT INTO history (instance_id, from_state, event, to_state, attempt, started_at,
                         finished_at, task, branch, ends_branch, context, step)
    SELECT instance_id, $4, $5, $6, $7, $8, $9, $10, $11, $12, given, step FROM fenced WHERE $13
), next AS (
    INSERT INTO tasks (instance_id, name, kind, from_state, event, context, step, branch, queue,
                       target, status, due_at, created_at, lease_owner, claim, attempts,
                       first_attempt_at, token)
    SELECT instance_id, $14, $15, $16, $17, $18, $19, $20, $21, $22, 'ready', $23, $3, $24, $25,
           $26, $27, $28
    FROM fenced WHERE $29
    ON CONFLICT (instance_id, name) DO NOTHING
    RETURNING id
), ended AS (
    UPDATE instances SET result = $30, updated_at = $3
    WHERE $31 AND id = (SELECT instance_id FROM fenced) AND status = 'running'
), queued AS (
    INSERT INTO settle_queue (instance_id, queued_at)
    SELECT instance_id, $3 FROM fenced WHERE $33
    ON CONFLICT (instance_id) DO UPDATE SET queued_at = EXCLUDED.queued_at
), notified AS (
    SELECT pg_notify('phasm', '') WHERE $32 AND EXISTS (SELECT 1 FROM next)
)
SELECT (SELECT instance_id FROM fenced), (SELECT id FROM next), (SELECT COUNT(*) FROM notified)";

/// Commit a chain step ([`Shape::Chain`]) with [`SIMPLE_COMMIT`].
pub(super) async fn apply_chain(
    client: &Object,
    now: Micros,
    plan: &WritePlan<'_>,
) -> StoreResult<Executed> {
    let c = plan.commit;
    let h = plan.history.first();
    let successor = plan.successors.first();
    let t = successor.map(|s| s.task);
    let lease = successor.and_then(|s| s.lease);
    let (owner, due_at, claim, attempts, first) =
        Lease::columns(lease.as_ref(), t.map_or(0, |t| t.due_at), now);
    let result = match plan.instance {
        InstanceWrite::BranchResult(context) => Some(to_json(context)?),
        _ => None,
    };
    let empty = String::new();
    let task_context = match t {
        Some(t) => to_json(&t.context)?,
        None => String::new(),
    };
    let token = t.and_then(|t| t.token.as_ref().map(ToString::to_string));
    let statement = client.prepare_cached(SIMPLE_COMMIT).await.map_err(pg)?;
    let row = client
        .query_one(
            &statement,
            &[
                &c.task_id,
                &c.claim,
                &now,
                &h.and_then(|h| h.from.clone()),
                h.map_or(&empty, |h| &h.event),
                h.map_or(&empty, |h| &h.to),
                &h.map_or(0, |h| i64::from(h.attempt)),
                &h.map_or(0, |h| h.started_at),
                &h.map_or(0, |h| h.finished_at),
                h.map_or(&empty, |h| &h.task),
                h.map_or(&empty, |h| &h.branch),
                &h.is_some_and(|h| h.ends_branch),
                &h.is_some(),
                t.map_or(&empty, |t| &t.name),
                &t.map_or("", |t| t.kind.as_str()),
                &t.and_then(|t| t.from_state.clone()),
                t.map_or(&empty, |t| &t.event),
                &task_context,
                &t.map_or(0, |t| bigint(t.step)),
                t.map_or(&empty, |t| &t.branch),
                t.map_or(&empty, |t| &t.queue),
                &t.and_then(|t| t.target.clone()),
                &due_at,
                &owner,
                &claim,
                &attempts,
                &first,
                &token,
                &t.is_some(),
                &result,
                &result.is_some(),
                &plan.wakes_others,
                &plan.settle.complete,
            ],
        )
        .await
        .map_err(pg)?;
    let instance_id: Option<i64> = row.get(0);
    let Some(instance_id) = instance_id else {
        return Ok(Executed::fenced());
    };
    let inserted: Option<i64> = row.get(1);
    let mut claimed = Vec::new();
    if let (Some(id), Some(t), Some(_)) = (inserted, t, lease) {
        claimed.push(t.claimed(id, c, now));
    }
    Ok(Executed {
        result: AppliedCommit {
            applied: Applied::Yes,
            claimed,
        },
        instance_id: Some(instance_id),
        settle: plan.settle,
        wakes: inserted.is_some() && plan.wakes_others,
    })
}

/// A branch's step that ends in a fan-in state: finish the task, record the arrival, park
/// the context, and make sure a join will take it — one statement.
pub(super) const PARK_COMMIT_TEMPLATE: &str = "
WITH fenced AS (
    DELETE FROM tasks WHERE id = $1 AND claim = $2 AND status = 'ready' AND due_at > $3
    RETURNING instance_id, context, step
), hist AS (
    INSERT INTO history (instance_id, from_state, event, to_state, attempt, started_at,
                         finished_at, task, branch, ends_branch, context, step)
    SELECT instance_id, $4, $5, $6, $7, $8, $9, $10, $11, FALSE, context, step FROM fenced
), item AS (
    INSERT INTO items (instance_id, state, grp, context, branch, step, created_at)
    SELECT instance_id, $12, $13, $14, $15, $16, $3 FROM fenced
    RETURNING id, instance_id
), pending AS (
    -- A join not yet started (for a window, locked while looking: see `park`).
    SELECT t.id FROM tasks t
    WHERE t.instance_id = (SELECT instance_id FROM fenced) AND t.kind = 'join'
      AND t.from_state = $12 AND t.grp = $13 AND t.status IN ('ready', 'waiting')
      AND t.lease_owner IS NULL
    {LOCK}
), joiner AS (
    INSERT INTO tasks (instance_id, name, kind, from_state, event, context, step, branch, queue,
                       target, status, due_at, created_at, grp)
    SELECT item.instance_id, $17 || item.id, 'join', $12, 'fan-in', '{}', $16, '', $18, $19, $20,
           $21, $3, $13
    FROM item
    WHERE NOT EXISTS (SELECT 1 FROM pending)
    ON CONFLICT (instance_id, name) DO NOTHING
    RETURNING id
), notified AS (
    SELECT pg_notify('phasm', '') WHERE $22 AND EXISTS (SELECT 1 FROM joiner)
)
SELECT (SELECT instance_id FROM fenced), (SELECT COUNT(*) FROM notified)";

/// [`PARK_COMMIT_TEMPLATE`] for a window fan-in: the pending join is locked while looking.
pub(super) static PARK_COMMIT_WINDOW: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| PARK_COMMIT_TEMPLATE.replace("{LOCK}", "FOR UPDATE OF t"));

/// [`PARK_COMMIT_TEMPLATE`] for a barrier (`fan_in: all`): no lock, since a barrier join
/// cannot start while the parking step is live (see `park`).
pub(super) static PARK_COMMIT_BARRIER: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| PARK_COMMIT_TEMPLATE.replace("{LOCK}", ""));

/// Apply one commit: its [`plan`](crate::store::plan) in one transaction (a chain step or a
/// park in one statement), settling left to the caller, after the transaction.
pub(super) async fn apply_one(
    client: &mut Object,
    now: Micros,
    c: &Commit,
    successors: Option<&SuccessorClaim>,
    fused: bool,
) -> StoreResult<Executed> {
    let plan = plan::plan(c, successors, now);
    match plan.shape {
        Shape::Chain if fused => return apply_chain(client, now, &plan).await,
        Shape::Park if fused => return apply_park(client, now, &plan).await,
        _ => {}
    }
    let mut tx = PgTx(begin(client).await?);
    let executed = execute::execute(&mut tx, &plan, now).await?;
    if executed.instance_id.is_some() {
        tx.0.commit().await.map_err(pg)?;
    }
    Ok(executed)
}

/// The plan's operations as PostgreSQL statements in one commit's transaction.
pub(super) struct PgTx<'c>(pub(super) Transaction<'c>);

impl PlanTx for PgTx<'_> {
    async fn fence(
        &mut self,
        task_id: i64,
        claim: i64,
        fence: Fence<'_>,
        now: Micros,
    ) -> StoreResult<Option<Fenced>> {
        let (sql, extra) = sql::fence(fence, now);
        let sql = sql.postgres();
        let row = match extra {
            None => self.0.query_opt(sql, &[&task_id, &claim, &now]).await,
            Some((due_at, text)) => {
                self.0
                    .query_opt(sql, &[&task_id, &claim, &now, &due_at, &text])
                    .await
            }
        }
        .map_err(pg)?;
        Ok(row.map(|r| Fenced {
            instance_id: r.get(0),
            is_join: r.get(1),
            given: r.get(2),
            step: r.get(3),
        }))
    }

    async fn delete_join_items(&mut self, join_task: i64) -> StoreResult<()> {
        self.0
            .execute(sql::DELETE_JOIN_ITEMS.postgres(), &[&join_task])
            .await
            .map_err(pg)?;
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
        insert_row(&self.0, instance_id, task, now, lease, accepts).await
    }

    /// One statement for all (a step forking thousands of branches would otherwise pay a
    /// round trip each).
    async fn insert_unleased(
        &mut self,
        instance_id: i64,
        tasks: &[&NewTask],
        now: Micros,
    ) -> StoreResult<()> {
        insert_tasks(&self.0, &vec![instance_id; tasks.len()], tasks, now).await
    }

    /// The instance's row is locked first, as a delivery locks it.
    async fn take_buffered(
        &mut self,
        instance_id: i64,
        events: &[&str],
    ) -> StoreResult<Option<(String, Context)>> {
        self.0
            .execute(
                "SELECT 1 FROM instances WHERE id = $1 FOR UPDATE",
                &[&instance_id],
            )
            .await
            .map_err(pg)?;
        let taken = self
            .0
            .query_opt(
                "DELETE FROM events WHERE id = (
                     SELECT id FROM events WHERE instance_id = $1 AND event = ANY($2)
                     ORDER BY id LIMIT 1)
                 RETURNING event, data",
                &[&instance_id, &events],
            )
            .await
            .map_err(pg)?;
        taken
            .map(|row| Ok((row.get(0), from_json(row.get(1))?)))
            .transpose()
    }

    async fn insert_history(
        &mut self,
        instance_id: i64,
        entries: &[HistoryEntry],
        given: Option<&str>,
        step: i64,
    ) -> StoreResult<()> {
        for h in entries {
            self.0
                .execute(
                    sql::INSERT_HISTORY.postgres(),
                    &[
                        &instance_id,
                        &h.from,
                        &h.event,
                        &h.to,
                        &i64::from(h.attempt),
                        &h.started_at,
                        &h.finished_at,
                        &h.task,
                        &h.branch,
                        &h.ends_branch,
                        &given,
                        &step,
                    ],
                )
                .await
                .map_err(pg)?;
        }
        Ok(())
    }

    async fn insert_item(&mut self, instance_id: i64, p: &Parked, now: Micros) -> StoreResult<i64> {
        Ok(self
            .0
            .query_one(
                sql::INSERT_ITEM.postgres_returning_id(),
                &[
                    &instance_id,
                    &p.state,
                    &p.group,
                    &to_json(&p.context)?,
                    &p.branch,
                    &bigint(p.step),
                    &now,
                ],
            )
            .await
            .map_err(pg)?
            .get(0))
    }

    /// The look for a pending join, then the insert (locked while looking for a window).
    async fn join_unless_pending(
        &mut self,
        instance_id: i64,
        p: &Parked,
        join: &JoinTask,
        item: i64,
        now: Micros,
    ) -> StoreResult<()> {
        let lock = if join.lock_pending { "FOR UPDATE" } else { "" };
        let pending = self
            .0
            .query(
                &format!(
                    "SELECT id FROM tasks
                     WHERE instance_id = $1 AND kind = 'join' AND from_state = $2 AND grp = $3
                       AND status IN ('ready', 'waiting') AND lease_owner IS NULL
                     {lock}"
                ),
                &[&instance_id, &p.state, &p.group],
            )
            .await
            .map_err(pg)?;
        if !pending.is_empty() {
            return Ok(());
        }
        self.0
            .execute(
                "INSERT INTO tasks (instance_id, name, kind, from_state, event, context, step, branch,
                                    queue, target, status, due_at, created_at, grp)
                 VALUES ($1, $2, 'join', $3, 'fan-in', '{}', $4, '', $5, $6, $7, $8, $9, $10)
                 ON CONFLICT (instance_id, name) DO NOTHING",
                &[
                    &instance_id,
                    &format!("{}{item}", join.name_prefix),
                    &p.state,
                    &bigint(p.step),
                    &p.queue,
                    &p.target,
                    &join.status.as_str(),
                    &join.due_at,
                    &now,
                    &p.group,
                ],
            )
            .await
            .map_err(pg)?;
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
            .query_opt(
                sql::INSERT_CHILD.postgres_returning_id(),
                &[
                    &child.name,
                    &child.machine,
                    &to_json(&child.context)?,
                    &parent,
                    &now,
                ],
            )
            .await
            .map_err(pg)?;
        Ok(inserted.map(|row| row.get(0)))
    }

    async fn insert_log(&mut self, instance_id: i64, l: &LogLine) -> StoreResult<()> {
        self.0
            .execute(
                sql::INSERT_LOG.postgres(),
                &[&instance_id, &l.at, &l.level, &l.message, &l.task],
            )
            .await
            .map_err(pg)?;
        Ok(())
    }

    async fn set_result(
        &mut self,
        instance_id: i64,
        result: &Context,
        now: Micros,
    ) -> StoreResult<()> {
        self.0
            .execute(
                sql::SET_RESULT.postgres(),
                &[&instance_id, &to_json(result)?, &now],
            )
            .await
            .map_err(pg)?;
        Ok(())
    }

    async fn drop_pending(&mut self, instance_id: i64) -> StoreResult<()> {
        drop_pending(&self.0, instance_id).await
    }

    async fn hold_ready(&mut self, instance_id: i64) -> StoreResult<()> {
        lock_pending(&self.0, instance_id).await?;
        self.0
            .execute(sql::HOLD_READY.postgres(), &[&instance_id])
            .await
            .map_err(pg)?;
        Ok(())
    }

    async fn end_instance(
        &mut self,
        instance_id: i64,
        status: InstanceStatus,
        error: Option<&str>,
        now: Micros,
    ) -> StoreResult<()> {
        end_instance(&self.0, instance_id, status, error, now).await
    }

    /// Inside the transaction, only a note that the instance may be complete: both checks
    /// run after the commit (see `store::plan`), and the sweep settles what a dead worker
    /// left noted.
    async fn settle(&mut self, instance_id: i64, settle: Settle, now: Micros) -> StoreResult<bool> {
        if settle.complete {
            queue_settle(&self.0, instance_id, now).await?;
        }
        Ok(false)
    }

    async fn wake_others(&mut self) -> StoreResult<()> {
        self.0
            .execute("SELECT pg_notify('phasm', '')", &[])
            .await
            .map_err(pg)?;
        Ok(())
    }
}

/// Note, in the commit's transaction, that the instance may be complete: the check after the
/// commit removes the note, and the sweep settles what a dead worker left noted.
async fn queue_settle(tx: &Transaction<'_>, instance_id: i64, now: Micros) -> StoreResult<()> {
    tx.execute(
        "INSERT INTO settle_queue (instance_id, queued_at) VALUES ($1, $2)
         ON CONFLICT (instance_id) DO UPDATE SET queued_at = EXCLUDED.queued_at",
        &[&instance_id, &now],
    )
    .await
    .map_err(pg)?;
    Ok(())
}

/// Drop an instance's pending work: its tasks (of every branch) and its parked branches.
/// Commits of the instance running meanwhile finish first ([`lock_pending`]).
pub(super) async fn drop_pending(tx: &Transaction<'_>, instance_id: i64) -> StoreResult<()> {
    lock_pending(tx, instance_id).await?;
    tx.execute(sql::DROP_TASKS.postgres(), &[&instance_id])
        .await
        .map_err(pg)?;
    tx.execute(sql::DROP_ITEMS.postgres(), &[&instance_id])
        .await
        .map_err(pg)?;
    Ok(())
}

/// Most passes [`lock_pending`] makes before it gives up.
const LOCK_PASSES: usize = 50;

/// Lock every pending task of an instance, waiting for the commits of the instance that run
/// meanwhile, so that what this transaction then drops or holds is all there is.
///
/// A commit locks its own task (the fence) before it writes the next ones. Under READ
/// COMMITTED a statement sees the rows committed when it began, so one `DELETE` that waited
/// for such a commit does not see the successor it wrote: it would outlive a cancel, a
/// reset or a failed instance's hold and run on. Each pass here locks what it sees, in a
/// fresh snapshot, until a pass sees nothing new. Then every commit that could add a task
/// either finished (its tasks are seen and locked) or must first lock a task this
/// transaction holds, and waits for it.
pub(super) async fn lock_pending(tx: &Transaction<'_>, instance_id: i64) -> StoreResult<()> {
    let mut locked = std::collections::BTreeSet::new();
    for _ in 0..LOCK_PASSES {
        let seen: Vec<i64> = tx
            .query(
                "SELECT id FROM tasks WHERE instance_id = $1 ORDER BY id FOR UPDATE",
                &[&instance_id],
            )
            .await
            .map_err(pg)?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let before = locked.len();
        locked.extend(seen);
        if locked.len() == before {
            return Ok(());
        }
    }
    Err(StoreError::Database {
        message: format!(
            "the instance's steps kept committing while {LOCK_PASSES} passes tried to lock them; try again"
        ),
        transient: true,
        source: None,
    })
}

pub(super) async fn end_instance(
    tx: &Transaction<'_>,
    id: i64,
    status: InstanceStatus,
    error: Option<&str>,
    now: Micros,
) -> StoreResult<()> {
    tx.execute(
        sql::END_INSTANCE.postgres(),
        &[&id, &status.as_str(), &error, &now],
    )
    .await
    .map_err(pg)?;
    Ok(())
}

/// Start many instances in one transaction: their rows in one statement, their start tasks in
/// another, and one look-up of the names that existed already.
pub(super) async fn start_many(
    store: &PostgresStore,
    now: Micros,
    instances: Vec<NewInstance>,
) -> StoreResult<Vec<Started>> {
    let mut client = store.client().await?;
    let tx = begin(&mut client).await?;
    let answers = start_in(&tx, now, &instances).await?;
    let created = answers.contains(&Started::Created);
    if created {
        tx.execute("SELECT pg_notify('phasm', '')", &[])
            .await
            .map_err(pg)?;
    }
    tx.commit().await.map_err(pg)?;
    if created {
        store.changes.notify_waiters();
    }
    Ok(answers)
}

/// [`start_many`] inside a transaction (which the caller commits, notifying workers when an
/// instance was created).
pub(super) async fn start_in(
    tx: &Transaction<'_>,
    now: Micros,
    instances: &[NewInstance],
) -> StoreResult<Vec<Started>> {
    let names: Vec<&str> = instances.iter().map(|n| n.name.as_str()).collect();
    let machines: Vec<&str> = instances.iter().map(|n| n.machine.as_str()).collect();
    let versions: Vec<Option<i32>> = instances
        .iter()
        .map(|n| n.version.map(|v| i32::try_from(v).unwrap_or(i32::MAX)))
        .collect();
    let contexts = instances
        .iter()
        .map(|n| to_json(&n.context))
        .collect::<StoreResult<Vec<_>>>()?;
    // A name given twice is inserted once (the first); ON CONFLICT skips the names that exist.
    let rows = tx
        .query(
            "INSERT INTO instances (name, machine, status, context, created_at, updated_at, version)
             SELECT DISTINCT ON (n) n, m, 'running', c, $4, $4,
                    (SELECT v.id FROM machine_versions v WHERE v.machine = m
                       AND (u.w IS NULL OR v.version = u.w)
                     ORDER BY v.version DESC LIMIT 1)
             FROM UNNEST($1::TEXT[], $2::TEXT[], $3::TEXT[], $5::INTEGER[])
                  WITH ORDINALITY AS u (n, m, c, w, i)
             ORDER BY n, i
             ON CONFLICT (name) DO NOTHING
             RETURNING id, name",
            &[&names, &machines, &contexts, &now, &versions],
        )
        .await
        .map_err(pg)?;
    let mut created: std::collections::HashMap<String, i64> =
        rows.iter().map(|r| (r.get(1), r.get(0))).collect();
    // Each input's answer: `Created` for the first of a name inserted now; the others are
    // answered below.
    let mut answers: Vec<Option<Started>> = Vec::with_capacity(instances.len());
    let mut made = std::collections::HashMap::new();
    let mut ids = Vec::with_capacity(created.len());
    let mut tasks = Vec::with_capacity(created.len());
    for new in instances {
        match created.remove(&new.name) {
            Some(id) => {
                made.insert(new.name.as_str(), new.machine.as_str());
                ids.push(id);
                tasks.push(&new.start);
                answers.push(Some(Started::Created));
            }
            None => answers.push(None),
        }
    }
    if !tasks.is_empty() {
        insert_tasks(tx, &ids, &tasks, now).await?;
    }
    let mut existing = std::collections::HashMap::new();
    let others: Vec<&str> = names
        .iter()
        .copied()
        .filter(|n| !made.contains_key(n))
        .collect();
    if !others.is_empty() {
        for r in tx
            .query(
                "SELECT name, machine, status FROM instances WHERE name = ANY($1)",
                &[&others],
            )
            .await
            .map_err(pg)?
        {
            let name: String = r.get(0);
            existing.insert(name, (r.get::<_, String>(1), parse_status(r.get(2))?));
        }
    }
    instances
        .iter()
        .zip(answers)
        .map(|(new, answer)| {
            if let Some(answer) = answer {
                return Ok(answer);
            }
            let (machine, status) = match made.get(new.name.as_str()) {
                // Created earlier in this same call.
                Some(machine) => ((*machine).to_string(), InstanceStatus::Running),
                None => existing.get(&new.name).cloned().unwrap_or_else(|| {
                    // Its row went away between the insert and the look-up: answer as the
                    // first input of that name.
                    let first = instances.iter().find(|n| n.name == new.name);
                    (
                        first.map_or_else(String::new, |n| n.machine.clone()),
                        InstanceStatus::Running,
                    )
                }),
            };
            Ok(Started::Existing { machine, status })
        })
        .collect()
}

/// Insert many unleased tasks in one statement, task `i` of instance `instance_ids[i]` (a
/// step that forks thousands of branches, or a bulk start, would otherwise pay a round trip
/// per task).
pub(super) async fn insert_tasks(
    tx: &Transaction<'_>,
    instance_ids: &[i64],
    tasks: &[&NewTask],
    now: Micros,
) -> StoreResult<()> {
    debug_assert_eq!(instance_ids.len(), tasks.len(), "an instance per task");
    let names: Vec<&str> = tasks.iter().map(|t| t.name.as_str()).collect();
    let kinds: Vec<&str> = tasks.iter().map(|t| t.kind.as_str()).collect();
    let froms: Vec<Option<&str>> = tasks.iter().map(|t| t.from_state.as_deref()).collect();
    let events: Vec<&str> = tasks.iter().map(|t| t.event.as_str()).collect();
    let contexts = tasks
        .iter()
        .map(|t| to_json(&t.context))
        .collect::<StoreResult<Vec<_>>>()?;
    let steps: Vec<i64> = tasks.iter().map(|t| bigint(t.step)).collect();
    let branches: Vec<&str> = tasks.iter().map(|t| t.branch.as_str()).collect();
    let queues: Vec<&str> = tasks.iter().map(|t| t.queue.as_str()).collect();
    let targets: Vec<Option<&str>> = tasks.iter().map(|t| t.target.as_deref()).collect();
    let dues: Vec<i64> = tasks.iter().map(|t| t.due_at).collect();
    let tokens: Vec<Option<String>> = tasks
        .iter()
        .map(|t| t.token.as_ref().map(ToString::to_string))
        .collect();
    tx.execute(
        "INSERT INTO tasks (instance_id, name, kind, from_state, event, context, step, branch, queue,
                            target, status, due_at, created_at, token)
         SELECT i, n, k, f, e, c, s, b, q, t, 'ready', d, $13, tok
         FROM UNNEST($1::BIGINT[], $2::TEXT[], $3::TEXT[], $4::TEXT[], $5::TEXT[], $6::TEXT[],
                     $7::BIGINT[], $8::TEXT[], $9::TEXT[], $10::TEXT[], $11::BIGINT[], $12::TEXT[])
              AS u (i, n, k, f, e, c, s, b, q, t, d, tok)
         ON CONFLICT (instance_id, name) DO NOTHING",
        &[
            &instance_ids,
            &names,
            &kinds,
            &froms,
            &events,
            &contexts,
            &steps,
            &branches,
            &queues,
            &targets,
            &dues,
            &tokens,
            &now,
        ],
    )
    .await
    .map_err(pg)?;
    Ok(())
}

/// Apply one commit, then run its settling checks (outside its transaction: see
/// `store::plan`).
pub(super) async fn apply(
    store: &PostgresStore,
    now: Micros,
    commit: &Commit,
    successors: Option<&SuccessorClaim>,
) -> StoreResult<AppliedCommit> {
    let mut client = store.client().await?;
    let outcome = apply_one(&mut client, now, commit, successors, store.fused_commits).await?;
    drop(client);
    if let (true, Some(id)) = (outcome.settle.release_barriers, outcome.instance_id) {
        store
            .settle_coalesced(id, outcome.settle.complete, now)
            .await?;
    }
    if outcome.wakes {
        store.changes.notify_waiters();
    }
    Ok(outcome.result)
}

/// Commit a branch's arrival at a fan-in ([`Shape::Park`]) with [`PARK_COMMIT_TEMPLATE`].
pub(super) async fn apply_park(
    client: &Object,
    now: Micros,
    plan: &WritePlan<'_>,
) -> StoreResult<Executed> {
    let c = plan.commit;
    let (Some(h), Some(park)) = (plan.history.first(), plan.parks.first()) else {
        return Err(StoreError::database("not a parking commit"));
    };
    let (p, join) = (park.parked, &park.join);
    let sql = if join.lock_pending {
        &*PARK_COMMIT_WINDOW
    } else {
        &*PARK_COMMIT_BARRIER
    };
    let statement = client.prepare_cached(sql).await.map_err(pg)?;
    let row = client
        .query_one(
            &statement,
            &[
                &c.task_id,
                &c.claim,
                &now,
                &h.from,
                &h.event,
                &h.to,
                &i64::from(h.attempt),
                &h.started_at,
                &h.finished_at,
                &h.task,
                &h.branch,
                &p.state,
                &p.group,
                &to_json(&p.context)?,
                &p.branch,
                &bigint(p.step),
                &join.name_prefix,
                &p.queue,
                &p.target,
                &join.status.as_str(),
                &join.due_at,
                &plan.wakes_others,
            ],
        )
        .await
        .map_err(pg)?;
    let instance_id: Option<i64> = row.get(0);
    let notified: i64 = row.get(1);
    let Some(instance_id) = instance_id else {
        return Ok(Executed::fenced());
    };
    Ok(Executed {
        result: AppliedCommit {
            applied: Applied::Yes,
            claimed: Vec::new(),
        },
        settle: plan.settle,
        instance_id: Some(instance_id),
        wakes: notified > 0,
    })
}
