//! Per-queue limits inside one worker: `max_concurrent` running steps and a `rate` of starts
//! (a token bucket that holds at most one period's worth of starts).

use std::collections::BTreeMap;

use crate::clock::{micros, Micros};
use crate::machine::Config;

struct Bucket {
    capacity: f64,
    tokens: f64,
    per_micro: f64,
    updated: Micros,
}

impl Bucket {
    fn refill(&mut self, now: Micros) {
        let elapsed = (now - self.updated).max(0) as f64;
        self.tokens = (self.tokens + elapsed * self.per_micro).min(self.capacity);
        self.updated = now;
    }
}

/// The limits of every configured queue and what is running on each.
pub(crate) struct QueueGate {
    concurrency: BTreeMap<String, (usize, usize)>,
    buckets: BTreeMap<String, Bucket>,
}

impl QueueGate {
    pub fn new(config: &Config) -> Self {
        let mut concurrency = BTreeMap::new();
        let mut buckets = BTreeMap::new();
        for (name, limits) in &config.queues {
            if let Some(max) = limits.max_concurrent {
                concurrency.insert(name.clone(), (max as usize, 0));
            }
            if let Some(rate) = limits.rate {
                let capacity = f64::from(rate.count);
                buckets.insert(
                    name.clone(),
                    Bucket {
                        capacity,
                        tokens: capacity,
                        per_micro: capacity / micros(rate.per).max(1) as f64,
                        updated: 0,
                    },
                );
            }
        }
        Self {
            concurrency,
            buckets,
        }
    }

    /// Per-queue claim limits for queues that have any.
    pub fn queue_limits(&mut self, now: Micros) -> Vec<(String, usize)> {
        let mut names: Vec<String> = self.concurrency.keys().cloned().collect();
        names.extend(
            self.buckets
                .keys()
                .filter(|k| !self.concurrency.contains_key(*k))
                .cloned(),
        );
        names
            .into_iter()
            .map(|q| {
                let by_concurrency = self
                    .concurrency
                    .get(&q)
                    .map_or(usize::MAX, |(max, running)| max.saturating_sub(*running));
                let by_rate = self.buckets.get_mut(&q).map_or(usize::MAX, |b| {
                    b.refill(now);
                    b.tokens.floor() as usize
                });
                let limit = by_concurrency.min(by_rate);
                (q, limit)
            })
            .collect()
    }

    /// Overall claim budget (unlimited unless every queue were limited; kept simple).
    pub fn budget(&self, _now: Micros) -> usize {
        usize::MAX
    }

    pub fn started(&mut self, queue: &str, now: Micros) {
        if let Some((_, running)) = self.concurrency.get_mut(queue) {
            *running += 1;
        }
        if let Some(b) = self.buckets.get_mut(queue) {
            b.refill(now);
            b.tokens = (b.tokens - 1.0).max(0.0);
        }
    }

    pub fn finished(&mut self, queue: &str) {
        if let Some((_, running)) = self.concurrency.get_mut(queue) {
            *running = running.saturating_sub(1);
        }
    }

    /// When an empty rate bucket next holds a whole token.
    pub fn next_refill(&self, now: Micros) -> Option<Micros> {
        self.buckets
            .values()
            .filter(|b| b.tokens < 1.0)
            .map(|b| now + ((1.0 - b.tokens) / b.per_micro).ceil() as Micros)
            .min()
    }
}
