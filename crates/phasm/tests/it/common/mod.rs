//! Helpers shared by the tests that watch real processes.

#![allow(dead_code, unused_imports, unused_macros)]

pub mod paging;
pub mod postgres;

/// Run each named test — an `async fn NAME(store: Arc<dyn Store>)` of the including file —
/// once on an in-memory SQLite store (`sqlite::NAME`) and once on a fresh PostgreSQL schema
/// (`postgres::NAME`), so behaviour is checked on both backends.
macro_rules! on_both_stores {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $name() {
                    let store = phasm::store::SqliteStore::open(
                        ":memory:",
                        &phasm::store::SqliteOptions::default(),
                    )
                    .expect("opens");
                    super::$name(std::sync::Arc::new(store)).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test]
                async fn $name() {
                    let Some(schema) =
                        crate::common::postgres::Schema::fresh(stringify!($name)).await
                    else {
                        return;
                    };
                    super::$name(std::sync::Arc::new(schema.store().await)).await;
                    schema.drop_schema().await;
                }
            )*
        }
    };
}

use std::time::Duration;

/// True while `pid` exists and is not a zombie.
pub fn running(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => false,
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .and_then(|rest| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
    }
}

/// Wait up to 5 s for `pid` to be gone; whether it went.
pub async fn gone(pid: u32) -> bool {
    for _ in 0..50 {
        if !running(pid) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

use std::path::Path;
use std::sync::Arc;

use phasm::action::Registry;
use phasm::clock::{Clock, SystemClock};
use phasm::config::{load_str, LoadOptions};
use phasm::control::start_instance;
use phasm::engine::{Context, Limits};
use phasm::machine::Config;
use phasm::store::{SqliteOptions, SqliteStore, Store};
use phasm::worker::{Worker, WorkerOptions};

/// What a test needs to run a worker on one instance: a machine file loaded from text (its
/// `exec` actions bound, Python hosts started if it has a `python:` section), a SQLite store
/// in the test's folder, and an instance started.
pub struct Setup {
    pub config: Arc<Config>,
    pub registry: Arc<Registry>,
    pub store: Arc<dyn Store>,
    pub clock: Arc<dyn Clock>,
    /// The started instance.
    pub name: String,
}

/// Load `yaml` as `dir/fsm.yaml`, open `dir/phasm.db` and start an instance of `machine`.
pub async fn setup(yaml: &str, dir: &Path, machine: &str, context: Context) -> Setup {
    let loaded = load_str(yaml, dir.join("fsm.yaml"), &LoadOptions::default())
        .unwrap_or_else(|e| panic!("{e}"));
    let mut config = loaded.config;
    let mut registry = Registry::new();
    registry.bind_config(&config);
    phasm::action::python::start(&mut config, &loaded.sites, &mut registry)
        .await
        .unwrap();
    let config = Arc::new(config);
    let store: Arc<dyn Store> =
        Arc::new(SqliteStore::open(dir.join("phasm.db"), &SqliteOptions::default()).unwrap());
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let name = start(&*store, &config, machine, context).await;
    Setup {
        config,
        registry: Arc::new(registry),
        store,
        clock,
        name,
    }
}

/// Start an instance of `machine` now, with a generated name; its name.
pub async fn start(store: &dyn Store, config: &Config, machine: &str, context: Context) -> String {
    start_instance(
        store,
        config,
        &SystemClock,
        machine,
        context,
        None,
        &Limits::default(),
    )
    .await
    .unwrap()
    .name()
    .to_string()
}

impl Setup {
    /// A worker on this setup's store.
    pub fn worker(&self, options: WorkerOptions) -> Worker {
        Worker::new(
            Arc::clone(&self.store),
            Arc::clone(&self.config),
            Arc::clone(&self.registry),
            Arc::clone(&self.clock),
            options,
        )
        .unwrap()
    }
}
