//! Model → YAML → model is the identity, for generated configurations that exercise every key.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use phasm::config::{load_str, to_yaml, LoadOptions};
use phasm::machine::{
    ActionBinding, Config, ContextType, Countdown, ExecBinding, FanIn, Logging, Machine,
    MachineDefaults, PythonSettings, QueueLimits, Rate, RetrySettings, State, Transition,
    TransitionPolicy,
};
use proptest::collection::{btree_map, vec};
use proptest::option;
use proptest::prelude::*;

const PATH: &str = "/phasm-roundtrip/fsm.yaml";

fn name() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9][a-zA-Z0-9-]{0,11}"
}

/// Free text where the language allows any string (actions, queues, namespaces).
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-zA-Z_][a-zA-Z0-9_.]{0,15}",
        "[ -~]{1,12}".prop_filter("not blank", |s| !s.trim().is_empty()),
        Just("true".to_string()),
        Just("12".to_string()),
        Just("a: b # c".to_string()),
    ]
}

fn duration() -> impl Strategy<Value = Duration> {
    prop_oneof![
        (0u64..100_000).prop_map(Duration::from_secs),
        (0u64..10_000_000).prop_map(Duration::from_millis),
    ]
}

fn countdown() -> impl Strategy<Value = Countdown> {
    prop_oneof![
        duration().prop_map(Countdown::Fixed),
        (duration(), duration()).prop_map(|(a, b)| Countdown::Random {
            minimum: a.min(b),
            maximum: a.max(b)
        }),
    ]
}

fn retry() -> impl Strategy<Value = RetrySettings> {
    (
        option::of(0u32..1000),
        option::of(duration()),
        option::of(duration()),
        option::of(duration()),
        option::of(0u32..20),
    )
        .prop_map(|(limit, a, b, age, doublings)| {
            let (min_backoff, max_backoff) = match (a, b) {
                (Some(a), Some(b)) => (Some(a.min(b)), Some(a.max(b))),
                other => other,
            };
            RetrySettings {
                task_retry_limit: limit,
                min_backoff,
                max_backoff,
                task_age_limit: age,
                max_doublings: doublings,
            }
        })
}

/// Raw material for one state, made valid by [`assemble`].
#[derive(Debug, Clone)]
struct RawState {
    namespace: Option<String>,
    entry: Option<String>,
    action: Option<String>,
    exit: Option<String>,
    is_final: bool,
    kind: u8,
    continuation_countdown: Option<Duration>,
    fan_in: Option<FanIn>,
    fan_in_group: Option<String>,
    transitions: Vec<RawTransition>,
}

#[derive(Debug, Clone)]
struct RawTransition {
    event: String,
    to: usize,
    action: Option<String>,
    namespace: Option<String>,
    countdown: Option<Countdown>,
    queue: Option<String>,
    target: Option<String>,
    retry: RetrySettings,
}

fn raw_transition() -> impl Strategy<Value = RawTransition> {
    (
        name(),
        0usize..8,
        option::of(text()),
        option::of(text()),
        option::of(countdown()),
        option::of(text()),
        option::of(text()),
        retry(),
    )
        .prop_map(
            |(event, to, action, namespace, countdown, queue, target, retry)| RawTransition {
                event,
                to,
                action,
                namespace,
                countdown,
                queue,
                target,
                retry,
            },
        )
}

fn raw_state() -> impl Strategy<Value = RawState> {
    (
        (
            option::of(text()),
            option::of(text()),
            option::of(text()),
            option::of(text()),
        ),
        any::<bool>(),
        0u8..3,
        option::of(duration()),
        prop_oneof![
            (0u64..600).prop_map(|s| FanIn::Window(Duration::from_secs(s))),
            Just(FanIn::All)
        ],
        option::of(text()),
        vec(raw_transition(), 0..4),
    )
        .prop_map(
            |((namespace, entry, action, exit), is_final, kind, cc, fan_in, group, transitions)| {
                RawState {
                    namespace,
                    entry,
                    action,
                    exit,
                    is_final,
                    kind,
                    continuation_countdown: cc,
                    fan_in: Some(fan_in),
                    fan_in_group: group,
                    transitions,
                }
            },
        )
}

