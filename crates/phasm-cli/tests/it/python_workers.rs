//! `phasm worker` processes with Python actions, one of them killed with SIGKILL again and
//! again while Python steps run: on SQLite and on PostgreSQL every instance completes, every
//! transition is committed once, every fan-in sees each branch once, and no host outlives
//! its worker for long.

use crate::common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{
    assert_joined_once, count, phasm, postgres_schema, worker, FORK_JOIN_PY, FORK_JOIN_PY_MODULE,
};

fn start_all(d: &Path, db: &str, instances: usize) {
    for i in 0..instances {
        let out = phasm(
            d,
            db,
            &["start", "fsm.yaml", "--name", &format!("fj-{i:03}")],
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// The Python hosts started by workers in `d` (their command line names the package).
fn hosts_of(d: &Path) -> Vec<u32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).ok();
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if cwd.as_deref() == Some(d) && String::from_utf8_lossy(&cmdline).contains("phasm.host") {
            pids.push(pid);
        }
    }
    pids
}

fn kill_workers_while_they_run(d: &Path, db: &str, instances: usize, kills: usize) {
    // The first victim works alone, so it surely holds running Python steps when it dies.
    let mut first = worker(d, db, &["--concurrency", "16"]);
    std::thread::sleep(Duration::from_millis(800));
    first.kill().expect("SIGKILL");
    first.wait().unwrap();
    let steady = worker(d, db, &["--concurrency", "16"]);
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut done = 0;
    while count(d, db, "completed") < instances {
        assert!(
            Instant::now() < deadline,
            "only {} completed",
            count(d, db, "completed")
        );
        if done < kills {
            let mut victim = worker(d, db, &["--concurrency", "16"]);
            std::thread::sleep(Duration::from_millis(600));
            victim.kill().expect("SIGKILL");
            victim.wait().unwrap();
            done += 1;
        } else {
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    let mut steady = steady;
    // A SIGTERM drains the worker, which closes its hosts.
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &steady.id().to_string()])
        .status();
    assert!(steady.wait().unwrap().success());
    assert_eq!(count(d, db, "failed"), 0);
    let mut interrupted = 0;
    for i in 0..instances {
        let name = format!("fj-{i:03}");
        assert_joined_once(d, db, &name);
        let s = common::status(d, db, &name);
        interrupted += s["history"].as_array().map_or(0, |h| {
            h.iter().filter(|e| e["attempt"].as_u64() > Some(0)).count()
        });
    }
    // The kills hit running steps: their later attempts committed instead.
    assert!(interrupted > 0, "no step was interrupted by a kill");
    // Hosts of killed workers see their stdin close and exit; none is left behind.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !hosts_of(d).is_empty() {
        assert!(
            Instant::now() < deadline,
            "hosts left running: {:?}",
            hosts_of(d)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn setup() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("fsm.yaml"), FORK_JOIN_PY).unwrap();
    std::fs::write(dir.path().join("forkjoin.py"), FORK_JOIN_PY_MODULE).unwrap();
    dir
}

#[test]
fn sqlite_workers_with_python_actions_killed_at_random_lose_nothing() {
    let dir = setup();
    let d = dir.path();
    let db = d.join("phasm.db").display().to_string();
    start_all(d, &db, 120);
    kill_workers_while_they_run(d, &db, 120, 4);
}

#[test]
fn postgres_workers_with_python_actions_killed_at_random_lose_nothing() {
    let Some(schema) = postgres_schema("python") else {
        return;
    };
    let dir = setup();
    let d = dir.path();
    start_all(d, &schema.url, 120);
    kill_workers_while_they_run(d, &schema.url, 120, 4);
}

const MISBEHAVING: &str = r"
python:
  processes: 1
  timeout: 1s
state_machines:
- name: Dies
  namespace: misbehave
  logging: persistent
  min_backoff_seconds: 0.1
  states:
  - name: a
    initial: true
    action: dies_once
    transitions:
    - event: ok
      to: b
  - name: b
    final: true
- name: Hangs
  namespace: misbehave
  task_retry_limit: 0
  states:
  - name: a
    initial: true
    final: true
    action: hangs
";

const MISBEHAVING_MODULE: &str = r#"
import os
import time


def dies_once(ctx):
    if not os.path.exists("died"):
        open("died", "w").close()
        os._exit(3)
    print("second attempt, on a new host")
    return "ok"


def hangs(ctx):
    time.sleep(1000)
"#;

