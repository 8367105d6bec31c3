//! phasm's integration tests, gathered in one binary (each file a module) so the suite links
//! once instead of once per file. Two stay apart: `out_of_descriptors.rs` lowers the
//! process's file descriptor limit, and `simulation.rs` is run alone with many seeds.

// Tests panic on purpose when what they check does not hold: unwrap and expect are the
// assertions of setup steps here.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
mod common;

mod exec_action;
mod fantasm_files;
mod fantasm_scenarios;
mod graphs;
mod http_action;
mod immediate;
mod invalid_files;
mod lost_lease;
mod pages_overlap;
mod parallel;
mod pinned_versions;
mod postgres_store;
mod python_actions;
mod python_hosts;
mod python_package;
mod roundtrip;
mod run_sqlite;
mod server;
mod server_connections;
mod sqlite_store;
