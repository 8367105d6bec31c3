//! Schedules with real worker processes, on SQLite and PostgreSQL: an `every: 1s` schedule
//! fired by two workers at once starts exactly one instance per tick, none early; after
//! downtime only the latest missed tick runs; `phasm schedules` reports it all.

use std::path::Path;
use std::process::Child;
use std::time::Duration;

use crate::common::{phasm, postgres_schema, worker};

const MACHINE: &str = r#"
actions:
  Go:
    exec: [sh, -c, "cat > /dev/null; echo '{\"event\": \"done\"}'"]
schedules:
- name: tick
  machine: Job
  every: 1s
  context: {kind: scheduled}
  overlap: allow
- name: yearly
  machine: Job
  cron: "0 0 1 1 *"
  timezone: Europe/Paris
state_machines:
- name: Job
  states:
  - name: run
    initial: true
    action: Go
    transitions:
    - event: done
      to: end
  - name: end
    final: true
"#;

const SEC: i64 = 1_000_000;

/// SIGKILL, then reap.
fn kill(mut child: Child) {
    child.kill().expect("SIGKILL");
    let _ = child.wait();
}

/// The schedule's instances: (tick in seconds since the epoch, created at in microseconds),
/// in tick order.
fn instances(dir: &Path, db: &str) -> Vec<(i64, i64, serde_json::Value)> {
    let out = phasm(dir, db, &["list", "--json", "--limit", "100000"]);
    assert!(out.status.success(), "{out:?}");
    let list: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).expect("JSON");
    let mut ticks: Vec<(i64, i64, serde_json::Value)> = list
        .into_iter()
        .map(|i| {
            let name = i["instance"].as_str().expect("a name").to_string();
            let stamp = name.strip_prefix("tick-").expect("a tick's instance");
            let tick = chrono::NaiveDateTime::parse_from_str(stamp, "%Y%m%dT%H%M%SZ")
                .expect("a tick time in the name")
                .and_utc()
                .timestamp();
            let created =
                chrono::DateTime::parse_from_rfc3339(i["created_at"].as_str().expect("created_at"))
                    .expect("a time")
                    .timestamp_micros();
            (tick, created, i)
        })
        .collect();
    ticks.sort_by_key(|t| t.0);
    ticks
}

fn consecutive(ticks: &[(i64, i64, serde_json::Value)]) -> bool {
    ticks.windows(2).all(|w| w[1].0 == w[0].0 + 1)
}

fn one_instance_per_tick(db: &str) {
    let dir = tempfile::tempdir().expect("temp dir");
    let d = dir.path();
    std::fs::write(d.join("fsm.yaml"), MACHINE).expect("write");
    let out = phasm(d, db, &["schedules", "fsm.yaml", "--json"]);
    assert!(out.status.success(), "{out:?}");
    let before: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(before["schedules"][0]["last_tick"], serde_json::Value::Null);

    // Two workers fire the same ticks for ten seconds.
    let a = worker(d, db, &[]);
    let b = worker(d, db, &[]);
    std::thread::sleep(Duration::from_secs(10));
    kill(a);
    kill(b);
    let first = instances(d, db);
    assert!(
        first.len() >= 7,
        "ten seconds of `every: 1s` started only {} instances",
        first.len()
    );
    assert!(
        consecutive(&first),
        "a tick was missed or fired twice: {first:?}"
    );
    for (tick, created, i) in &first {
        assert!(*created >= tick * SEC, "started before its tick: {i}");
        assert!(
            *created < (tick + 5) * SEC,
            "started long after its tick: {i}"
        );
    }

    // Three ticks pass with no worker; a worker then fires only the latest missed one.
    std::thread::sleep(Duration::from_millis(3500));
    let c = worker(d, db, &[]);
    std::thread::sleep(Duration::from_secs(3));
    kill(c);
    let all = instances(d, db);
    let last_before = first.last().expect("instances").0;
    let after: Vec<_> = all.iter().filter(|t| t.0 > last_before).cloned().collect();
    assert!(!after.is_empty(), "the restarted worker fired nothing");
    assert!(
        after[0].0 - last_before >= 3,
        "missed ticks were made up: the first tick after the restart is {} s after the last one before",
        after[0].0 - last_before
    );
    assert!(consecutive(&after), "{after:?}");
    let view = crate::common::status(
        d,
        db,
        all.last().expect("one").2["instance"]
            .as_str()
            .expect("name"),
    );
    assert_eq!(view["context"]["kind"], "scheduled");

    let out = phasm(d, db, &["schedules", "fsm.yaml", "--json"]);
    assert!(out.status.success(), "{out:?}");
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let tick = &listed["schedules"][0];
    assert_eq!(tick["name"], "tick");
    assert_eq!(
        tick["last_instance"],
        all.last().expect("one").2["instance"]
    );
    let yearly = &listed["schedules"][1];
    assert_eq!(yearly["last_instance"], serde_json::Value::Null, "{yearly}");
    assert!(
        yearly["next_tick"]
            .as_str()
            .is_some_and(|t| t.ends_with("-12-31T23:00:00.000Z")),
        "midnight on 1 January in Paris is 23:00 UTC: {yearly}"
    );
    let text = phasm(d, db, &["schedules", "fsm.yaml"]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("yearly  starts Job, cron 0 0 1 1 * (Europe/Paris)"),
        "{text}"
    );
}

