//! Three `phasm worker` processes share one PostgreSQL database; one of them is killed with
//! SIGKILL and restarted again and again. Every instance completes, every transition is
//! committed once, and every fan-in sees each branch once.

use crate::common;

use std::time::{Duration, Instant};

use common::{assert_joined_once, count, phasm, postgres_schema, worker, FORK_JOIN};

#[test]
fn three_workers_share_the_work_and_a_killed_one_loses_nothing() {
    let Some(schema) = postgres_schema("workers") else {
        return;
    };
    let db = schema.url.clone();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("fsm.yaml"), FORK_JOIN).unwrap();
    let instances = 200;
    let mut starters = Vec::new();
    for chunk in 0..4 {
        let db = db.clone();
        let d = d.to_path_buf();
        starters.push(std::thread::spawn(move || {
            for i in (chunk * 50)..(chunk * 50 + 50) {
                let out = phasm(
                    &d,
                    &db,
                    &["start", "fsm.yaml", "--name", &format!("fj-{i:03}")],
                );
                assert!(
                    out.status.success(),
                    "{}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }));
    }
    for s in starters {
        s.join().unwrap();
    }
    let steady = [
        worker(d, &db, &["--concurrency", "16"]),
        worker(d, &db, &["--concurrency", "16"]),
    ];
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut kills = 0;
    while count(d, &db, "completed") < instances {
        assert!(
            Instant::now() < deadline,
            "only {} completed",
            count(d, &db, "completed")
        );
        if kills < 5 {
            let mut victim = worker(d, &db, &["--concurrency", "16"]);
            std::thread::sleep(Duration::from_millis(700));
            victim.kill().expect("SIGKILL");
            victim.wait().unwrap();
            kills += 1;
        } else {
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    for mut w in steady {
        let _ = w.kill();
        let _ = w.wait();
    }
    assert_eq!(count(d, &db, "failed"), 0);
    for i in 0..instances {
        assert_joined_once(d, &db, &format!("fj-{i:03}"));
    }
}

/// `max_concurrent` holds across workers: two workers with 8 slots each never run more than
/// 2 steps of a queue limited to 2 at once.
#[test]
fn a_queue_limit_holds_across_workers() {
    let Some(schema) = postgres_schema("limits") else {
        return;
    };
    let db = schema.url.clone();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(
        d.join("fsm.yaml"),
        "actions:\n  Slow:\n    exec: [sh, -c, \"cat > /dev/null; echo start $(date +%s%N) >> runs.log; sleep 0.3; echo end $(date +%s%N) >> runs.log\"]\nqueues:\n  narrow:\n    max_concurrent: 2\nstate_machines:\n- name: Narrow\n  queue: narrow\n  states:\n  - name: only\n    initial: true\n    final: true\n    action: Slow\n",
    )
    .unwrap();
    for i in 0..10 {
        assert!(
            phasm(d, &db, &["start", "fsm.yaml", "--name", &format!("n{i}")])
                .status
                .success()
        );
    }
    let workers = [
        worker(d, &db, &["--concurrency", "8"]),
        worker(d, &db, &["--concurrency", "8"]),
    ];
    let deadline = Instant::now() + Duration::from_secs(60);
    while count(d, &db, "completed") < 10 {
        assert!(Instant::now() < deadline, "not finished");
        std::thread::sleep(Duration::from_millis(200));
    }
    for mut w in workers {
        let _ = w.kill();
        let _ = w.wait();
    }
    let log = std::fs::read_to_string(d.join("runs.log")).unwrap();
    let mut events: Vec<(u128, i32)> = log
        .lines()
        .filter_map(|l| l.split_once(' '))
        .filter_map(|(kind, t)| {
            t.trim()
                .parse::<u128>()
                .ok()
                .map(|t| (t, if kind == "start" { 1 } else { -1 }))
        })
        .collect();
    events.sort_unstable();
    let (mut running, mut peak) = (0, 0);
    for (_, delta) in events {
        running += delta;
        peak = peak.max(running);
    }
    assert_eq!(peak, 2, "{log}");
}
