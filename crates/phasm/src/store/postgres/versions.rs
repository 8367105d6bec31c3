//! Machine versions: a deploy stores each changed machine as its next version; reading them.

use tokio_postgres::types::ToSql;

use super::{begin, pg, PostgresStore};
use crate::clock::Micros;
use crate::engine::{Position, TaskKind};
use crate::store::convert::{count, parse_status};
use crate::store::{
    upgrade_accepts, upgrade_log, upgrade_plan, Deployed, NewVersion, StoreError, StoreResult,
    StoredVersion, UpgradeRequest, Upgraded, VersionCounts, VersionRecord,
};

/// Store each definition as its machine's next version unless the latest has its hash (see
/// [`AdminStore::deploy`]). Deploys of one machine take turns (an advisory lock per machine),
/// so two at once cannot both number the same version.
pub(super) async fn deploy(
    store: &PostgresStore,
    now: Micros,
    versions: &[NewVersion],
) -> StoreResult<Vec<Deployed>> {
    let mut client = store.client().await?;
    let tx = begin(&mut client).await?;
    let mut done = Vec::with_capacity(versions.len());
    // In one order whatever the deploy's, so two deploys never wait on each other's locks.
    let mut order: Vec<&NewVersion> = versions.iter().collect();
    order.sort_by(|a, b| a.machine.cmp(&b.machine));
    for v in order {
        tx.execute(
            "SELECT pg_advisory_xact_lock(hashtext('phasm-deploy:' || $1))",
            &[&v.machine],
        )
        .await
        .map_err(pg)?;
    }
    for v in versions {
        if v.if_unknown {
            let known = tx
                .query_opt(
                    "SELECT version FROM machine_versions WHERE machine = $1 AND hash = $2
                     ORDER BY version DESC LIMIT 1",
                    &[&v.machine, &v.hash],
                )
                .await
                .map_err(pg)?;
            if let Some(row) = known {
                done.push(Deployed {
                    machine: v.machine.clone(),
                    version: u32::try_from(row.get::<_, i32>(0)).unwrap_or(u32::MAX),
                    new: false,
                });
                continue;
            }
        }
        let latest = tx
            .query_opt(
                "SELECT version, hash FROM machine_versions WHERE machine = $1
                 ORDER BY version DESC LIMIT 1",
                &[&v.machine],
            )
            .await
            .map_err(pg)?
            .map(|r| (r.get::<_, i32>(0), r.get::<_, String>(1)));
        let (version, new) = match latest {
            Some((version, hash)) if hash == v.hash => (version, false),
            latest => {
                let next = latest.map_or(1, |(version, _)| version + 1);
                let id: i64 = tx
                    .query_one(
                        "INSERT INTO machine_versions
                       (machine, version, hash, definition, source, path, deployed_at)
                     VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id",
                        &[
                            &v.machine,
                            &next,
                            &v.hash,
                            &v.definition,
                            &v.source,
                            &v.path,
                            &now,
                        ],
                    )
                    .await
                    .map_err(pg)?
                    .get(0);
                if next == 1 {
                    // Instances started before the machine was ever deployed take version 1.
                    tx.execute(
                        "UPDATE instances SET version = $2 WHERE machine = $1 AND version IS NULL",
                        &[&v.machine, &id],
                    )
                    .await
                    .map_err(pg)?;
                }
                (next, true)
            }
        };
        done.push(Deployed {
            machine: v.machine.clone(),
            version: u32::try_from(version).unwrap_or(u32::MAX),
            new,
        });
    }
    tx.commit().await.map_err(pg)?;
    Ok(done)
}

fn record(r: &tokio_postgres::Row) -> VersionRecord {
    VersionRecord {
        machine: r.get(0),
        version: u32::try_from(r.get::<_, i32>(1)).unwrap_or(u32::MAX),
        hash: r.get(2),
        path: r.get(3),
        deployed_at: r.get(4),
    }
}

/// The versions of `machine` (all machines' with `None`), by machine, oldest first.
pub(super) async fn versions(
    store: &PostgresStore,
    machine: Option<&str>,
) -> StoreResult<Vec<VersionRecord>> {
    let client = store.client().await?;
    let rows = client
        .query(
            "SELECT machine, version, hash, path, deployed_at FROM machine_versions
             WHERE $1::TEXT IS NULL OR machine = $1 ORDER BY machine, version",
            &[&machine],
        )
        .await
        .map_err(pg)?;
    Ok(rows.iter().map(record).collect())
}

