//! One module per group of commands.

pub mod bench;
pub mod bench_versions;
pub mod files;
pub mod inspect;
pub mod run;
pub mod schedules;
pub mod send;
pub mod versions;

use clap::ValueEnum;

/// `--sync`: SQLite durability.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum SyncMode {
    /// fsync every commit.
    Full,
    /// fsync at checkpoints.
    Normal,
    /// never fsync.
    Off,
}

/// Parse `30s`, `5m`, `500ms` or plain seconds.
pub fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    phasm::config::parse_duration(text)
}
