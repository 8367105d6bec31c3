//! The store conformance suite against PostgreSQL, each check in a schema of its own (see
//! `common/postgres.rs` for the database it uses and when it skips).

mod common;

use common::postgres::Schema;
use phasm::store::conformance;

#[tokio::test]
async fn postgres_passes_the_conformance_suite() {
    let schemas = std::sync::Mutex::new(Vec::new());
    match Schema::fresh("reachable").await {
        None => return,
        Some(schema) => schema.drop_schema().await,
    }
    conformance::run_all(|check| {
        let schemas = &schemas;
        async move {
            let schema = Schema::fresh(check).await.expect("PostgreSQL went away");
            let store = schema.store().await;
            schemas.lock().unwrap().push(schema);
            store
        }
    })
    .await;
    let schemas = std::mem::take(&mut *schemas.lock().unwrap());
    for schema in schemas {
        schema.drop_schema().await;
    }
}

#[tokio::test]
async fn postgres_errors_say_whether_they_pass() {
    use phasm::store::{PostgresOptions, PostgresStore};
    // Nothing listens on port 1: connecting fails, and may work later.
    let unreachable = PostgresStore::open(
        "postgres://postgres@127.0.0.1:1/test?connect_timeout=2",
        &PostgresOptions::default(),
    )
    .await
    .expect_err("nothing listens there");
    assert!(unreachable.is_transient(), "{unreachable}");
    assert!(std::error::Error::source(&unreachable).is_some());
    // A URL that is not one fails the same way every time.
    let bad = PostgresStore::open("postgres://[", &PostgresOptions::default())
        .await
        .expect_err("not a URL");
    assert!(!bad.is_transient(), "{bad}");
}
