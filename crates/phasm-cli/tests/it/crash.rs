//! Real worker processes killed with SIGKILL, and paused with SIGSTOP past their lease:
//! nothing is lost and every transition is committed exactly once.

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

fn phasm(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_phasm"))
        .args(args)
        .current_dir(dir)
        .env("PHASM_DB", dir.join("phasm.db"))
        .output()
        .expect("phasm runs")
}

/// A worker process, returned once it says it has started (its signal handlers are set).
fn spawn_worker(dir: &Path, lease: &str) -> (Child, std::thread::JoinHandle<String>) {
    use std::io::{BufRead, BufReader, Read};
    let mut child = Command::new(env!("CARGO_BIN_EXE_phasm"))
        .args([
            "worker",
            "fsm.yaml",
            "--lease",
            lease,
            "--concurrency",
            "16",
        ])
        .current_dir(dir)
        .env("PHASM_DB", dir.join("phasm.db"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("worker starts");
    let mut stderr = BufReader::new(child.stderr.take().expect("stderr piped"));
    let mut first = String::new();
    stderr
        .read_line(&mut first)
        .expect("worker writes a first line");
    assert!(first.contains("started"), "unexpected first line: {first}");
    let rest = std::thread::spawn(move || {
        let mut all = first;
        let _ = stderr.read_to_string(&mut all);
        all
    });
    (child, rest)
}

fn signal(child: &Child, sig: &str) {
    let status = Command::new("kill")
        .args([&format!("-{sig}"), &child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success());
}

fn status(dir: &Path, name: &str) -> Value {
    let out = phasm(dir, &["status", name, "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("status is JSON")
}

fn list(dir: &Path) -> Vec<Value> {
    let out = phasm(dir, &["list", "--json", "--limit", "1000"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    match serde_json::from_slice(&out.stdout).expect("list is JSON") {
        Value::Array(rows) => rows,
        other => panic!("{other}"),
    }
}

const STEPS: usize = 5;

fn write_machine(dir: &Path) {
    let mut yaml = String::from(
        "actions:\n  Work:\n    exec: [sh, -c, \"cat > /dev/null; sleep 0.2; echo '{\\\"event\\\": \\\"next\\\"}'\"]\n  Last:\n    exec: [sh, -c, \"cat > /dev/null\"]\nstate_machines:\n- name: Crash\n  task_retry_limit: 50\n  min_backoff_seconds: 0.1\n  max_backoff_seconds: 1\n  states:\n",
    );
    for i in 1..=STEPS {
        yaml.push_str(&format!("  - name: s{i}\n"));
        if i == 1 {
            yaml.push_str("    initial: true\n");
        }
        if i == STEPS {
            yaml.push_str("    final: true\n    action: Last\n");
        } else {
            yaml.push_str(&format!(
                "    action: Work\n    transitions:\n    - event: next\n      to: s{}\n",
                i + 1
            ));
        }
    }
    std::fs::write(dir.join("fsm.yaml"), yaml).expect("write machine");
}

/// The seed of a kill schedule, printed so that a failure can be replayed.
fn kill_schedule() -> Lcg {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(7, |d| d.as_nanos() as u64);
    eprintln!("kill schedule seed: {seed}");
    Lcg(seed)
}

/// A small deterministic random sequence (the seed is printed, so a failure can be replayed).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, below: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % below
    }
}

fn scratch() -> tempfile::TempDir {
    tempfile::tempdir().expect("temp dir")
}

#[test]
fn killing_workers_at_random_moments_loses_nothing_and_commits_each_step_once() {
    let dir = scratch();
    let dir = dir.path();
    write_machine(dir);
    let instances = 50;
    for i in 0..instances {
        let out = phasm(
            dir,
            &["start", "fsm.yaml", "--name", &format!("crash-{i:02}")],
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut rng = kill_schedule();
    for round in 0..8 {
        let (mut worker, _) = spawn_worker(dir, "2s");
        std::thread::sleep(Duration::from_millis(300 + rng.next(900)));
        worker.kill().expect("SIGKILL");
        worker.wait().expect("reaped");
        let done = list(dir)
            .iter()
            .filter(|r| r["status"] == "completed")
            .count();
        eprintln!("round {round}: killed, {done}/{instances} completed");
    }
    let (mut worker, _) = spawn_worker(dir, "2s");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let rows = list(dir);
        if rows.iter().filter(|r| r["status"] == "completed").count() == instances {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not all instances completed: {rows:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    signal(&worker, "TERM");
    let exit = worker.wait().expect("worker exits");
    assert!(exit.success(), "worker exit: {exit:?}");

    for i in 0..instances {
        let s = status(dir, &format!("crash-{i:02}"));
        assert_eq!(s["status"], "completed", "{s}");
        let history = s["history"].as_array().expect("history");
        let path: Vec<(String, String)> = history
            .iter()
            .map(|h| {
                (
                    h["from"].as_str().unwrap_or("-").to_string(),
                    h["to"].as_str().unwrap_or("?").to_string(),
                )
            })
            .collect();
        let mut expected = vec![("-".to_string(), "s1".to_string())];
        for k in 1..STEPS {
            expected.push((format!("s{k}"), format!("s{}", k + 1)));
        }
        assert_eq!(
            path, expected,
            "instance crash-{i:02}: each transition exactly once"
        );
        assert!(s["tasks"].as_array().is_some_and(Vec::is_empty));
    }
}

#[test]
fn a_worker_paused_past_its_lease_cannot_commit() {
    let dir = scratch();
    let dir = dir.path();
    std::fs::write(
        dir.join("fsm.yaml"),
        "actions:\n  Slow:\n    exec: [sh, -c, \"cat > /dev/null; sleep 4; echo '{\\\"event\\\": \\\"next\\\"}'\"]\nstate_machines:\n- name: Paused\n  states:\n  - name: a\n    initial: true\n    action: Slow\n    transitions:\n    - event: next\n      to: b\n  - name: b\n    final: true\n",
    )
    .unwrap();
    let out = phasm(dir, &["start", "fsm.yaml", "--name", "p1"]);
    assert!(out.status.success());

    let (first, first_stderr) = spawn_worker(dir, "1s");
    let deadline = Instant::now() + Duration::from_secs(20);
    while status(dir, "p1")["tasks"][0]["leased_by"].is_null() {
        assert!(
            Instant::now() < deadline,
            "the first worker never claimed the task"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    signal(&first, "STOP");
    std::thread::sleep(Duration::from_millis(2500)); // well past the 1 s lease

    let first_owner = status(dir, "p1")["tasks"][0]["leased_by"].clone();
    let (mut second, _) = spawn_worker(dir, "10s");
    // Once the second worker holds the step, the first wakes up while its own attempt is
    // still running: its renewals now find the lease lost, tick after tick.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let holder = status(dir, "p1")["tasks"][0]["leased_by"].clone();
        if !holder.is_null() && holder != first_owner {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the second worker never claimed the step"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    signal(&first, "CONT");
    let deadline = Instant::now() + Duration::from_secs(30);
    while status(dir, "p1")["status"] != "completed" {
        assert!(
            Instant::now() < deadline,
            "the second worker did not finish: {}",
            status(dir, "p1")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(1500));
    signal(&first, "TERM");
    signal(&second, "TERM");
    let mut first = first;
    first.wait().expect("first exits");
    second.wait().expect("second exits");
    let stderr = first_stderr.join().expect("stderr read");
    assert!(
        stderr.contains("1 step stopped or refused (lease lost), 0 commits given up"),
        "the paused worker must have been refused:\n{stderr}"
    );
    assert_eq!(
        stderr.matches("lease lost (").count(),
        1,
        "a lost lease is reported once, not on every renewal:\n{stderr}"
    );

    let s = status(dir, "p1");
    let history = s["history"].as_array().unwrap();
    assert_eq!(history.len(), 2, "each transition once: {s}");
    assert_eq!(history[0]["to"], "a");
    assert_eq!(
        history[0]["attempt"], 1,
        "the second worker's attempt committed"
    );
    assert_eq!(history[1]["to"], "b");
}

#[test]
fn the_totals_example_gives_the_same_total_however_often_its_worker_is_killed() {
    let dir = scratch();
    let d = dir.path();
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/totals");
    for entry in ["totals.yaml", "records.jsonl"] {
        std::fs::copy(example.join(entry), d.join(entry)).unwrap();
    }
    std::fs::create_dir(d.join("actions")).unwrap();
    for entry in std::fs::read_dir(example.join("actions")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), d.join("actions").join(entry.file_name())).unwrap();
    }
    std::fs::rename(d.join("totals.yaml"), d.join("fsm.yaml")).unwrap();
    let out = phasm(d, &["start", "fsm.yaml", "--name", "totals"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut rng = kill_schedule();
    for _ in 0..5 {
        let (mut worker, _) = spawn_worker(d, "2s");
        std::thread::sleep(Duration::from_millis(300 + rng.next(1200)));
        worker.kill().expect("SIGKILL");
        worker.wait().expect("reaped");
    }
    let (worker, _) = spawn_worker(d, "2s");
    let deadline = Instant::now() + Duration::from_secs(120);
    while status(d, "totals")["status"] == "running" {
        assert!(
            Instant::now() < deadline,
            "not finished: {}",
            status(d, "totals")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    signal(&worker, "TERM");
    let s = status(d, "totals");
    assert_eq!(s["status"], "completed", "{s}");
    assert_eq!(s["context"]["count"], 10_000);
    assert_eq!(s["context"]["total_cents"], 4_995_000);
    assert_eq!(s["branches"]["parked"], 0);

    // Status reads the latest transitions only, whatever the instance did; `--all` pages
    // through every one.
    let total = s["history_total"].as_u64().unwrap();
    assert!(total > 10_000, "{total}");
    assert_eq!(s["history"].as_array().unwrap().len(), 100);
    assert_eq!(s["end_states"], serde_json::json!(["total"]));
    let text = phasm(d, &["status", "totals"]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains(&format!(
            "… {} earlier transitions not shown (`phasm status totals --all` shows every one)",
            total - 100
        )),
        "{text}"
    );
    let all = phasm(d, &["status", "totals", "--all"]);
    let all = String::from_utf8_lossy(&all.stdout);
    let rows = all
        .lines()
        .filter(|l| {
            l.split_whitespace()
                .next()
                .is_some_and(|n| n.parse::<u64>().is_ok())
        })
        .count() as u64;
    assert_eq!(rows, total, "{all}");
    let every = phasm(d, &["status", "totals", "--all", "--json"]);
    let every: Value = serde_json::from_slice(&every.stdout).unwrap();
    assert_eq!(every["history"].as_array().unwrap().len() as u64, total);
}
