//! Events from outside with real worker processes, on SQLite and PostgreSQL: an event kept
//! before its wait, an event accepted while no worker runs and one whose step is killed
//! (SIGKILL) midway are each taken exactly once; a repeated id changes nothing; a finished
//! instance refuses events; timeouts racing events end every wait exactly once.

use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

use crate::common::{phasm, postgres_schema, status, worker};

/// Waits `approval` for `approved` (then a slow `Ship`) or times out after `TIMEOUT`.
const MACHINE: &str = r#"
actions:
  Go:
    exec: [sh, -c, "cat > /dev/null; echo '{\"event\": \"ask\"}'"]
  Ask:
    exec: [sh, -c, "cat > /dev/null; echo '{}'"]
  Ship:
    exec: [sh, -c, "cat > /dev/null; sleep SHIP_SECONDS; echo '{}'"]
state_machines:
- name: Order
  task_retry_limit: 10
  min_backoff_seconds: 0.2
  states:
  - name: received
    initial: true
    action: Go
    transitions:
    - event: ask
      to: approval
  - name: approval
    entry: Ask
    wait:
      timeout: TIMEOUT
      timeout_event: expired
    transitions:
    - event: approved
      to: shipped
    - event: expired
      to: escalated
  - name: shipped
    final: true
    action: Ship
  - name: escalated
    final: true
"#;

fn setup(timeout: &str, ship_seconds: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    let yaml = MACHINE
        .replace("TIMEOUT", timeout)
        .replace("SHIP_SECONDS", ship_seconds);
    std::fs::write(dir.path().join("fsm.yaml"), yaml).expect("write");
    dir
}

fn until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// SIGKILL (what `Child::kill` sends on Unix), then reap.
fn kill(mut child: Child) {
    child.kill().expect("SIGKILL");
    let _ = child.wait();
}

/// How many committed transitions of `name` left `approval` (on any event).
fn left_approval(dir: &Path, db: &str, name: &str) -> Vec<String> {
    status(dir, db, name)["history"]
        .as_array()
        .expect("history")
        .iter()
        .filter(|h| h["from"] == "approval")
        .map(|h| h["event"].as_str().unwrap_or_default().to_string())
        .collect()
}

fn send(dir: &Path, db: &str, args: &[&str]) -> (i32, String) {
    let mut all = vec!["send"];
    all.extend_from_slice(args);
    let out = phasm(dir, db, &all);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

fn events_are_taken_once(db: &str) {
    let dir = setup("1h", "1");
    let d = dir.path();
    for name in ["o1", "o2"] {
        let out = phasm(d, db, &["start", "fsm.yaml", "--name", name]);
        assert!(out.status.success(), "{out:?}");
    }
    // Before the wait: kept, then taken by the wait when it begins.
    let (code, text) = send(d, db, &["o1", "approved", "--id", "early"]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("kept"), "{text}");
    let w = worker(d, db, &[]);
    until("o1 to complete", Duration::from_secs(60), || {
        status(d, db, "o1")["status"] == "completed"
    });
    assert_eq!(left_approval(d, db, "o1"), ["approved"]);
    until("o2 to wait", Duration::from_secs(60), || {
        status(d, db, "o2")["waiting"]
            .as_array()
            .is_some_and(|w| w.len() == 1)
    });
    let view = status(d, db, "o2");
    assert_eq!(
        view["waiting"][0]["events"],
        serde_json::json!(["approved", "expired"])
    );
    // Accepted, then the worker is killed while the step it started (a 1 s `Ship`) runs.
    let (code, text) = send(
        d,
        db,
        &["o2", "approved", "--id", "e1", "--data", r#"{"by": "ana"}"#],
    );
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("delivered"), "{text}");
    let (code, text) = send(d, db, &["o2", "approved", "--id", "e1"]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("accepted before"), "a repeated id: {text}");
    std::thread::sleep(Duration::from_millis(500));
    kill(w);
    assert_eq!(status(d, db, "o2")["status"], "running");
    let w = worker(d, db, &[]);
    until("o2 to complete", Duration::from_secs(60), || {
        status(d, db, "o2")["status"] == "completed"
    });
    kill(w);
    let view = status(d, db, "o2");
    assert_eq!(left_approval(d, db, "o2"), ["approved"], "{view}");
    assert_eq!(view["context"]["by"], "ana");
    let (code, text) = send(d, db, &["o2", "approved"]);
    assert_eq!(code, 1, "a completed instance refuses events: {text}");
    assert!(text.contains("completed"), "{text}");
    let (code, text) = send(d, db, &["nobody", "approved"]);
    assert_eq!(code, 2, "{text}");
    let (code, text) = send(d, db, &["o2", "refunded", "--file", "fsm.yaml"]);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("accepts"), "{text}");
}

#[test]
fn events_are_taken_once_across_a_kill_on_sqlite() {
    events_are_taken_once("phasm.db");
}

#[test]
fn events_are_taken_once_across_a_kill_on_postgres() {
    let Some(schema) = postgres_schema("events_once") else {
        return;
    };
    events_are_taken_once(&schema.url);
}

fn timeouts_race_events(db: &str) {
    let dir = setup("2s", "0");
    let d = dir.path();
    let names: Vec<String> = (0..12).map(|i| format!("r{i}")).collect();
    let w = worker(d, db, &[]);
    for name in &names {
        let out = phasm(d, db, &["start", "fsm.yaml", "--name", name]);
        assert!(out.status.success(), "{out:?}");
    }
    until("every instance to wait", Duration::from_secs(60), || {
        names.iter().all(|n| {
            status(d, db, n)["waiting"]
                .as_array()
                .is_some_and(|w| w.len() == 1)
        })
    });
    // Send around the deadlines: some events come first, some timeouts do.
    std::thread::sleep(Duration::from_millis(1500));
    for name in &names {
        let (code, text) = send(d, db, &[name, "approved"]);
        assert!(code == 0 || code == 1, "{name}: {text}");
    }
    until("every instance to end", Duration::from_secs(60), || {
        names
            .iter()
            .all(|n| status(d, db, n)["status"] == "completed")
    });
    kill(w);
    for name in &names {
        let left = left_approval(d, db, name);
        assert_eq!(left.len(), 1, "{name} left its wait once: {left:?}");
    }
}

#[test]
fn timeouts_racing_events_end_each_wait_once_on_sqlite() {
    timeouts_race_events("phasm.db");
}

#[test]
fn timeouts_racing_events_end_each_wait_once_on_postgres() {
    let Some(schema) = postgres_schema("events_race") else {
        return;
    };
    timeouts_race_events(&schema.url);
}
