//! The work waiting in each queue, with the queue's limits (`phasm queues`, `GET
//! /api/queues`, the console's queues page).

use serde::Serialize;

use crate::clock::Micros;
use crate::machine::{Config, Machine};
use crate::store::{RecentSteps, StoreStats};

/// One queue: the steps in it now and its limits.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct QueueStatus {
    /// The queue.
    pub queue: String,
    /// Steps due now and not running.
    pub due: u64,
    /// Steps waiting for a countdown, a retry backoff or a timeout.
    pub scheduled: u64,
    /// Steps a worker holds.
    pub running: u64,
    /// How long the oldest due step has waited, in seconds.
    pub oldest_due_age_seconds: f64,
    /// `max_concurrent` from the configuration's `queues:`.
    pub max_concurrent: Option<u32>,
    /// `rate` from the configuration's `queues:`, as written (`20/1s`).
    pub rate: Option<String>,
    /// Steps committed per second lately (over the window of the [`RecentSteps`] given; none
    /// without one, or without the configuration that says which queue a step ran on).
    pub steps_per_second: Option<f64>,
}

/// Steps committed lately and when: what [`queue_statuses`] turns into each queue's rate.
#[derive(Debug, Clone, Copy)]
pub struct Throughput<'a> {
    /// The steps.
    pub recent: &'a RecentSteps,
    /// Now: the window is from `recent.window_start` to now.
    pub now: Micros,
}

/// The queue a committed step of `machine` ran on: its transition's, the start's for the
/// step into the initial state, and for a join or a final exit the queue of a transition
/// into its state.
fn queue_of<'m>(
    machine: &'m Machine,
    from: Option<&str>,
    event: &str,
    to: &str,
) -> Option<&'m str> {
    let Some(from) = from else {
        return Some(&machine.start_policy.queue);
    };
    if let Some(t) = machine.state(from).and_then(|s| s.transition(event)) {
        return Some(&t.effective.queue);
    }
    let state = if event == crate::engine::PSEUDO_FINAL {
        from
    } else {
        to
    };
    machine
        .transition_into(state)
        .map(|t| t.effective.queue.as_str())
}

/// How far back a queue's rate counts: its steps per second over the last minute.
pub const RATE_WINDOW: Micros = 60 * 1_000_000;

/// The queues now (see [`queue_statuses`]), with their rates over the last [`RATE_WINDOW`]
/// when the configuration is given, and the store's figures they came from.
///
/// # Errors
/// The store's.
pub async fn queue_report(
    store: &dyn crate::store::Store,
    config: Option<&Config>,
    now: Micros,
) -> crate::store::StoreResult<(Vec<QueueStatus>, StoreStats)> {
    let stats = store.stats(now).await?;
    let recent = match config {
        Some(_) => Some(store.recent_steps(now - RATE_WINDOW).await?),
        None => None,
    };
    let throughput = recent.as_ref().map(|recent| Throughput { recent, now });
    Ok((queue_statuses(config, &stats, throughput), stats))
}

/// Every queue that holds steps, and (given the configuration) every queue with limits or
/// steps committed lately even when empty, by name.
pub fn queue_statuses(
    config: Option<&Config>,
    stats: &StoreStats,
    throughput: Option<Throughput<'_>>,
) -> Vec<QueueStatus> {
    // Steps committed lately per queue (the configuration says which queue a step ran on).
    let mut committed: std::collections::BTreeMap<&str, u64> = Default::default();
    if let (Some(config), Some(t)) = (config, throughput) {
        for g in &t.recent.groups {
            let queue = config
                .machine(&g.machine)
                .and_then(|m| queue_of(m, g.from.as_deref(), &g.event, &g.to));
            if let Some(queue) = queue {
                *committed.entry(queue).or_default() += g.steps;
            }
        }
    }
    let seconds = throughput.map(|t| ((t.now - t.recent.window_start) as f64 / 1e6).max(1.0));
    let mut names: Vec<&str> = stats.queues.iter().map(|q| q.queue.as_str()).collect();
    if let Some(config) = config {
        names.extend(config.queues.keys().map(String::as_str));
    }
    names.extend(committed.keys());
    names.sort_unstable();
    names.dedup();
    names
        .into_iter()
        .map(|name| {
            let q = stats.queues.iter().find(|q| q.queue == name);
            let limits = config.and_then(|c| c.queues.get(name));
            QueueStatus {
                queue: name.to_string(),
                due: q.map_or(0, |q| q.due),
                scheduled: q.map_or(0, |q| q.scheduled),
                running: q.map_or(0, |q| q.running),
                oldest_due_age_seconds: q.map_or(0.0, |q| q.oldest_due_age_seconds),
                max_concurrent: limits.and_then(|l| l.max_concurrent),
                rate: limits
                    .and_then(|l| l.rate)
                    .map(|r| format!("{}/{}", r.count, crate::config::format_duration(r.per))),
                steps_per_second: seconds
                    .filter(|_| config.is_some())
                    .map(|s| committed.get(name).copied().unwrap_or(0) as f64 / s),
            }
        })
        .collect()
}
