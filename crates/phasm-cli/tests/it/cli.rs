//! The `phasm` binary as a user runs it: output, exit codes, files written.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn phasm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_phasm"))
        .args(args)
        .current_dir(repo())
        .output()
        .expect("phasm runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

const THREE_MISTAKES: &str = "crates/phasm/tests/invalid/three-mistakes.yaml";
const FANTASM_FSM: &str = "crates/phasm/tests/fixtures/fantasm-yaml/test/fsm.yaml";

#[test]
fn validate_prints_three_located_errors_and_nothing_else() {
    let out = phasm(&["validate", THREE_MISTAKES]);
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stdout.is_empty(), "stdout: {}", text(&out.stdout));
    let err = text(&out.stderr);
    let headers: Vec<&str> = err.lines().filter(|l| l.contains(": error: ")).collect();
    assert_eq!(headers.len(), 3, "{err}");
    assert!(
        headers[0].starts_with(&format!("{THREE_MISTAKES}:6:12: error: `logging`")),
        "{err}"
    );
    assert!(
        headers[1].starts_with(&format!(
            "{THREE_MISTAKES}:10:5: error: unknown key `acton`"
        )),
        "{err}"
    );
    assert!(
        headers[2].starts_with(&format!(
            "{THREE_MISTAKES}:14:11: error: transition to unknown state `finsh`"
        )),
        "{err}"
    );
    assert!(err.contains("did you mean `action`?"), "{err}");
    assert!(err.contains("did you mean `finish`?"), "{err}");
    assert!(
        err.contains("14 |       to: finsh\n   |           ^^^^^"),
        "{err}"
    );
    assert!(!err.contains("warning"), "{err}");
}

