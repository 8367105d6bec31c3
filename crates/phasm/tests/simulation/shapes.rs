//! The machines a seed runs, drawn from the seed, and the actions they bind.
//!
//! - `Pager` pages through `0..n` with a continuation, forks a branch per item, works each
//!   (failing now and then, running past its lease now and then, spawning a `Child` for
//!   every seventh item), gathers the branches in a window or barrier fan-in and totals them
//!   in a barrier.
//! - `Line` is a chain of 2 to 6 steps; one of them may wait for the event `poke` with a
//!   timeout whose event `late` leads on the same way, so events race timeouts.
//! - A schedule may start a `Line` every second.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use phasm::action::{Action, ActionContext, ActionResult, Registry};
use phasm::engine::Context;
use serde_json::json;

use crate::common;

/// A `Line` step that waits for `poke`, or for its timeout's `late`.
#[derive(Debug, Clone, Copy)]
pub struct WaitAt {
    /// Its position in the line (never the first or the last).
    pub at: usize,
    /// The wait's timeout.
    pub timeout: Duration,
}

/// The shape of a seed's machines.
#[derive(Debug, Clone)]
pub struct Shape {
    /// Items `Pager` pages through.
    pub n: u64,
    /// Items per page.
    pub page: u64,
    /// `fan_in:` of the gathering state: `0`, `1` (a window) or `all` (a barrier).
    pub gather: &'static str,
    /// States of `Line`.
    pub line: usize,
    /// Its waiting state, if any.
    pub wait: Option<WaitAt>,
    /// A schedule starts a `Line` every second.
    pub schedule: bool,
}

impl Shape {
    /// A shape drawn from `rng`.
    pub fn draw(rng: &mut fastrand::Rng) -> Self {
        let line = rng.usize(2..=6);
        let wait = (line >= 3 && rng.bool()).then(|| WaitAt {
            at: rng.usize(1..line - 1),
            timeout: Duration::from_millis(rng.u64(1..=300)),
        });
        Self {
            n: rng.u64(1..=40),
            page: rng.u64(1..=8),
            gather: ["0", "1", "all"][rng.usize(..3)],
            line,
            wait,
            schedule: rng.u8(..4) == 0,
        }
    }

    /// The `Line` state at `i`.
    pub fn line_state(i: usize) -> String {
        format!("l{i}")
    }

    /// The configuration file of this shape.
    pub fn yaml(&self) -> String {
        let retry =
            "  task_retry_limit: 1000\n  min_backoff_seconds: 10ms\n  max_backoff_seconds: 50ms\n";
        let mut y = String::new();
        if self.schedule {
            y.push_str("schedules:\n- name: tick\n  machine: Line\n  every: 1s\n");
        }
        y.push_str("state_machines:\n");
        y.push_str("- name: Pager\n");
        y.push_str(retry);
        y.push_str(&format!(
            "  states:
  - name: read
    initial: true
    continuation: true
    action: Page
    transitions:
    - event: split
      to: split
  - name: split
    action: Split
    transitions:
    - event: work
      to: work
      countdown: {{minimum: 0ms, maximum: 40ms}}
  - name: work
    action: Work
    transitions:
    - event: join
      to: gather
  - name: gather
    fan_in: {}
    action: Gather
    transitions:
    - event: done
      to: total
  - name: total
    fan_in: all
    action: Total
    final: true
",
            self.gather
        ));
        y.push_str("- name: Child\n");
        y.push_str(retry);
        y.push_str(
            "  states:\n  - name: only\n    initial: true\n    final: true\n    action: Chore\n",
        );
        y.push_str("- name: Line\n");
        y.push_str(retry);
        y.push_str("  states:\n");
        for i in 0..self.line {
            let name = Self::line_state(i);
            let next = Self::line_state(i + 1);
            y.push_str(&format!("  - name: {name}\n"));
            if i == 0 {
                y.push_str("    initial: true\n");
            }
            if i + 1 == self.line {
                y.push_str("    final: true\n    action: End\n");
            } else if let Some(w) = self.wait.filter(|w| w.at == i) {
                y.push_str(&format!(
                    "    wait: {{timeout: {}ms, timeout_event: late}}\n    transitions:\n    - event: poke\n      to: {next}\n    - event: late\n      to: {next}\n",
                    w.timeout.as_millis()
                ));
            } else {
                y.push_str(&format!(
                    "    action: Step\n    transitions:\n    - event: next\n      to: {next}\n"
                ));
            }
        }
        y
    }
}

/// How often actions fail and run long.
#[derive(Debug, Clone, Copy)]
pub struct Trouble {
    /// Chance an attempt fails.
    pub fail: f64,
    /// Chance an attempt runs past its lease.
    pub slow: f64,
}

/// The actions, their randomness from `seed`.
pub fn registry(shape: &Shape, trouble: Trouble, seed: u64) -> Registry {
    let mut r = common::paging::registry(shape.page);
    let rng = Arc::new(Mutex::new(fastrand::Rng::with_seed(seed)));
    let act = |then: Then| Act {
        rng: Arc::clone(&rng),
        trouble,
        then,
    };
    r.register("Work", act(Then::Join));
    r.register("Chore", act(Then::End));
    r.register("Step", act(Then::Next));
    r.register("End", act(Then::End));
    r
}

/// What an action does when it does not fail.
#[derive(Debug, Clone, Copy)]
enum Then {
    /// Dispatch `join`, and for every seventh item start a `Child` after a random countdown.
    Join,
    /// Dispatch `next`.
    Next,
    /// Dispatch nothing (a final state).
    End,
}

/// An action that fails now and then and now and then runs longer than a lease.
struct Act {
    rng: Arc<Mutex<fastrand::Rng>>,
    trouble: Trouble,
    then: Then,
}

#[async_trait]
impl Action for Act {
    async fn run(&self, cx: &mut ActionContext) -> ActionResult {
        let (fail, slow, delay) = {
            let mut rng = self.rng.lock().unwrap();
            (
                rng.f64() < self.trouble.fail,
                rng.f64() < self.trouble.slow,
                rng.u64(0..=30),
            )
        };
        if slow {
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
        if fail {
            return Err("a passing fault".into());
        }
        match self.then {
            Then::End => Ok(None),
            Then::Next => Ok(Some("next".into())),
            Then::Join => {
                let ids: Vec<u64> = cx.get("ids")?.unwrap_or_default();
                if ids.first().is_some_and(|id| id % 7 == 0) {
                    let mut child = Context::new();
                    child.insert("ids".into(), json!(ids));
                    cx.spawn_after("Child", vec![child], Duration::from_millis(delay));
                }
                Ok(Some("join".into()))
            }
        }
    }
}
