//! `phasm deploy` and `phasm versions`: each machine whose definition changed is stored as its
//! next version, the same file again stores nothing, a file that fails validation changes
//! nothing; `run`, `worker` and `serve` deploy their file first. On SQLite and PostgreSQL.

use std::path::Path;

use crate::common::{phasm, postgres_schema, status, worker};

fn until(what: &str, mut done: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    while !done() {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(60),
            "timed out waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

fn kill(mut child: std::process::Child) {
    child.kill().expect("SIGKILL");
    let _ = child.wait();
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

const ONE: &str = "actions:\n  Go:\n    exec: [sh, -c, \"cat > /dev/null\"]\nstate_machines:\n- name: Order\n  states:\n  - name: a\n    initial: true\n    final: true\n    action: Go\n- name: Refund\n  states:\n  - name: r\n    initial: true\n    final: true\n";

fn deploys_on(d: &Path, db: &str) {
    std::fs::write(d.join("fsm.yaml"), ONE).unwrap();
    let out = phasm(d, db, &["deploy", "fsm.yaml"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "Order v1 (new)\nRefund v1 (new)\n");
    let out = phasm(d, db, &["deploy", "fsm.yaml"]);
    assert_eq!(
        text(&out.stdout),
        "Order v1 (unchanged)\nRefund v1 (unchanged)\n"
    );
    // Order changes (its binding's program); Refund does not.
    std::fs::write(d.join("fsm.yaml"), ONE.replace("cat > /dev/null", "cat")).unwrap();
    let out = phasm(d, db, &["deploy", "fsm.yaml"]);
    assert_eq!(text(&out.stdout), "Order v2 (new)\nRefund v1 (unchanged)\n");
    // A file that fails validation changes nothing.
    std::fs::write(
        d.join("bad.yaml"),
        ONE.replace("final: true\n    action", "action"),
    )
    .unwrap();
    let out = phasm(d, db, &["deploy", "fsm.yaml", "bad.yaml"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    // The same machine in two files is refused, naming both.
    std::fs::write(d.join("copy.yaml"), ONE).unwrap();
    let out = phasm(d, db, &["deploy", "fsm.yaml", "copy.yaml"]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(
        err.contains("defined in both") && err.contains("copy.yaml"),
        "{err}"
    );
    let out = phasm(d, db, &["versions", "Order", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let numbers: Vec<u64> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["version"].as_u64().unwrap())
        .collect();
    assert_eq!(numbers, [1, 2]);
    assert_eq!(list[1]["path"], "fsm.yaml");
    // `run` deploys its file first: a change it brings is a new version.
    std::fs::write(
        d.join("fsm.yaml"),
        ONE.replace("cat > /dev/null", "cat >&2"),
    )
    .unwrap();
    let out = phasm(
        d,
        db,
        &["run", "fsm.yaml", "--machine", "Order", "--name", "o1"],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    // The instance records the version it started on.
    let out = phasm(d, db, &["status", "o1", "--json"]);
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["version"], 3, "{status}");
    let out = phasm(d, db, &["status", "o1"]);
    assert!(
        text(&out.stdout).contains("machine   Order v3"),
        "{}",
        text(&out.stdout)
    );
    let out = phasm(d, db, &["versions"]);
    let shown = text(&out.stdout);
    assert!(
        shown.contains("Order v3") && shown.contains("Refund v1"),
        "{shown}"
    );
    assert!(!shown.contains("Refund v2"), "{shown}");
    // A file without Refund, whose instance still runs, leaves its versions and says so.
    let out = phasm(
        d,
        db,
        &["start", "fsm.yaml", "--machine", "Refund", "--name", "r1"],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let only_order = ONE.split("- name: Refund").next().unwrap().to_string();
    std::fs::write(d.join("order.yaml"), only_order).unwrap();
    let out = phasm(d, db, &["deploy", "order.yaml"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "Order v4 (new)\nRefund: not in these files; its versions stay, and 1 instance still runs on them\n"
    );
    // `run` of a file whose content is an older version starts on that version, and says
    // that it is not the latest.
    std::fs::write(
        d.join("fsm.yaml"),
        ONE.replace("cat > /dev/null", "cat >&2"),
    )
    .unwrap();
    let out = phasm(
        d,
        db,
        &["run", "fsm.yaml", "--machine", "Order", "--name", "o2"],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("holds Order v3, but v4 is the latest deployed"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(crate::common::status(d, db, "o2")["version"], 3);
    // Scrubbing removes the versions no instance is on, never the latest.
    let out = phasm(d, db, &["scrub", "--older-than", "30d"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).ends_with("removed 2 versions no instance is on: Order v1, Order v2\n"),
        "{}",
        text(&out.stdout)
    );
    let out = phasm(d, db, &["versions", "--json"]);
    let left: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let left: Vec<String> = left
        .as_array()
        .unwrap()
        .iter()
        .map(|v| format!("{} v{}", v["machine"].as_str().unwrap(), v["version"]))
        .collect();
    assert_eq!(left, ["Order v3", "Order v4", "Refund v1"]);
}

#[test]
fn deploys_store_each_changed_machine_once_on_sqlite_and_postgres() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    deploys_on(d, &d.join("phasm.db").display().to_string());
    if let Some(schema) = postgres_schema("versions") {
        deploys_on(d, &schema.url);
    }
}

/// Order waits in `approval` for `approve` (v1) or `approved` (v2).
const WAITING: &str = "state_machines:\n- name: Order\n  states:\n  - name: approval\n    initial: true\n    wait: {timeout: 1h, timeout_event: expired}\n    transitions:\n    - event: approve\n      to: done\n    - event: expired\n      to: done\n  - name: done\n    final: true\n";

fn sends_and_starts_on(d: &Path, db: &str) {
    std::fs::write(d.join("fsm.yaml"), WAITING).unwrap();
    assert!(phasm(d, db, &["deploy", "fsm.yaml"]).status.success());
    let out = phasm(d, db, &["start", "fsm.yaml", "--name", "old"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    std::fs::write(
        d.join("fsm.yaml"),
        WAITING.replace("event: approve\n", "event: approved\n"),
    )
    .unwrap();
    assert!(phasm(d, db, &["deploy", "fsm.yaml"]).status.success());
    let out = phasm(d, db, &["start", "fsm.yaml", "--name", "new"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    // Without --file, an event is checked against the version the instance runs on.
    let out = phasm(d, db, &["send", "old", "approvd"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(err.contains("accept: approve, expired"), "{err}");
    let out = phasm(d, db, &["send", "old", "approved"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "v2's event is not v1's: {}",
        text(&out.stderr)
    );
    let out = phasm(d, db, &["send", "new", "approved"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = phasm(d, db, &["send", "old", "approve"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    // --version starts on an older version; one that is not stored is refused, naming those
    // that are.
    let out = phasm(
        d,
        db,
        &["start", "fsm.yaml", "--name", "pinned", "--version", "1"],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = phasm(d, db, &["status", "pinned", "--json"]);
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["version"], 1, "{status}");
    let out = phasm(d, db, &["send", "pinned", "approve"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = phasm(d, db, &["start", "fsm.yaml", "--version", "9"]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("no version 9") && err.contains("v1, v2"),
        "{err}"
    );
}

#[test]
fn events_and_starts_follow_the_instance_version_on_sqlite_and_postgres() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    sends_and_starts_on(d, &d.join("phasm.db").display().to_string());
    if let Some(schema) = postgres_schema("versions_send") {
        sends_and_starts_on(d, &schema.url);
    }
}

fn upgrades_on(d: &Path, db: &str) {
    let v1 = WAITING.replace("name: Order", "name: Shop");
    std::fs::write(d.join("fsm.yaml"), &v1).unwrap();
    assert!(phasm(d, db, &["deploy", "fsm.yaml"]).status.success());
    for name in ["s0", "s1", "s2", "s3"] {
        let out = phasm(d, db, &["start", "fsm.yaml", "--name", name]);
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
    // The instances wait in `approval` once a worker ran their first step.
    let w = worker(d, db, &[]);
    until("the waits", || {
        ["s0", "s1", "s2", "s3"].iter().all(|n| {
            status(d, db, n)["history"]
                .as_array()
                .is_some_and(|h| h.len() == 1)
        })
    });
    kill(w);
    // v2 renames `approval` to `review`.
    let v2 = v1.replace("approval", "review");
    std::fs::write(d.join("fsm.yaml"), &v2).unwrap();
    assert!(phasm(d, db, &["deploy", "fsm.yaml"]).status.success());
    let out = phasm(d, db, &["upgrade", "s0"]);
    assert_eq!(out.status.code(), Some(1));
    let said = text(&out.stdout);
    assert!(
        said.contains(
            "s0: not moved: state `approval` is not in v2: map it with `--map approval=NEW`"
        ),
        "{said}"
    );
    let out = phasm(
        d,
        db,
        &["upgrade", "s0", "--map", "approval=review", "--dry-run"],
    );
    assert!(out.status.success(), "{}", text(&out.stdout));
    assert_eq!(text(&out.stdout), "s0: would move v1 → v2\n");
    assert_eq!(status(d, db, "s0")["version"], 1, "a dry run moves nothing");
    let out = phasm(
        d,
        db,
        &[
            "upgrade",
            "--machine",
            "Shop",
            "--from",
            "1",
            "--map",
            "approval=review",
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stdout));
    let said = text(&out.stdout);
    assert_eq!(said.lines().count(), 4, "{said}");
    assert!(said.contains("s0: moved v1 → v2"), "{said}");
    let out = phasm(d, db, &["upgrade", "s0", "--to", "1"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stdout).contains("v1 is older than v2"),
        "{}",
        text(&out.stdout)
    );
    // `phasm diff` says what changed.
    let out = phasm(d, db, &["diff", "Shop", "1", "2"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let said = text(&out.stdout);
    assert!(
        said.contains("- state `approval`") && said.contains("+ state `review`"),
        "{said}"
    );
    assert!(said.contains("+ transition `review --approve`"), "{said}");
    let out = phasm(d, db, &["diff", "Shop", "1", "1"]);
    assert_eq!(text(&out.stdout), "Shop v1 and v1 do not differ\n");
    let out = phasm(d, db, &["diff", "Shop", "1", "7"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("its versions are v1, v2"),
        "{}",
        text(&out.stderr)
    );
    // The moved instance takes its event and ends through v2's states.
    let out = phasm(d, db, &["send", "s0", "approve"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    // `phasm versions` counts the live instances on each version.
    let out = phasm(d, db, &["versions", "Shop"]);
    let listed = text(&out.stdout);
    assert!(
        listed.contains("Shop v1 ") && listed.contains("no instances"),
        "{listed}"
    );
    assert!(
        listed.contains("4 running (3 waiting), 0 failed"),
        "{listed}"
    );
    let out = phasm(d, db, &["versions", "Shop", "--json"]);
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (list[1]["running"].as_u64(), list[1]["waiting"].as_u64()),
        (Some(4), Some(3)),
        "{list}"
    );
    // `phasm graph` draws a stored version: MACHINE@N, MACHINE (the latest), an instance's.
    let drawn = |target: &str| {
        let out = phasm(d, db, &["graph", target, "--format", "dot"]);
        assert!(out.status.success(), "{target}: {}", text(&out.stderr));
        text(&out.stdout)
    };
    assert!(drawn("Shop@1").contains("approval") && !drawn("Shop@1").contains("review"));
    assert!(drawn("Shop").contains("review") && !drawn("Shop").contains("approval"));
    assert!(drawn("s1").contains("review"), "s1 runs on v2");
    let out = phasm(d, db, &["graph", "Nothing"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    let out = phasm(d, db, &["graph", "Shop@9"]);
    assert!(
        text(&out.stderr).contains("its versions are v1, v2"),
        "{}",
        text(&out.stderr)
    );
    // Schedules and queues without a file read the deployed versions.
    let out = phasm(d, db, &["schedules"]);
    assert_eq!(
        text(&out.stdout),
        "no schedules in the deployed versions\n",
        "{}",
        text(&out.stderr)
    );
    assert!(phasm(d, db, &["queues"]).status.success());
    // Every instance left v1: scrubbing removes it (v2, the latest, stays).
    let out = phasm(d, db, &["scrub", "--older-than", "1d"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).ends_with("removed 1 version no instance is on: Shop v1\n"),
        "{}",
        text(&out.stdout)
    );
    let w = worker(d, db, &[]);
    until("s0 to complete", || {
        status(d, db, "s0")["status"] == "completed"
    });
    kill(w);
    let s0 = status(d, db, "s0");
    assert_eq!(s0["version"], 2, "{s0}");
    assert_eq!(s0["history"][1]["from"], "review", "{s0}");
    // A reset needs no file: the step is built again from the instance's version.
    let step = s0["history"][1]["id"]
        .as_i64()
        .expect("a step id")
        .to_string();
    let out = phasm(d, db, &["reset", "s0", "--step", &step]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(status(d, db, "s0")["status"], "running");
    let out = phasm(d, db, &["logs", "s0"]);
    assert!(
        text(&out.stdout)
            .contains("upgraded from v1 to v2 of `Shop` (states renamed: approval → review)"),
        "{}",
        text(&out.stdout)
    );
}

#[test]
fn instances_move_forward_only_where_their_states_exist_on_sqlite_and_postgres() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    upgrades_on(d, &d.join("phasm.db").display().to_string());
    if let Some(schema) = postgres_schema("versions_upgrade") {
        upgrades_on(d, &schema.url);
    }
}

/// `phasm worker` without a file works on what the database has deployed, each step bound by
/// its own version (an exec binding here); with nothing deployed it says what to do.
fn works_on_what_is_deployed(d: &Path, db: &str) {
    let elsewhere = d.join("elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    let out = phasm(&elsewhere, db, &["worker"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("no machine is deployed in this database"),
        "{}",
        text(&out.stderr)
    );
    std::fs::write(d.join("fsm.yaml"), ONE).unwrap();
    assert!(phasm(d, db, &["deploy", "fsm.yaml"]).status.success());
    let out = phasm(
        d,
        db,
        &["start", "fsm.yaml", "--machine", "Order", "--name", "w1"],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    // The file is gone: the worker reads the machines from the database.
    std::fs::remove_file(d.join("fsm.yaml")).unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_phasm"))
        .args(["worker", "--lease", "2s"])
        .current_dir(&elsewhere)
        .env("PHASM_DB", db)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    until("w1 to complete", || {
        status(d, db, "w1")["status"] == "completed"
    });
    child.kill().unwrap();
    let out = child.wait_with_output().unwrap();
    let said = text(&out.stderr);
    assert!(
        said.contains("working on the deployed versions (Order v1, Refund v1)"),
        "{said}"
    );
}

#[test]
fn a_worker_without_a_file_works_on_what_is_deployed_on_sqlite_and_postgres() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    works_on_what_is_deployed(d, &d.join("phasm.db").display().to_string());
    if let Some(schema) = postgres_schema("versions_deployed") {
        works_on_what_is_deployed(d, &schema.url);
    }
}

/// A machine of `file` binding `CheckOrder` to a program that tags the context with `tag`.
fn tagged(machine: &str, tag: &str) -> String {
    format!(
        "actions:\n  CheckOrder:\n    exec: [sh, -c, 'cat > /dev/null; echo \"{{\\\"context\\\": {{\\\"tag\\\": \\\"{tag}\\\"}}}}\"']\nstate_machines:\n- name: {machine}\n  states:\n  - name: check\n    initial: true\n    final: true\n    action: CheckOrder\n"
    )
}

/// Two files that both bind `CheckOrder`, differently, deploy into one database and are
/// worked on by one worker: each machine runs its own file's binding.
fn two_files_keep_their_bindings(d: &Path, db: &str) {
    std::fs::write(d.join("a.yaml"), tagged("Alpha", "a")).unwrap();
    std::fs::write(d.join("b.yaml"), tagged("Beta", "b")).unwrap();
    let out = phasm(d, db, &["deploy", "a.yaml", "b.yaml"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    for (file, name) in [("a.yaml", "alpha-1"), ("b.yaml", "beta-1")] {
        let out = phasm(d, db, &["start", file, "--name", name]);
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_phasm"))
        .args(["worker", "a.yaml", "b.yaml", "--lease", "2s"])
        .current_dir(d)
        .env("PHASM_DB", db)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    until("both to complete", || {
        ["alpha-1", "beta-1"]
            .iter()
            .all(|n| status(d, db, n)["status"] == "completed")
    });
    kill(child);
    for (name, tag) in [("alpha-1", "a"), ("beta-1", "b")] {
        let s = status(d, db, name);
        assert_eq!(s["context"]["tag"], tag, "{name}: {s}");
    }
}

#[test]
fn files_binding_the_same_name_keep_their_own_bindings_on_sqlite_and_postgres() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    two_files_keep_their_bindings(d, &d.join("phasm.db").display().to_string());
    if let Some(schema) = postgres_schema("versions_two_files") {
        two_files_keep_their_bindings(d, &schema.url);
    }
}
