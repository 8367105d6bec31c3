//! The `phasm` command's integration tests, gathered in one binary (each file a module) so the
//! suite links once instead of once per file. Two stay apart, since they stop or restart a
//! PostgreSQL server (a throwaway cluster of their own): `postgres_restart.rs` and
//! `postgres_stopped.rs`.

// Tests panic on purpose when what they check does not hold: unwrap and expect are the
// assertions of setup steps here.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
mod common;

mod cli;
mod console;
mod crash;
mod events;
mod failed_siblings;
mod fantasm_example;
mod postgres_workers;
mod python_workers;
mod rolling_deploy;
mod run;
mod schedules;
mod sqlite_files;
mod versions;
