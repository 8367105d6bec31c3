//! Running a step's hosted calls (Python actions) as one request to an action host.
//!
//! Consecutive calls of a step that a host carries out go in one `step` request, in
//! Fantasm's order, so they share one `obj` and cost one round trip. A continuation page's
//! host reports the next token before the page's main action runs; phasm queues the next page
//! (fenced by this page's lease) and only then lets the host go on, so pages overlap.

use std::sync::Arc;

use crate::action::host::protocol::{Done, FromHost, StepCall, StepRequest};
use crate::action::host::HostPool;
use crate::action::ActionContext;
use crate::engine::{Call, Step, TaskKind};
use crate::machine::ActionRole;

use super::{queue_next_page, StepEnv, StepFailure};

/// Run `calls` (each with its host reference) on a host; the main action's event when the
/// calls include it. When no host can take the step (none starts: a module that does not
/// import, say), nothing ran: the step is postponed without counting an attempt, so fixing
/// the module brings it back.
pub(super) async fn run(
    env: &StepEnv<'_>,
    step: &mut Step<'_>,
    pool: &Arc<HostPool>,
    calls: &[(Call, String)],
    cx: &mut ActionContext,
) -> Result<Option<String>, StepFailure> {
    let task = step.task();
    let mut wire = Vec::with_capacity(calls.len() + 1);
    for (call, reference) in calls {
        if step.asks_for_next_page(call) {
            wire.push(StepCall {
                role: "continuation",
                action: reference.clone(),
                state: call.state.clone(),
            });
        }
        wire.push(StepCall {
            role: call.role.as_str(),
            action: reference.clone(),
            state: call.state.clone(),
        });
    }
    let request = StepRequest {
        id: 0,
        machine: cx.machine.clone(),
        instance: cx.instance.clone(),
        task: cx.task.clone(),
        attempt: cx.attempt,
        event: cx.event.clone(),
        context: cx.context.clone(),
        contexts: (task.kind == TaskKind::Join).then(|| cx.contexts.clone()),
        token: cx.token.clone(),
        wait_token: cx.wait_token.clone(),
        calls: wire,
    };
    let mut running = pool
        .start_step(request.clone())
        .await
        .map_err(|e| StepFailure::Unavailable(format!("no action host can take it: {e}")))?;
    loop {
        match running.next().await.map_err(StepFailure::Failed)? {
            FromHost::Token { token, .. } => {
                let outcome = match step.next_page(token, env.clock.now()) {
                    Some(page) => queue_next_page(env, page).await,
                    None => Ok(()),
                };
                running
                    .answer(&outcome)
                    .await
                    .map_err(StepFailure::Failed)?;
                outcome.map_err(StepFailure::Failed)?;
            }
            FromHost::Done(done) => {
                let has_action = calls.iter().any(|(c, _)| c.role == ActionRole::Action);
                let event = apply(cx, &request.calls, *done).map_err(StepFailure::Failed)?;
                return Ok(if has_action { event } else { None });
            }
        }
    }
}

/// Apply a host's `done` to the step's context; the event, or the failure described.
fn apply(cx: &mut ActionContext, calls: &[StepCall], done: Done) -> Result<Option<String>, String> {
    for line in done.log {
        cx.log(&line.level, line.message);
    }
    if let Some(error) = done.error {
        let kind = error.kind.as_deref().unwrap_or("Error");
        let what = match error.call.and_then(|i| calls.get(i)) {
            Some(call) => {
                let slot = match call.role {
                    "exit" => "exit action",
                    "transition" => "transition action",
                    "entry" => "entry action",
                    "continuation" => "continuation of",
                    _ => "action",
                };
                format!("{slot} `{}` of state `{}`", call.action, call.state)
            }
            None => "the Python step".to_string(),
        };
        if let Some(traceback) = error.traceback.as_deref().map(str::trim_end) {
            if !traceback.is_empty() {
                let level = if error.transient { "warning" } else { "error" };
                cx.log(level, traceback.to_string());
            }
        }
        return Err(format!("{what} failed: {kind}: {}", error.message));
    }
    if let Some(context) = done.context {
        cx.context = context;
    }
    cx.forks.extend(done.forks);
    for spawn in done.spawns {
        let countdown = spawn
            .countdown
            .filter(|c| c.is_finite() && *c > 0.0)
            .and_then(|c| std::time::Duration::try_from_secs_f64(c).ok())
            .unwrap_or_default();
        cx.spawn_after(&spawn.machine, spawn.contexts, countdown);
    }
    if let Some(reason) = done.halt {
        cx.halt(reason);
    }
    if let Some(token) = done.next_token.filter(|t| !t.is_null()) {
        cx.set_next_token(token);
    }
    Ok(done.event)
}
