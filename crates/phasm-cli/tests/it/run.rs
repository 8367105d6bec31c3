//! `phasm run`, `start`, `status`, `list`, `logs`, `retry`, `cancel` as a user runs them.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn phasm(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_phasm"))
        .args(args)
        .current_dir(dir)
        .env("PHASM_DB", dir.join("phasm.db"))
        .output()
        .expect("phasm runs")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn last_json(out: &Output) -> Value {
    let stdout = text(&out.stdout);
    let line = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(line).unwrap_or_else(|e| panic!("last line is not JSON ({e}): {stdout}"))
}

/// A copy of an example in a scratch folder.
fn example(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let from = repo().join("examples").join(name);
    copy_dir(&from, dir.path());
    dir
}

fn copy_dir(from: &Path, to: &Path) {
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            std::fs::create_dir_all(&target).unwrap();
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

const SMALL: &str = "actions:\n  Go:\n    exec: [sh, -c, \"cat > /dev/null; echo '{\\\"event\\\": \\\"next\\\", \\\"context\\\": {\\\"done\\\": true}}'\"]\n  Stop:\n    exec: [sh, -c, \"cat > /dev/null; echo '{\\\"halt\\\": \\\"not today\\\"}'\"]\nstate_machines:\n- name: Small\n  context_types:\n    count: int\n  states:\n  - name: a\n    initial: true\n    action: Go\n    transitions:\n    - event: next\n      to: b\n  - name: b\n    final: true\n- name: Halting\n  states:\n  - name: a\n    initial: true\n    action: Stop\n    transitions:\n    - event: next\n      to: b\n  - name: b\n    final: true\n";

fn small() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("fsm.yaml"), SMALL).unwrap();
    dir
}

