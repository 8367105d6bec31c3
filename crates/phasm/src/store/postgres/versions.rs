//! Machine versions: a deploy stores each changed machine as its next version; reading them.

use super::*;
use crate::store::{Deployed, NewVersion, StoredVersion, VersionRecord};

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