/// One version with its texts.
pub(super) async fn version(
    store: &PostgresStore,
    machine: &str,
    version: u32,
) -> StoreResult<Option<StoredVersion>> {
    let number = i32::try_from(version).unwrap_or(i32::MAX);
    stored(store, "machine = $1 AND version = $2", &[&machine, &number]).await
}

/// One version with its texts, by id.
pub(super) async fn version_by_id(
    store: &PostgresStore,
    id: i64,
) -> StoreResult<Option<StoredVersion>> {
    stored(store, "id = $1", &[&id]).await
}

/// The version `filter` selects, with its texts.
async fn stored(
    store: &PostgresStore,
    filter: &str,
    args: &[&(dyn ToSql + Sync)],
) -> StoreResult<Option<StoredVersion>> {
    let client = store.client().await?;
    let row = client
        .query_opt(
            &format!(
                "SELECT machine, version, hash, path, deployed_at, definition, source
                 FROM machine_versions WHERE {filter}"
            ),
            args,
        )
        .await
        .map_err(pg)?;
    Ok(row.map(|r| StoredVersion {
        record: record(&r),
        definition: r.get(5),
        source: r.get(6),
    }))
}

/// Move an instance to a later version (see [`AdminStore::upgrade`]). The instance's row is
/// locked first, so a delivery, a reset or another upgrade of it waits; a running step holds
/// a lease, which refuses the move.
pub(super) async fn upgrade(
    store: &PostgresStore,
    now: Micros,
    request: &UpgradeRequest,
) -> StoreResult<Upgraded> {
    let mut client = store.client().await?;
    let tx = begin(&mut client).await?;
    let Some(row) = tx
        .query_opt(
            "SELECT i.id, i.status, v.version FROM instances i
             LEFT JOIN machine_versions v ON v.id = i.version
             WHERE i.name = $1 FOR UPDATE OF i",
            &[&request.instance],
        )
        .await
        .map_err(pg)?
    else {
        return Ok(Upgraded::NotFound);
    };
    let instance_id: i64 = row.get(0);
    let status = parse_status(row.get(1))?;
    if !status.may_cancel() {
        return Ok(Upgraded::Ended(status));
    }
    let version = row
        .get::<_, Option<i32>>(2)
        .map(|v| u32::try_from(v).unwrap_or(u32::MAX));
    if version != Some(request.from) {
        return Ok(Upgraded::OnVersion(version));
    }
    let to = i32::try_from(request.to).unwrap_or(i32::MAX);
    let Some(target) = tx
        .query_opt(
            "SELECT id FROM machine_versions WHERE machine = $1 AND version = $2",
            &[&request.target.name, &to],
        )
        .await
        .map_err(pg)?
    else {
        return Ok(Upgraded::Refused(vec![format!(
            "v{} of `{}` is not stored",
            request.to, request.target.name
        )]));
    };
    let target_id: i64 = target.get(0);
    // Rows of its tasks are locked too: a claim skips them until this commits. Locking them
    // waits out the commits of its steps in flight (which do not lock the instance) and
    // takes what they wrote (`lock_pending`); a task claimed meanwhile shows its lease, and
    // refuses the move.
    super::apply::lock_pending(&tx, instance_id).await?;
    let tasks = "SELECT id, kind, from_state, event, branch, step,
                        (status = 'ready' AND lease_owner IS NOT NULL AND due_at > $2) AS running
                 FROM tasks WHERE instance_id = $1 ORDER BY id";
    let rows = tx.query(tasks, &[&instance_id, &now]).await.map_err(pg)?;
    if rows.iter().any(|r| r.get::<_, bool>(6)) {
        return Ok(Upgraded::StepRunning);
    }
    let positions = rows
        .iter()
        .map(|r| {
            let kind: String = r.get(1);
            Ok(Position {
                task_id: r.get(0),
                kind: TaskKind::parse(&kind)
                    .ok_or_else(|| StoreError::Corrupt(format!("task kind `{kind}`")))?,
                from_state: r.get(2),
                event: r.get(3),
                branch: r.get(4),
                step: count(r.get::<_, i64>(5)),
            })
        })
        .collect::<StoreResult<Vec<_>>>()?;
    let parked: Vec<String> = tx
        .query(
            "SELECT DISTINCT state FROM items WHERE instance_id = $1 ORDER BY state",
            &[&instance_id],
        )
        .await
        .map_err(pg)?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let (plan, moved) = match upgrade_plan(request, &positions, &parked) {
        Ok(planned) => planned,
        Err(answer) => return Ok(answer),
    };
    for t in &plan.tasks {
        let accepts = t.accepts.as_deref().map(upgrade_accepts);
        tx.execute(
            "UPDATE tasks SET from_state = $2, event = $3, accepts = COALESCE($4, accepts),
                              due_at = COALESCE($5, due_at)
             WHERE id = $1",
            &[&t.task_id, &t.from_state, &t.event, &accepts, &t.due_at],
        )
        .await
        .map_err(pg)?;
    }
    for (old, new) in &plan.parked {
        tx.execute(
            "UPDATE items SET state = $3 WHERE instance_id = $1 AND state = $2",
            &[&instance_id, old, new],
        )
        .await
        .map_err(pg)?;
    }
    tx.execute(
        "UPDATE instances SET version = $2, updated_at = $3 WHERE id = $1",
        &[&instance_id, &target_id, &now],
    )
    .await
    .map_err(pg)?;
    let log = upgrade_log(request, now);
    tx.execute(
        "INSERT INTO logs (instance_id, at, level, message, task) VALUES ($1, $2, $3, $4, $5)",
        &[&instance_id, &log.at, &log.level, &log.message, &log.task],
    )
    .await
    .map_err(pg)?;
    tx.commit().await.map_err(pg)?;
    Ok(moved)
}

