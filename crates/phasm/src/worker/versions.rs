//! The machine versions a worker runs steps on.
//!
//! Each instance is pinned to the version of its machine it started on
//! ([`Task::version`]); every step of it runs on that version's states, transitions, retry
//! policies, countdowns, waits and fan-ins, and on its `actions:` bindings and `python:`
//! section. Rust handlers are the worker's own: they are the user's deploy.
//!
//! A worker meets a version the first time it claims one of its tasks. A version whose
//! definition is the one the worker's own file deploys (same content hash) runs on the
//! worker's own configuration and registry: the steady state costs one map lookup per step.
//! Any other version is read from the store once, loaded, bound (its exec and http bindings,
//! a Python host pool of its own when it has a `python:` section) and kept until the worker
//! stops. A version this worker cannot run — an action bound to nothing here, a Python path
//! that does not exist on this host, a definition this phasm cannot read — is kept as
//! [`Pinned::Unavailable`]: its steps are postponed without using up an attempt, for a worker
//! that can run them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::OnceCell;

use crate::action::host::HostPool;
use crate::action::Registry;
use crate::config::load_definition;
use crate::engine::Task;
use crate::machine::Config;
use crate::store::{Store, StoreError, StoredVersion};

use super::lock;

/// What a worker runs a pinned step on.
#[derive(Debug)]
pub(crate) enum Pinned {
    /// The version's machine (in `config`) and the actions it calls.
    Run {
        config: Arc<Config>,
        registry: Arc<Registry>,
    },
    /// This worker cannot run the version; why, for the step's record.
    Unavailable(String),
}

/// The versions a worker has met, by store id (see the module doc).
pub(crate) struct Versions {
    /// The worker's own configuration and registry.
    own: Arc<Pinned>,
    /// The definition hash of each machine of the worker's own configuration.
    own_hashes: HashMap<String, String>,
    /// Every version met, loaded once (concurrent steps of a new version wait for one load).
    met: Mutex<HashMap<i64, Arc<OnceCell<Arc<Pinned>>>>>,
    /// Host pools started for versions other than the worker's own, closed when it stops.
    pools: Mutex<Vec<Arc<HostPool>>>,
}

impl Versions {
    /// The versions of a worker running `config` with `registry`, whose machines' deployed
    /// definitions have `own_hashes` (machine → hash).
    pub(crate) fn new(
        config: Arc<Config>,
        registry: Arc<Registry>,
        own_hashes: HashMap<String, String>,
    ) -> Self {
        Self {
            own: Arc::new(Pinned::Run { config, registry }),
            own_hashes,
            met: Mutex::new(HashMap::new()),
            pools: Mutex::new(Vec::new()),
        }
    }

    /// What `task` runs on. A store failure while reading a version the worker has not met
    /// yet is returned (nothing is kept: the next step of that version reads it again).
    pub(crate) async fn of(
        &self,
        store: &dyn Store,
        task: &Task,
    ) -> Result<Arc<Pinned>, StoreError> {
        let Some(id) = task.version else {
            // Started before its machine was ever deployed (and not adopted since).
            return Ok(Arc::clone(&self.own));
        };
        let cell = Arc::clone(lock(&self.met).entry(id).or_default());
        cell.get_or_try_init(|| self.load(store, id, &task.machine))
            .await
            .cloned()
    }

    /// Read version `id` of `machine` and make it runnable.
    async fn load(
        &self,
        store: &dyn Store,
        id: i64,
        machine: &str,
    ) -> Result<Arc<Pinned>, StoreError> {
        let Some(stored) = store.version_by_id(id).await? else {
            return Ok(Arc::new(Pinned::Unavailable(format!(
                "the version of machine `{machine}` this instance started on (id {id}) is not in \
                 the database"
            ))));
        };
        if self.own_hashes.get(machine) == Some(&stored.record.hash) {
            return Ok(Arc::clone(&self.own));
        }
        let pinned = self.bind(&stored).await;
        if let Pinned::Unavailable(reason) = &pinned {
            tracing::warn!(machine, version = stored.record.version, "{reason}");
        } else {
            tracing::info!(
                machine,
                version = stored.record.version,
                "running steps of an older or newer version than this worker's file"
            );
        }
        Ok(Arc::new(pinned))
    }

    /// Load a stored version's definition and bind its actions: the worker's Rust handlers,
    /// the version's own exec and http bindings, and hosts for its Python actions.
    async fn bind(&self, stored: &StoredVersion) -> Pinned {
        let record = &stored.record;
        let which = format!("`{}` v{}", record.machine, record.version);
        let loaded = match load_definition(
            &record.machine,
            record.version,
            &stored.definition,
            &record.path,
        ) {
            Ok(loaded) => loaded,
            Err(e) => return Pinned::Unavailable(e.to_string()),
        };
        let mut config = loaded.config;
        let Pinned::Run { registry: own, .. } = &*self.own else {
            return Pinned::Unavailable("the worker's own registry is missing".into());
        };
        let mut registry = own.handlers_only();
        registry.bind_config(&config);
        let pool =
            match crate::action::python::start(&mut config, &loaded.sites, &mut registry).await {
                Ok(pool) => pool,
                Err(e) => {
                    return Pinned::Unavailable(format!(
                        "this worker cannot run the Python actions of {which}: {e}"
                    ))
                }
            };
        let unavailable = match config.machine(&record.machine) {
            None => Some(format!("{which} is not in its stored definition")),
            Some(machine) => {
                let missing = registry.unbound(machine);
                (!missing.is_empty()).then(|| {
                    format!(
                        "this worker cannot run {which}: {} bound to nothing here (a worker \
                         that registers them runs these steps)",
                        missing.join("; ")
                    )
                })
            }
        };
        if let Some(reason) = unavailable {
            if let Some(pool) = pool {
                pool.close(std::time::Duration::from_secs(5)).await;
            }
            return Pinned::Unavailable(reason);
        }
        if let Some(pool) = pool {
            lock(&self.pools).push(pool);
        }
        Pinned::Run {
            config: Arc::new(config),
            registry: Arc::new(registry),
        }
    }

    /// Whether `hash` is the definition of `machine` in the worker's own configuration.
    pub(crate) fn is_own(&self, machine: &str, hash: &str) -> bool {
        self.own_hashes.get(machine).is_some_and(|h| h == hash)
    }

    /// The versions this worker met and cannot run, described.
    pub(crate) fn unavailable(&self) -> Vec<String> {
        lock(&self.met)
            .values()
            .filter_map(|cell| match cell.get().map(|p| &**p) {
                Some(Pinned::Unavailable(reason)) => Some(reason.clone()),
                _ => None,
            })
            .collect()
    }

    /// Close the host pools started for other versions (what is left after `grace` is killed).
    pub(crate) async fn close(&self, grace: std::time::Duration) {
        let pools = std::mem::take(&mut *lock(&self.pools));
        for pool in pools {
            pool.close(grace).await;
        }
    }
}
