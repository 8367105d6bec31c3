//! Time as the engine sees it: integer microseconds since the Unix epoch, from a clock that
//! tests can replace, so countdowns and timeouts are tested without sleeping.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Microseconds since the Unix epoch (the unit of every stored timestamp).
pub type Micros = i64;

/// Convert a duration to microseconds, saturating.
pub fn micros(d: Duration) -> Micros {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

/// A source of the current time.
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// The current time.
    fn now(&self) -> Micros;
}

/// The system's wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Micros {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, micros)
    }
}

/// A clock that only moves when told to: for deterministic tests and immediate mode.
#[derive(Debug, Clone, Default)]
pub struct ManualClock(Arc<AtomicI64>);

impl ManualClock {
    /// A clock standing at `start`.
    pub fn new(start: Micros) -> Self {
        Self(Arc::new(AtomicI64::new(start)))
    }

    /// Move the clock forward (never backward) to `to`.
    pub fn advance_to(&self, to: Micros) {
        self.0.fetch_max(to, Ordering::SeqCst);
    }

    /// Move the clock forward by `by`.
    pub fn advance(&self, by: Duration) {
        self.0.fetch_add(micros(by), Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Micros {
        self.0.load(Ordering::SeqCst)
    }
}

/// Time as tokio's clock tells it, from `start`: simulated when the runtime's time is paused
/// (`tokio::time::pause`, or a runtime built with `start_paused`), where it jumps to the next
/// timer whenever every task waits. A worker on this clock sleeps, times out and renews
/// leases in no real time, in an order that replays exactly.
#[derive(Debug, Clone, Copy)]
pub struct TokioClock {
    start: Micros,
    origin: tokio::time::Instant,
}

impl TokioClock {
    /// A clock standing at `start` now (call it inside the runtime whose clock it follows).
    pub fn new(start: Micros) -> Self {
        Self {
            start,
            origin: tokio::time::Instant::now(),
        }
    }
}

impl Clock for TokioClock {
    fn now(&self) -> Micros {
        self.start + micros(self.origin.elapsed())
    }
}

/// Format a timestamp as RFC 3339 UTC with millisecond precision.
pub fn rfc3339(at: Micros) -> String {
    chrono::DateTime::from_timestamp_micros(at).map_or_else(
        || at.to_string(),
        |t| t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string(),
    )
}
