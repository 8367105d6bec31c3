//! phasm: a durable finite-state-machine workflow engine that speaks Fantasm's `fsm.yaml`.
//!
//! This crate is the library behind the `phasm` command. Its layers, from pure to IO:
//!
//! - [`machine`]: the model of machines, states and transitions (plain data, no IO);
//! - [`config`]: YAML files → the model, with complete, located validation;
//! - [`diagnostic`]: located problems and their compiler-style rendering;
//! - [`graph`]: drawings of a machine (DOT, Mermaid, SVG).

pub mod config;
pub mod diagnostic;
pub mod graph;
pub mod machine;
