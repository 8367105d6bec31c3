//! The `exec` binding's protocol and failure modes, against real processes.

use crate::common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use phasm::action::{Action, ActionContext, ExecAction};
use phasm::clock::SystemClock;
use phasm::engine::Context;
use phasm::machine::ExecBinding;

fn sh(script: &str, timeout: Option<Duration>) -> ExecAction {
    ExecAction::new(ExecBinding {
        argv: vec!["sh".into(), "-c".into(), script.into()],
        working_dir: std::env::temp_dir(),
        timeout,
    })
}

fn cx() -> ActionContext {
    let mut c = Context::new();
    c.insert("n".into(), 1.into());
    ActionContext::new("M", "M-1", c, Arc::new(SystemClock))
}

#[tokio::test]
async fn a_response_sets_event_context_and_log() {
    let action = sh(
        r#"cat >/dev/null; echo '{"event": "next", "context": {"a": 1}, "log": ["hello"]}'"#,
        None,
    );
    let mut cx = cx();
    let event = action.run(&mut cx).await.unwrap();
    assert_eq!(event.as_deref(), Some("next"));
    assert_eq!(
        serde_json::Value::Object(cx.context().clone()),
        serde_json::json!({"a": 1})
    );
}

#[tokio::test]
async fn the_request_carries_the_step() {
    // Echo the request back as the new context.
    let action = sh(r#"printf '{"context": '; cat; printf '}'"#, None);
    let mut cx = cx();
    action.run(&mut cx).await.unwrap();
    let request = cx.context();
    assert_eq!(request["machine"], "M");
    assert_eq!(request["instance"], "M-1");
    assert_eq!(request["role"], "action");
    assert_eq!(request["attempt"], 0);
    assert_eq!(request["task"], "M-1--test");
    assert_eq!(request["context"]["n"], 1);
}

#[tokio::test]
async fn empty_output_means_no_event_and_no_change() {
    let mut cx = cx();
    assert_eq!(sh("cat >/dev/null", None).run(&mut cx).await.unwrap(), None);
    assert_eq!(cx.context()["n"], 1);
}

#[tokio::test]
async fn a_non_zero_exit_fails_with_its_stderr() {
    let err = sh("echo 'card declined by bank' >&2; exit 3", None)
        .run(&mut cx())
        .await
        .unwrap_err();
    assert!(
        err.message()
            .contains("exited with status 3: card declined by bank"),
        "{err}"
    );
}

#[tokio::test]
async fn a_timeout_kills_the_program() {
    let started = Instant::now();
    let err = sh("sleep 30", Some(Duration::from_millis(200)))
        .run(&mut cx())
        .await
        .unwrap_err();
    assert!(err.message().contains("timed out after 0.2s"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test]
async fn garbage_output_fails() {
    let err = sh("echo this is not json", None)
        .run(&mut cx())
        .await
        .unwrap_err();
    assert!(err.message().contains("output is not JSON"), "{err}");
    let err = sh("echo '[1, 2]'", None).run(&mut cx()).await.unwrap_err();
    assert!(err.message().contains("must be a JSON object"), "{err}");
    let err = sh(r#"echo '{"event": 5}'"#, None)
        .run(&mut cx())
        .await
        .unwrap_err();
    assert!(err.message().contains("`event` must be a string"), "{err}");
    let err = sh(r#"echo '{"context": [1]}'"#, None)
        .run(&mut cx())
        .await
        .unwrap_err();
    assert!(
        err.message().contains("`context` must be a JSON object"),
        "{err}"
    );
}

#[tokio::test]
async fn huge_output_fails_without_hanging() {
    let err = sh(
        "head -c 20000000 /dev/zero | tr '\\0' a",
        Some(Duration::from_secs(60)),
    )
    .run(&mut cx())
    .await
    .unwrap_err();
    assert!(
        err.message().contains("wrote more than 16777216 bytes"),
        "{err}"
    );
}

#[tokio::test]
async fn a_missing_program_fails_clearly() {
    let action = ExecAction::new(ExecBinding {
        argv: vec!["/no/such/program".into()],
        working_dir: std::env::temp_dir(),
        timeout: None,
    });
    let err = action.run(&mut cx()).await.unwrap_err();
    assert!(
        err.message().contains("cannot start `/no/such/program`"),
        "{err}"
    );
}

#[tokio::test]
async fn a_program_that_ignores_its_input_still_works() {
    let action = sh(r#"echo '{"event": "ok"}'"#, None);
    assert_eq!(action.run(&mut cx()).await.unwrap().as_deref(), Some("ok"));
}

#[tokio::test]
async fn a_timeout_kills_the_whole_process_group() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("pid");
    let script = format!("sleep 1000 & echo $! > {}; sleep 1000", pidfile.display());
    let err = sh(&script, Some(Duration::from_millis(500)))
        .run(&mut cx())
        .await
        .unwrap_err();
    assert!(
        err.message().contains("killed with its process group"),
        "{err}"
    );
    let pid: u32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(
        common::gone(pid).await,
        "the background process {pid} survived"
    );
}

#[tokio::test]
async fn a_program_that_exited_is_not_waited_on_for_output_a_grandchild_holds_open() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("pid");
    // The background sleep inherits stdout, so its end never comes while it lives.
    let script = format!(
        "cat > /dev/null; sleep 30 & echo $! > {}; echo '{{\"event\": \"ok\"}}'",
        pidfile.display()
    );
    let started = Instant::now();
    let event = sh(&script, Some(Duration::from_secs(20)))
        .run(&mut cx())
        .await
        .unwrap();
    assert_eq!(event.as_deref(), Some("ok"));
    assert!(started.elapsed() < Duration::from_secs(20));
    // What the call left behind in its process group is stopped with it.
    let pid: u32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(
        common::gone(pid).await,
        "the background process {pid} survived"
    );
}

#[tokio::test]
async fn an_unknown_response_field_is_named_with_a_suggestion() {
    let err = sh(r#"cat > /dev/null; echo '{"evnet": "ok"}'"#, None)
        .run(&mut cx())
        .await
        .unwrap_err();
    assert!(
        err.message()
            .contains("unknown field `evnet` in the response (did you mean `event`?)"),
        "{err}"
    );
    let err = sh(r#"cat > /dev/null; echo '{"frobnicate": 1}'"#, None)
        .run(&mut cx())
        .await
        .unwrap_err();
    assert!(
        err.message()
            .contains("unknown field `frobnicate` in the response; the fields are `event`"),
        "{err}"
    );
}

#[tokio::test]
async fn a_first_line_with_only_a_token_outside_a_continuation_is_the_response() {
    // No worker listens for an early token here: the line is an ordinary response.
    let mut cx = cx();
    let event = sh(r#"cat > /dev/null; echo '{"token": 3}'"#, None)
        .run(&mut cx)
        .await
        .unwrap();
    assert_eq!(event, None);
}

#[tokio::test]
async fn log_lines_may_carry_a_level() {
    use phasm::config::{load_str, LoadOptions};
    let yaml = r#"
actions:
  Talk:
    exec: [sh, -c, "cat > /dev/null; echo '{\"log\": [\"plain\", {\"level\": \"warning\", \"message\": \"careful\"}, {\"level\": \"critical\", \"message\": \"on fire\"}]}'"]
  Bad:
    exec: [sh, -c, "cat > /dev/null; echo '{\"log\": [{\"level\": \"loud\", \"message\": \"x\"}]}'"]
state_machines:
- name: M
  logging: persistent
  task_retry_limit: 0
  states:
  - name: a
    initial: true
    final: true
    action: Talk
- name: N
  task_retry_limit: 0
  states:
  - name: a
    initial: true
    final: true
    action: Bad
"#;
    let config = load_str(
        yaml,
        std::env::temp_dir().join("fsm.yaml"),
        &LoadOptions::default(),
    )
    .unwrap()
    .config;
    let run = phasm::testing::Immediate::new(config, phasm::action::Registry::new()).unwrap();
    let view = run.run("M", Context::new()).await.unwrap();
    let logs: Vec<(String, String)> = run
        .store()
        .logs(&view.name)
        .await
        .unwrap()
        .into_iter()
        .map(|l| (l.level, l.message))
        .collect();
    assert_eq!(
        logs,
        [
            ("info".to_string(), "plain".to_string()),
            ("warning".to_string(), "careful".to_string()),
            ("critical".to_string(), "on fire".to_string()),
        ]
    );
    let bad = run.run("N", Context::new()).await.unwrap();
    let error = bad.error.unwrap_or_default();
    assert!(
        error.contains("a `log` line's `level` must be one of debug, info"),
        "{error}"
    );
}

/// A program killed by a signal is reported with the signal's name; SIGKILL, what the
/// kernel's out-of-memory killer sends, says so.
#[tokio::test]
async fn a_program_killed_by_a_signal_names_it() {
    let mut cx = cx();
    let e = sh("cat >/dev/null; kill -KILL $$", None)
        .run(&mut cx)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("killed by SIGKILL, perhaps out of memory"),
        "{e}"
    );
    let e = sh("cat >/dev/null; kill -SEGV $$", None)
        .run(&mut cx)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("killed by SIGSEGV"), "{e}");
}
