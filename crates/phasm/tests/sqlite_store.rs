//! The store conformance suite against SQLite.

mod store_conformance;

use phasm::store::{SqliteOptions, SqliteStore};

fn fresh() -> (tempfile::TempDir, SqliteStore) {
    let dir = tempfile::tempdir().expect("temp dir");
    let store =
        SqliteStore::open(dir.path().join("phasm.db"), &SqliteOptions::default()).expect("opens");
    (dir, store)
}

macro_rules! conformance {
    ($($check:ident),* $(,)?) => {
        $(
            #[tokio::test]
            async fn $check() {
                let (_dir, store) = fresh();
                store_conformance::$check(&store).await;
            }
        )*
    };
}

conformance!(
    starting_is_idempotent,
    claims_only_due_tasks_once_until_the_lease_expires,
    claim_respects_limits_and_queues,
    a_superseded_claim_cannot_commit,
    an_expired_lease_cannot_commit,
    renewing_extends_a_held_lease,
    a_commit_applies_everything_together,
    a_branch_ending_while_others_are_pending_does_not_complete,
    a_retry_reschedules_the_task,
    a_postponed_step_does_not_count_an_attempt,
    a_failure_holds_the_instance_until_retried,
    cancel_and_halt_drop_pending_work,
    a_cancelled_instances_running_step_cannot_commit,
    successors_due_now_come_back_leased,
    task_names_are_unique_per_instance,
    list_filters_newest_first,
    task_ids_are_never_reused,
    targets_route_tasks_to_their_pools,
    scrub_removes_only_old_ended_instances,
    commits_probe_reports_a_rate,
    history_and_logs_page_with_cursors,
    an_instance_view_is_bounded_however_long_the_instance_ran,
    workers_are_listed_until_they_stop_or_expire,
);

#[tokio::test]
async fn reopening_keeps_data_and_schema_version() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.db");
    {
        let store = SqliteStore::open(&path, &SqliteOptions::default()).unwrap();
        store_conformance::starting_is_idempotent(&store).await;
    }
    let store = SqliteStore::open(&path, &SqliteOptions::default()).unwrap();
    use phasm::store::Store;
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
