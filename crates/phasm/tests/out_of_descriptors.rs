//! An `exec` action that cannot start because the worker is out of file descriptors is not
//! the action's failure: the step waits and runs when descriptors are free again, without
//! using up its attempts (here it has a single one).
//!
//! This file holds one test on purpose: it lowers the whole test process's descriptor limit
//! and fills it.

// Tests panic on purpose when what they check does not hold: unwrap and expect are the
// assertions of setup steps here.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "it/common/mod.rs"]
mod common;

use std::time::Duration;

use phasm::engine::Context;
use phasm::store::InstanceStatus;
use phasm::worker::{StopWhen, WorkerOptions};
use rustix::process::{getrlimit, setrlimit, Resource};

const MACHINE: &str = r#"
actions:
  Work:
    exec: [sh, -c, 'cat >/dev/null; echo "{\"event\": \"done\"}"']
state_machines:
- name: Once
  max_retries: 0
  states:
  - name: start
    initial: true
    action: Work
    transitions:
    - event: done
      to: end
  - name: end
    final: true
"#;

/// Open files until the process has no descriptor left; they are closed when dropped.
fn exhaust_descriptors() -> Vec<std::fs::File> {
    let mut limit = getrlimit(Resource::Nofile);
    limit.current = Some(256.min(limit.maximum.unwrap_or(256)));
    setrlimit(Resource::Nofile, limit).unwrap();
    let mut hoard = Vec::new();
    loop {
        match std::fs::File::open("/dev/null") {
            Ok(f) => hoard.push(f),
            Err(e) => {
                assert!(phasm::action::out_of_resources(&e), "{e}");
                return hoard;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_that_cannot_start_for_lack_of_descriptors_waits_without_using_its_attempt() {
    let dir = tempfile::tempdir().unwrap();
    let setup = common::setup(MACHINE, dir.path(), "Once", Context::new()).await;
    let (store, name) = (&setup.store, &setup.name);
    let worker = setup.worker(WorkerOptions {
        stop: StopWhen::Ended(vec![name.clone()]),
        poll_interval: Duration::from_millis(50),
        ..WorkerOptions::default()
    });

    let hoard = exhaust_descriptors();
    let worker = tokio::spawn(worker.run(std::future::pending()));
    // The step is tried, cannot start, and waits with its attempt given back.
    let mut postponed = None;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let view = store.instance(name).await.unwrap().unwrap();
        assert_eq!(view.status, InstanceStatus::Running, "{:?}", view.tasks);
        if let Some(task) = view.tasks.first() {
            if task.leased_by.is_none() && task.last_error.is_some() {
                postponed = Some(task.clone());
                break;
            }
        }
    }
    let task = postponed.expect("the step was never tried");
    assert_eq!(task.attempts, 0, "{task:?}");
    let error = task.last_error.unwrap_or_default();
    assert!(error.contains("out of file descriptors"), "{error}");

    drop(hoard);
    let report = tokio::time::timeout(Duration::from_secs(20), worker)
        .await
        .expect("the instance did not finish once descriptors were free")
        .unwrap()
        .unwrap();
    assert!(report.postponed >= 1, "{report:?}");
    assert_eq!(report.failures, 0, "{report:?}");
    let view = store.instance(name).await.unwrap().unwrap();
    assert_eq!(view.status, InstanceStatus::Completed);
    assert_eq!(view.history.last().map(|h| h.attempt), Some(0));
    let logs = store.logs(name).await.unwrap();
    assert!(
        logs.iter()
            .any(|l| l.level == "warn" && l.message.contains("not counted as an attempt")),
        "{logs:?}"
    );
}