/// A host that dies mid-step and a step that hangs, through `phasm run` on one store.
fn misbehaving_hosts_on(d: &Path, db: &str) {
    let run = |machine: &str| phasm(d, db, &["run", "fsm.yaml", "--machine", machine, "--json"]);
    let out = run("Dies");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let last: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    assert_eq!(last["status"], "completed", "{text}");
    let name = last["instance"].as_str().unwrap().to_string();
    let s = common::status(d, db, &name);
    assert_eq!(s["history"][0]["attempt"], 1, "{s}");
    let logs = phasm(d, db, &["logs", &name]);
    let logs = String::from_utf8_lossy(&logs.stdout);
    assert!(logs.contains("second attempt, on a new host"), "{logs}");

    let out = run("Hangs");
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("timed out after 1s"), "{text}");
    assert!(
        hosts_of(d).is_empty(),
        "hosts left running: {:?}",
        hosts_of(d)
    );
}

#[test]
fn misbehaving_hosts_fail_attempts_clearly_on_sqlite_and_postgres() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("fsm.yaml"), MISBEHAVING).unwrap();
    std::fs::write(d.join("misbehave.py"), MISBEHAVING_MODULE).unwrap();
    misbehaving_hosts_on(d, &d.join("phasm.db").display().to_string());
    let Some(schema) = postgres_schema("misbehave") else {
        return;
    };
    std::fs::remove_file(d.join("died")).unwrap();
    misbehaving_hosts_on(d, &schema.url);
}

const LINGERING: &str = r"
python:
  processes: 1
  timeout: 120s
state_machines:
- name: Forks
  namespace: linger
  states:
  - name: a
    initial: true
    final: true
    action: forks
- name: Sleeps
  namespace: linger
  states:
  - name: a
    initial: true
    final: true
    action: sleeps
";

const LINGERING_MODULE: &str = r#"
import os
import time


def forks(ctx):
    if os.fork() == 0:
        os.execvp("sleep", ["sleep", "10"])
    return None


def sleeps(ctx):
    time.sleep(100)
"#;

/// A worker's hosts die with it when it is SIGKILLed (instead of running their steps on,
/// up to the timeout, while the steps run again elsewhere), and a child an action forked
/// does not hold a SIGTERM'd worker's shutdown.
#[test]
fn hosts_die_with_their_worker_and_a_forked_child_does_not_delay_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("fsm.yaml"), LINGERING).unwrap();
    std::fs::write(d.join("linger.py"), LINGERING_MODULE).unwrap();
    let db = d.join("phasm.db").display().to_string();
    for (machine, name) in [("Forks", "f1"), ("Sleeps", "s1")] {
        let out = phasm(
            d,
            &db,
            &["start", "fsm.yaml", "--machine", machine, "--name", name],
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // SIGKILL while `sleeps` runs: the host goes at once with its worker.
    let mut victim = worker(d, &db, &[]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while count(d, &db, "completed") < 1 {
        assert!(Instant::now() < deadline, "`forks` did not complete");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(500));
    assert!(!hosts_of(d).is_empty(), "a host runs `sleeps`");
    victim.kill().expect("SIGKILL");
    victim.wait().unwrap();
    let killed = Instant::now();
    while !hosts_of(d).is_empty() {
        assert!(
            killed.elapsed() < Duration::from_secs(3),
            "hosts outlived their SIGKILLed worker: {:?}",
            hosts_of(d)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // A worker whose host forked a long-lived child stops promptly on SIGTERM.
    assert!(phasm(d, &db, &["cancel", "s1"]).status.success());
    let out = phasm(
        d,
        &db,
        &["start", "fsm.yaml", "--machine", "Forks", "--name", "f2"],
    );
    assert!(out.status.success());
    let mut steady = worker(d, &db, &[]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while count(d, &db, "completed") < 2 {
        assert!(
            Instant::now() < deadline,
            "the second `forks` did not complete"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let asked = Instant::now();
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &steady.id().to_string()])
        .status();
    let _ = steady.wait();
    let took = asked.elapsed();
    assert!(took < Duration::from_secs(5), "shutdown took {took:?}");
}

/// A host flooding its stderr (here written past Python's `sys.stderr`, which a step's own
/// thread would route to its log) costs phasm's log at most a hundred lines a second: the
/// rest is counted in one line.
#[test]
fn a_host_flooding_stderr_is_throttled_in_phasms_log() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(
        d.join("fsm.yaml"),
        "python:\n  processes: 1\nstate_machines:\n- name: Loud\n  namespace: loud\n  states:\n  - name: a\n    initial: true\n    final: true\n    action: shout\n",
    )
    .unwrap();
    std::fs::write(
        d.join("loud.py"),
        "import os\n\n\ndef shout(ctx):\n    os.write(2, b''.join(b'line %d\\n' % i for i in range(5000)))\n",
    )
    .unwrap();
    let db = d.join("phasm.db").display().to_string();
    let out = phasm(d, &db, &["run", "fsm.yaml"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    let shown = err.lines().filter(|l| l.contains("stderr: line ")).count();
    assert!(shown <= 100, "{shown} stderr lines in phasm's log");
    assert!(
        err.contains("more lines not shown (over 100 a second)"),
        "{}",
        &err[err.len().saturating_sub(500)..]
    );
}
