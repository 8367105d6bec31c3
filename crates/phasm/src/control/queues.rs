//! The work waiting in each queue, with the queue's limits (`phasm queues`, `GET
//! /api/queues`, the console's queues page).

use serde::Serialize;

use crate::machine::Config;
use crate::store::StoreStats;

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
}

/// Every queue that holds steps, and (given the configuration) every queue with limits even
/// when empty, by name.
pub fn queue_statuses(config: Option<&Config>, stats: &StoreStats) -> Vec<QueueStatus> {
    let mut names: Vec<&str> = stats.queues.iter().map(|q| q.queue.as_str()).collect();
    if let Some(config) = config {
        names.extend(config.queues.keys().map(String::as_str));
    }
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
            }
        })
        .collect()
}
