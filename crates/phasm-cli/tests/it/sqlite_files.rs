//! What phasm does to SQLite files it is pointed at: only commands that start work create a
//! database; someone else's file, a newer phasm's, one whose tables clash, or one that is not
//! SQLite at all is refused and left byte for byte as it was; read-only commands never write.

use std::path::Path;
use std::process::{Command, Output};

fn phasm(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_phasm"))
        .args(args)
        .current_dir(dir)
        .output()
        .expect("phasm runs")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Make a SQLite file with Python's sqlite3 (rollback journal, like most applications').
fn sqlite(dir: &Path, file: &str, sql: &str) {
    let script = format!(
        "import sqlite3; c = sqlite3.connect({file:?}); c.executescript({sql:?}); c.commit(); c.close()"
    );
    let out = Command::new("python3")
        .args(["-c", &script])
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
}

const MACHINE: &str = "actions:\n  Go:\n    exec: [sh, -c, \"cat > /dev/null\"]\nstate_machines:\n- name: M\n  states:\n  - name: a\n    initial: true\n    final: true\n    action: Go\n";

/// Every command, against `file`: each must fail with status 3, saying `says`, and leave
/// the file (and the folder) exactly as they were.
fn refused_untouched(dir: &Path, file: &str, says: &str) {
    let before = std::fs::read(dir.join(file)).unwrap();
    for args in [
        &["list", "--db", file][..],
        &["status", "x", "--db", file][..],
        &["logs", "x", "--db", file][..],
        &["cancel", "x", "--db", file][..],
        &["start", "fsm.yaml", "--db", file][..],
        &["run", "fsm.yaml", "--db", file][..],
    ] {
        let out = phasm(dir, args);
        assert_eq!(
            out.status.code(),
            Some(3),
            "{args:?}: {}",
            text(&out.stderr)
        );
        let err = text(&out.stderr);
        assert!(err.contains(says), "{args:?}: {err}");
        assert!(
            !err.contains("CREATE TABLE"),
            "the migration script is not printed: {err}"
        );
        assert_eq!(
            std::fs::read(dir.join(file)).unwrap(),
            before,
            "{args:?} changed {file}"
        );
        assert!(
            !dir.join(format!("{file}-wal")).exists(),
            "{args:?} made a WAL file"
        );
    }
}

fn setup() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("fsm.yaml"), MACHINE).unwrap();
    dir
}

#[test]
fn someone_elses_sqlite_file_is_refused_and_left_untouched() {
    let dir = setup();
    let d = dir.path();
    sqlite(
        d,
        "notes.db",
        "CREATE TABLE notes (t TEXT); INSERT INTO notes VALUES ('mine');",
    );
    refused_untouched(
        d,
        "notes.db",
        "is a SQLite database of something else (tables: notes)",
    );
}

#[test]
fn a_newer_phasms_file_is_refused_before_anything_is_changed() {
    let dir = setup();
    let d = dir.path();
    sqlite(d, "newer.db", "CREATE TABLE phasm_schema (version INTEGER NOT NULL); INSERT INTO phasm_schema VALUES (99);");
    refused_untouched(
        d,
        "newer.db",
        "schema version 99, newer than this phasm understands",
    );
}

#[test]
fn clashing_tables_are_refused_without_printing_the_migration() {
    let dir = setup();
    let d = dir.path();
    sqlite(
        d,
        "clash.db",
        "CREATE TABLE phasm_schema (version INTEGER NOT NULL); CREATE TABLE instances (id TEXT);",
    );
    let before = std::fs::read(d.join("clash.db")).unwrap();
    let out = phasm(d, &["run", "fsm.yaml", "--db", "clash.db"]);
    assert_eq!(out.status.code(), Some(3));
    let err = text(&out.stderr);
    assert!(
        err.contains("cannot bring `clash.db` to phasm schema version 1"),
        "{err}"
    );
    assert!(err.contains("already exists"), "{err}");
    assert!(!err.contains("CREATE"), "{err}");
    assert_eq!(std::fs::read(d.join("clash.db")).unwrap(), before);
}

