//! Firing schedules: at each tick of a schedule, ask the store to fire it
//! ([`WorkStore::fire_schedule`](crate::store::WorkStore::fire_schedule)), which starts its
//! instance once however many workers ask.
//!
//! The live schedules are those of the **latest deployed version** of each machine the worker
//! runs (its own file's, for a machine never deployed). The worker reads them again every
//! [`REFRESH`]: a deploy that removes a schedule stops it, and one that changes its timing
//! moves its next tick, on every worker, whatever file each was started with.
//!
//! A worker remembers the last tick it handed to the store per schedule, so between ticks it
//! costs nothing but that periodic look at the versions: no query, only a comparison of the
//! clock with the next tick. On its first look it hands over each schedule's latest tick,
//! which registers a new schedule or fires the latest tick missed while no worker ran.

use std::collections::HashMap;

use crate::clock::{micros, Micros};
use crate::config::load_definition;
use crate::engine;
use crate::machine::Machine;
use crate::schedule::{Overlap, Schedule};
use crate::store::{Fired, NewInstance, ScheduleTick, Started};

use super::Inner;

/// How soon a tick the store could not fire is tried again.
const RETRY_AFTER: std::time::Duration = std::time::Duration::from_secs(1);

/// How often a worker reads which versions are the latest, for their schedules.
pub(crate) const REFRESH: std::time::Duration = std::time::Duration::from_secs(5);

/// One live schedule and the machine (of the version it was read from) it starts.
#[derive(Debug, Clone)]
struct Live {
    schedule: Schedule,
    machine: Machine,
}

/// The schedules of one worker and the last tick it fired of each.
pub(super) struct Firing {
    /// The live schedules of each machine, and the version they were read from (`None`:
    /// the worker's own file, the machine never deployed).
    live: HashMap<String, (Option<u32>, Vec<Live>)>,
    /// The last tick handed to the store, by schedule name.
    fired: HashMap<String, Micros>,
    /// When to look again (`None`: schedules are off).
    next: Option<Micros>,
    /// When to read the latest versions again.
    refresh_at: Micros,
}

impl Firing {
    /// Nothing read or fired yet: the first look is at once.
    pub(super) fn new(inner: &Inner) -> Self {
        Self {
            live: HashMap::new(),
            fired: HashMap::new(),
            next: inner.options.schedules.then_some(Micros::MIN),
            refresh_at: Micros::MIN,
        }
    }

    /// When a tick is due next, or the versions are read again.
    pub(super) fn next_at(&self) -> Option<Micros> {
        self.next
    }

    /// Read the latest versions' schedules when it is time, then fire every schedule whose
    /// latest tick this worker has not handed to the store yet.
    pub(super) async fn fire_due(&mut self, inner: &Inner, now: Micros) {
        if self.next.is_none_or(|next| now < next) {
            return;
        }
        if now >= self.refresh_at {
            self.refresh(inner).await;
            self.refresh_at = now + micros(REFRESH);
        }
        let mut next: Option<Micros> = Some(self.refresh_at);
        let mut soonest = |t: Micros| next = Some(next.map_or(t, |n| n.min(t)));
        let live: Vec<Live> = self
            .live
            .values()
            .flat_map(|(_, l)| l.iter().cloned())
            .collect();
        for Live { schedule, machine } in &live {
            if let Some(tick) = schedule.latest_tick(now) {
                if self
                    .fired
                    .get(&schedule.name)
                    .is_none_or(|fired| *fired < tick)
                {
                    if fire(inner, schedule, machine, tick, now).await {
                        self.fired.insert(schedule.name.clone(), tick);
                    } else {
                        soonest(now + micros(RETRY_AFTER));
                    }
                }
            }
            if let Some(t) = schedule.next_tick(now) {
                soonest(t);
            }
        }
        self.next = next;
    }