/// The live instances of each version (see [`ReadStore::version_counts`]).
pub(super) async fn version_counts(
    store: &PostgresStore,
    machine: Option<&str>,
) -> StoreResult<Vec<VersionCounts>> {
    let client = store.client().await?;
    let rows = client
        .query(
            "SELECT v.machine, v.version,
                    COUNT(*) FILTER (WHERE i.status = 'running'),
                    COUNT(*) FILTER (WHERE i.status = 'failed'),
                    (SELECT COUNT(DISTINCT t.instance_id) FROM tasks t
                     JOIN instances w ON w.id = t.instance_id
                     WHERE t.kind = 'wait' AND w.version = v.id AND w.status = 'running')
             FROM instances i JOIN machine_versions v ON v.id = i.version
             WHERE i.status IN ('running', 'failed')
               AND i.version IN (SELECT id FROM machine_versions
                                 WHERE $1::TEXT IS NULL OR machine = $1)
             GROUP BY v.id, v.machine, v.version ORDER BY v.machine, v.version",
            &[&machine],
        )
        .await
        .map_err(pg)?;
    Ok(rows
        .iter()
        .map(|r| VersionCounts {
            machine: r.get(0),
            version: u32::try_from(r.get::<_, i32>(1)).unwrap_or(u32::MAX),
            running: u64::try_from(r.get::<_, i64>(2)).unwrap_or(0),
            waiting: u64::try_from(r.get::<_, i64>(4)).unwrap_or(0),
            failed: u64::try_from(r.get::<_, i64>(3)).unwrap_or(0),
        })
        .collect())
}

/// Delete the versions no instance records, but the latest of each machine (see
/// [`AdminStore::scrub_versions`]). Deploys of the machines take turns with it (the deploy
/// lock of every machine whose versions it looks at), so a version being stored is not
/// judged meanwhile.
pub(super) async fn scrub_versions(store: &PostgresStore) -> StoreResult<Vec<(String, u32)>> {
    let mut client = store.client().await?;
    let tx = begin(&mut client).await?;
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtext('phasm-deploy:' || m))
         FROM (SELECT DISTINCT machine AS m FROM machine_versions ORDER BY 1) AS machines",
        &[],
    )
    .await
    .map_err(pg)?;
    let rows = tx
        .query(
            "DELETE FROM machine_versions v
             WHERE NOT EXISTS (SELECT 1 FROM instances i WHERE i.version = v.id)
               AND v.version < (SELECT MAX(l.version) FROM machine_versions l
                                WHERE l.machine = v.machine)
             RETURNING v.machine, v.version",
            &[],
        )
        .await
        .map_err(pg)?;
    tx.commit().await.map_err(pg)?;
    let mut gone: Vec<(String, u32)> = rows
        .iter()
        .map(|r| {
            (
                r.get::<_, String>(0),
                u32::try_from(r.get::<_, i32>(1)).unwrap_or(u32::MAX),
            )
        })
        .collect();
    gone.sort();
    Ok(gone)
}
