//! Engine rules end to end, in immediate mode (fake clock, in-memory store).

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use phasm::action::Registry;
use phasm::config::{load_str, LoadOptions};
use phasm::engine::Context;
use phasm::store::{InstanceStatus, Store};
use phasm::testing::{Immediate, START_TIME};

const MACHINE: &str = r"
state_machines:
- name: Pay
  task_retry_limit: 3
  min_backoff_seconds: 10
  states:
  - name: start
    initial: true
    action: Begin
    transitions:
    - event: charge
      to: charging
  - name: charging
    action: Charge
    transitions:
    - event: done
      to: finished
  - name: finished
    final: true
";

fn config() -> phasm::machine::Config {
    load_str(MACHINE, "pay.yaml", &LoadOptions::default())
        .unwrap()
        .config
}

fn registry(
    charge: impl Fn(&mut phasm::action::ActionContext) -> phasm::action::ActionResult
        + Send
        + Sync
        + 'static,
) -> Registry {
    let mut r = Registry::new();
    r.register_fn("Begin", |_| Ok(Some("charge".into())));
    r.register_fn("Charge", charge);
    r
}

async fn failed_attempts_retry_with_backoff_on_the_fake_clock(store: Arc<dyn Store>) {
    let calls = Arc::new(AtomicU32::new(0));
    let c = Arc::clone(&calls);
    let run = Immediate::with_store(
        config(),
        registry(move |cx| {
            c.fetch_add(1, Ordering::SeqCst);
            if cx.attempt() < 2 {
                return Err("provider unavailable".into());
            }
            Ok(Some("done".into()))
        }),
        Arc::clone(&store),
    )
    .unwrap();
    let view = run.run("Pay", Context::new()).await.unwrap();
    assert_eq!(view.status, InstanceStatus::Completed);
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    // `Charge` runs when `charging` is entered: the step into `charging` took three attempts.
    let charging = &view.history[1];
    assert_eq!((charging.to.as_str(), charging.attempt), ("charging", 2));
    // Backoffs of 10 s and 20 s passed on the fake clock, not the real one.
    assert!(run.clock_now() >= START_TIME + 30_000_000);
    let logs = run.store().logs(&view.name).await.unwrap();
    assert_eq!(
        logs.iter().filter(|l| l.level == "error").count(),
        2,
        "{logs:?}"
    );
    assert!(logs[0].message.contains("provider unavailable"));
}

trait ClockNow {
    fn clock_now(&self) -> i64;
}

impl ClockNow for Immediate {
    fn clock_now(&self) -> i64 {
        use phasm::clock::Clock;
        self.clock().now()
    }
}

async fn exhausted_retries_fail_the_instance_and_retry_resumes_it(store: Arc<dyn Store>) {
    let healthy = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let h = Arc::clone(&healthy);
    let run = Immediate::with_store(
        config(),
        registry(move |_| {
            if h.load(Ordering::SeqCst) {
                Ok(Some("done".into()))
            } else {
                Err("still down".into())
            }
        }),
        Arc::clone(&store),
    )
    .unwrap();
    let view = run.run("Pay", Context::new()).await.unwrap();
    assert_eq!(view.status, InstanceStatus::Failed);
    let error = view.error.clone().unwrap();
    assert!(
        error.contains("action `Charge` of state `charging` failed: still down (after 4 attempts)"),
        "{error}"
    );
    assert_eq!(
        view.history.len(),
        1,
        "history up to the failing step is kept"
    );
    assert_eq!(view.tasks[0].status, phasm::store::TaskStatus::Failed);

    healthy.store(true, Ordering::SeqCst);
    use phasm::clock::Clock;
    run.store()
        .retry(run.clock().now(), &view.name)
        .await
        .unwrap();
    run.run_pending().await.unwrap();
    let view = run.store().instance(&view.name).await.unwrap().unwrap();
    assert_eq!(view.status, InstanceStatus::Completed);
    assert_eq!(
        view.history.last().unwrap().attempt,
        0,
        "attempts start over after a retry"
    );
}

async fn an_unknown_event_fails_at_once_without_retries(store: Arc<dyn Store>) {
    let calls = Arc::new(AtomicU32::new(0));
    let c = Arc::clone(&calls);
    let run = Immediate::with_store(
        config(),
        registry(move |_| {
            c.fetch_add(1, Ordering::SeqCst);
            Ok(Some("refund".into()))
        }),
        Arc::clone(&store),
    )
    .unwrap();
    let view = run.run("Pay", Context::new()).await.unwrap();
    assert_eq!(view.status, InstanceStatus::Failed);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    let error = view.error.unwrap();
    assert!(
        error.contains("state `charging` of machine `Pay` returned event `refund`"),
        "{error}"
    );
}