#[test]
fn a_file_that_is_not_sqlite_is_refused_and_left_untouched() {
    let dir = setup();
    let d = dir.path();
    std::fs::write(d.join("notes.txt"), "dear diary, ".repeat(500)).unwrap();
    refused_untouched(d, "notes.txt", "is not a SQLite database");
}

#[test]
fn only_commands_that_start_work_create_a_database() {
    let dir = setup();
    let d = dir.path();
    for args in [
        &["list", "--db", "typo.db"][..],
        &["status", "x", "--db", "typo.db"][..],
        &["logs", "x", "--db", "typo.db"][..],
        &["retry", "x", "--db", "typo.db"][..],
        &["cancel", "x", "--db", "typo.db"][..],
        &["scrub", "--older-than", "1d", "--db", "typo.db"][..],
    ] {
        let out = phasm(d, args);
        assert_eq!(out.status.code(), Some(3), "{args:?}");
        assert!(
            text(&out.stderr).contains("no phasm database at `typo.db`"),
            "{args:?}"
        );
        assert!(!d.join("typo.db").exists(), "{args:?} created the file");
    }
    let out = phasm(d, &["run", "fsm.yaml", "--db", "new.db"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    // Reading it changes nothing.
    let listed = phasm(d, &["list", "--db", "new.db"]);
    assert!(listed.status.success(), "{}", text(&listed.stderr));
    assert!(text(&listed.stdout).contains("completed"));
}

/// Whether this process may make a private mount namespace (root): `unshare` then gives a
/// command a small tmpfs of its own that vanishes with it, touching nothing else.
fn private_mounts() -> bool {
    Command::new("unshare")
        .args(["-m", "true"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// A disk that fills up is reported as full — the first error, not the "cannot commit - no
/// transaction is active" of the rollback it caused — and nothing half-started is left.
#[test]
fn a_full_disk_is_reported_as_full() {
    if !private_mounts() {
        assert!(
            std::env::var("CI").is_err(),
            "CI runs as root and must run this test (unshare -m failed)"
        );
        eprintln!("SKIPPED a_full_disk_is_reported_as_full: needs root for a private tmpfs");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("fsm.yaml"), MACHINE).unwrap();
    let mut lines = String::new();
    for i in 0..3000 {
        lines.push_str(&format!(
            "{{\"i\": {i}, \"pad\": \"{}\"}}\n",
            "x".repeat(2000)
        ));
    }
    std::fs::write(d.join("ctx.jsonl"), lines).unwrap();
    std::fs::create_dir(d.join("small")).unwrap();
    let script = format!(
        "mount -t tmpfs -o size=400k tmpfs small && cd small && {} start ../fsm.yaml --contexts ../ctx.jsonl --db p.db > /dev/null",
        env!("CARGO_BIN_EXE_phasm")
    );
    let out = Command::new("unshare")
        .args(["-m", "sh", "-c", &script])
        .current_dir(d)
        .output()
        .unwrap();
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains("database or disk is full"), "{err}");
    assert!(!err.contains("no transaction is active"), "{err}");
}

/// A new database, its WAL and shared-memory files are readable by their owner alone: they
/// hold every context and the wait-token key.
#[test]
fn new_database_files_are_private_to_their_owner() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("fsm.yaml"), MACHINE).unwrap();
    // A worker keeps the WAL and shared-memory files open while we look.
    let mut worker = Command::new(env!("CARGO_BIN_EXE_phasm"))
        .args(["worker", "fsm.yaml", "--db", "p.db"])
        .current_dir(d)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let out = phasm(d, &["start", "fsm.yaml", "--db", "p.db"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !(d.join("p.db-wal").exists() && d.join("p.db-shm").exists()) {
        assert!(
            std::time::Instant::now() < deadline,
            "no WAL files appeared"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    for file in ["p.db", "p.db-wal", "p.db-shm"] {
        let mode = std::fs::metadata(d.join(file))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "{file} is {mode:o}");
    }
    let _ = worker.kill();
    let _ = worker.wait();
}
