//! phasm: a durable finite-state-machine workflow engine that speaks Fantasm's `fsm.yaml`.
//!
//! This crate is the library behind the `phasm` command. Its modules, floor by floor from
//! the ground up (a module uses only modules on its floor or below):
//!
//! 1. **Ground** — plain values every layer names, naming nothing of phasm:
//!    [`clock`] (time as microseconds, the clocks), [`context`] (an instance's data),
//!    [`duration`] (durations as files write them), [`token`] (wait tokens), and
//!    [`diagnostic`] (located problems and their rendering).
//! 2. **Model** — [`schedule`] (instances started on a clock) and [`machine`] (machines,
//!    states, transitions, queues, bindings: plain data, no IO).
//! 3. **Reading** — [`config`]: YAML files → the model, with complete, located validation,
//!    as a pipeline (`yaml` → `read` → `build` → `check`); [`graph`] draws a machine.
//! 4. **The step** — [`engine`]: the deterministic step of an instance, from a claimed task
//!    and what its actions produced to the [`engine::Commit`] of its effects, as data.
//! 5. **IO boundary** — [`store`]: one trait for durable state, with the commit plan
//!    (`store::plan`), its one executor (`store::execute`) and claim planner
//!    (`store::claim`), the SQLite and PostgreSQL backends holding only their SQL, and the
//!    conformance suite; [`action`]: the handler API and its bindings (Rust, Python hosts,
//!    programs, webhooks).
//! 6. **Runtime** — [`worker`]: claims, runs and commits steps, with leases, limits and
//!    schedules.
//! 7. **Operations** — [`control`]: what the CLI, the API and the console do to instances
//!    (start, send, reset, retry, cancel, upgrade, list), each written once; [`testing`]:
//!    machines run in tests, with fault injection and a paused clock.
//! 8. **Faces** — `server`: the HTTP API and router, and inside it `server::console`, the
//!    web pages it serves (built on the API's state and checks), behind the `server`
//!    feature.
//!
//! ```
//! use phasm::config::{load_str, LoadOptions};
//!
//! let yaml = "
//! state_machines:
//! - name: Hello
//!   states:
//!   - name: greet
//!     initial: true
//!     final: true
//!     action: SayHello
//! ";
//! let loaded = load_str(yaml, "hello.yaml", &LoadOptions::default()).expect("valid");
//! let machine = loaded.config.machine("Hello").expect("defined");
//! assert_eq!(machine.initial_state().map(|s| s.name.as_str()), Some("greet"));
//! assert!(phasm::graph::to_dot(machine).contains("\"greet\""));
//!
//! // Mistakes come back located, one diagnostic each.
//! let err = load_str("state_machines:\n- name: Bad_Name\n", "bad.yaml", &LoadOptions::default())
//!     .unwrap_err();
//! assert!(err.to_string().starts_with("bad.yaml:2:9: error: invalid machine name `Bad_Name`"));
//! ```
//!
//! ## Cargo features
//!
//! All on by default; an embedder that needs less sets `default-features = false` and picks:
//!
//! - `postgres`: the PostgreSQL store ([`store::PostgresStore`]); without it only SQLite;
//! - `server`: the HTTP API, the web console and `GET /metrics` (`server`, `server::console`);
//! - `http`: webhook actions (`http:` bindings; without it such a call fails, saying why);
//! - `conformance` (off by default): the store conformance suite, `store::conformance`.

pub mod action;
pub mod clock;
pub mod config;
pub mod context;
pub mod control;
pub mod diagnostic;
pub mod duration;
pub mod engine;
pub mod graph;
pub mod machine;
pub mod schedule;
#[cfg(feature = "server")]
pub mod server;
pub mod store;
pub mod testing;
pub mod token;
pub mod worker;
