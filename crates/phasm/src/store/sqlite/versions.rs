//! Machine versions: a deploy stores each changed machine as its next version; reading them.

use rusqlite::{params, OptionalExtension, Transaction};

use super::db;
use crate::clock::Micros;
use crate::engine::{Position, TaskKind};
use crate::store::convert::{count, parse_status};
use crate::store::{
    upgrade_accepts, upgrade_log, upgrade_plan, Deployed, NewVersion, StoreError, StoreResult,
    StoredVersion, UpgradeRequest, Upgraded, VersionCounts, VersionRecord,
};

/// Store each definition as its machine's next version unless the latest has its hash (see
/// [`AdminStore::deploy`]); the writer's transaction holds the database's write lock, so no
/// other deploy numbers a version meanwhile.
pub(super) fn deploy(
    tx: &Transaction<'_>,
    now: Micros,
    versions: &[NewVersion],
) -> StoreResult<Vec<Deployed>> {
    let mut done = Vec::with_capacity(versions.len());
    for v in versions {
        if v.if_unknown {
            let known: Option<i64> = tx
                .prepare_cached(
                    "SELECT version FROM machine_versions WHERE machine = ?1 AND hash = ?2
                     ORDER BY version DESC LIMIT 1",
                )
                .map_err(db)?
                .query_row(params![v.machine, v.hash], |r| r.get(0))
                .optional()
                .map_err(db)?;
            if let Some(version) = known {
                done.push(Deployed {
                    machine: v.machine.clone(),
                    version: u32::try_from(version).unwrap_or(u32::MAX),
                    new: false,
                });
                continue;
            }
        }
        let latest: Option<(i64, String)> = tx
            .prepare_cached(
                "SELECT version, hash FROM machine_versions WHERE machine = ?1
                 ORDER BY version DESC LIMIT 1",
            )
            .map_err(db)?
            .query_row([&v.machine], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()
            .map_err(db)?;
        let (version, new) = match latest {
            Some((version, hash)) if hash == v.hash => (version, false),
            latest => {
                let next = latest.map_or(1, |(version, _)| version + 1);
                tx.prepare_cached(
                    "INSERT INTO machine_versions
                       (machine, version, hash, definition, source, path, deployed_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                )
                .map_err(db)?
                .execute(params![
                    v.machine,
                    next,
                    v.hash,
                    v.definition,
                    v.source,
                    v.path,
                    now
                ])
                .map_err(db)?;
                if next == 1 {
                    adopt(tx, &v.machine, tx.last_insert_rowid())?;
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
    Ok(done)
}

/// Instances of `machine` started before it was ever deployed take its first version.
fn adopt(tx: &Transaction<'_>, machine: &str, version_id: i64) -> StoreResult<()> {
    tx.prepare_cached("UPDATE instances SET version = ?2 WHERE machine = ?1 AND version IS NULL")
        .map_err(db)?
        .execute(params![machine, version_id])
        .map_err(db)?;
    Ok(())
}

fn record(r: &rusqlite::Row<'_>) -> rusqlite::Result<VersionRecord> {
    Ok(VersionRecord {
        machine: r.get(0)?,
        version: u32::try_from(r.get::<_, i64>(1)?).unwrap_or(u32::MAX),
        hash: r.get(2)?,
        path: r.get(3)?,
        deployed_at: r.get(4)?,
    })
}

/// The versions of `machine` (all machines' with `None`), by machine, oldest first.
pub(super) fn versions(
    tx: &Transaction<'_>,
    machine: Option<&str>,
) -> StoreResult<Vec<VersionRecord>> {
    tx.prepare_cached(
        "SELECT machine, version, hash, path, deployed_at FROM machine_versions
         WHERE ?1 IS NULL OR machine = ?1 ORDER BY machine, version",
    )
    .map_err(db)?
    .query_map([machine], record)
    .map_err(db)?
    .collect::<Result<Vec<_>, _>>()
    .map_err(db)
}

/// One version with its texts.
pub(super) fn version(
    tx: &Transaction<'_>,
    machine: &str,
    version: u32,
) -> StoreResult<Option<StoredVersion>> {
    stored(
        tx,
        "machine = ?1 AND version = ?2",
        params![machine, i64::from(version)],
    )
}

/// One version with its texts, by id.
pub(super) fn version_by_id(tx: &Transaction<'_>, id: i64) -> StoreResult<Option<StoredVersion>> {
    stored(tx, "id = ?1", params![id])
}

/// The version `filter` selects, with its texts.
fn stored(
    tx: &Transaction<'_>,
    filter: &str,
    args: impl rusqlite::Params,
) -> StoreResult<Option<StoredVersion>> {
    tx.prepare_cached(&format!(
        "SELECT machine, version, hash, path, deployed_at, definition, source
         FROM machine_versions WHERE {filter}"
    ))
    .map_err(db)?
    .query_row(args, |r| {
        Ok(StoredVersion {
            record: record(r)?,
            definition: r.get(5)?,
            source: r.get(6)?,
        })
    })
    .optional()
    .map_err(db)
}

/// Move an instance to a later version (see [`AdminStore::upgrade`]), in the writer's
/// transaction: nothing else writes between reading its positions and rewriting them.
pub(super) fn upgrade(
    tx: &Transaction<'_>,
    now: Micros,
    request: &UpgradeRequest,
) -> StoreResult<Upgraded> {
    let found: Option<(i64, String, Option<i64>)> = tx
        .prepare_cached(
            "SELECT i.id, i.status, v.version FROM instances i
             LEFT JOIN machine_versions v ON v.id = i.version WHERE i.name = ?1",
        )
        .map_err(db)?
        .query_row([&request.instance], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
        .optional()
        .map_err(db)?;
    let Some((instance_id, status, version)) = found else {
        return Ok(Upgraded::NotFound);
    };
    let status = parse_status(&status)?;
    if !status.may_cancel() {
        return Ok(Upgraded::Ended(status));
    }
    let version = version.map(|v| u32::try_from(v).unwrap_or(u32::MAX));
    if version != Some(request.from) {
        return Ok(Upgraded::OnVersion(version));
    }
    let target_id: Option<i64> = tx
        .prepare_cached("SELECT id FROM machine_versions WHERE machine = ?1 AND version = ?2")
        .map_err(db)?
        .query_row(params![request.target.name, i64::from(request.to)], |r| {
            r.get(0)
        })
        .optional()
        .map_err(db)?;
    let Some(target_id) = target_id else {
        return Ok(Upgraded::Refused(vec![format!(
            "v{} of `{}` is not stored",
            request.to, request.target.name
        )]));
    };
    let running: i64 = tx
        .prepare_cached(
            "SELECT COUNT(*) FROM tasks WHERE instance_id = ?1 AND status = 'ready'
               AND lease_owner IS NOT NULL AND due_at > ?2",
        )
        .map_err(db)?
        .query_row(params![instance_id, now], |r| r.get(0))
        .map_err(db)?;
    if running > 0 {
        return Ok(Upgraded::StepRunning);
    }
    let positions = tx
        .prepare_cached(
            "SELECT id, kind, from_state, event, branch, step FROM tasks
             WHERE instance_id = ?1 ORDER BY id",
        )
        .map_err(db)?
        .query_map([instance_id], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, Option<String>>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, String>(4)?,
                r.get::<_, i64>(5)?,
            ))
        })
        .map_err(db)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(db)?
        .into_iter()
        .map(|(task_id, kind, from_state, event, branch, step)| {
            Ok(Position {
                task_id,
                kind: TaskKind::parse(&kind)
                    .ok_or_else(|| StoreError::Corrupt(format!("task kind `{kind}`")))?,
                from_state,
                event,
                branch,
                step: count(step),
            })
        })
        .collect::<StoreResult<Vec<_>>>()?;
    let parked: Vec<String> = tx
        .prepare_cached("SELECT DISTINCT state FROM items WHERE instance_id = ?1 ORDER BY state")
        .map_err(db)?
        .query_map([instance_id], |r| r.get(0))
        .map_err(db)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(db)?;
    let (plan, moved) = match upgrade_plan(request, &positions, &parked) {
        Ok(planned) => planned,
        Err(answer) => return Ok(answer),
    };
    for t in &plan.tasks {
        let accepts = t.accepts.as_deref().map(upgrade_accepts);
        tx.prepare_cached(
            "UPDATE tasks SET from_state = ?2, event = ?3, accepts = COALESCE(?4, accepts),
                              due_at = COALESCE(?5, due_at)
             WHERE id = ?1",
        )
        .map_err(db)?
        .execute(params![t.task_id, t.from_state, t.event, accepts, t.due_at])
        .map_err(db)?;
    }
    for (old, new) in &plan.parked {
        tx.prepare_cached("UPDATE items SET state = ?3 WHERE instance_id = ?1 AND state = ?2")
            .map_err(db)?
            .execute(params![instance_id, old, new])
            .map_err(db)?;
    }
    tx.prepare_cached("UPDATE instances SET version = ?2, updated_at = ?3 WHERE id = ?1")
        .map_err(db)?
        .execute(params![instance_id, target_id, now])
        .map_err(db)?;
    super::apply::insert_log(tx, instance_id, &upgrade_log(request, now))?;
    Ok(moved)
}

/// The live instances of each version (see [`ReadStore::version_counts`]): one pass over
/// the index of live instances by version and status, and one over the index of waits.
pub(super) fn version_counts(
    tx: &Transaction<'_>,
    machine: Option<&str>,
) -> StoreResult<Vec<VersionCounts>> {
    let number = |n: i64| u64::try_from(n).unwrap_or(0);
    let mut counts: std::collections::BTreeMap<i64, VersionCounts> =
        std::collections::BTreeMap::new();
    let rows = tx
        .prepare_cached(
            "SELECT version, status, COUNT(*) FROM instances
             WHERE status IN ('running', 'failed')
               AND version IN (SELECT id FROM machine_versions WHERE ?1 IS NULL OR machine = ?1)
             GROUP BY version, status",
        )
        .map_err(db)?
        .query_map([machine], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
            ))
        })
        .map_err(db)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(db)?;
    for (id, status, n) in rows {
        let c = counts.entry(id).or_default();
        if status == "running" {
            c.running = number(n);
        } else {
            c.failed = number(n);
        }
    }
    // The waits first (CROSS JOIN keeps that order): there are few of them, while walking
    // the running instances to find theirs reads them all.
    let waits = tx
        .prepare_cached(
            "SELECT i.version, COUNT(DISTINCT t.instance_id)
             FROM tasks t CROSS JOIN instances i ON i.id = t.instance_id
             WHERE t.kind = 'wait' AND i.status = 'running'
             GROUP BY i.version",
        )
        .map_err(db)?
        .query_map([], |r| {
            Ok((r.get::<_, Option<i64>>(0)?, r.get::<_, i64>(1)?))
        })
        .map_err(db)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(db)?;
    for (id, n) in waits {
        if let Some(c) = id.and_then(|id| counts.get_mut(&id)) {
            c.waiting = number(n);
        }
    }
    let names = tx
        .prepare_cached(
            "SELECT id, machine, version FROM machine_versions WHERE ?1 IS NULL OR machine = ?1",
        )
        .map_err(db)?
        .query_map([machine], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
            ))
        })
        .map_err(db)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(db)?;
    let mut out = Vec::with_capacity(counts.len());
    for (id, machine, version) in names {
        if let Some(mut c) = counts.remove(&id) {
            c.machine = machine;
            c.version = u32::try_from(version).unwrap_or(u32::MAX);
            out.push(c);
        }
    }
    out.sort_by(|a, b| (&a.machine, a.version).cmp(&(&b.machine, b.version)));
    Ok(out)
}

/// Delete the versions no instance records, but the latest of each machine (see
/// [`AdminStore::scrub_versions`]).
pub(super) fn scrub_versions(tx: &Transaction<'_>) -> StoreResult<Vec<(String, u32)>> {
    tx.prepare_cached(
        "DELETE FROM machine_versions
         WHERE id NOT IN (SELECT DISTINCT version FROM instances WHERE version IS NOT NULL)
           AND version < (SELECT MAX(l.version) FROM machine_versions l
                          WHERE l.machine = machine_versions.machine)
         RETURNING machine, version",
    )
    .map_err(db)?
    .query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            u32::try_from(r.get::<_, i64>(1)?).unwrap_or(u32::MAX),
        ))
    })
    .map_err(db)?
    .collect::<Result<Vec<_>, _>>()
    .map_err(db)
    .map(|mut gone| {
        gone.sort();
        gone
    })
}
