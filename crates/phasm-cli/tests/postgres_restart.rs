//! PostgreSQL restarts in the middle of a run: the workers log the outage, back off,
//! reconnect, and finish every instance with nothing lost and nothing committed twice.
//! The server is a throwaway cluster of this test's own, never the machine's.

// Tests panic on purpose when what they check does not hold: unwrap and expect are the
// assertions of setup steps here.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "it/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::cluster::Cluster;
use common::{assert_joined_once, count, phasm, worker, FORK_JOIN};

#[test]
fn workers_survive_a_database_restart() {
    let Some(cluster) = Cluster::start("workers_survive_a_database_restart") else {
        return;
    };
    let db = cluster.url.clone();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("fsm.yaml"), FORK_JOIN).unwrap();
    let instances = 60;
    for i in 0..instances {
        let out = phasm(
            d,
            &db,
            &["start", "fsm.yaml", "--name", &format!("r-{i:02}")],
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let workers = [
        worker(d, &db, &["--concurrency", "8"]),
        worker(d, &db, &["--concurrency", "8"]),
    ];
    std::thread::sleep(Duration::from_millis(800));
    cluster.restart();
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let out = phasm(
            d,
            &db,
            &["list", "--json", "--status", "completed", "--limit", "1000"],
        );
        if out.status.success() && count(d, &db, "completed") == instances {
            break;
        }
        assert!(Instant::now() < deadline, "not finished after the restart");
        std::thread::sleep(Duration::from_millis(300));
    }
    for mut w in workers {
        let _ = w.kill();
        let _ = w.wait();
    }
    for i in 0..instances {
        assert_joined_once(d, &db, &format!("r-{i:02}"));
    }
}

/// One-shot commands ride out a restart of the server: each passing failure (a connection the
/// server ended, `57P01`; a server not yet back) is tried again, and a command that still
/// fails says so once, in one line, without the connection pool's own warnings.
#[test]
fn one_shot_commands_ride_out_a_restart_and_fail_in_one_line() {
    let Some(cluster) = Cluster::start("one_shot_commands_ride_out_a_restart") else {
        return;
    };
    let db = cluster.url.clone();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("fsm.yaml"), FORK_JOIN).unwrap();
    let out = phasm(d, &db, &["start", "fsm.yaml", "--name", "one"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let statuses = {
        let d = d.to_path_buf();
        let db = db.clone();
        std::thread::spawn(move || {
            let began = Instant::now();
            let mut outs = Vec::new();
            while began.elapsed() < Duration::from_secs(6) {
                outs.push(phasm(&d, &db, &["status", "one", "--json"]));
            }
            outs
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    cluster.restart();
    let outs = statuses.join().unwrap();
    let (mut ok, mut failed) = (0, 0);
    for out in &outs {
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("WARN"), "{err}");
        if out.status.success() {
            ok += 1;
        } else {
            failed += 1;
            assert_eq!(err.trim().lines().count(), 1, "one line per failure: {err}");
            assert!(err.starts_with("error: "), "{err}");
        }
    }
    eprintln!("{ok} status commands answered and {failed} failed across the restart");
    for out in outs.iter().filter(|o| !o.status.success()).take(3) {
        eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    }
    assert!(ok > 0);
    assert!(
        failed <= 1,
        "a restart of about a second is ridden out by the retries ({failed} of {} failed)",
        outs.len()
    );
}
