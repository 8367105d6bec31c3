//! Immediate mode: run an instance to its end inside a test, deterministically, with a fake
//! clock — countdowns, retries and backoffs take no real time.
//!
//! ```
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! use phasm::action::Registry;
//! use phasm::config::{load_str, LoadOptions};
//! use phasm::testing::Immediate;
//!
//! let yaml = "
//! state_machines:
//! - name: Reminder
//!   states:
//!   - name: wait
//!     initial: true
//!     action: Wait
//!     transitions:
//!     - event: later
//!       to: remind
//!       countdown: 30d
//!   - name: remind
//!     final: true
//!     action: Remind
//! ";
//! let config = load_str(yaml, "reminder.yaml", &LoadOptions::default()).unwrap().config;
//! let mut registry = Registry::new();
//! registry.register_fn("Wait", |_| Ok(Some("later".into())));
//! registry.register_fn("Remind", |cx| { cx.put("sent", true)?; Ok(None) });
//! let run = Immediate::new(config, registry).unwrap();
//! let done = run.run("Reminder", Default::default()).await.unwrap();
//! assert_eq!(done.status, phasm::store::InstanceStatus::Completed);
//! assert_eq!(done.current_context.unwrap()["sent"], true);
//! # });
//! ```

mod faults;

pub use faults::{FaultCounts, Faults, FaultyStore};

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::action::Registry;
use crate::clock::{Clock, ManualClock};
use crate::control::{start_instance, StartError};
use crate::engine::{Context, Limits};
use crate::machine::Config;
use crate::store::{ClaimRequest, InstanceView, SqliteOptions, SqliteStore, Store, StoreError};
use crate::worker::{check_bindings, run_task, StepEnv, WorkerError};

/// The fake clock's starting time: 2030-01-01T00:00:00Z.
pub const START_TIME: i64 = 1_893_456_000_000_000;

/// Runs instances to their end in memory, one step at a time, jumping the clock to the next
/// due task when nothing is due.
pub struct Immediate {
    config: Config,
    registry: Registry,
    store: Arc<dyn Store>,
    clock: ManualClock,
    limits: Limits,
    rng: Mutex<fastrand::Rng>,
    max_steps: usize,
    chaos: Option<Mutex<(fastrand::Rng, f64)>>,
}

/// Why an immediate run stopped short.
#[derive(Debug, thiserror::Error)]
pub enum ImmediateError {
    /// The instance could not be started.
    #[error(transparent)]
    Start(#[from] StartError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// More steps than allowed ran: the machine probably loops forever.
    #[error("stopped after {0} steps; does the machine loop forever? (raise the limit with `max_steps`)")]
    TooManySteps(usize),
}

impl Immediate {
    /// An immediate runner for a configuration and its Rust actions (and `exec` bindings),
    /// on an in-memory SQLite store.
    ///
    /// # Errors
    /// When an action name is bound to nothing, or the in-memory store cannot open.
    pub fn new(config: Config, registry: Registry) -> Result<Self, WorkerError> {
        let store = SqliteStore::open(":memory:", &SqliteOptions::default())?;
        Self::with_store(config, registry, Arc::new(store))
    }

    /// An immediate runner on a store of the caller's (an empty PostgreSQL schema, say), so
    /// that a machine's behaviour can be checked on every backend.
    ///
    /// # Errors
    /// When an action name is bound to nothing.
    pub fn with_store(
        config: Config,
        mut registry: Registry,
        store: Arc<dyn Store>,
    ) -> Result<Self, WorkerError> {
        registry.bind_config(&config);
        check_bindings(&config, &registry)?;
        Ok(Self {
            config,
            registry,
            store,
            clock: ManualClock::new(START_TIME),
            limits: Limits::default(),
            rng: Mutex::new(fastrand::Rng::with_seed(0)),
            max_steps: 100_000,
            chaos: None,
        })
    }

