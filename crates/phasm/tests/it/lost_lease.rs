//! A step whose lease is lost is stopped, not left to run to an end whose commit would be
//! refused: cancelling an instance kills its running `exec` program within a renewal tick.

use crate::common;

use std::time::Duration;

use phasm::engine::Context;
use phasm::store::{Control, InstanceStatus};
use phasm::worker::{StopWhen, WorkerOptions};

const MACHINE: &str = r"
actions:
  Slow:
    exec: [sh, -c, 'echo $$ > pid; exec sleep 60']
state_machines:
- name: Slow
  states:
  - name: start
    initial: true
    action: Slow
    transitions:
    - event: done
      to: end
  - name: end
    final: true
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_an_instance_stops_its_running_program() {
    let dir = tempfile::tempdir().unwrap();
    let setup = common::setup(MACHINE, dir.path(), "Slow", Context::new()).await;
    let (store, clock, name) = (&setup.store, &setup.clock, &setup.name);
    let worker = setup.worker(WorkerOptions {
        // Renewed every 200 ms.
        lease: Duration::from_millis(600),
        stop: StopWhen::Never,
        poll_interval: Duration::from_millis(50),
        ..WorkerOptions::default()
    });
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let worker = tokio::spawn(worker.run(async {
        let _ = stopped.await;
    }));

    let pid_file = dir.path().join("pid");
    let mut pid = None;
    for _ in 0..200 {
        if let Some(p) = std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
        {
            pid = Some(p);
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let pid = pid.expect("the program never started");
    assert!(common::running(pid));

    assert_eq!(
        store.cancel(clock.now(), name).await.unwrap(),
        Control::Done
    );
    assert!(
        common::gone(pid).await,
        "the cancelled instance's program is still running"
    );

    let _ = stop.send(());
    let report = tokio::time::timeout(Duration::from_secs(10), worker)
        .await
        .expect("the worker did not stop")
        .unwrap()
        .unwrap();
    assert_eq!(report.fenced, 1, "{report:?}");
    assert_eq!(report.steps, 0, "{report:?}");
    let view = store.instance(name).await.unwrap().unwrap();
    assert_eq!(view.status, InstanceStatus::Cancelled);
}
