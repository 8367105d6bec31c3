//! phasm: a durable finite-state-machine workflow engine that speaks Fantasm's `fsm.yaml`.
//!
//! This crate is the library behind the `phasm` command. Its layers, from pure to IO:
//!
//! - [`machine`]: the model of machines, states and transitions (plain data, no IO);
//! - [`config`]: YAML files → the model, with complete, located validation;
//! - [`diagnostic`]: located problems and their compiler-style rendering;
//! - [`graph`]: drawings of a machine (DOT, Mermaid, SVG).
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
//! - `server`: the HTTP API, the web console and `GET /metrics` (`server`, `console`);
//! - `http`: webhook actions (`http:` bindings; without it such a call fails, saying why);
//! - `conformance` (off by default): the store conformance suite, `store::conformance`.

pub mod action;
pub mod clock;
pub mod config;
#[cfg(feature = "server")]
pub mod console;
pub mod control;
pub mod diagnostic;
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
