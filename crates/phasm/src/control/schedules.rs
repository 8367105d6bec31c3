//! What operators ask of schedules: when each last fired, what it started, when it fires
//! next (`phasm schedules`, `GET /api/schedules`, the console's machine list).

use serde::Serialize;

use crate::clock::{rfc3339, Micros};
use crate::machine::Config;
use crate::store::{InstanceStatus, ReadStore, ScheduleRecord, StoreError};

/// One schedule of a configuration with what the store knows of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ScheduleStatus {
    /// Its name.
    pub name: String,
    /// The machine it starts.
    pub machine: String,
    /// When it ticks, as people read it (`cron 0 3 * * * (Europe/Paris)`, `every 10m`).
    pub timing: String,
    /// `skip` or `allow`.
    pub overlap: &'static str,
    /// The last tick fired (or skipped, or at which a worker first saw the schedule);
    /// `None`: no worker has seen it yet.
    pub last_tick: Option<Micros>,
    /// The instance the last started tick started.
    pub last_instance: Option<String>,
    /// That instance's status.
    pub last_status: Option<InstanceStatus>,
    /// The next tick after now (`None`: the expression never matches again).
    pub next_tick: Option<Micros>,
    /// A tick at or before now has not fired: no worker has run since it came (a worker
    /// fires it when it starts — only the latest missed tick).
    pub overdue: bool,
}

/// The schedules of `config`, in file order, with their records from the store.
///
/// # Errors
/// When the store cannot be read.
pub async fn schedule_statuses(
    store: &dyn ReadStore,
    config: &Config,
    now: Micros,
) -> Result<Vec<ScheduleStatus>, StoreError> {
    if config.schedules.is_empty() {
        return Ok(Vec::new());
    }
    let records = store.schedules().await?;
    Ok(statuses(config, &records, now))
}

/// [`schedule_statuses`] from records already read.
pub fn statuses(config: &Config, records: &[ScheduleRecord], now: Micros) -> Vec<ScheduleStatus> {
    config
        .schedules
        .iter()
        .map(|s| {
            let record = records.iter().find(|r| r.name == s.name);
            let last_tick = record.map(|r| r.last_tick);
            ScheduleStatus {
                name: s.name.clone(),
                machine: s.machine.clone(),
                timing: s.describe(),
                overlap: s.overlap.as_str(),
                last_tick,
                last_instance: record.and_then(|r| r.last_instance.clone()),
                last_status: record.and_then(|r| r.last_status),
                next_tick: s.next_tick(now),
                overdue: matches!((last_tick, s.latest_tick(now)), (Some(last), Some(latest)) if latest > last),
            }
        })
        .collect()
}

/// A schedule's status as JSON (times as RFC 3339 text).
pub fn schedule_json(s: &ScheduleStatus) -> serde_json::Value {
    serde_json::json!({
        "name": s.name,
        "machine": s.machine,
        "timing": s.timing,
        "overlap": s.overlap,
        "last_tick": s.last_tick.map(rfc3339),
        "last_instance": s.last_instance,
        "last_status": s.last_status.map(InstanceStatus::as_str),
        "next_tick": s.next_tick.map(rfc3339),
        "overdue": s.overdue,
    })
}