#[test]
fn validate_accepts_fantasm_files_and_reports_each() {
    let out = phasm(&["validate", FANTASM_FSM, "examples/orders/orders.yaml"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains(
            // Its Python classes are bound to nothing here: one warning per action name.
            "ok: crates/phasm/tests/fixtures/fantasm-yaml/test/fsm.yaml (11 machines, 33 states, 52 warnings)"
        ),
        "{stdout}"
    );
    assert!(
        stdout.contains("ok: examples/orders/orders.yaml (1 machine, 5 states)"),
        "{stdout}"
    );
}

#[test]
fn validate_reports_problems_in_every_file_given() {
    let out = phasm(&[
        "validate",
        THREE_MISTAKES,
        "crates/phasm/tests/invalid/duplicate-event.yaml",
        FANTASM_FSM,
    ]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert_eq!(err.matches(": error: ").count(), 4, "{err}");
}

#[test]
fn strict_reports_unbound_actions() {
    let out = phasm(&["validate", "--strict", FANTASM_FSM]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(
        err.contains("error: action `DoAction1` is not bound"),
        "{err}"
    );
    assert!(
        err.contains("bind `complex_machine.DoAction1` or `DoAction1`"),
        "{err}"
    );
    let ok = phasm(&["validate", "--strict", "examples/orders/orders.yaml"]);
    assert_eq!(ok.status.code(), Some(0), "{}", text(&ok.stderr));
}

#[test]
fn warnings_pass_unless_denied() {
    let dir = tempdir();
    let file = dir.join("unreachable.yaml");
    std::fs::write(
        &file,
        "state_machines:\n- name: M\n  states:\n  - name: a\n    initial: true\n    final: true\n  - name: orphan\n    final: true\n",
    )
    .unwrap();
    let path = file.to_str().unwrap();
    let out = phasm(&["validate", path]);
    assert_eq!(out.status.code(), Some(0));
    let err = text(&out.stderr);
    assert!(
        err.contains(":7:11: warning: state `orphan` cannot be reached from the initial state `a`"),
        "{err}"
    );
    assert!(text(&out.stdout).contains("1 warning"));
    let denied = phasm(&["validate", "--deny-warnings", path]);
    assert_eq!(denied.status.code(), Some(2));
}

#[test]
fn missing_file_is_a_clear_error() {
    let out = phasm(&["validate", "no/such/file.yaml"]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(
        err.starts_with("error: cannot read `no/such/file.yaml`"),
        "{err}"
    );
}

#[test]
fn graph_writes_dot_mermaid_and_svg() {
    let dot = phasm(&[
        "graph",
        FANTASM_FSM,
        "--machine",
        "ComplexMachine",
        "--format",
        "dot",
    ]);
    assert_eq!(dot.status.code(), Some(0));
    assert!(text(&dot.stdout).starts_with("digraph \"ComplexMachine\" {"));
    let mermaid = phasm(&[
        "graph",
        FANTASM_FSM,
        "-m",
        "ComplexMachine",
        "-f",
        "mermaid",
    ]);
    assert!(text(&mermaid.stdout).contains("stateDiagram-v2"));
    let dir = tempdir();
    let svg_path = dir.join("complex.svg");
    let svg = phasm(&[
        "graph",
        FANTASM_FSM,
        "-m",
        "ComplexMachine",
        "-o",
        svg_path.to_str().unwrap(),
    ]);
    assert_eq!(svg.status.code(), Some(0), "{}", text(&svg.stderr));
    let written = std::fs::read_to_string(&svg_path).unwrap();
    assert!(written.contains("<svg") && written.contains("event4"));
}

#[test]
fn graph_needs_a_machine_when_the_file_has_several() {
    let out = phasm(&["graph", FANTASM_FSM]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(
        err.contains("defines 11 machines; choose one with --machine NAME"),
        "{err}"
    );
    assert!(err.contains("ComplexMachine"), "{err}");
    let unknown = phasm(&["graph", FANTASM_FSM, "-m", "Nope"]);
    assert_eq!(unknown.status.code(), Some(2));
    assert!(text(&unknown.stderr).contains("has no machine named `Nope`"));
}

fn tempdir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "phasm-cli-test-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Run `phasm ARGS` with its stdout closed before it writes: as `phasm ARGS | head -0`.
fn with_closed_stdout(dir: &Path, args: &[&str]) -> Output {
    use std::process::Stdio;
    let mut child = Command::new(env!("CARGO_BIN_EXE_phasm"))
        .args(args)
        .current_dir(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("phasm runs");
    drop(child.stdout.take());
    child.wait_with_output().expect("phasm ends")
}

#[test]
fn a_closed_pipe_ends_output_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("phasm.db").display().to_string();
    // 3,000 instances: far more output than a pipe holds, so writing must meet the closed end.
    let made = phasm(&[
        "bench",
        "chain",
        "--instances",
        "3000",
        "--steps",
        "1",
        "--db",
        &db,
        "--sync",
        "off",
    ]);
    assert!(made.status.success(), "{}", text(&made.stderr));
    let name = text(&phasm(&["list", "--db", &db, "--limit", "1", "--json"]).stdout);
    let name = serde_json::from_str::<serde_json::Value>(&name).unwrap()[0]["instance"]
        .as_str()
        .unwrap()
        .to_string();
    for args in [
        vec!["list", "--db", &db, "--limit", "100000"],
        vec!["list", "--db", &db, "--limit", "100000", "--json"],
        vec!["status", &name, "--db", &db],
        vec![
            "graph",
            FANTASM_FSM,
            "--machine",
            "ComplexMachine",
            "--format",
            "svg",
        ],
    ] {
        let out = with_closed_stdout(&repo(), &args);
        let err = text(&out.stderr);
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert_eq!(out.status.code(), Some(0), "{args:?}: {err}");
    }
}

#[test]
fn validate_warns_about_unbound_actions_and_strict_refuses_them() {
    let dir = tempdir();
    let file = dir.join("unbound.yaml");
    std::fs::write(
        &file,
        "state_machines:\n- name: M\n  states:\n  - name: a\n    initial: true\n    final: true\n    action: Missing\n",
    )
    .unwrap();
    let path = file.to_str().unwrap();
    let out = phasm(&["validate", path]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(
        err.contains(":7:13: warning: action `Missing` is not bound: `phasm run` and `phasm worker` refuse to start"),
        "{err}"
    );
    assert!(text(&out.stdout).contains("1 warning"));
    let strict = phasm(&["validate", "--strict", path]);
    assert_eq!(strict.status.code(), Some(2));
    assert!(text(&strict.stderr).contains(":7:13: error: action `Missing` is not bound"));
}

#[test]
fn serve_refuses_a_short_or_blank_token_before_listening() {
    for (token, why) in [
        ("short", "use at least 16"),
        ("                    ", "empty or only white space"),
        (
            "a token with spaces in it",
            "printable ASCII without spaces",
        ),
    ] {
        let out = phasm(&[
            "serve",
            "examples/orders/orders.yaml",
            "--listen",
            "127.0.0.1:0",
            "--token",
            token,
            "--db",
            "/nonexistent/never-opened.db",
        ]);
        assert_eq!(out.status.code(), Some(2), "{token:?}");
        let err = text(&out.stderr);
        assert!(
            err.contains("the token (--token") && err.contains(why),
            "{err}"
        );
    }
    // A token file is read (its first line) and checked the same way.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("token");
    std::fs::write(&file, "short\n").unwrap();
    let out = phasm(&[
        "serve",
        "examples/orders/orders.yaml",
        "--listen",
        "127.0.0.1:0",
        "--token-file",
        &file.display().to_string(),
        "--db",
        "/nonexistent/never-opened.db",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("use at least 16"),
        "{}",
        text(&out.stderr)
    );
}

/// Actions never see phasm's own secrets (the API token, the database URL), while a variable
/// an operator sets for them on purpose passes through.
#[test]
fn actions_do_not_inherit_the_token_or_the_database_url() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let yaml = "actions:\n  Look:\n    exec: [sh, look.sh]\nstate_machines:\n- name: M\n  logging: persistent\n  states:\n  - name: a\n    initial: true\n    final: true\n    action: Look\n";
    let script = "cat > /dev/null\nprintf '{\"log\": [\"token=%s db=%s file=%s mine=%s\"]}' \"$PHASM_TOKEN\" \"$PHASM_DB\" \"$PHASM_TOKEN_FILE\" \"$MY_SETTING\"\n";
    std::fs::write(d.join("look.sh"), script).unwrap();
    std::fs::write(d.join("fsm.yaml"), yaml).unwrap();
    let db = d.join("p.db").display().to_string();
    let out = Command::new(env!("CARGO_BIN_EXE_phasm"))
        .args(["run", "fsm.yaml", "--name", "look"])
        .current_dir(d)
        .env("PHASM_DB", &db)
        .env("PHASM_TOKEN", "secret-token-0123456789")
        .env("PHASM_TOKEN_FILE", "/secret/file")
        .env("MY_SETTING", "kept")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let logs = Command::new(env!("CARGO_BIN_EXE_phasm"))
        .args(["logs", "look", "--db", &db])
        .output()
        .unwrap();
    let logs = text(&logs.stdout);
    assert!(logs.contains("token= db= file= mine=kept"), "{logs}");
}

#[test]
fn reset_runs_an_ended_instance_again_from_a_step_of_its_history() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("phasm.db").display().to_string();
    let file = "examples/orders/orders.yaml";
    let ran = phasm(&[
        "run",
        file,
        "--name",
        "o1",
        "--set",
        "quantity=2",
        "--db",
        &db,
    ]);
    assert!(ran.status.success(), "{}", text(&ran.stderr));
    let status = |args: &[&str]| {
        let out = phasm(&[&["status", "o1", "--db", &db], args].concat());
        assert!(out.status.success(), "{}", text(&out.stderr));
        text(&out.stdout)
    };
    let json: serde_json::Value = serde_json::from_str(&status(&["--json"])).unwrap();
    assert_eq!(json["status"], "completed");
    let charging = json["history"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["to"] == "charging")
        .expect("a step into charging")["id"]
        .to_string();
    // The text status lists each step by the id `reset` takes.
    assert!(
        status(&[])
            .lines()
            .any(|l| l.split_whitespace().next() == Some(charging.as_str())),
        "{}",
        status(&[])
    );
    let reset = phasm(&[
        "reset", "o1", "--step", &charging, "--file", file, "--db", &db,
    ]);
    assert!(reset.status.success(), "{}", text(&reset.stderr));
    assert!(
        text(&reset.stdout).contains("running again from step"),
        "{}",
        text(&reset.stdout)
    );
    let json: serde_json::Value = serde_json::from_str(&status(&["--json"])).unwrap();
    assert_eq!(json["status"], "running", "{json}");
    assert_eq!(json["tasks"][0]["from"], "received", "{json}");
    // An unknown step is refused, saying where the ids are.
    let bad = phasm(&[
        "reset", "o1", "--step", "99999", "--file", file, "--db", &db,
    ]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(
        text(&bad.stderr).contains("has no step 99999"),
        "{}",
        text(&bad.stderr)
    );
    // Working it again ends it again, through the steps after the chosen one.
    let again = phasm(&["run", file, "--name", "o1", "--db", &db]);
    assert!(again.status.success(), "{}", text(&again.stderr));
    let json: serde_json::Value = serde_json::from_str(&status(&["--json"])).unwrap();
    assert_eq!(json["status"], "completed", "{json}");
    let into_charging = json["history"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|h| h["to"] == "charging")
        .count();
    assert_eq!(into_charging, 2, "the step ran again: {json}");
    // `phasm queues` counts the steps just committed per queue (which queue a step ran on is
    // the file's to say).
    let out = phasm(&["queues", "--file", file, "--db", &db, "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let queues: serde_json::Value = serde_json::from_str(&text(&out.stdout)).unwrap();
    let payments = queues["queues"]
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["queue"] == "payments")
        .unwrap_or_else(|| panic!("{queues}"));
    assert!(
        payments["steps_per_second"].as_f64().unwrap_or(0.0) > 0.0,
        "{queues}"
    );
    assert_eq!(json["context"]["total"], 19.98, "{json}");
}

/// `phasm logs` and `phasm status` never send a log line's control characters to the
/// terminal raw (an escape sequence could clear or recolour it): they are shown escaped.
#[test]
fn logs_show_control_characters_escaped() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let yaml = "actions:\n  Paint:\n    exec: [sh, paint.sh]\nstate_machines:\n- name: M\n  logging: persistent\n  states:\n  - name: a\n    initial: true\n    final: true\n    action: Paint\n";
    std::fs::write(d.join("fsm.yaml"), yaml).unwrap();
    std::fs::write(
        d.join("paint.sh"),
        "cat > /dev/null\nprintf '{\"log\": [\"\\\\u001b[2Jcleared\\\\rback\"]}'\n",
    )
    .unwrap();
    let db = d.join("p.db").display().to_string();
    let out = Command::new(env!("CARGO_BIN_EXE_phasm"))
        .args(["run", "fsm.yaml", "--name", "paint", "--db", &db])
        .current_dir(d)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let logs = Command::new(env!("CARGO_BIN_EXE_phasm"))
        .args(["logs", "paint", "--db", &db])
        .output()
        .unwrap();
    let shown = text(&logs.stdout);
    assert!(
        !shown.contains('\u{1b}') && !shown.contains('\r'),
        "{shown:?}"
    );
    assert!(shown.contains("\\u{1b}[2Jcleared\\u{d}back"), "{shown:?}");
}
