//! A rolling deploy with real processes: 20 instances wait in `approval` on v1; v2 renames it
//! `review`, changes a retry policy and adds a state; 20 more start on v2; a worker started
//! with each file runs side by side while both are SIGKILLed and restarted in a loop; 5 of the
//! v1 instances are moved to v2 with `--map approval=review`; every instance is sent its
//! event. Then each instance ended through its own version's states, with its own version's
//! bindings, and each transition was committed once. On SQLite and PostgreSQL.

use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

use crate::common::{phasm, postgres_schema, status, worker};

/// v1: wait in `approval`, then `ship` (an exec binding that says it is v1's).
const V1: &str = r#"actions:
  Ship:
    exec: [sh, -c, 'cat > /dev/null; sleep 0.2; echo "{\"event\": \"done\", \"context\": {\"by\": \"v1\"}}"']
state_machines:
- name: Order
  states:
  - name: approval
    initial: true
    wait: {timeout: 1h, timeout_event: expired}
    transitions:
    - event: approve
      to: ship
    - event: expired
      to: ship
  - name: ship
    action: Ship
    transitions:
    - event: done
      to: shipped
  - name: shipped
    final: true
"#;

/// v2: `approval` renamed `review`, a `pack` state before `ship`, another retry policy, and
/// `Ship` saying it is v2's.
const V2: &str = r#"actions:
  Pack:
    exec: [sh, -c, 'cat > /dev/null; sleep 0.2; echo "{\"event\": \"next\"}"']
  Ship:
    exec: [sh, -c, 'cat > /dev/null; sleep 0.2; echo "{\"event\": \"done\", \"context\": {\"by\": \"v2\"}}"']
state_machines:
- name: Order
  task_retry_limit: 7
  states:
  - name: review
    initial: true
    wait: {timeout: 1h, timeout_event: expired}
    transitions:
    - event: approve
      to: pack
    - event: expired
      to: pack
  - name: pack
    action: Pack
    transitions:
    - event: next
      to: ship
  - name: ship
    action: Ship
    transitions:
    - event: done
      to: shipped
  - name: shipped
    final: true
"#;

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn ok(dir: &Path, db: &str, args: &[&str]) -> String {
    let out = phasm(dir, db, args);
    assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
    text(&out.stdout)
}

fn until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn kill(mut child: Child) {
    child.kill().expect("SIGKILL");
    let _ = child.wait();
}

/// The transitions an instance committed after its start, as `FROM --EVENT--> TO`.
fn path(dir: &Path, db: &str, name: &str) -> (u64, Vec<String>, String) {
    let s = status(dir, db, name);
    assert_eq!(s["status"], "completed", "{name}: {s}");
    let history = s["history"].as_array().expect("history");
    let steps = history
        .iter()
        .map(|h| {
            format!(
                "{} --{}--> {}",
                h["from"].as_str().unwrap_or("(start)"),
                h["event"].as_str().unwrap_or_default(),
                h["to"].as_str().unwrap_or_default()
            )
        })
        .collect();
    let by = s["context"]["by"]
        .as_str()
        .or_else(|| s["current_context"]["by"].as_str())
        .unwrap_or_default()
        .to_string();
    (s["version"].as_u64().unwrap_or(0), steps, by)
}

fn rolling_deploy_on(root: &Path, db: &str) {
    let (one, two) = (root.join("v1"), root.join("v2"));
    for (dir, yaml) in [(&one, V1), (&two, V2)] {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("fsm.yaml"), yaml).unwrap();
    }
    ok(&one, db, &["deploy", "fsm.yaml"]);
    let old: Vec<String> = (0..20).map(|i| format!("a{i:02}")).collect();
    let new: Vec<String> = (0..20).map(|i| format!("b{i:02}")).collect();
    for name in &old {
        ok(&one, db, &["start", "fsm.yaml", "--name", name]);
    }
    // The v1 instances begin waiting in `approval`.
    let w = worker(&one, db, &[]);
    until("v1's waits", Duration::from_secs(60), || {
        old.iter().all(|n| {
            status(&one, db, n)["history"]
                .as_array()
                .is_some_and(|h| h.len() == 1)
        })
    });
    kill(w);
    assert_eq!(ok(&two, db, &["deploy", "fsm.yaml"]), "Order v2 (new)\n");
    for name in &new {
        ok(&two, db, &["start", "fsm.yaml", "--name", name]);
    }
    // A rolling deploy: a worker with each file, side by side. The v1 worker restarting does
    // not make v1 the latest again.
    let mut workers = vec![worker(&one, db, &[]), worker(&two, db, &[])];
    let said = ok(&one, db, &["versions", "Order"]);
    assert_eq!(said.lines().count(), 2, "{said}");
    // Five waiting v1 instances move to v2.
    let moved: Vec<&str> = old[..5].iter().map(String::as_str).collect();
    let mut args = vec!["upgrade", "--map", "approval=review"];
    args.extend(&moved);
    let said = ok(&two, db, &args);
    assert_eq!(said.matches("moved v1 → v2").count(), 5, "{said}");
    for name in old.iter().chain(&new) {
        ok(&two, db, &["send", name, "approve"]);
    }
    // Both workers are SIGKILLed and restarted while the instances run.
    let mut seed: u64 = 0x5eed_1234;
    for _ in 0..6 {
        seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
        std::thread::sleep(Duration::from_millis(300 + (seed >> 33) % 900));
        for w in workers.drain(..) {
            kill(w);
        }
        workers = vec![worker(&one, db, &[]), worker(&two, db, &[])];
    }
    until(
        "every instance to complete",
        Duration::from_secs(120),
        || {
            old.iter()
                .chain(&new)
                .all(|n| status(&one, db, n)["status"] == "completed")
        },
    );
    for w in workers {
        kill(w);
    }
    let v1_path = vec![
        "(start) --pseudo-init--> approval".to_string(),
        "approval --approve--> ship".to_string(),
        "ship --done--> shipped".to_string(),
    ];
    let v2_path = |first: &str| {
        vec![
            format!("(start) --pseudo-init--> {first}"),
            "review --approve--> pack".to_string(),
            "pack --next--> ship".to_string(),
            "ship --done--> shipped".to_string(),
        ]
    };
    for name in &old[5..] {
        assert_eq!(
            path(&one, db, name),
            (1, v1_path.clone(), "v1".to_string()),
            "{name} ends through v1's states, once each"
        );
    }
    for name in &old[..5] {
        assert_eq!(
            path(&one, db, name),
            (2, v2_path("approval"), "v2".to_string()),
            "{name} moved to v2 and ended through v2's states"
        );
    }
    for name in &new {
        assert_eq!(
            path(&one, db, name),
            (2, v2_path("review"), "v2".to_string()),
            "{name} ends through v2's states, once each"
        );
    }
}

#[test]
fn a_rolling_deploy_runs_each_instance_on_its_version_through_sigkills() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    rolling_deploy_on(&d.join("sqlite"), &d.join("phasm.db").display().to_string());
    if let Some(schema) = postgres_schema("rolling_deploy") {
        rolling_deploy_on(&d.join("postgres"), &schema.url);
    }
}
