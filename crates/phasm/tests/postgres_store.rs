//! The store conformance suite against PostgreSQL, each check in a schema of its own.
//!
//! The database is `PHASM_TEST_POSTGRES` (default `postgres://postgres@127.0.0.1:5432/test`).
//! Without a reachable server the checks print `SKIPPED` and pass — unless
//! `PHASM_REQUIRE_POSTGRES=1` (as `.ci/run` sets it), which makes them fail instead.

use phasm::store::conformance;
use phasm::store::{PostgresOptions, PostgresStore};

fn base_url() -> String {
    std::env::var("PHASM_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// A store in a fresh schema (dropped when the guard goes), or `None` (after saying so) when
/// PostgreSQL is unreachable.
async fn fresh(test: &str) -> Option<(PostgresStore, Cleanup)> {
    let base = base_url();
    let (client, connection) = match tokio_postgres::connect(&base, tokio_postgres::NoTls).await {
        Ok(c) => c,
        Err(e) => {
            if std::env::var("PHASM_REQUIRE_POSTGRES").is_ok_and(|v| v == "1") {
                panic!("PostgreSQL is required (PHASM_REQUIRE_POSTGRES=1) but {base} is unreachable: {e}");
            }
            eprintln!("SKIPPED {test}: PostgreSQL at {base} is unreachable ({e})");
            return None;
        }
    };
    tokio::spawn(connection);
    let schema = format!(
        "phasm_test_{}_{}",
        test,
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default()
    );
    client
        .batch_execute(&format!(
            "DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema}"
        ))
        .await
        .expect("create schema");
    let sep = if base.contains('?') { '&' } else { '?' };
    let url = format!("{base}{sep}options=-csearch_path%3D{schema}");
    let store = PostgresStore::open(&url, &PostgresOptions::default())
        .await
        .expect("opens");
    Some((store, Cleanup { client, schema }))
}

/// Drops a test's schema.
struct Cleanup {
    client: tokio_postgres::Client,
    schema: String,
}

impl Cleanup {
    async fn run(self) {
        let _ = self
            .client
            .batch_execute(&format!("DROP SCHEMA IF EXISTS {} CASCADE", self.schema))
            .await;
    }
}

#[tokio::test]
async fn postgres_passes_the_conformance_suite() {
    // Each check in a schema of its own, all dropped at the end.
    let cleanups = std::sync::Mutex::new(Vec::new());
    match fresh("reachable").await {
        None => return,
        Some((store, cleanup)) => {
            drop(store);
            cleanup.run().await;
        }
    }
    conformance::run_all(|check| {
        let cleanups = &cleanups;
        async move {
            let (store, cleanup) = fresh(check).await.expect("PostgreSQL went away");
            cleanups.lock().unwrap().push(cleanup);
            store
        }
    })
    .await;
    let cleanups = std::mem::take(&mut *cleanups.lock().unwrap());
    for cleanup in cleanups {
        cleanup.run().await;
    }
}