/// Turn raw material into a machine that satisfies every validation rule.
#[allow(clippy::too_many_arguments)]
fn assemble(
    name: String,
    namespace: Option<String>,
    queue: Option<String>,
    target: Option<String>,
    countdown: Option<Countdown>,
    retry: RetrySettings,
    context_types: BTreeMap<String, ContextType>,
    logging: Logging,
    semaphore: bool,
    raw: Vec<RawState>,
) -> Machine {
    let n = raw.len();
    // kind: 0 plain, 1 continuation, 2 fan-in.
    let kinds: Vec<u8> = raw.iter().map(|r| r.kind).collect();
    let any_fan_in = kinds.contains(&2);
    let countdown = if any_fan_in { None } else { countdown };
    let defaults = MachineDefaults {
        queue: queue.as_deref(),
        target: target.as_deref(),
        countdown,
        retry: &retry,
    };
    let mut states: Vec<State> = Vec::new();
    for (i, r) in raw.iter().enumerate() {
        let kind = kinds[i];
        let is_final = r.is_final || i == n - 1;
        let mut seen = std::collections::HashSet::new();
        let transitions: Vec<Transition> = r
            .transitions
            .iter()
            .filter(|t| seen.insert(t.event.clone()))
            .map(|t| {
                let to = t.to % n;
                let target_kind = kinds[to];
                let action = if kind == 0 && target_kind == 0 {
                    t.action.clone()
                } else {
                    None
                };
                let countdown = if target_kind == 2 { None } else { t.countdown };
                Transition {
                    event: t.event.clone(),
                    to: format!("s{to}"),
                    action,
                    namespace: t.namespace.clone(),
                    countdown,
                    queue: t.queue.clone(),
                    target: t.target.clone(),
                    retry: t.retry,
                    effective: TransitionPolicy::resolve(
                        &defaults,
                        t.queue.as_deref(),
                        t.target.as_deref(),
                        countdown,
                        &t.retry,
                    ),
                }
            })
            .collect();
        let leads_to_special = transitions
            .iter()
            .any(|t| kinds[t.to[1..].parse::<usize>().unwrap_or(0)] != 0);
        let action = if is_final && kind == 0 {
            r.action.clone()
        } else {
            Some(r.action.clone().unwrap_or_else(|| "Act".into()))
        };
        states.push(State {
            name: format!("s{i}"),
            namespace: r.namespace.clone(),
            entry: r.entry.clone(),
            action,
            exit: if kind == 0 && !leads_to_special {
                r.exit.clone()
            } else {
                None
            },
            initial: i == 0,
            is_final,
            continuation: kind == 1,
            continuation_countdown: if kind == 1 {
                r.continuation_countdown
            } else {
                None
            },
            fan_in: if kind == 2 { r.fan_in } else { None },
            fan_in_group: if kind == 2 {
                r.fan_in_group.clone()
            } else {
                None
            },
            wait: None,
            transitions,
        });
    }
    let start_policy = TransitionPolicy::resolve(&defaults, None, None, None, &retry);
    Machine {
        name,
        namespace,
        queue,
        target,
        countdown,
        retry,
        context_types,
        logging,
        use_run_once_semaphore: semaphore,
        states,
        start_policy,
    }
}

fn machine() -> impl Strategy<Value = Machine> {
    (
        (
            name(),
            option::of(text()),
            option::of(text()),
            option::of(text()),
        ),
        option::of(countdown()),
        retry(),
        btree_map(text(), text().prop_map(ContextType), 0..3),
        prop_oneof![Just(Logging::Default), Just(Logging::Persistent)],
        any::<bool>(),
        vec(raw_state(), 1..6),
    )
        .prop_map(
            |((name, ns, queue, target), countdown, retry, types, logging, sem, raw)| {
                assemble(
                    name, ns, queue, target, countdown, retry, types, logging, sem, raw,
                )
            },
        )
}

