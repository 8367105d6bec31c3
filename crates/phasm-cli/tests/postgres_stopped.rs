//! PostgreSQL stops while a worker runs: SIGTERM still stops the worker within seconds, and
//! once the server is back another worker finishes every instance, nothing lost or committed
//! twice. (Its own test binary, so no other test's connections see the outage.)

#[path = "it/common/mod.rs"]
mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{assert_joined_once, count, phasm, postgres_schema, worker, FORK_JOIN};

fn cluster(action: &str) -> Result<(), String> {
    let version = std::fs::read_dir("/etc/postgresql")
        .map_err(|e| format!("no local cluster: {e}"))?
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .next()
        .ok_or("no local cluster")?;
    let out = Command::new("pg_ctlcluster")
        .args(["--skip-systemctl-redirect", &version, "main", action])
        .output()
        .map_err(|e| format!("pg_ctlcluster: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// Starts the server again however the test ends.
struct Restart;

impl Drop for Restart {
    fn drop(&mut self) {
        let _ = cluster("start");
        for _ in 0..30 {
            let ready = Command::new("pg_isready")
                .args(["-q", "-h", "127.0.0.1", "-p", "5432"])
                .status()
                .is_ok_and(|s| s.success());
            if ready {
                break;
            }
            std::thread::sleep(Duration::from_secs(1));
        }
    }
}

#[test]
fn sigterm_stops_a_worker_promptly_while_postgres_is_down() {
    let Some(schema) = postgres_schema("stopped") else {
        return;
    };
    let db = schema.url.clone();
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
    let restart = Restart;
    if let Err(why) = cluster("stop") {
        if std::env::var("PHASM_REQUIRE_POSTGRES").is_ok_and(|v| v == "1") {
            panic!("cannot stop PostgreSQL for this test: {why}");
        }
        eprintln!("SKIPPED: cannot stop PostgreSQL ({why})");
        let _ = running.kill();
        let _ = running.wait();
        return;
    }
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
    drop(restart); // the server is back
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