#[test]
fn run_completes_and_reports_json() {
    let dir = small();
    let out = phasm(
        dir.path(),
        &[
            "run", "fsm.yaml", "-m", "Small", "--set", "count=3", "--json",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let result = last_json(&out);
    assert_eq!(result["status"], "completed");
    assert_eq!(result["machine"], "Small");
    assert_eq!(result["steps"], 2);
    assert_eq!(result["context"]["done"], true);
    let name = result["instance"].as_str().unwrap();
    assert!(name.starts_with("Small-"), "{name}");

    let status = phasm(dir.path(), &["status", name, "--json"]);
    let s: Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(s["instance"], name);
    assert_eq!(s["status"], "completed");
    assert_eq!(
        s["initial_context"]["count"], 3,
        "--set converts by context_types"
    );
    let h = &s["history"];
    assert_eq!(h[0]["from"], Value::Null);
    assert_eq!(h[0]["event"], "pseudo-init");
    assert_eq!(h[0]["to"], "a");
    assert_eq!(h[1]["from"], "a");
    assert_eq!(h[1]["event"], "next");
    assert_eq!(h[1]["to"], "b");
    assert_eq!(h[1]["attempt"], 0);
    assert!(h[1]["at"].as_str().unwrap().ends_with('Z'));
}

#[test]
fn a_halted_run_exits_zero() {
    let dir = small();
    let out = phasm(dir.path(), &["run", "fsm.yaml", "-m", "Halting", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let result = last_json(&out);
    assert_eq!(result["status"], "halted");
    assert_eq!(result["error"], "not today");
}

#[test]
fn a_failed_run_exits_one_and_retry_resumes_it() {
    let dir = example("report");
    let d = dir.path();
    let out = phasm(d, &["run", "report.yaml", "--json"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let result = last_json(&out);
    assert_eq!(result["status"], "failed");
    let error = result["error"].as_str().unwrap();
    assert!(error.contains("outbox/ does not exist"), "{error}");
    assert!(error.contains("(after 3 attempts)"), "{error}");
    let name = result["instance"].as_str().unwrap().to_string();

    let logs = text(&phasm(d, &["logs", &name]).stdout);
    assert_eq!(
        logs.matches("attempt 0 failed").count() + logs.matches("attempt 1 failed").count(),
        2,
        "{logs}"
    );

    std::fs::create_dir(d.join("outbox")).unwrap();
    let retry = phasm(d, &["retry", &name]);
    assert_eq!(retry.status.code(), Some(0), "{}", text(&retry.stderr));
    let mut worker = Command::new(env!("CARGO_BIN_EXE_phasm"))
        .args(["worker", "report.yaml"])
        .current_dir(d)
        .env("PHASM_DB", d.join("phasm.db"))
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s: Value =
            serde_json::from_slice(&phasm(d, &["status", &name, "--json"]).stdout).unwrap();
        if s["status"] == "completed" {
            break;
        }
        assert!(Instant::now() < deadline, "not resumed: {s}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = worker.kill();
    let _ = worker.wait();
    let published = std::fs::read_to_string(d.join("outbox/published.txt")).unwrap();
    assert_eq!(published.lines().count(), 1);
    // Only failed instances can be retried.
    assert_eq!(phasm(d, &["retry", &name]).status.code(), Some(1));
}

#[test]
fn start_is_idempotent_and_cancel_stops_an_instance() {
    let dir = small();
    let d = dir.path();
    let first = phasm(d, &["start", "fsm.yaml", "-m", "Small", "--name", "job-1"]);
    assert_eq!(first.status.code(), Some(0), "{}", text(&first.stderr));
    assert_eq!(text(&first.stdout).lines().last(), Some("job-1"));
    let again = phasm(d, &["start", "fsm.yaml", "-m", "Small", "--name", "job-1"]);
    assert_eq!(text(&again.stdout).lines().last(), Some("job-1"));
    assert!(text(&again.stderr).contains("already exists (running); nothing was started"));

    let s: Value =
        serde_json::from_slice(&phasm(d, &["status", "job-1", "--json"]).stdout).unwrap();
    assert_eq!(s["status"], "running");
    assert_eq!(s["tasks"].as_array().unwrap().len(), 1);

    assert_eq!(
        phasm(d, &["cancel", "job-1", "--reason", "started by mistake"])
            .status
            .code(),
        Some(0)
    );
    assert_eq!(
        phasm(d, &["cancel", "job-1"]).status.code(),
        Some(1),
        "already cancelled"
    );
    let s: Value =
        serde_json::from_slice(&phasm(d, &["status", "job-1", "--json"]).stdout).unwrap();
    assert_eq!(s["error"], "started by mistake", "the reason is kept: {s}");
    let listed: Value =
        serde_json::from_slice(&phasm(d, &["list", "--status", "cancelled", "--json"]).stdout)
            .unwrap();
    assert_eq!(listed[0]["instance"], "job-1");
    let text_list = text(&phasm(d, &["list"]).stdout);
    assert!(
        text_list.contains("job-1") && text_list.contains("cancelled"),
        "{text_list}"
    );
}

#[test]
fn bad_input_exits_two_with_a_clear_message() {
    let dir = small();
    let d = dir.path();
    let cases: [(&[&str], &str); 7] = [
        (
            &["run", "fsm.yaml", "-m", "Small", "--set", "count=many"],
            "`count` is typed `int` in machine `Small`, but `many` is not a whole number",
        ),
        (
            &["run", "fsm.yaml", "-m", "Small", "--context", "[1]"],
            "--context must be a JSON object",
        ),
        (
            &["run", "fsm.yaml", "-m", "Small", "--context", "{oops"],
            "--context is not valid JSON",
        ),
        (
            &["run", "fsm.yaml"],
            "defines 2 machines; choose one with --machine NAME",
        ),
        (
            &["run", "fsm.yaml", "-m", "Nope"],
            "has no machine named `Nope`",
        ),
        (
            &["start", "fsm.yaml", "-m", "Small", "--name", "bad name"],
            "invalid instance name `bad name`",
        ),
        (
            &["status", "no-such-instance"],
            "no instance named `no-such-instance`",
        ),
    ];
    for (args, message) in cases {
        let out = phasm(d, args);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{args:?}: {}",
            text(&out.stderr)
        );
        assert!(
            text(&out.stderr).contains(message),
            "{args:?}: {}",
            text(&out.stderr)
        );
    }
}

#[test]
fn database_errors_exit_with_their_own_status() {
    let dir = small();
    let d = dir.path();
    for args in [
        &[
            "run",
            "fsm.yaml",
            "-m",
            "Small",
            "--db",
            "postgres://postgres@127.0.0.1:1/nowhere",
        ][..],
        &[
            "status",
            "x",
            "--db",
            "postgres://postgres@127.0.0.1:1/nowhere",
        ][..],
        &["list", "--db", "postgres://postgres@127.0.0.1:1/nowhere"][..],
    ] {
        let out = phasm(d, args);
        assert_eq!(
            out.status.code(),
            Some(3),
            "{args:?}: {}",
            text(&out.stderr)
        );
        assert!(
            text(&out.stderr).contains("cannot connect to PostgreSQL"),
            "{args:?}"
        );
    }
}

#[test]
fn unbound_actions_are_refused_before_anything_runs() {
    let dir = tempfile::tempdir().unwrap();
    let fsm = repo().join("crates/phasm/tests/fixtures/fantasm-yaml/test/fantasm_tests/yaml/test-TaskQueueFSMTests.yaml");
    let out = phasm(
        dir.path(),
        &["run", fsm.to_str().unwrap(), "-m", "TaskQueueFSMTests"],
    );
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(
        err.contains("uses actions that are bound to nothing"),
        "{err}"
    );
    assert!(err.contains("`CountExecuteCalls` (looked up as `fantasm_tests.actions.CountExecuteCalls` or `CountExecuteCalls`)"), "{err}");
    assert!(!dir.path().join("phasm.db").exists(), "nothing was written");
}

#[test]
fn an_oversized_start_context_is_refused() {
    let dir = small();
    let big = format!("{{\"blob\": \"{}\"}}", "x".repeat(2000));
    let out = phasm(
        dir.path(),
        &[
            "start",
            "fsm.yaml",
            "-m",
            "Small",
            "--context",
            &big,
            "--max-context-bytes",
            "1000",
        ],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("over the limit of 1000 bytes"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn run_waits_for_the_instances_it_spawned() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(
        d.join("fsm.yaml"),
        "actions:\n  Spawn:\n    exec: [sh, -c, \"cat > /dev/null; echo '{\\\"spawn\\\": [{\\\"machine\\\": \\\"Child\\\", \\\"contexts\\\": [{\\\"n\\\": 1}, {\\\"n\\\": 2}]}]}'\"]\n  Slow:\n    exec: [sh, -c, \"cat > /dev/null; sleep 0.5\"]\nstate_machines:\n- name: Parent\n  states:\n  - name: a\n    initial: true\n    final: true\n    action: Spawn\n- name: Child\n  states:\n  - name: c\n    initial: true\n    final: true\n    action: Slow\n",
    )
    .unwrap();
    let out = phasm(d, &["run", "fsm.yaml", "-m", "Parent", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let result = last_json(&out);
    let children = result["children"].as_array().unwrap();
    assert_eq!(children.len(), 2);
    for child in children {
        let s: Value = serde_json::from_slice(
            &phasm(d, &["status", child.as_str().unwrap(), "--json"]).stdout,
        )
        .unwrap();
        assert_eq!(
            s["status"], "completed",
            "run returned before its child finished: {s}"
        );
        assert_eq!(s["parent"], result["instance"]);
    }
}

#[test]
fn targeted_steps_wait_for_a_worker_of_their_pool() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(
        d.join("fsm.yaml"),
        "actions:\n  Go:\n    exec: [sh, -c, \"cat > /dev/null; echo '{\\\"event\\\": \\\"next\\\"}'\"]\n  End:\n    exec: [sh, -c, \"cat > /dev/null\"]\nstate_machines:\n- name: Pools\n  states:\n  - name: light\n    initial: true\n    action: Go\n    transitions:\n    - event: next\n      to: heavy\n      target: gpu\n  - name: heavy\n    final: true\n    action: End\n",
    )
    .unwrap();
    assert!(phasm(d, &["start", "fsm.yaml", "--name", "p"])
        .status
        .success());
    // Before any worker runs, status says so.
    let shown = text(&phasm(d, &["status", "p"]).stdout);
    assert!(
        shown.contains("waiting: no worker is running: start one with `phasm worker FILE`"),
        "{shown}"
    );
    // A worker, and what status and `phasm workers` say while it runs.
    let run_worker = |extra: &[&str]| {
        let child = Command::new(env!("CARGO_BIN_EXE_phasm"))
            .args(["worker", "fsm.yaml"])
            .args(extra)
            .current_dir(d)
            .env("PHASM_DB", d.join("phasm.db"))
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(1500));
        let workers = text(&phasm(d, &["workers", "--json"]).stdout);
        let status = text(&phasm(d, &["status", "p"]).stdout);
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let said = text(&child.wait_with_output().unwrap().stderr);
        (said, workers, status)
    };
    let (said, workers, status) = run_worker(&[]);
    let workers: Value = serde_json::from_str(&workers).unwrap();
    assert_eq!(workers["workers"].as_array().unwrap().len(), 1, "{workers}");
    assert_eq!(workers["workers"][0]["targets"], "untargeted", "{workers}");
    assert_eq!(
        workers["workers"][0]["machines"],
        json!(["Pools"]),
        "{workers}"
    );
    // What it says of itself: its process, the phasm version, its concurrency.
    assert_eq!(
        workers["workers"][0]["pid"].as_u64().map(|p| p > 0),
        Some(true),
        "{workers}"
    );
    assert_eq!(
        workers["workers"][0]["version"],
        env!("CARGO_PKG_VERSION"),
        "{workers}"
    );
    assert_eq!(workers["workers"][0]["concurrency"], 64, "{workers}");
    assert_eq!(workers["gone"], json!([]), "{workers}");
    assert!(
        status.contains(
            "waiting: no running worker takes target `gpu`: start one with `phasm worker FILE --target gpu`"
        ),
        "{status}"
    );
    // A worker that stopped is gone from the list at once.
    assert_eq!(
        text(&phasm(d, &["workers"]).stdout).trim(),
        format!("no worker is running on {}", d.join("phasm.db").display())
    );
    // The worker says at start which of the file's targets it will not serve.
    assert!(
        said.contains("warning: this worker does not take steps with target `gpu`"),
        "{said}"
    );
    let s: Value = serde_json::from_slice(&phasm(d, &["status", "p", "--json"]).stdout).unwrap();
    assert_eq!(s["status"], "running", "the gpu step waits: {s}");
    assert_eq!(s["history"].as_array().unwrap().len(), 1);
    assert_eq!(s["tasks"][0]["target"], "gpu", "{s}");
    let shown = text(&phasm(d, &["status", "p"]).stdout);
    assert!(
        shown.contains("target `gpu`: only `phasm worker --target gpu` takes it"),
        "{shown}"
    );
    let (said, workers, _) = run_worker(&["--target", "gpu"]);
    assert!(workers.contains(r#""targets":["gpu"]"#), "{workers}");
    assert!(!said.contains("does not take steps"), "{said}");
    // A worker shows each step it commits, without RUST_LOG.
    assert!(said.contains("p: light --next--> heavy"), "{said}");
    let s: Value = serde_json::from_slice(&phasm(d, &["status", "p", "--json"]).stdout).unwrap();
    assert_eq!(s["status"], "completed", "{s}");
}

#[test]
fn scrub_removes_ended_instances_and_keeps_running_ones() {
    let dir = small();
    let d = dir.path();
    assert_eq!(
        phasm(d, &["run", "fsm.yaml", "-m", "Small"]).status.code(),
        Some(0)
    );
    assert!(phasm(
        d,
        &["start", "fsm.yaml", "-m", "Small", "--name", "waiting"]
    )
    .status
    .success());
    let kept = phasm(d, &["scrub", "--older-than", "30d"]);
    assert_eq!(
        text(&kept.stdout).trim(),
        "removed 0 ended instances older than 30d (with their history and logs)"
    );
    std::thread::sleep(Duration::from_millis(20));
    let out = phasm(d, &["scrub", "--older-than", "0s", "--batch", "1"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).starts_with("removed 1 ended instance older than 0s"),
        "{}",
        text(&out.stdout)
    );
    let listed: Value = serde_json::from_slice(&phasm(d, &["list", "--json"]).stdout).unwrap();
    let names: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["instance"].as_str())
        .collect();
    assert_eq!(names, ["waiting"], "the running instance stays");
}

#[test]
fn the_result_names_the_state_the_instance_ended_in() {
    let dir = example("orders");
    let d = dir.path();
    let out = phasm(d, &["run", "orders.yaml", "--set", "card=declined"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let first = text(&out.stdout);
    assert!(
        first
            .lines()
            .next()
            .unwrap_or_default()
            .contains(" completed in state `cancelled` after 3 steps in "),
        "{first}"
    );
    let out = phasm(
        d,
        &["run", "orders.yaml", "--set", "card=declined", "--json"],
    );
    let json = last_json(&out);
    assert_eq!(json["state"], "cancelled", "{json}");
    assert_eq!(json["states"], serde_json::json!(["cancelled"]), "{json}");
}

#[test]
fn on_a_terminal_the_transitions_stay_above_the_spinner() {
    let dir = small();
    let d = dir.path();
    // `script` gives phasm a terminal; what it shows is captured in the typescript file.
    let typescript = d.join("typescript");
    let command = format!("{} run fsm.yaml -m Small", env!("CARGO_BIN_EXE_phasm"));
    let status = Command::new("script")
        .args(["-qec", &command])
        .arg(&typescript)
        .current_dir(d)
        .env("PHASM_DB", d.join("phasm.db"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .status()
        .expect("script runs (util-linux)");
    assert!(status.success());
    let screen = std::fs::read_to_string(&typescript).unwrap();
    assert!(screen.contains("start --pseudo-init--> "), "{screen}");
    assert!(screen.contains(" completed in state `"), "{screen}");
}

#[test]
fn string_values_of_typed_keys_are_converted_at_start() {
    let dir = small();
    let d = dir.path();
    let out = phasm(
        d,
        &[
            "run",
            "fsm.yaml",
            "-m",
            "Small",
            "--context",
            r#"{"count": "3", "other": "4"}"#,
            "--json",
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let result = last_json(&out);
    let status = phasm(
        d,
        &["status", result["instance"].as_str().unwrap(), "--json"],
    );
    let status: Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(status["initial_context"]["count"], 3, "{status}");
    assert_eq!(status["initial_context"]["other"], "4", "{status}");
    let bad = phasm(
        d,
        &[
            "start",
            "fsm.yaml",
            "-m",
            "Small",
            "--context",
            r#"{"count": "three"}"#,
        ],
    );
    assert_eq!(bad.status.code(), Some(2));
    assert!(
        text(&bad.stderr).contains(
            "`count` is typed `int` in machine `Small`, but `three` is not a whole number"
        ),
        "{}",
        text(&bad.stderr)
    );
}

#[test]
fn smaller_messages_read_right() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(
        d.join("fsm.yaml"),
        "actions:\n  Fail:\n    exec: [sh, -c, \"cat > /dev/null; exit 3\"]\nstate_machines:\n- name: F\n  task_retry_limit: 0\n  states:\n  - name: a\n    initial: true\n    final: true\n    action: Fail\n",
    )
    .unwrap();
    let out = phasm(d, &["run", "fsm.yaml"]);
    assert_eq!(out.status.code(), Some(1));
    let shown = text(&out.stdout);
    assert!(
        shown.contains(" failed before its first step in "),
        "{shown}"
    );
    assert!(shown.contains("(after 1 attempt)"), "{shown}");
    let help = text(&phasm(d, &["status", "--help"]).stdout);
    assert!(help.contains("postgres://"), "{help}");
    // Durability is for commands that write.
    for read_only in ["status", "list", "logs"] {
        let help = text(&phasm(d, &[read_only, "--help"]).stdout);
        assert!(!help.contains("--sync"), "{read_only}: {help}");
    }
    assert!(text(&phasm(d, &["worker", "--help"]).stdout).contains("--sync"));
}

/// Running instances in the database `db` (a SQLite path or a PostgreSQL URL); 0 when a start
/// killed early left a SQLite file without phasm's tables (its schema is created in a
/// transaction of its own, all or nothing).
fn instance_count(db: &str) -> usize {
    let out = Command::new(env!("CARGO_BIN_EXE_phasm"))
        .args(["list", "--json", "--limit", "100000", "--db", db])
        .output()
        .unwrap();
    if !out.status.success() {
        let err = text(&out.stderr);
        assert!(err.contains("schema version 0"), "{err}");
        return 0;
    }
    serde_json::from_slice::<Vec<Value>>(&out.stdout)
        .unwrap()
        .len()
}

#[test]
fn start_contexts_starts_one_instance_per_line_or_none() {
    let dir = small();
    let p = dir.path();
    std::fs::write(
        p.join("orders.jsonl"),
        "{\"count\": \"1\"}\n\n{\"count\": 2}\n{\"count\": \"3\"}\n",
    )
    .unwrap();
    let out = phasm(
        p,
        &[
            "start",
            "fsm.yaml",
            "--machine",
            "Small",
            "--contexts",
            "orders.jsonl",
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let names: Vec<String> = text(&out.stdout).lines().map(str::to_string).collect();
    assert_eq!(names.len(), 3, "{names:?}");
    // In order, and `--set`'s typed conversion applies to each line.
    let first = phasm(p, &["status", &names[0], "--json"]);
    assert_eq!(last_json(&first)["context"]["count"], 1);
    let third = phasm(p, &["status", &names[2], "--json"]);
    assert_eq!(last_json(&third)["context"]["count"], 3);

    // A bad line: nothing is started, and the message points at it.
    std::fs::write(p.join("bad.jsonl"), "{\"count\": 4}\n[1, 2]\n").unwrap();
    let out = phasm(
        p,
        &[
            "start",
            "fsm.yaml",
            "--machine",
            "Small",
            "--contexts",
            "bad.jsonl",
        ],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("bad.jsonl:2: each line must be a JSON object"),
        "{}",
        text(&out.stderr)
    );
    std::fs::write(
        p.join("typed.jsonl"),
        "{\"count\": 4}\n{\"count\": \"many\"}\n",
    )
    .unwrap();
    let out = phasm(
        p,
        &[
            "start",
            "fsm.yaml",
            "--machine",
            "Small",
            "--contexts",
            "typed.jsonl",
        ],
    );
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(
        err.contains("typed.jsonl:2:") && err.contains("nothing was started"),
        "{err}"
    );
    assert_eq!(instance_count(&p.join("phasm.db").display().to_string()), 3);

    // Standard input.
    let mut child = Command::new(env!("CARGO_BIN_EXE_phasm"))
        .args(["start", "fsm.yaml", "--machine", "Small", "--contexts", "-"])
        .current_dir(p)
        .env("PHASM_DB", p.join("phasm.db"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin
            .write_all(b"{\"count\": 5}\n{\"count\": 6}\n")
            .unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(text(&out.stdout).lines().count(), 2);
    assert_eq!(instance_count(&p.join("phasm.db").display().to_string()), 5);
}

/// A file started again — after its start was killed part way, or stopped with SIGINT — adds
/// only what was missing: each committed transaction's names were printed as it committed, a
/// signal stops between transactions saying where, and the lines' names come from the file's
/// content and line numbers, so nothing is started twice.
#[test]
fn a_bulk_start_stopped_part_way_is_finished_by_running_it_again() {
    let dir = small();
    let p = dir.path();
    let db = p.join("again.db").display().to_string();
    let mut lines = String::new();
    for i in 0..25_000 {
        lines.push_str(&format!("{{\"count\": {i}}}\n"));
    }
    lines.push_str("{\"name\": \"named-one\", \"context\": {\"count\": 1}}\n");
    std::fs::write(p.join("big.jsonl"), lines).unwrap();
    let args = [
        "start",
        "fsm.yaml",
        "--machine",
        "Small",
        "--contexts",
        "big.jsonl",
        "--sync",
        "off",
        "--db",
        &db,
    ];
    // SIGINT once the first transaction's names are out.
    let mut child = Command::new(env!("CARGO_BIN_EXE_phasm"))
        .args(args)
        .current_dir(p)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut first).unwrap();
    assert!(first.starts_with("Small-"), "{first}");
    let _ = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status();
    let mut rest = String::new();
    let _ = std::io::Read::read_to_string(&mut stdout, &mut rest);
    let out = child.wait_with_output().unwrap();
    let printed = 1 + rest.lines().count();
    let err = text(&out.stderr);
    if out.status.success() {
        // It finished before the signal was seen: every line was started.
        assert_eq!(printed, 25_001, "{err}");
    } else {
        assert!(err.contains("stopped by a signal"), "{err}");
        assert!(err.contains("run the same command again"), "{err}");
        assert_eq!(printed % 10_000, 0, "whole transactions only: {printed}");
        assert_eq!(instance_count(&db), printed);
    }
    // Again: only what is missing is started; the names are the same.
    let out = phasm(p, &args);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).lines().count(), 25_001);
    assert!(text(&out.stdout).lines().any(|l| l == "named-one"));
    assert_eq!(instance_count(&db), 25_001);
    // Killed outright part way, then run again: still each line once.
    let mut child = Command::new(env!("CARGO_BIN_EXE_phasm"))
        .args([
            "start",
            "fsm.yaml",
            "--machine",
            "Small",
            "--contexts",
            "big.jsonl",
            "--key",
            "second",
            "--sync",
            "off",
            "--db",
            &db,
        ])
        .current_dir(p)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut first).unwrap();
    let _ = child.kill();
    let _ = child.wait();
    let out = phasm(
        p,
        &[
            "start",
            "fsm.yaml",
            "--machine",
            "Small",
            "--contexts",
            "big.jsonl",
            "--key",
            "second",
            "--sync",
            "off",
            "--db",
            &db,
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    // `named-one` exists already; the 25,000 unnamed lines are new under the key `second`.
    assert_eq!(instance_count(&db), 50_001);
}

/// A bulk start killed at any moment leaves all of its 10,000 instances or none, on SQLite
/// and on PostgreSQL.
#[test]
fn a_bulk_start_killed_midway_leaves_all_or_none() {
    let dir = small();
    let sqlite = dir.path().join("bulk.db").display().to_string();
    killed_bulk_starts(dir.path(), &sqlite);
    if let Some(schema) = crate::common::postgres_schema("bulk_start") {
        killed_bulk_starts(dir.path(), &schema.url);
    }
}

fn killed_bulk_starts(p: &Path, db: &str) {
    let mut lines = String::new();
    for i in 0..10_000 {
        lines.push_str(&format!("{{\"count\": {i}}}\n"));
    }
    std::fs::write(p.join("many.jsonl"), lines).unwrap();
    // Each start a batch of its own (a new key), so each may add its 10,000.
    let key = std::cell::Cell::new(0);
    let start = || {
        key.set(key.get() + 1);
        Command::new(env!("CARGO_BIN_EXE_phasm"))
            .args([
                "start",
                "fsm.yaml",
                "--machine",
                "Small",
                "--contexts",
                "many.jsonl",
                "--key",
                &format!("k{}", key.get()),
                "--db",
                db,
            ])
            .current_dir(p)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    // How long a whole start takes here, then kills spread over that time; each leaves the
    // database with 10,000 more instances or none more.
    let began = Instant::now();
    assert!(start().wait().unwrap().success());
    let took = began.elapsed();
    let mut total = instance_count(db);
    assert_eq!(total, 10_000);
    let mut seen = std::collections::BTreeSet::new();
    for tenths in [2u32, 5, 8, 10, 13, 16] {
        let mut child = start();
        std::thread::sleep(took * tenths / 10);
        let _ = child.kill();
        let _ = child.wait();
        let now = instance_count(db);
        let added = now - total;
        assert!(
            added == 0 || added == 10_000,
            "killed after {tenths}/10 of a start: {added} instances"
        );
        seen.insert(added);
        total = now;
    }
    eprintln!("{db}: a start took {took:?}; instances added by the killed ones: {seen:?}");
}
