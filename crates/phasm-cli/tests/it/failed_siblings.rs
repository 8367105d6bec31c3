//! The rule for a failed instance's other branches: a branch that fails for good fails the
//! whole instance, and its sibling branches stop where they are (held) — even one that was
//! running then, whose commit is refused. Status says so (no "live" branch), nothing runs
//! on its own, and `phasm retry` resumes every stopped branch with the failed one. On SQLite
//! and PostgreSQL.

use crate::common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{phasm, postgres_schema, status};

const SIBLINGS: &str = r#"
actions:
  Split:
    exec: [sh, -c, "cat > /dev/null; echo '{\"event\": \"work\", \"context\": {\"b\": 0}, \"forks\": [{\"b\": 1}, {\"b\": 2}]}'"]
  Work:
    exec: [python3, -c, "import json, os, sys, time\nr = json.load(sys.stdin)\nif r['context']['b'] == 0 and not os.path.exists('failed-once'):\n    open('failed-once', 'w').close()\n    sys.exit(3)\ntime.sleep(1)\nprint(json.dumps({'event': 'done'}))"]
state_machines:
- name: Siblings
  task_retry_limit: 0
  states:
  - name: split
    initial: true
    action: Split
    transitions:
    - event: work
      to: work
  - name: work
    action: Work
    transitions:
    - event: done
      to: end
  - name: end
    final: true
"#;

fn siblings_on(d: &Path, db: &str) {
    let out = phasm(d, db, &["run", "fsm.yaml", "--name", "s1"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = status(d, db, "s1");
    assert_eq!(s["status"], "failed", "{s}");
    assert_eq!(s["branches"]["failed"], 1, "{s}");
    assert_eq!(
        s["branches"]["live"], 0,
        "no branch of a failed instance is live: {s}"
    );
    assert_eq!(s["branches"]["held"], 2, "{s}");
    let shown = String::from_utf8_lossy(&phasm(d, db, &["status", "s1"]).stdout).into_owned();
    assert!(
        shown.contains("2 held (stopped by the failure; `phasm retry` resumes them)"),
        "{shown}"
    );
    assert!(
        shown.contains("stopped because the instance failed; `phasm retry` resumes it"),
        "{shown}"
    );
    // Nothing runs on its own: a worker leaves a failed instance alone.
    let mut worker = Command::new(env!("CARGO_BIN_EXE_phasm"))
        .args(["worker", "fsm.yaml", "--quiet"])
        .current_dir(d)
        .env("PHASM_DB", db)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        status(d, db, "s1")["history"].as_array().map(Vec::len),
        Some(1)
    );
    // A retry resumes the failed branch and its stopped siblings: each transition once.
    assert!(phasm(d, db, &["retry", "s1"]).status.success());
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while status(d, db, "s1")["status"] != "completed" {
        assert!(
            std::time::Instant::now() < deadline,
            "{}",
            status(d, db, "s1")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = worker.kill();
    let _ = worker.wait();
    let s = status(d, db, "s1");
    assert_eq!(s["branches"]["ended"], 3, "{s}");
    assert_eq!(s["history"].as_array().map(Vec::len), Some(7), "{s}");
}

#[test]
fn a_failed_branch_stops_its_siblings_until_a_retry_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("fsm.yaml"), SIBLINGS).unwrap();
    siblings_on(d, &d.join("phasm.db").display().to_string());
}

#[test]
fn a_failed_branch_stops_its_siblings_until_a_retry_on_postgres() {
    let Some(schema) = postgres_schema("siblings") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("fsm.yaml"), SIBLINGS).unwrap();
    siblings_on(d, &schema.url);
}