    /// An immediate runner whose Python actions (a `python:` section) run in real action
    /// hosts, started here; events written as Python constants are resolved first.
    ///
    /// # Errors
    /// As [`Immediate::new`], and when the Python actions cannot be resolved.
    pub async fn with_hosts(
        loaded: crate::config::Loaded,
        mut registry: Registry,
    ) -> Result<Self, WorkerError> {
        let mut config = loaded.config;
        registry.bind_config(&config);
        crate::action::python::start(&mut config, &loaded.sites, &mut registry).await?;
        Self::new(config, registry)
    }

    /// Simulate crashes: after a step's actions ran, with probability `crash_rate` its
    /// commit is dropped (as if the worker died just before committing) and the clock jumps
    /// past the lease, so the step runs again. Deterministic for a seed. For testing that
    /// machines (and phasm) lose nothing and commit nothing twice.
    pub fn with_crashes(mut self, seed: u64, crash_rate: f64) -> Self {
        self.chaos = Some(Mutex::new((fastrand::Rng::with_seed(seed), crash_rate)));
        self
    }

    /// Allow at most this many steps per run (default 100 000).
    pub fn max_steps(mut self, steps: usize) -> Self {
        self.max_steps = steps;
        self
    }

    /// The registry (its host pool, for instance).
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The fake clock (to read, or to move forward between runs).
    pub fn clock(&self) -> &ManualClock {
        &self.clock
    }

    /// The store, to inspect history and logs after a run.
    pub fn store(&self) -> &dyn Store {
        &*self.store
    }

    /// Start an instance of `machine` and run it, and everything else pending, to the end.
    /// Unlike [`ReadStore::instance`](crate::store::ReadStore::instance), the view carries the instance's whole history, for tests to
    /// assert on.
    ///
    /// # Errors
    /// See [`ImmediateError`].
    pub async fn run(
        &self,
        machine: &str,
        context: Context,
    ) -> Result<InstanceView, ImmediateError> {
        let started = start_instance(
            &*self.store,
            &self.config,
            &self.clock,
            machine,
            context,
            None,
            &self.limits,
        )
        .await?;
        self.run_pending().await?;
        let mut view = self
            .store
            .instance(started.name())
            .await?
            .ok_or_else(|| StoreError::Corrupt("the instance vanished".into()))?;
        if view.history_total > view.history.len() as u64 {
            let mut history = Vec::new();
            crate::store::for_each_transition(&*self.store, &view.name, |h| {
                history.push(h.clone());
            })
            .await?;
            view.history = history;
        }
        Ok(view)
    }

    /// Run every pending task until none is left.
    ///
    /// # Errors
    /// See [`ImmediateError`].
    pub async fn run_pending(&self) -> Result<usize, ImmediateError> {
        let clock: Arc<dyn Clock> = Arc::new(self.clock.clone());
        let env = StepEnv {
            store: &*self.store,
            successors: None,
            adopt: None,
            action_timeout: Duration::from_secs(300),
            config: &self.config,
            spawnable: &self.config,
            registry: &self.registry,
            clock: &clock,
            limits: &self.limits,
            rng: &self.rng,
        };
        let lease = Duration::from_secs(60);
        let request = ClaimRequest {
            owner: "immediate".into(),
            lease,
            limit: 1,
            queue_limits: Vec::new(),
            queues: None,
            targets: crate::store::Targets::Any,
            shared_limits: Vec::new(),
        };
        let mut steps = 0;
        loop {
            let now = self.clock.now();
            if let Some(task) = self.store.claim(now, &request).await?.pop() {
                steps += 1;
                if steps > self.max_steps {
                    return Err(ImmediateError::TooManySteps(self.max_steps));
                }
                let commit = run_task(&env, &task, now).await;
                let crashed = self.chaos.as_ref().is_some_and(|chaos| {
                    let mut chaos = chaos
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    let rate = chaos.1;
                    chaos.0.f64() < rate
                });
                if crashed {
                    self.clock.advance(lease + Duration::from_secs(1));
                } else {
                    self.store
                        .apply(self.clock.now(), commit.into(), None)
                        .await?;
                }
                continue;
            }
            match self.store.next_due().await? {
                Some(due) if due > now => self.clock.advance_to(due),
                Some(_) => {}
                None => return Ok(steps),
            }
        }
    }
}
