//! PostgreSQL restarts in the middle of a run: the workers log the outage, back off,
//! reconnect, and finish every instance with nothing lost and nothing committed twice.
//! (Its own test binary, so no other test's connections see the restart.)

#[path = "it/common/mod.rs"]
mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{assert_joined_once, count, phasm, postgres_schema, worker, FORK_JOIN};

fn restart_postgres() -> Result<(), String> {
    let versions =
        std::fs::read_dir("/etc/postgresql").map_err(|e| format!("no local cluster: {e}"))?;
    let version = versions
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .next()
        .ok_or("no local cluster")?;
    let out = Command::new("pg_ctlcluster")
        .args(["--skip-systemctl-redirect", &version, "main", "restart"])
        .output()
        .map_err(|e| format!("pg_ctlcluster: {e}"))?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    Ok(())
}

#[test]
fn workers_survive_a_database_restart() {
    let Some(schema) = postgres_schema("restart") else {
        return;
    };
    let db = schema.url.clone();
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
    if let Err(why) = restart_postgres() {
        if std::env::var("PHASM_REQUIRE_POSTGRES").is_ok_and(|v| v == "1") {
            panic!("cannot restart PostgreSQL for this test: {why}");
        }
        eprintln!("SKIPPED workers_survive_a_database_restart: cannot restart PostgreSQL ({why})");
        return;
    }
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
