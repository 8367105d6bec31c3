//! PostgreSQL stops while a worker runs: SIGTERM still stops the worker within seconds, and
//! once the server is back another worker finishes every instance, nothing lost or committed
//! twice. The server is a throwaway cluster of this test's own, never the machine's.

// Tests panic on purpose when what they check does not hold: unwrap and expect are the
// assertions of setup steps here.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "it/common/mod.rs"]
mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::cluster::Cluster;
use common::{assert_joined_once, count, phasm, worker, FORK_JOIN};

#[test]
fn sigterm_stops_a_worker_promptly_while_postgres_is_down() {
    let Some(cluster) = Cluster::start("sigterm_stops_a_worker_promptly_while_postgres_is_down")
    else {
        return;
    };
    let db = cluster.url.clone();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("fsm.yaml"), FORK_JOIN).unwrap();
    let instances = 30;
    for i in 0..instances {
        let out = phasm(
            d,
            &db,
            &["start", "fsm.yaml", "--name", &format!("s-{i:02}")],
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut running = Command::new(env!("CARGO_BIN_EXE_phasm"))
        .args([
            "worker",
            "fsm.yaml",
            "--lease",
            "2s",
            "--concurrency",
            "8",
            "--quiet",
        ])
        .current_dir(d)
        .env("PHASM_DB", &db)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("worker starts");
    let mut stderr = running.stderr.take().expect("stderr");
    let said = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut stderr, &mut text);
        text
    });
    std::thread::sleep(Duration::from_millis(500));
    cluster.stop();
    // Let the worker meet the outage (failed claims and commits, backing off).
    std::thread::sleep(Duration::from_secs(3));
    let asked = Instant::now();
    let _ = Command::new("kill")
        .args(["-TERM", &running.id().to_string()])
        .status();
    let deadline = asked + Duration::from_secs(15);
    loop {
        if running.try_wait().unwrap().is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = running.kill();
            panic!("the worker still ran 15 s after SIGTERM with the database down");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let took = asked.elapsed();
    assert!(took < Duration::from_secs(10), "stopping took {took:?}");
    // What it could not commit is counted as given up, apart from leases lost.
    let said = said.join().unwrap_or_default();
    let last = said
        .lines()
        .rev()
        .find(|l| l.contains("stopped:"))
        .unwrap_or_default();
    eprintln!("{last}");
    assert!(
        last.contains("0 steps stopped or refused (lease lost)"),
        "{said}"
    );
    let given_up: u64 = last
        .split(", ")
        .find(|p| p.contains("given up"))
        .and_then(|p| p.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no given-up count: {last}"));
    assert!(
        given_up >= 1,
        "steps were running when the database went: {said}"
    );
    cluster.start_again();
    let mut finisher = worker(d, &db, &["--concurrency", "8"]);
    let deadline = Instant::now() + Duration::from_secs(120);
    while count(d, &db, "completed") < instances {
        assert!(Instant::now() < deadline, "not finished after the outage");
        std::thread::sleep(Duration::from_millis(300));
    }
    let _ = finisher.kill();
    let _ = finisher.wait();
    for i in 0..instances {
        assert_joined_once(d, &db, &format!("s-{i:02}"));
    }
}