fn config() -> impl Strategy<Value = Config> {
    let dir = PathBuf::from(Path::new(PATH).parent().unwrap_or(Path::new("/")));
    (
        option::of(text()),
        option::of(any::<bool>()),
        vec(machine(), 1..4),
        btree_map(text(), (vec(text(), 1..3), option::of(duration())), 0..3),
        btree_map(
            text(),
            (
                option::of(1u32..100),
                option::of((1u32..1000, 1u64..100_000)),
            ),
            0..3,
        ),
        option::of((
            option::of(vec(text(), 1..3)),
            option::of(1u32..16),
            option::of(duration().prop_filter("positive", |d| !d.is_zero())),
            option::of(text()),
        )),
    )
        .prop_map(
            move |(root_url, check, machines, actions, queues, python)| {
                let mut seen = std::collections::HashSet::new();
                let machines = machines
                    .into_iter()
                    .filter(|m| seen.insert(m.name.clone()))
                    .collect();
                Config {
                    root_url,
                    enable_capabilities_check: check,
                    machines,
                    actions: actions
                        .into_iter()
                        .map(|(k, (argv, timeout))| {
                            (
                                k,
                                ActionBinding::Exec(ExecBinding {
                                    argv,
                                    working_dir: dir.clone(),
                                    timeout,
                                }),
                            )
                        })
                        .collect(),
                    queues: queues
                        .into_iter()
                        .map(|(k, (max, rate))| {
                            (
                                k,
                                QueueLimits {
                                    max_concurrent: max,
                                    rate: rate.map(|(count, ms)| Rate {
                                        count,
                                        per: Duration::from_millis(ms),
                                    }),
                                },
                            )
                        })
                        .collect(),
                    python: python.map(|(path, processes, timeout, interpreter)| PythonSettings {
                        path: path.as_ref().map_or_else(
                            || vec![dir.clone()],
                            |p| {
                                p.iter()
                                    .map(|e| dir.join(e).components().collect())
                                    .collect()
                            },
                        ),
                        processes,
                        timeout,
                        interpreter,
                        working_dir: dir.clone(),
                        path_as_written: path,
                    }),
                    schedules: Vec::new(),
                }
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn model_to_yaml_to_model_is_identity(config in config()) {
        let yaml = to_yaml(&config);
        let loaded = load_str(&yaml, PATH, &LoadOptions::default())
            .unwrap_or_else(|e| panic!("emitted YAML does not load:\n{e}\n---\n{yaml}"));
        prop_assert_eq!(&loaded.config, &config, "YAML was:\n{}", yaml);
    }
}

#[test]
fn http_and_built_in_bindings_round_trip() {
    let yaml = "actions:\n  Hook:\n    http: https://hooks.example/pay?x=1\n    timeout: 1500ms\n    headers:\n      Authorization: Bearer abc\n  Read:\n    lines: data/r.jsonl\n    batch: 7\n    into: rows\n    event: got\n  Each:\n    list: ids\nstate_machines:\n- name: M\n  states:\n  - name: a\n    initial: true\n    final: true\n    action: Hook\n";
    let first = load_str(yaml, PATH, &LoadOptions::default())
        .unwrap()
        .config;
    let again = load_str(&to_yaml(&first), PATH, &LoadOptions::default())
        .unwrap()
        .config;
    assert_eq!(first, again);
}

#[test]
fn schedules_round_trip() {
    let yaml = r#"schedules:
- name: nightly-report
  machine: M
  cron: "0 3 * * MON-FRI"
  timezone: Europe/Paris
  context: {kind: nightly, n: "3", ratio: 0.5, on: true, list: [1, "2"], deep: {a: ~}}
  overlap: allow
- name: often
  machine: M
  every: 10m
state_machines:
- name: M
  states:
  - name: a
    initial: true
    final: true
    action: A
"#;
    let first = load_str(yaml, PATH, &LoadOptions::default())
        .unwrap()
        .config;
    assert_eq!(first.schedules.len(), 2);
    let context = &first.schedules[0].context;
    assert_eq!(context["kind"], "nightly");
    assert_eq!(context["n"], "3", "quoted text stays a string");
    assert_eq!(context["ratio"], 0.5);
    assert_eq!(context["on"], true);
    assert_eq!(context["list"], serde_json::json!([1, "2"]));
    assert_eq!(context["deep"], serde_json::json!({"a": null}));
    let yaml = to_yaml(&first);
    let again = load_str(&yaml, PATH, &LoadOptions::default())
        .unwrap_or_else(|e| panic!("{e}\n{yaml}"))
        .config;
    assert_eq!(first, again, "{yaml}");
}