async fn a_panicking_action_is_a_failed_attempt(store: Arc<dyn Store>) {
    let calls = Arc::new(AtomicU32::new(0));
    let c = Arc::clone(&calls);
    let run = Immediate::with_store(
        config(),
        registry(move |_| {
            assert!(c.fetch_add(1, Ordering::SeqCst) != 0, "index out of bounds");
            Ok(Some("done".into()))
        }),
        Arc::clone(&store),
    )
    .unwrap();
    let view = run.run("Pay", Context::new()).await.unwrap();
    assert_eq!(view.status, InstanceStatus::Completed);
    let logs = run.store().logs(&view.name).await.unwrap();
    assert!(
        logs.iter().any(|l| l
            .message
            .contains("an action panicked: index out of bounds")),
        "{logs:?}"
    );
}

async fn halting_ends_the_instance(store: Arc<dyn Store>) {
    let run = Immediate::with_store(
        config(),
        registry(|cx| {
            cx.halt("customer closed the account");
            Ok(Some("done".into()))
        }),
        Arc::clone(&store),
    )
    .unwrap();
    let view = run.run("Pay", Context::new()).await.unwrap();
    assert_eq!(view.status, InstanceStatus::Halted);
    assert_eq!(view.error.as_deref(), Some("customer closed the account"));
    assert!(view.tasks.is_empty());
}

async fn an_oversized_context_is_refused_and_nothing_is_lost(store: Arc<dyn Store>) {
    let run = Immediate::with_store(
        config(),
        registry(|cx| {
            cx.put("blob", "x".repeat(2 * 1024 * 1024))?;
            Ok(Some("done".into()))
        }),
        Arc::clone(&store),
    )
    .unwrap();
    let mut start = Context::new();
    start.insert("order".into(), 7.into());
    let view = run.run("Pay", start).await.unwrap();
    assert_eq!(view.status, InstanceStatus::Failed);
    let error = view.error.unwrap();
    assert!(error.contains("over the limit of 1048576 bytes"), "{error}");
    // The step that was refused is kept, with the context it started from.
    assert_eq!(view.tasks.len(), 1);
    let context = view.current_context.unwrap();
    assert_eq!(context["order"], 7);
    assert!(context.get("blob").is_none());
}

async fn context_changes_carry_to_the_next_step_and_scratch_does_not(store: Arc<dyn Store>) {
    let mut r = Registry::new();
    r.register_fn("Begin", |cx| {
        cx.put("amount", 12.5)?;
        cx.scratch().insert("handle".into(), 1.into());
        Ok(Some("charge".into()))
    });
    r.register_fn("Charge", |cx| {
        let amount: f64 = cx.get("amount")?.unwrap_or_default();
        assert!(cx.scratch().is_empty(), "scratch is per step");
        cx.put("charged", amount * 2.0)?;
        Ok(Some("done".into()))
    });
    let run = Immediate::with_store(config(), r, Arc::clone(&store)).unwrap();
    let view = run.run("Pay", Context::new()).await.unwrap();
    assert_eq!(view.status, InstanceStatus::Completed);
    assert_eq!(view.current_context.unwrap()["charged"], 25.0);
}

#[test]
fn unbound_actions_are_refused_before_running() {
    let err = Immediate::new(config(), Registry::new()).err().unwrap();
    let text = err.to_string();
    assert!(
        text.contains("machine `Pay` uses actions that are bound to nothing"),
        "{text}"
    );
    assert!(text.contains("`Charge`"), "{text}");
}

async fn a_machine_that_loops_forever_is_stopped(store: Arc<dyn Store>) {
    let yaml = "state_machines:\n- name: Loop\n  states:\n  - name: a\n    initial: true\n    action: Again\n    transitions:\n    - event: again\n      to: a\n  - name: b\n    final: true\n";
    let cfg = load_str(yaml, "loop.yaml", &LoadOptions::default())
        .unwrap()
        .config;
    let mut r = Registry::new();
    r.register_fn("Again", |_| Ok(Some("again".into())));
    let run = Immediate::with_store(cfg, r, Arc::clone(&store))
        .unwrap()
        .max_steps(50);
    let err = run.run("Loop", Context::new()).await.unwrap_err();
    assert!(err.to_string().contains("stopped after 50 steps"), "{err}");
}

on_both_stores!(
    failed_attempts_retry_with_backoff_on_the_fake_clock,
    exhausted_retries_fail_the_instance_and_retry_resumes_it,
    an_unknown_event_fails_at_once_without_retries,
    a_panicking_action_is_a_failed_attempt,
    halting_ends_the_instance,
    an_oversized_context_is_refused_and_nothing_is_lost,
    context_changes_carry_to_the_next_step_and_scratch_does_not,
    a_machine_that_loops_forever_is_stopped,
);
