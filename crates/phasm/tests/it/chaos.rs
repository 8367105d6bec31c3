//! Seeded simulations: random machines that page through a list with a continuation, fork a
//! branch per item, fail and retry at random, park in fan-ins (windows or barriers), while
//! steps "crash" at random (their commits are dropped and they run again after their
//! lease). Whatever happens, every instance completes, and every item was paged once,
//! forked once and joined exactly once.

use crate::common;

use std::sync::{Arc, Mutex};

use phasm::action::Registry;
use phasm::config::{load_str, LoadOptions};
use phasm::engine::Context;
use phasm::store::{InstanceStatus, Store};
use phasm::testing::Immediate;
use serde_json::json;

fn machine(window: &str, countdown: u64) -> String {
    format!(
        r"
state_machines:
- name: Chaos
  task_retry_limit: 40
  min_backoff_seconds: 1
  max_backoff_seconds: 5
  states:
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
      countdown: {{minimum: 0, maximum: {countdown}}}
  - name: work
    action: Work
    transitions:
    - event: join
      to: gather
  - name: gather
    fan_in: {window}
    action: Gather
    transitions:
    - event: done
      to: total
  - name: total
    fan_in: all
    action: Total
    final: true
"
    )
}

fn registry(page: u64, fail_rate: f64, seed: u64) -> Registry {
    let mut r = common::paging::registry(page);
    let rng = Arc::new(Mutex::new(fastrand::Rng::with_seed(seed)));
    r.register_fn("Work", move |_| {
        if rng.lock().unwrap().f64() < fail_rate {
            return Err("a passing fault".into());
        }
        Ok(Some("join".into()))
    });
    r
}

async fn random_machines_with_crashes_join_every_branch_exactly_once(store: Arc<dyn Store>) {
    let windows = ["0", "1", "5", "all"];
    for seed in 0..200u64 {
        let mut rng = fastrand::Rng::with_seed(seed);
        let n = rng.u64(1..=60);
        let page = rng.u64(1..=10);
        let window = windows[rng.usize(..windows.len())];
        let countdown = rng.u64(0..=4);
        let crash_rate = [0.0, 0.1, 0.3][rng.usize(..3)];
        let fail_rate = [0.0, 0.2][rng.usize(..2)];
        let about = format!(
            "seed {seed}: n={n} page={page} fan_in={window} countdown<={countdown}s crashes={crash_rate} failures={fail_rate}"
        );
        let config = load_str(
            &machine(window, countdown),
            "chaos.yaml",
            &LoadOptions::default(),
        )
        .unwrap_or_else(|e| panic!("{about}: {e}"))
        .config;
        let run =
            Immediate::with_store(config, registry(page, fail_rate, seed), Arc::clone(&store))
                .unwrap()
                .with_crashes(seed, crash_rate);
        let mut start = Context::new();
        start.insert("n".into(), json!(n));
        let view = run
            .run("Chaos", start)
            .await
            .unwrap_or_else(|e| panic!("{about}: {e}"));
        assert_eq!(view.status, InstanceStatus::Completed, "{about}: {view:?}");
        let result = view.current_context.unwrap_or_default();
        let ids =
            common::paging::joined_ids(&result).unwrap_or_else(|| panic!("{about}: {result:?}"));
        assert_eq!(
            ids,
            (0..n).collect::<Vec<_>>(),
            "{about}: every item joined exactly once"
        );
        let pages = view.history.iter().filter(|h| h.to == "read").count() as u64;
        assert_eq!(
            pages,
            n.div_ceil(page),
            "{about}: every page committed once"
        );
        assert_eq!(view.branches.parked, 0, "{about}");
        assert!(view.tasks.is_empty(), "{about}");
    }
}

on_both_stores!(random_machines_with_crashes_join_every_branch_exactly_once,);
