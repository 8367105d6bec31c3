//! `phasm schedules`: each schedule of a machine file, when it last fired and fires next.

use std::path::Path;
use std::process::ExitCode;

use phasm::clock::{Clock, SystemClock};
use phasm::control::{self, ScheduleStatus};
use serde_json::json;

use super::files::load;
use super::inspect::open_db;
use crate::output::{outln, time};
use crate::{db, exit, DbArgs};

/// `phasm schedules FILE`: 0, or 2 for an invalid file, 3 when the database fails. A SQLite
/// file that does not exist yet means no schedule has fired.
pub async fn schedules(file: Option<&Path>, as_json: bool, args: &DbArgs) -> ExitCode {
    let (config, what) = if let Some(file) = file {
        match load(file) {
            Some(config) => (config, file.display().to_string()),
            None => return exit::invalid_reported(),
        }
    } else {
        let store = match open_db(args, phasm::store::Access::ReadOnly).await {
            Ok(s) => s,
            Err(code) => return code,
        };
        match control::deployed_config(&*store).await {
            Ok(d) => (d.config, "the deployed versions".to_string()),
            Err(control::DeployedError::Store(e)) => return exit::database(e),
            Err(e) => return exit::invalid(e),
        }
    };
    let now = SystemClock.now();
    let fresh = !db::is_postgres(&args.db) && !Path::new(&args.db).exists();
    let statuses = if fresh || config.schedules.is_empty() {
        control::statuses(&config, &[], now)
    } else {
        let store = match open_db(args, phasm::store::Access::ReadOnly).await {
            Ok(s) => s,
            Err(code) => return code,
        };
        match control::schedule_statuses(&*store, &config, now).await {
            Ok(s) => s,
            Err(e) => return exit::database(e),
        }
    };
    if as_json {
        let all: Vec<_> = statuses.iter().map(control::schedule_json).collect();
        outln!("{}", json!({ "schedules": all }));
        return ExitCode::SUCCESS;
    }
    if statuses.is_empty() {
        outln!("no schedules in {what}");
        return ExitCode::SUCCESS;
    }
    for s in &statuses {
        print(s);
    }
    ExitCode::SUCCESS
}

fn print(s: &ScheduleStatus) {
    outln!(
        "{}  starts {}, {}, overlap {}",
        s.name,
        s.machine,
        s.timing,
        s.overlap
    );
    let last = match (s.last_tick, &s.last_instance) {
        (None, _) => "never: a worker starts it at the first tick after it first runs".to_string(),
        (Some(tick), None) => format!("{} (first seen; nothing started yet)", time(tick)),
        (Some(tick), Some(instance)) => {
            let status = s.last_status.map_or("scrubbed", |st| st.as_str());
            format!("{}; last instance {instance} ({status})", time(tick))
        }
    };
    outln!("  last   {last}");
    let next = s.next_tick.map_or("never".to_string(), time);
    if s.overdue {
        outln!("  next   {next}; a tick has passed unfired: no worker ran then (the next worker to start fires the latest one)");
    } else {
        outln!("  next   {next}");
    }
}