#[test]
fn a_schedule_starts_one_instance_per_tick_under_two_workers_on_sqlite() {
    one_instance_per_tick("phasm.db");
}

#[test]
fn a_schedule_starts_one_instance_per_tick_under_two_workers_on_postgres() {
    let Some(schema) = postgres_schema("schedules") else {
        return;
    };
    one_instance_per_tick(&schema.url);
}

#[test]
fn the_schedules_example_is_valid() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out = phasm(
        &root,
        "unused.db",
        &["validate", "--strict", "examples/schedules/schedules.yaml"],
    );
    assert!(out.status.success(), "{out:?}");
    let out = phasm(
        &root,
        root.join("target/no-such-schedules.db")
            .to_str()
            .expect("a path"),
        &["schedules", "examples/schedules/schedules.yaml"],
    );
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("digest  starts Digest, every 10s, overlap skip"),
        "{text}"
    );
    assert!(
        text.contains("nightly-digest  starts Digest, cron 0 3 * * * (Europe/Paris)"),
        "{text}"
    );
    assert!(text.contains("never"), "{text}");
}

/// The live schedules are the latest deployed version's: a worker started with a file that
/// has `tick` stops firing it once a deploy (from another file) removes it.
fn a_removed_schedule_stops(db: Option<&str>) {
    let dir = tempfile::tempdir().expect("temp dir");
    let (d, next) = (dir.path(), dir.path().join("next"));
    let file = d.join("phasm.db").display().to_string();
    let db = db.unwrap_or(&file);
    std::fs::write(d.join("fsm.yaml"), MACHINE).expect("write");
    std::fs::create_dir(&next).expect("mkdir");
    let without = MACHINE.replace(
        "- name: tick\n  machine: Job\n  every: 1s\n  context: {kind: scheduled}\n  overlap: allow\n",
        "",
    );
    assert_ne!(without, MACHINE);
    std::fs::write(next.join("fsm.yaml"), without).expect("write");
    let w = worker(d, db, &[]);
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        !instances(d, db).is_empty(),
        "`tick` fired before the deploy"
    );
    let out = phasm(&next, db, &["deploy", "fsm.yaml"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "Job v2 (new)\n");
    // Within one look at the versions (5 s) the worker stops firing it.
    std::thread::sleep(Duration::from_millis(6500));
    let settled = instances(d, db).len();
    std::thread::sleep(Duration::from_secs(3));
    let later = instances(d, db).len();
    kill(w);
    assert_eq!(
        later, settled,
        "a schedule the latest version removed still fires"
    );
}

#[test]
fn a_deploy_that_removes_a_schedule_stops_it_on_sqlite_and_postgres() {
    a_removed_schedule_stops(None);
    if let Some(schema) = postgres_schema("removed_schedule") {
        a_removed_schedule_stops(Some(&schema.url));
    }
}
