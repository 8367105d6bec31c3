//! One machine's YAML mapping → the model, checking each key and value where it stands.
//!
//! Cross-object rules (one initial state, known targets, fan-in restrictions, reachability)
//! run afterwards in [`super::check`], on the model and the positions recorded here.

use std::collections::BTreeMap;

use super::read::{Cx, Fields, ObjSpans};
use super::yaml::{Node, NodeKind};
use crate::machine::{
    is_valid_event, is_valid_name, ContextType, Countdown, FanIn, Logging, Machine,
    MachineDefaults, RetrySettings, State, Transition, TransitionPolicy, Wait,
    DEFAULT_TIMEOUT_EVENT, MAX_NAME_LENGTH,
};

/// Keys of a machine.
pub(crate) const MACHINE_KEYS: &[&str] = &[
    "name",
    "namespace",
    "queue",
    "target",
    "countdown",
    "task_retry_limit",
    "max_retries",
    "min_backoff_seconds",
    "max_backoff_seconds",
    "task_age_limit",
    "max_doublings",
    "context_types",
    "logging",
    "use_run_once_semaphore",
    "states",
];

/// Keys of a state.
pub(crate) const STATE_KEYS: &[&str] = &[
    "name",
    "namespace",
    "entry",
    "action",
    "exit",
    "initial",
    "final",
    "continuation",
    "continuation_countdown",
    "fan_in",
    "fan_in_group",
    "wait",
    "transitions",
];

/// Keys of a state's `wait:`.
pub(crate) const WAIT_KEYS: &[&str] = &["timeout", "timeout_event"];

/// Keys of a transition.
pub(crate) const TRANSITION_KEYS: &[&str] = &[
    "event",
    "to",
    "action",
    "namespace",
    "countdown",
    "queue",
    "target",
    "task_retry_limit",
    "max_retries",
    "min_backoff_seconds",
    "max_backoff_seconds",
    "task_age_limit",
    "max_doublings",
];

/// Where a machine's parts stand, for the checks that follow building.
#[derive(Debug, Clone, Default)]
pub(crate) struct MachineSpans {
    pub obj: ObjSpans,
    pub states: Vec<StateSpans>,
}

/// Where a state's parts stand.
#[derive(Debug, Clone, Default)]
pub(crate) struct StateSpans {
    pub obj: ObjSpans,
    pub transitions: Vec<ObjSpans>,
}

/// Build one machine. Always returns a machine (with blanks where values were bad) so that
/// later checks can still find problems in the rest; errors are in `cx`.
pub(crate) fn machine(cx: &mut Cx<'_>, node: &Node) -> Option<(Machine, MachineSpans)> {
    let f = cx.fields(node, "a machine", MACHINE_KEYS)?;
    let name = required_name(cx, &f, "name", "machine");
    let namespace = cx.optional_string(&f, "namespace");
    let queue = cx.optional_string(&f, "queue");
    let target = cx.optional_string(&f, "target");
    let countdown = f
        .get("countdown")
        .and_then(|n| cx.countdown(n, "countdown"));
    let retry = retry_settings(cx, &f, &format!("machine `{name}`"));
    let logging = match f.get("logging") {
        None => Logging::Default,
        Some(n) => match cx.string(n, "logging").as_deref() {
            Some("default") | None => Logging::Default,
            Some("persistent") => Logging::Persistent,
            Some(other) => {
                let label = super::read::suggest(other, ["default", "persistent"])
                    .map_or("use `default` or `persistent`".to_string(), |s| {
                        format!("did you mean `{s}`?")
                    });
                cx.error(
                    n.span,
                    format!("`logging` must be `default` or `persistent`, found `{other}`"),
                    Some(label),
                );
                Logging::Default
            }
        },
    };
    let use_run_once_semaphore = f
        .get("use_run_once_semaphore")
        .and_then(|n| cx.boolean(n, "use_run_once_semaphore"))
        .unwrap_or(true);
    let context_types = f
        .get("context_types")
        .map(|n| context_types(cx, n))
        .unwrap_or_default();

    let defaults = MachineDefaults {
        queue: queue.as_deref(),
        target: target.as_deref(),
        countdown,
        retry: &retry,
    };
    let (states, state_spans) = list(cx, &f, "states", "a list of states", |cx, item| {
        state(cx, item, &defaults)
    });
    let start_policy = TransitionPolicy::resolve(&defaults, None, None, None, &retry);
    let machine = Machine {
        name,
        namespace,
        queue,
        target,
        countdown,
        retry,
        context_types,
        logging,
        use_run_once_semaphore,
        states,
        start_policy,
    };
    Some((
        machine,
        MachineSpans {
            obj: f.spans(),
            states: state_spans,
        },
    ))
}

