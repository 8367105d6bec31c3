//! PostgreSQL restarts in the middle of a run: the workers log the outage, back off,
//! reconnect, and finish every instance with nothing lost and nothing committed twice.
//! The server is a throwaway cluster of this test's own, never the machine's.

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
