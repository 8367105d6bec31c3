//! The store conformance suite against SQLite.

use phasm::store::conformance;
use phasm::store::prelude::*;
use phasm::store::{SqliteOptions, SqliteStore};

/// One test per conformance check (`conformance::NAME`), each on a fresh database file: a
/// failure names its check, and the other checks still run.
macro_rules! on_sqlite {
    ($($check:ident),*) => {
        mod conformance_checks {
            use super::*;
            $(
                #[tokio::test]
                async fn $check() {
                    let dir = tempfile::tempdir().expect("temp dir");
                    let path = dir.path().join("conformance.db");
                    let store = SqliteStore::open(path, &SqliteOptions::default()).expect("opens");
                    conformance::$check(&store).await;
                }
            )*
        }
    };
}
phasm::for_each_conformance_check!(on_sqlite);

/// The mixed workload (every common commit shape, leased successors, forks, fan-ins,
/// spawns) ends every instance, for several seeds.
#[tokio::test]
async fn the_mixed_workload_completes_every_instance() {
    for seed in 1..=8 {
        let dir = tempfile::tempdir().expect("temp dir");
        let store =
            SqliteStore::open(dir.path().join("w.db"), &SqliteOptions::default()).expect("opens");
        conformance::mixed_workload(&store, seed).await;
    }
}

#[tokio::test]
async fn reopening_keeps_data_and_schema_version() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.db");
    {
        let store = SqliteStore::open(&path, &SqliteOptions::default()).unwrap();
        conformance::starting_is_idempotent(&store).await;
    }
    let store = SqliteStore::open(&path, &SqliteOptions::default()).unwrap();
    assert!(store.instance("i1").await.unwrap().is_some());
}

#[test]
fn a_database_from_a_newer_phasm_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.db");
    drop(SqliteStore::open(&path, &SqliteOptions::default()).unwrap());
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.execute("INSERT INTO phasm_schema (version) VALUES (99)", [])
        .unwrap();
    drop(conn);
    let err = SqliteStore::open(&path, &SqliteOptions::default()).unwrap_err();
    assert!(err.to_string().contains("schema version 99"), "{err}");
}

#[test]
fn a_file_that_is_not_a_database_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("not.db");
    std::fs::write(
        &path,
        "this is not sqlite, just text that is long enough to look like a header........",
    )
    .unwrap();
    let err = SqliteStore::open(&path, &SqliteOptions::default()).unwrap_err();
    assert!(
        err.to_string().contains("not a usable SQLite database")
            || err.to_string().contains("not a database"),
        "{err}"
    );
}

/// Reads run on a connection of their own: a read answers while the writer is busy with a
/// long run of commits (here the commit-rate probe, thousands of fsync'd transactions).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_do_not_wait_behind_the_writer() {
    let dir = tempfile::tempdir().unwrap();
    let store = std::sync::Arc::new(
        SqliteStore::open(dir.path().join("p.db"), &SqliteOptions::default()).unwrap(),
    );
    conformance::starting_is_idempotent(&*store).await;
    let writer = {
        let store = std::sync::Arc::clone(&store);
        tokio::spawn(async move { store.probe_commit_rate(5000).await })
    };
    // Let the probe start on the writer's thread.
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    let read = store.list(&Default::default()).await.unwrap();
    assert!(!read.is_empty());
    assert!(
        !writer.is_finished(),
        "the read should have answered while the writer was still busy"
    );
    writer.await.unwrap().unwrap();
}

fn new_instance(name: String) -> phasm::store::NewInstance {
    phasm::store::NewInstance {
        start: phasm::engine::NewTask {
            name: format!("{name}--start"),
            from_state: None,
            event: "go".into(),
            kind: phasm::engine::TaskKind::Dispatch,
            context: Default::default(),
            step: 0,
            branch: String::new(),
            queue: "default".into(),
            target: None,
            due_at: 0,
            token: None,
        },
        name,
        machine: "M".into(),
        context: Default::default(),
        version: None,
    }
}

/// Eight processes' worth of stores on one file (each its own connections, as eight `phasm
/// send`s are) writing at once: every write waits for the lock instead of failing with
/// "database is locked" — write transactions take the lock when they begin, so none has
/// to upgrade a read it began on an older snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_on_one_file_never_see_database_is_locked() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.db");
    let per_store = 125;
    let stores = 8;
    {
        let store = SqliteStore::open(&path, &SqliteOptions::default()).unwrap();
        let all = (0..stores * per_store)
            .map(|i| new_instance(format!("i{i}")))
            .collect();
        store.start_many(0, all).await.unwrap();
    }
    let mut tasks = Vec::new();
    for s in 0..stores {
        let path = path.clone();
        tasks.push(tokio::spawn(async move {
            let store = SqliteStore::open(&path, &SqliteOptions::default()).unwrap();
            let mut failed = Vec::new();
            for i in 0..per_store {
                // Each reads the instance, then writes: the pattern that failed.
                let name = format!("i{}", s * per_store + i);
                if let Err(e) = store.cancel(1, &name).await {
                    failed.push(format!("cancel {name}: {e}"));
                }
                let fresh = new_instance(format!("s{s}-{i}"));
                if let Err(e) = store.start(1, fresh).await {
                    failed.push(format!("start s{s}-{i}: {e}"));
                }
            }
            failed
        }));
    }
    let mut failed = Vec::new();
    for t in tasks {
        failed.extend(t.await.unwrap());
    }
    assert!(
        failed.is_empty(),
        "{} of {} writes failed, first: {:?}",
        failed.len(),
        2 * stores * per_store,
        failed.first()
    );
}