fn state(
    cx: &mut Cx<'_>,
    node: &Node,
    defaults: &MachineDefaults<'_>,
) -> Option<(State, StateSpans)> {
    let f = cx.fields(node, "a state", STATE_KEYS)?;
    let name = required_name(cx, &f, "name", "state");
    let flag =
        |cx: &mut Cx<'_>, key: &str| f.get(key).and_then(|n| cx.boolean(n, key)).unwrap_or(false);
    let namespace = cx.optional_string(&f, "namespace");
    let entry = cx.optional_string(&f, "entry");
    let action = cx.optional_string(&f, "action");
    let exit = cx.optional_string(&f, "exit");
    let initial = flag(cx, "initial");
    let is_final = flag(cx, "final");
    let continuation = flag(cx, "continuation");
    let continuation_countdown = f
        .get("continuation_countdown")
        .and_then(|n| cx.duration(n, "continuation_countdown"));
    let fan_in = f.get("fan_in").and_then(|n| fan_in(cx, n));
    let fan_in_group = cx.optional_string(&f, "fan_in_group");
    let wait = f.get("wait").and_then(|n| wait(cx, n));

    let (transitions, transition_spans) = list(
        cx,
        &f,
        "transitions",
        "a list of transitions",
        |cx, item| transition(cx, item, defaults),
    );
    let state = State {
        name,
        namespace,
        entry,
        action,
        exit,
        initial,
        is_final,
        continuation,
        continuation_countdown,
        fan_in,
        fan_in_group,
        wait,
        transitions,
    };
    Some((
        state,
        StateSpans {
            obj: f.spans(),
            transitions: transition_spans,
        },
    ))
}

fn transition(
    cx: &mut Cx<'_>,
    node: &Node,
    defaults: &MachineDefaults<'_>,
) -> Option<(Transition, ObjSpans)> {
    let f = cx.fields(node, "a transition", TRANSITION_KEYS)?;
    let event = match f.get("event") {
        None => {
            cx.error(
                f.whole,
                "a transition needs an `event`",
                Some("add `event: NAME`".into()),
            );
            String::new()
        }
        Some(n) => match cx.string(n, "event") {
            Some(e) if is_valid_event(&e) => e,
            Some(e) => {
                cx.error(
                    n.span,
                    format!("invalid event name `{e}`"),
                    Some(name_rule_hint(&e)),
                );
                String::new()
            }
            None => String::new(),
        },
    };
    let to = match f.get("to") {
        None => {
            cx.error(
                f.whole,
                "a transition needs `to`, the state it leads to",
                Some("add `to: STATE`".into()),
            );
            String::new()
        }
        Some(n) => cx.string(n, "to").unwrap_or_default(),
    };
    let action = cx.optional_string(&f, "action");
    let namespace = cx.optional_string(&f, "namespace");
    let queue = cx.optional_string(&f, "queue");
    let target = cx.optional_string(&f, "target");
    let countdown: Option<Countdown> = f
        .get("countdown")
        .and_then(|n| cx.countdown(n, "countdown"));
    let retry = retry_settings(cx, &f, &format!("transition `{event}`"));
    let effective = TransitionPolicy::resolve(
        defaults,
        queue.as_deref(),
        target.as_deref(),
        countdown,
        &retry,
    );
    Some((
        Transition {
            event,
            to,
            action,
            namespace,
            countdown,
            queue,
            target,
            retry,
            effective,
        },
        f.spans(),
    ))
}

