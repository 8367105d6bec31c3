//! Machine versions: a deploy stores each changed machine as its next version; reading them.

use super::*;
use crate::store::{Deployed, NewVersion, StoredVersion, VersionRecord};

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
