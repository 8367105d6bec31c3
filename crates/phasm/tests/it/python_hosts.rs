//! Action hosts that misbehave: die in the middle of a step, hang past the timeout (with a
//! grandchild), write lines that are not the protocol, exit at hello. Each failure is a
//! clear, retried attempt; nothing is left running.

use crate::common;

use std::path::PathBuf;
use std::time::Duration;

use phasm::action::Registry;
use phasm::config::{load_str, LoadOptions};
use phasm::engine::Context;
use phasm::store::InstanceStatus;
use phasm::testing::Immediate;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/python")
}

async fn runner(python: &str, machines: &str) -> Result<Immediate, String> {
    let yaml = format!("python:\n{python}state_machines:\n{machines}");
    let loaded = load_str(&yaml, fixtures().join("test.yaml"), &LoadOptions::default())
        .unwrap_or_else(|e| panic!("{e}"));
    Immediate::with_hosts(loaded, Registry::new())
        .await
        .map_err(|e| e.to_string())
}

fn one_state(action: &str, retries: u32) -> String {
    format!(
        "- name: M
  task_retry_limit: {retries}
  states:
  - name: a
    initial: true
    action: {action}
    transitions:
    - event: ok
      to: b
  - name: b
    final: true
"
    )
}

fn context(key: &str, value: &str) -> Context {
    let mut c = Context::new();
    c.insert(key.into(), value.into());
    c
}

#[tokio::test]
async fn a_host_that_dies_mid_step_fails_the_attempt_and_is_restarted() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("died");
    let run = runner("  processes: 1\n", &one_state("fsmtests.DiesOnce", 3))
        .await
        .unwrap();
    let before = run_pids(&run);
    let view = run
        .run("M", context("marker", &marker.display().to_string()))
        .await
        .unwrap();
    assert_eq!(view.status, InstanceStatus::Completed, "{view:?}");
    assert!(marker.exists());
    // The first attempt died with its host; the second ran on a new one.
    assert_eq!(view.history[0].attempt, 1);
    let after = run_pids(&run);
    assert_eq!(after.len(), 1);
    assert_ne!(before, after, "the host was restarted");
}

fn run_pids(run: &Immediate) -> Vec<u32> {
    run.registry().hosts().map(|p| p.pids()).unwrap_or_default()
}

#[tokio::test]
async fn a_step_past_its_timeout_kills_the_host_with_its_process_group() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("grandchild.pid");
    let run = runner(
        "  processes: 1\n  timeout: 1s\n",
        &one_state("fsmtests.Hangs", 0),
    )
    .await
    .unwrap();
    let host = run_pids(&run)[0];
    let started = std::time::Instant::now();
    let view = run
        .run("M", context("pidfile", &pidfile.display().to_string()))
        .await
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(15));
    assert_eq!(view.status, InstanceStatus::Failed);
    let error = view.error.unwrap_or_default();
    assert!(error.contains("timed out after 1s"), "{error}");
    assert!(
        error.contains("was killed with its process group"),
        "{error}"
    );
    let grandchild: u32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    for pid in [host, grandchild] {
        assert!(
            common::gone(pid).await,
            "process {pid} survived the timeout"
        );
    }
}

#[tokio::test]
async fn a_line_that_is_not_the_protocol_fails_the_attempt_and_the_host() {
    let run = runner(
        "  processes: 1\n  interpreter: ./fakehost.py\n",
        &one_state("fake.garbage", 1),
    )
    .await
    .unwrap();
    let view = run.run("M", Context::new()).await.unwrap();
    assert_eq!(view.status, InstanceStatus::Failed);
    let error = view.error.unwrap_or_default();
    assert!(
        error.contains("broke the protocol: it wrote a line that is not the host protocol"),
        "{error}"
    );
    assert!(
        !error.contains("this is not the protocol"),
        "the line is not quoted (it may hold any step's data): {error}"
    );
}

/// An answer that cannot be read but names its request fails only that step: the host,
/// which still writes whole lines, goes on, and the error quotes none of the line's data.
#[tokio::test]
async fn an_unreadable_answer_that_names_its_step_fails_only_that_step() {
    let run = runner(
        "  processes: 1\n  interpreter: ./fakehost.py\n",
        &one_state("fake.bad_line", 0),
    )
    .await
    .unwrap();
    let host = run_pids(&run);
    let view = run.run("M", Context::new()).await.unwrap();
    assert_eq!(view.status, InstanceStatus::Failed);
    let error = view.error.unwrap_or_default();
    assert!(error.contains("ProtocolError"), "{error}");
    assert!(
        error.contains("answer to this step cannot be read"),
        "{error}"
    );
    assert!(!error.contains("secret"), "{error}");
    assert_eq!(run_pids(&run), host, "the host goes on");
}