/// Build each item of a list-valued key (an absent or empty key is an empty list).
fn list<T, S>(
    cx: &mut Cx<'_>,
    f: &Fields<'_>,
    key: &str,
    expected: &str,
    mut build: impl FnMut(&mut Cx<'_>, &Node) -> Option<(T, S)>,
) -> (Vec<T>, Vec<S>) {
    let mut built = (Vec::new(), Vec::new());
    let Some(n) = f.get(key).filter(|n| !n.is_null()) else {
        return built;
    };
    let NodeKind::Seq(items) = &n.kind else {
        cx.error(
            n.span,
            format!("`{key}` must be {expected}, found {}", n.describe()),
            None,
        );
        return built;
    };
    for item in items {
        if let Some((value, spans)) = build(cx, item) {
            built.0.push(value);
            built.1.push(spans);
        }
    }
    built
}

/// The name of a machine or state: required, and `[a-zA-Z0-9-]{1,50}`.
fn required_name(cx: &mut Cx<'_>, f: &Fields<'_>, key: &str, what: &str) -> String {
    match f.get(key) {
        None => {
            cx.error(
                f.whole,
                format!("a {what} needs a `{key}`"),
                Some(format!("add `{key}: NAME`")),
            );
            String::new()
        }
        Some(n) => match cx.string(n, key) {
            Some(name) if is_valid_name(&name) => name,
            Some(name) => {
                cx.error(
                    n.span,
                    format!("invalid {what} name `{name}`"),
                    Some(name_rule_hint(&name)),
                );
                String::new()
            }
            None => String::new(),
        },
    }
}

fn name_rule_hint(name: &str) -> String {
    if name.len() > MAX_NAME_LENGTH {
        format!(
            "names are at most {MAX_NAME_LENGTH} characters; this one has {}",
            name.len()
        )
    } else {
        "names may use only letters, digits and `-`".to_string()
    }
}

/// The five retry keys, and `max_retries`, Fantasm's deprecated alias of `task_retry_limit`.
fn retry_settings(cx: &mut Cx<'_>, f: &Fields<'_>, owner: &str) -> RetrySettings {
    let mut retry = RetrySettings {
        task_retry_limit: f
            .get("task_retry_limit")
            .and_then(|n| cx.count(n, "task_retry_limit")),
        min_backoff: f
            .get("min_backoff_seconds")
            .and_then(|n| cx.duration(n, "min_backoff_seconds")),
        max_backoff: f
            .get("max_backoff_seconds")
            .and_then(|n| cx.duration(n, "max_backoff_seconds")),
        task_age_limit: f
            .get("task_age_limit")
            .and_then(|n| cx.duration(n, "task_age_limit")),
        max_doublings: f
            .get("max_doublings")
            .and_then(|n| cx.count(n, "max_doublings")),
    };
    if let Some(n) = f.get("max_retries") {
        if f.get("task_retry_limit").is_some() {
            cx.error(
                n.span,
                format!("{owner} sets both `max_retries` and `task_retry_limit`"),
                Some("`max_retries` is an old name of `task_retry_limit`: keep only `task_retry_limit`".into()),
            );
        } else if let Some(limit) = cx.count(n, "max_retries") {
            retry.task_retry_limit = Some(limit);
            cx.warning(
                n.span,
                "`max_retries` is deprecated",
                Some("rename it to `task_retry_limit`".into()),
            );
        }
    }
    if let (Some(min), Some(max)) = (retry.min_backoff, retry.max_backoff) {
        if min > max {
            let span = f
                .entries
                .iter()
                .find(|(k, _, _)| *k == "max_backoff_seconds")
                .map_or(f.whole, |(_, _, v)| v.span);
            cx.error(
                span,
                format!("{owner} has `max_backoff_seconds` smaller than `min_backoff_seconds`"),
                None,
            );
        }
    }
    retry
}

/// `wait:` — `true`, an empty mapping, or `{timeout: D, timeout_event: NAME}`; `false` is no
/// wait.
fn wait(cx: &mut Cx<'_>, node: &Node) -> Option<Wait> {
    let forever = Wait {
        timeout: None,
        timeout_event: DEFAULT_TIMEOUT_EVENT.to_string(),
    };
    if node.is_null() {
        return Some(forever);
    }
    if !matches!(node.kind, NodeKind::Map(_)) {
        return cx.boolean(node, "wait")?.then_some(forever);
    }
    let f = cx.fields(node, "`wait`", WAIT_KEYS)?;
    let timeout = f.get("timeout").and_then(|n| cx.duration(n, "timeout"));
    if let (Some(t), Some(n)) = (timeout, f.get("timeout")) {
        if t.is_zero() {
            cx.error(
                n.span,
                "a wait's `timeout` must be longer than zero",
                Some("remove `timeout` to wait without a deadline".into()),
            );
        }
    }
    let timeout_event = match f.get("timeout_event") {
        None => DEFAULT_TIMEOUT_EVENT.to_string(),
        Some(n) => match cx.string(n, "timeout_event") {
            Some(e) if is_valid_event(&e) => e,
            Some(e) => {
                cx.error(
                    n.span,
                    format!("`timeout_event` `{e}` is not a valid event name"),
                    Some(format!(
                        "use letters, digits and `-`, at most {MAX_NAME_LENGTH} characters"
                    )),
                );
                e
            }
            None => DEFAULT_TIMEOUT_EVENT.to_string(),
        },
    };
    if timeout.is_none() && f.get("timeout").is_none() {
        if let Some(n) = f.get("timeout_event") {
            cx.warning(
                n.span,
                "`timeout_event` has no effect without a `timeout`",
                Some("add `timeout: DURATION`, or remove this key".into()),
            );
        }
    }
    Some(Wait {
        timeout,
        timeout_event,
    })
}

fn fan_in(cx: &mut Cx<'_>, node: &Node) -> Option<FanIn> {
    if node.scalar().is_some_and(|s| s.eq_ignore_ascii_case("all")) {
        return Some(FanIn::All);
    }
    let hint = "write a whole number of seconds to batch arrivals (`fan_in: 5`), or `all` to wait for every branch";
    match node.scalar() {
        Some(text) if text.trim().starts_with('-') => {
            cx.error(
                node.span,
                format!("`fan_in` cannot be negative, found `{text}`"),
                Some(format!(
                    "{hint}; remove the key if this is not a fan-in state"
                )),
            );
            return None;
        }
        Some(text) if !node.is_null() => match crate::duration::parse(text) {
            Ok(d) if d.subsec_nanos() == 0 => return Some(FanIn::Window(d)),
            _ => {
                cx.error(
                    node.span,
                    format!("`fan_in` must be a whole number of seconds or `all`, found `{text}`"),
                    Some(hint.into()),
                );
                return None;
            }
        },
        _ => {}
    }
    cx.error(
        node.span,
        format!(
            "`fan_in` must be a whole number of seconds or `all`, found {}",
            node.describe()
        ),
        Some(hint.into()),
    );
    None
}

fn context_types(cx: &mut Cx<'_>, node: &Node) -> BTreeMap<String, ContextType> {
    let mut types = BTreeMap::new();
    if node.is_null() {
        return types;
    }
    let NodeKind::Map(entries) = &node.kind else {
        cx.error(
            node.span,
            format!(
                "`context_types` must map context keys to type names, found {}",
                node.describe()
            ),
            None,
        );
        return types;
    };
    for (key, value) in entries {
        let Some(k) = key.scalar() else {
            cx.error(key.span, "context keys must be strings", None);
            continue;
        };
        if types.contains_key(k) {
            cx.error(key.span, format!("context key `{k}` is typed twice"), None);
            continue;
        }
        if let Some(t) = cx.string(value, k) {
            types.insert(k.to_string(), ContextType(t));
        }
    }
    types
}
