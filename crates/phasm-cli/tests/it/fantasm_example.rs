//! The Fantasm-style example runs to the end with `phasm run`, halts on request, and
//! `phasm validate --strict` resolves its Python actions.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn example() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/fantasm")
}

fn phasm(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_phasm"))
        .args(args)
        .current_dir(dir)
        .output()
        .expect("phasm runs")
}

#[test]
fn the_fantasm_example_completes_and_halts_on_an_empty_list() {
    let dir = tempfile::tempdir().unwrap();
    let file = example().join("fsm.yaml").display().to_string();
    let db = dir.path().join("phasm.db").display().to_string();
    let out = phasm(
        dir.path(),
        &[
            "run",
            &file,
            "--machine",
            "Newsletter",
            "--db",
            &db,
            "--json",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines = String::from_utf8_lossy(&out.stdout);
    let last: serde_json::Value =
        serde_json::from_str(lines.lines().last().unwrap_or_default()).expect("JSON");
    assert_eq!(last["status"], "completed", "{lines}");
    let name = last["instance"].as_str().unwrap().to_string();
    let status = phasm(dir.path(), &["status", &name, "--json", "--db", &db]);
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(status["context"]["sent"], 5, "{status}");
    assert_eq!(
        status["children"].as_array().map(Vec::len),
        Some(1),
        "{status}"
    );
    let logs = phasm(dir.path(), &["logs", &name, "--db", &db]);
    let logs = String::from_utf8_lossy(&logs.stdout);
    assert!(logs.contains("warning tally: 5 e-mails sent"), "{logs}");
    assert!(logs.contains("info    sent to ada@example.com"), "{logs}");

    let out = phasm(
        dir.path(),
        &[
            "run",
            &file,
            "--machine",
            "Newsletter",
            "--db",
            &db,
            "--set",
            "list=empty",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("halted"), "{text}");
    assert!(text.contains("has no subscribers"), "{text}");
}

#[test]
fn validate_strict_resolves_python_actions_with_suggestions() {
    let dir = tempfile::tempdir().unwrap();
    let ok = phasm(
        dir.path(),
        &[
            "validate",
            "--strict",
            &example().join("fsm.yaml").display().to_string(),
        ],
    );
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let yaml = std::fs::read_to_string(example().join("fsm.yaml"))
        .unwrap()
        .replace("action: Tally", "action: Talley");
    std::fs::write(example().join("misspelt.yaml.tmp"), yaml).unwrap();
    let bad = phasm(
        dir.path(),
        &[
            "validate",
            "--strict",
            &example().join("misspelt.yaml.tmp").display().to_string(),
        ],
    );
    let _ = std::fs::remove_file(example().join("misspelt.yaml.tmp"));
    assert_eq!(bad.status.code(), Some(2));
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        err.contains("misspelt.yaml.tmp:42:13: state `tally` action `Talley`"),
        "{err}"
    );
    assert!(err.contains("did you mean `Tally`?"), "{err}");
}
