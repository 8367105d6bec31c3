//! Firing schedules: at each tick of a schedule, ask the store to fire it
//! ([`WorkStore::fire_schedule`](crate::store::WorkStore::fire_schedule)), which starts its
//! instance once however many workers ask.
//!
//! A worker remembers the last tick it handed to the store per schedule, so between ticks it
//! costs nothing: no query, only a comparison of the clock with the next tick. On its first
//! look it hands over each schedule's latest tick, which registers a new schedule or fires
//! the latest tick missed while no worker ran.

use crate::clock::{micros, Micros};
use crate::engine;
use crate::schedule::Overlap;
use crate::store::{Fired, NewInstance, ScheduleTick, Started};

use super::Inner;

/// How soon a tick the store could not fire is tried again.
const RETRY_AFTER: std::time::Duration = std::time::Duration::from_secs(1);

/// The schedules of one worker and the last tick it fired of each.
pub(super) struct Firing {
    /// By index in the configuration's `schedules`.
    fired: Vec<Option<Micros>>,
    /// When to look again (`None`: the configuration has no schedules, or none ticks again).
    next: Option<Micros>,
}

impl Firing {
    /// Nothing fired yet: the first look is at once.
    pub(super) fn new(inner: &Inner) -> Self {
        let count = inner.config.schedules.len();
        Self {
            fired: vec![None; count],
            next: (count > 0 && inner.options.schedules).then_some(Micros::MIN),
        }
    }

    /// When a tick is due next.
    pub(super) fn next_at(&self) -> Option<Micros> {
        self.next
    }

    /// Fire every schedule whose latest tick this worker has not handed to the store yet,
    /// if one is due.
    pub(super) async fn fire_due(&mut self, inner: &Inner, now: Micros) {
        if self.next.is_none_or(|next| now < next) {
            return;
        }
        let mut next: Option<Micros> = None;
        let mut soonest = |t: Micros| next = Some(next.map_or(t, |n| n.min(t)));
        for (i, schedule) in inner.config.schedules.iter().enumerate() {
            if let Some(tick) = schedule.latest_tick(now) {
                if self.fired[i].is_none_or(|fired| fired < tick) {
                    if fire(inner, i, tick, now).await {
                        self.fired[i] = Some(tick);
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
}

/// Hand schedule `i`'s tick to the store; `false` when the store failed (try again soon).
async fn fire(inner: &Inner, i: usize, tick: Micros, now: Micros) -> bool {
    let schedule = &inner.config.schedules[i];
    let Some(machine) = inner.config.machine(&schedule.machine) else {
        // The loader refuses such a configuration; a hand-built one is reported once.
        tracing::error!(schedule = %schedule.name, machine = %schedule.machine, "a schedule starts a machine that does not exist");
        return true;
    };
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
