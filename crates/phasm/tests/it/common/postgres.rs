//! A fresh PostgreSQL schema per test.
//!
//! The database is `PHASM_TEST_POSTGRES` (default `postgres://postgres@127.0.0.1:5432/test`).
//! Without a reachable server a test prints `SKIPPED` and passes — unless
//! `PHASM_REQUIRE_POSTGRES=1` (as `.ci/run` sets it), which makes it fail instead.

use phasm::store::{PostgresOptions, PostgresStore};

fn base_url() -> String {
    std::env::var("PHASM_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// A schema of one test's own, dropped by [`Schema::drop_schema`] — or, when the test
/// panicked before it got there, when this goes out of scope.
pub struct Schema {
    client: tokio_postgres::Client,
    base: String,
    name: String,
    url: String,
    dropped: bool,
}

impl Drop for Schema {
    fn drop(&mut self) {
        if !self.dropped {
            // No runtime to await on here: psql drops it.
            let _ = std::process::Command::new("psql")
                .args([
                    &self.base,
                    "-qc",
                    &format!("DROP SCHEMA IF EXISTS {} CASCADE", self.name),
                ])
                .output();
        }
    }
}

impl Schema {
    /// A fresh schema for `test`, or `None` (after saying so) when PostgreSQL is unreachable.
    pub async fn fresh(test: &str) -> Option<Self> {
        let base = base_url();
        let (client, connection) = match tokio_postgres::connect(&base, tokio_postgres::NoTls).await
        {
            Ok(c) => c,
            Err(e) => {
                assert!(!std::env::var("PHASM_REQUIRE_POSTGRES").is_ok_and(|v| v == "1"), "PostgreSQL is required (PHASM_REQUIRE_POSTGRES=1) but {base} is unreachable: {e}");
                eprintln!("SKIPPED {test}: PostgreSQL at {base} is unreachable ({e})");
                return None;
            }
        };
        tokio::spawn(connection);
        // Unique first: PostgreSQL cuts names at 63 bytes.
        let name = format!(
            "phasm_test_{}_{}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or_default(),
            test.to_lowercase().chars().take(30).collect::<String>()
        );
        client
            .batch_execute(&format!(
                "DROP SCHEMA IF EXISTS {name} CASCADE; CREATE SCHEMA {name}"
            ))
            .await
            .expect("create schema");
        let sep = if base.contains('?') { '&' } else { '?' };
        let url = format!("{base}{sep}options=-csearch_path%3D{name}");
        Some(Self {
            client,
            base,
            name,
            url,
            dropped: false,
        })
    }

    /// The URL of this schema.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// A store in this schema.
    pub async fn store(&self) -> PostgresStore {
        self.store_with(&PostgresOptions::default()).await
    }

    /// A store in this schema, opened with `options`.
    pub async fn store_with(&self, options: &PostgresOptions) -> PostgresStore {
        PostgresStore::open(&self.url, options)
            .await
            .expect("opens")
    }

    /// Every row of `table` in this schema as JSON, in the order of `order_by`.
    #[allow(dead_code)]
    pub async fn rows(&self, table: &str, order_by: &str) -> Vec<String> {
        let sql = format!(
            "SELECT row_to_json(t)::TEXT FROM {}.{table} t ORDER BY {order_by}",
            self.name
        );
        self.client
            .query(&sql, &[])
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
            .iter()
            .map(|r| r.get(0))
            .collect()
    }

    /// Run `sql` in this schema, as a test that damages the database on purpose does.
    #[allow(dead_code)]
    pub async fn execute(&self, sql: &str) {
        self.client
            .batch_execute(&format!("SET search_path TO {}; {sql}", self.name))
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    /// Drop the schema and everything in it.
    pub async fn drop_schema(mut self) {
        let dropped = self
            .client
            .batch_execute(&format!("DROP SCHEMA IF EXISTS {} CASCADE", self.name))
            .await;
        self.dropped = dropped.is_ok();
    }
}