/// A host that exits while a child it started holds its stdout open is seen to be gone at
/// once (from the process, not from the end of its output): the step fails with the host's
/// status rather than waiting out its timeout, and the child dies with the host's group.
#[tokio::test]
async fn a_host_that_exits_leaving_a_child_on_its_stdout_is_noticed_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("child.pid");
    let run = runner(
        "  processes: 1\n  interpreter: ./fakehost.py\n  timeout: 60s\n",
        &one_state("fake.fork_exit", 0),
    )
    .await
    .unwrap();
    let started = std::time::Instant::now();
    let view = run
        .run("M", context("pidfile", &pidfile.display().to_string()))
        .await
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "noticed after {:?}",
        started.elapsed()
    );
    let error = view.error.unwrap_or_default();
    assert!(error.contains("exited with status 5"), "{error}");
    let child: u32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(
        common::gone(child).await,
        "the child {child} outlived its host"
    );
}

#[tokio::test]
async fn a_misspelt_field_is_named() {
    let run = runner(
        "  processes: 1\n  interpreter: ./fakehost.py\n",
        &one_state("fake.typo", 0),
    )
    .await
    .unwrap();
    let view = run.run("M", Context::new()).await.unwrap();
    let error = view.error.unwrap_or_default();
    assert!(error.contains("unknown field `evnet`"), "{error}");
}

#[tokio::test]
async fn a_host_that_exits_mid_step_is_reported_with_its_status_and_stderr() {
    let run = runner(
        "  processes: 1\n  interpreter: ./fakehost.py\n",
        &one_state("fake.silent_exit", 0),
    )
    .await
    .unwrap();
    let view = run.run("M", Context::new()).await.unwrap();
    let error = view.error.unwrap_or_default();
    assert!(error.contains("exited with status 7"), "{error}");
    assert!(error.contains("going away"), "{error}");
}

#[tokio::test]
async fn hosts_that_cannot_start_or_speak_another_version_are_refused() {
    let error = runner(
        "  interpreter: ./fakehost.py\n",
        &one_state("fake.wrong_version", 0),
    )
    .await
    .err()
    .unwrap();
    assert!(
        error.contains("speaks protocol 2, phasm speaks 1"),
        "{error}"
    );
    let error = runner("  interpreter: no-such-python\n", &one_state("x.y", 0))
        .await
        .err()
        .unwrap();
    assert!(
        error.contains("cannot start the Python host (`no-such-python`"),
        "{error}"
    );
    let error = runner("  interpreter: \"false\"\n", &one_state("x.y", 0))
        .await
        .err()
        .unwrap();
    assert!(
        error.contains("exited before answering hello")
            || error.contains("exited before reading hello"),
        "{error}"
    );
    assert!(error.contains("with status 1"), "{error}");
}

/// When no host can start (its module no longer imports), a step is postponed, not failed:
/// no attempt is used, the task says why, and once the module is fixed the step runs.
#[tokio::test]
async fn steps_wait_without_losing_attempts_while_no_host_can_start() {
    let dir = tempfile::tempdir().unwrap();
    let module = dir.path().join("breakable.py");
    let good = "from fantasm.action import FSMAction\n\nclass Go(FSMAction):\n    def execute(self, context, obj):\n        return 'ok'\n";
    std::fs::write(&module, good).unwrap();
    let yaml = format!(
        "python:\n  processes: 1\nstate_machines:\n{}",
        one_state("breakable.Go", 3)
    );
    let loaded = load_str(&yaml, dir.path().join("fsm.yaml"), &LoadOptions::default())
        .unwrap_or_else(|e| panic!("{e}"));
    let run = Immediate::with_hosts(loaded, Registry::new())
        .await
        .unwrap()
        .max_steps(4);
    // The module breaks, and its host goes (a deploy, say): no new host can start.
    std::fs::write(&module, "this is not python (\n").unwrap();
    let host = run_pids(&run)[0];
    phasm::action::host::kill_group(host);
    assert!(common::gone(host).await);
    let stopped = run.run("M", Context::new()).await;
    assert!(stopped.is_err(), "it keeps being postponed: {stopped:?}");
    let list = run.store().list(&Default::default()).await.unwrap();
    let name = list[0].instance.clone();
    let view = run.store().instance(&name).await.unwrap().unwrap();
    assert_eq!(view.status, InstanceStatus::Running);
    let task = &view.tasks[0];
    // Four postponements used none of the 4 attempts (failed, they would have failed the
    // instance); the claim the runner stopped at holds one.
    assert!(task.attempts <= 1, "no attempt was used: {task:?}");
    let why = task.last_error.clone().unwrap_or_default();
    assert!(why.contains("no action host can take it"), "{why}");
    // Fixed: the step runs once the restart backoff (at most 10 s) has passed.
    std::fs::write(&module, good).unwrap();
    tokio::time::sleep(Duration::from_secs(11)).await;
    run.run_pending().await.unwrap();
    let view = run.store().instance(&name).await.unwrap().unwrap();
    assert_eq!(view.status, InstanceStatus::Completed, "{view:?}");
    let page = phasm::store::PageRequest {
        after: 0,
        limit: 10,
    };
    let history = run
        .store()
        .history_page(&name, page, None)
        .await
        .unwrap()
        .unwrap();
    assert!(history.items[0].attempt <= 1, "{history:?}");
}