    /// Take each machine's schedules from its latest deployed version (when that changed
    /// since the last look), or from the worker's own file for a machine never deployed. A
    /// store that fails keeps the schedules as they were.
    async fn refresh(&mut self, inner: &Inner) {
        let records = match inner.store.versions(None).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "reading the deployed versions for their schedules failed; keeping the schedules as they were");
                return;
            }
        };
        let mut latest: HashMap<&str, &crate::store::VersionRecord> = HashMap::new();
        for r in &records {
            latest.insert(r.machine.as_str(), r);
        }
        for name in &inner.machines {
            let Some(record) = latest.get(name.as_str()) else {
                if !self.live.contains_key(name) {
                    let own = own_schedules(inner, name);
                    self.live.insert(name.clone(), (None, own));
                }
                continue;
            };
            let version = Some(record.version);
            if self.live.get(name).is_some_and(|(v, _)| *v == version) {
                continue;
            }
            let schedules = if inner.versions.is_own(name, &record.hash) {
                own_schedules(inner, name)
            } else {
                match stored_schedules(inner, name, record.version).await {
                    Some(s) => s,
                    None => continue,
                }
            };
            let was = self.live.insert(name.clone(), (version, schedules));
            if was.is_some_and(|(v, _)| v != version) {
                tracing::info!(machine = %name, version = record.version, "schedules now those of the latest version");
            }
        }
    }
}

/// The schedules of `machine` in the worker's own configuration.
fn own_schedules(inner: &Inner, machine: &str) -> Vec<Live> {
    let Some(m) = inner.config.machine(machine) else {
        return Vec::new();
    };
    inner
        .config
        .schedules
        .iter()
        .filter(|s| s.machine == machine)
        .map(|s| Live {
            schedule: s.clone(),
            machine: m.clone(),
        })
        .collect()
}

/// The schedules of version `version` of `machine`, as stored; `None` when it cannot be read
/// now (said in the log; the schedules stay as they were).
async fn stored_schedules(inner: &Inner, machine: &str, version: u32) -> Option<Vec<Live>> {
    let stored = match inner.store.version(machine, version).await {
        Ok(Some(stored)) => stored,
        Ok(None) => return Some(Vec::new()),
        Err(e) => {
            tracing::warn!(machine, version, error = %e, "reading a version's schedules failed");
            return None;
        }
    };
    let loaded = match load_definition(machine, version, &stored.definition, &stored.record.path) {
        Ok(loaded) => loaded,
        Err(e) => {
            tracing::warn!("{e}; its schedules are not fired by this worker");
            return None;
        }
    };
    let m = loaded.config.machine(machine)?.clone();
    Some(
        loaded
            .config
            .schedules
            .into_iter()
            .filter(|s| s.machine == machine)
            .map(|schedule| Live {
                schedule,
                machine: m.clone(),
            })
            .collect(),
    )
}

/// Hand `schedule`'s tick to the store; `false` when the store failed (try again soon).
async fn fire(
    inner: &Inner,
    schedule: &Schedule,
    machine: &Machine,
    tick: Micros,
    now: Micros,
) -> bool {
    let name = schedule.instance_name(tick);
    let request = ScheduleTick {
        schedule: schedule.name.clone(),
        tick,
        skip_if_running: schedule.overlap == Overlap::Skip,
        instance: NewInstance {
            name: name.clone(),
            machine: machine.name.clone(),
            context: schedule.context.clone(),
            start: engine::start_task(machine, &name, schedule.context.clone(), now),
            version: None,
        },
    };
    let outcome = match inner.store.fire_schedule(now, &request).await {
        Ok(fired) => fired,
        Err(e) => {
            tracing::warn!(schedule = %schedule.name, error = %e, "firing a schedule failed; trying again");
            return false;
        }
    };
    let label = match &outcome {
        Fired::Registered => "registered",
        Fired::Started(Started::Created) => "started",
        Fired::Started(Started::Existing { .. }) | Fired::AlreadyFired => "already_fired",
        Fired::Skipped { .. } => "skipped",
    };
    match outcome {
        Fired::Started(Started::Created) => {
            tracing::info!(schedule = %schedule.name, instance = %name, "schedule fired");
        }
        Fired::Skipped { running } => {
            tracing::info!(schedule = %schedule.name, %running, "schedule tick skipped: its last instance still runs");
        }
        _ => {}
    }
    metrics::counter!("phasm_schedule_ticks_total", "schedule" => schedule.name.clone(), "outcome" => label)
        .increment(1);
    true
}
