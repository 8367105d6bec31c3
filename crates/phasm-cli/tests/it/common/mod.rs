//! Helpers shared by the tests that run `phasm` processes against PostgreSQL.

#![allow(dead_code)]

pub mod cluster;

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};

/// A fresh schema, dropped (with everything in it) when this goes out of scope.
pub struct Schema {
    base: String,
    name: String,
    /// A URL whose connections use the schema.
    pub url: String,
}

impl Drop for Schema {
    fn drop(&mut self) {
        let _ = Command::new("psql")
            .args([
                &self.base,
                "-qc",
                &format!("DROP SCHEMA IF EXISTS {} CASCADE", self.name),
            ])
            .output();
    }
}

/// A fresh schema, or `None` (after saying so) when no PostgreSQL server is reachable — a
/// failure instead when `PHASM_REQUIRE_POSTGRES=1`.
pub fn postgres_schema(test: &str) -> Option<Schema> {
    let base = std::env::var("PHASM_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let schema = format!(
        "phasm_cli_{test}_{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default()
    );
    let created = Command::new("psql")
        .args([&base, "-qc", &format!("CREATE SCHEMA {schema}")])
        .output();
    match created {
        Ok(out) if out.status.success() => {}
        other => {
            let why = match other {
                Ok(out) => String::from_utf8_lossy(&out.stderr).into_owned(),
                Err(e) => e.to_string(),
            };
            assert!(
                !std::env::var("PHASM_REQUIRE_POSTGRES").is_ok_and(|v| v == "1"),
                "PostgreSQL is required (PHASM_REQUIRE_POSTGRES=1) but {base} is unusable: {why}"
            );
            eprintln!("SKIPPED {test}: PostgreSQL at {base} is unusable ({why})");
            return None;
        }
    }
    let sep = if base.contains('?') { '&' } else { '?' };
    let url = format!("{base}{sep}options=-csearch_path%3D{schema}");
    Some(Schema {
        base,
        name: schema,
        url,
    })
}

/// Run `phasm` to completion.
pub fn phasm(dir: &Path, db: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_phasm"))
        .args(args)
        .current_dir(dir)
        .env("PHASM_DB", db)
        .output()
        .expect("phasm runs")
}

/// Start a `phasm worker`, returned once it has said it started.
pub fn worker(dir: &Path, db: &str, extra: &[&str]) -> Child {
    use std::io::{BufRead, BufReader};
    let mut child = Command::new(env!("CARGO_BIN_EXE_phasm"))
        .args(["worker", "fsm.yaml", "--lease", "2s"])
        .args(extra)
        .current_dir(dir)
        .env("PHASM_DB", db)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("worker starts");
    let mut stderr = BufReader::new(child.stderr.take().expect("stderr"));
    // Warnings may come first (a file older than the latest deployed version, say).
    let mut first = String::new();
    loop {
        first.clear();
        let n = stderr.read_line(&mut first).expect("a line");
        assert!(n > 0, "the worker exited before it started");
        if !first.starts_with("warning: ") {
            break;
        }
    }
    assert!(first.contains("started"), "unexpected: {first}");
    std::thread::spawn(move || {
        let mut line = String::new();
        while stderr.read_line(&mut line).is_ok_and(|n| n > 0) {
            line.clear();
        }
    });
    child
}

/// `phasm status NAME --json`.
pub fn status(dir: &Path, db: &str, name: &str) -> serde_json::Value {
    let out = phasm(dir, db, &["status", name, "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON")
}

/// Instances by status.
pub fn count(dir: &Path, db: &str, status: &str) -> usize {
    let out = phasm(
        dir,
        db,
        &["list", "--json", "--limit", "100000", "--status", status],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice::<Vec<serde_json::Value>>(&out.stdout)
        .expect("JSON")
        .len()
}

/// A machine whose instances fork into four branches that each do a little work and join at
/// a barrier; the join lists the branches it saw.
pub const FORK_JOIN: &str = r#"
actions:
  Split:
    exec: [sh, -c, "cat > /dev/null; echo '{\"event\": \"work\", \"context\": {\"b\": 0}, \"forks\": [{\"b\": 1}, {\"b\": 2}, {\"b\": 3}]}'"]
  Work:
    exec: [sh, -c, "cat > /dev/null; sleep 0.05; echo '{\"event\": \"join\"}'"]
  Join:
    exec: [python3, -c, "import json,sys; r=json.load(sys.stdin); print(json.dumps({'context': {'joined': sorted(c['b'] for c in r['contexts'])}}))"]
state_machines:
- name: ForkJoin
  task_retry_limit: 20
  min_backoff_seconds: 0.2
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
    - event: join
      to: join
  - name: join
    fan_in: all
    action: Join
    final: true
"#;

/// Check that an instance of [`FORK_JOIN`] completed with every branch joined once and every
/// transition committed once.
pub fn assert_joined_once(dir: &Path, db: &str, name: &str) {
    let s = status(dir, db, name);
    assert_eq!(s["status"], "completed", "{s}");
    assert_eq!(
        s["context"]["joined"],
        serde_json::json!([0, 1, 2, 3]),
        "{s}"
    );
    let history = s["history"].as_array().expect("history");
    let mut seen = std::collections::HashSet::new();
    for h in history {
        let key = (
            h["branch"].to_string(),
            h["from"].to_string(),
            h["to"].to_string(),
        );
        assert!(seen.insert(key), "a transition was committed twice: {s}");
    }
    // start, split, then 4 × (work → join arrival), then the join.
    assert_eq!(history.len(), 1 + 4 + 4 + 1, "{s}");
}

/// [`FORK_JOIN`] with Python actions (phasm's native API) run by action hosts.
pub const FORK_JOIN_PY: &str = r"
python:
  processes: 2
state_machines:
- name: ForkJoin
  namespace: forkjoin
  task_retry_limit: 20
  min_backoff_seconds: 0.2
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
    - event: join
      to: join
  - name: join
    fan_in: all
    action: Join
    final: true
";

/// The actions of [`FORK_JOIN_PY`] (`forkjoin.py`).
pub const FORK_JOIN_PY_MODULE: &str = r#"
import time


def Split(ctx):
    ctx.put("b", 0)
    for b in (1, 2, 3):
        ctx.fork({"b": b})
    return "work"


def Work(ctx):
    time.sleep(0.05)
    return "join"


def Join(ctx):
    ctx.put("joined", sorted(c["b"] for c in ctx.contexts))
"#;
