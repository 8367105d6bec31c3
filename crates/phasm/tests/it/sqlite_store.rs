//! The store conformance suite against SQLite.

use phasm::store::conformance;
use phasm::store::prelude::*;
use phasm::store::{SqliteOptions, SqliteStore};

#[tokio::test]
async fn sqlite_passes_the_conformance_suite() {
    let dir = tempfile::tempdir().expect("temp dir");
    conformance::run_all(|check| {
        let path = dir.path().join(format!("{check}.db"));
        async move { SqliteStore::open(path, &SqliteOptions::default()).expect("opens") }
    })
    .await;
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
