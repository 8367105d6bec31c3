//! The model → `fsm.yaml` text. Only what was declared is written (effective policies are
//! derived again on load), so loading the output gives back the same model.

use std::fmt::Write as _;
use std::time::Duration;

use crate::duration;
use crate::machine::{
    ActionBinding, Config, Countdown, FanIn, Logging, Machine, Rate, RetrySettings, State,
    Transition,
};
use crate::schedule::{Overlap, Schedule, Timing};

/// Write a configuration as one self-contained machine file (imports are already inlined).
pub fn to_yaml(config: &Config) -> String {
    let mut out = String::new();
    if let Some(url) = &config.root_url {
        line(&mut out, 0, "root_url", &scalar(url));
    }
    if let Some(check) = config.enable_capabilities_check {
        line(&mut out, 0, "enable_capabilities_check", &check.to_string());
    }
    if !config.actions.is_empty() {
        out.push_str("actions:\n");
        for (name, binding) in &config.actions {
            let _ = writeln!(out, "  {}:", scalar(name));
            match binding {
                ActionBinding::Exec(exec) => {
                    let argv: Vec<String> = exec.argv.iter().map(|a| quoted(a)).collect();
                    line(&mut out, 4, "exec", &format!("[{}]", argv.join(", ")));
                    if let Some(t) = exec.timeout {
                        line(&mut out, 4, "timeout", &duration::format(t));
                    }
                }
                ActionBinding::Http(h) => {
                    line(&mut out, 4, "http", &quoted(&h.url));
                    if let Some(t) = h.timeout {
                        line(&mut out, 4, "timeout", &duration::format(t));
                    }
                    if !h.headers.is_empty() {
                        out.push_str("    headers:\n");
                        for (k, v) in &h.headers {
                            line(&mut out, 6, &scalar(k), &quoted(v));
                        }
                    }
                }
                ActionBinding::Lines(l) => {
                    line(&mut out, 4, "lines", &quoted(&l.path.to_string_lossy()));
                    page_keys(&mut out, l.batch, &l.into, l.event.as_deref());
                }
                ActionBinding::List(l) => {
                    line(&mut out, 4, "list", &scalar(&l.key));
                    page_keys(&mut out, l.batch, &l.into, l.event.as_deref());
                }
            }
        }
    }
    if !config.queues.is_empty() {
        out.push_str("queues:\n");
        for (name, limits) in &config.queues {
            if limits.max_concurrent.is_none() && limits.rate.is_none() {
                let _ = writeln!(out, "  {}: {{}}", scalar(name));
                continue;
            }
            let _ = writeln!(out, "  {}:", scalar(name));
            if let Some(n) = limits.max_concurrent {
                line(&mut out, 4, "max_concurrent", &n.to_string());
            }
            if let Some(rate) = limits.rate {
                line(&mut out, 4, "rate", &format_rate(rate));
            }
        }
    }
    if let Some(py) = &config.python {
        let empty = py.path_as_written.is_none()
            && py.processes.is_none()
            && py.timeout.is_none()
            && py.interpreter.is_none();
        if empty {
            out.push_str("python: {}\n");
        } else {
            out.push_str("python:\n");
            if let Some(path) = &py.path_as_written {
                let items: Vec<String> = path.iter().map(|p| quoted(p)).collect();
                line(&mut out, 2, "path", &format!("[{}]", items.join(", ")));
            }
            if let Some(n) = py.processes {
                line(&mut out, 2, "processes", &n.to_string());
            }
            if let Some(t) = py.timeout {
                line(&mut out, 2, "timeout", &duration::format(t));
            }
            if let Some(i) = &py.interpreter {
                line(&mut out, 2, "interpreter", &quoted(i));
            }
        }
    }
    if !config.schedules.is_empty() {
        out.push_str("schedules:\n");
        for s in &config.schedules {
            schedule(&mut out, s);
        }
    }
    out.push_str("state_machines:\n");
    for m in &config.machines {
        machine(&mut out, m);
    }
    out
}

fn schedule(out: &mut String, s: &Schedule) {
    let _ = writeln!(out, "- name: {}", scalar(&s.name));
    line(out, 2, "machine", &scalar(&s.machine));
    match &s.timing {
        Timing::Cron { expression, .. } => line(out, 2, "cron", &quoted(expression)),
        Timing::Every(every) => line(out, 2, "every", &duration::format(*every)),
    }
    if s.timezone_written {
        line(out, 2, "timezone", &quoted(s.timezone.name()));
    }
    if !s.context.is_empty() {
        // JSON is YAML's flow style, and reads back as the same values.
        let json = serde_json::to_string(&s.context).unwrap_or_else(|_| "{}".into());
        line(out, 2, "context", &json);
    }
    if s.overlap != Overlap::default() {
        line(out, 2, "overlap", s.overlap.as_str());
    }
}

fn page_keys(out: &mut String, batch: u32, into: &str, event: Option<&str>) {
    line(out, 4, "batch", &batch.to_string());
    line(out, 4, "into", &scalar(into));
    if let Some(e) = event {
        line(out, 4, "event", &scalar(e));
    }
}

fn machine(out: &mut String, m: &Machine) {
    let _ = writeln!(out, "- name: {}", scalar(&m.name));
    let ind = 2;
    opt(out, ind, "namespace", &m.namespace);
    opt(out, ind, "queue", &m.queue);
    opt(out, ind, "target", &m.target);
    if let Some(c) = &m.countdown {
        line(out, ind, "countdown", &countdown(c));
    }
    retry(out, ind, &m.retry);
    if !m.context_types.is_empty() {
        pad(out, ind);
        out.push_str("context_types:\n");
        for (key, t) in &m.context_types {
            line(out, ind + 2, &scalar(key), &scalar(&t.0));
        }
    }
    if m.logging == Logging::Persistent {
        line(out, ind, "logging", "persistent");
    }
    if !m.use_run_once_semaphore {
        line(out, ind, "use_run_once_semaphore", "false");
    }
    pad(out, ind);
    out.push_str("states:\n");
    for s in &m.states {
        state(out, ind, s);
    }
}

fn state(out: &mut String, ind: usize, s: &State) {
    pad(out, ind);
    let _ = writeln!(out, "- name: {}", scalar(&s.name));
    let ind = ind + 2;
    opt(out, ind, "namespace", &s.namespace);
    opt(out, ind, "entry", &s.entry);
    opt(out, ind, "action", &s.action);
    opt(out, ind, "exit", &s.exit);
    for (key, on) in [
        ("initial", s.initial),
        ("final", s.is_final),
        ("continuation", s.continuation),
    ] {
        if on {
            line(out, ind, key, "true");
        }
    }
    if let Some(d) = s.continuation_countdown {
        line(out, ind, "continuation_countdown", &duration::format(d));
    }
    match s.fan_in {
        Some(FanIn::All) => line(out, ind, "fan_in", "all"),
        Some(FanIn::Window(d)) => line(out, ind, "fan_in", &duration::format(d)),
        None => {}
    }
    opt(out, ind, "fan_in_group", &s.fan_in_group);
    if let Some(w) = &s.wait {
        match w.timeout {
            None => line(out, ind, "wait", "true"),
            Some(d) => {
                pad(out, ind);
                out.push_str("wait:\n");
                line(out, ind + 2, "timeout", &duration::format(d));
                line(out, ind + 2, "timeout_event", &scalar(&w.timeout_event));
            }
        }
    }
    if !s.transitions.is_empty() {
        pad(out, ind);
        out.push_str("transitions:\n");
        for t in &s.transitions {
            transition(out, ind, t);
        }
    }
}

fn transition(out: &mut String, ind: usize, t: &Transition) {
    pad(out, ind);
    let _ = writeln!(out, "- event: {}", scalar(&t.event));
    let ind = ind + 2;
    line(out, ind, "to", &scalar(&t.to));
    opt(out, ind, "action", &t.action);
    opt(out, ind, "namespace", &t.namespace);
    if let Some(c) = &t.countdown {
        line(out, ind, "countdown", &countdown(c));
    }
    opt(out, ind, "queue", &t.queue);
    opt(out, ind, "target", &t.target);
    retry(out, ind, &t.retry);
}

fn retry(out: &mut String, ind: usize, r: &RetrySettings) {
    if let Some(n) = r.task_retry_limit {
        line(out, ind, "task_retry_limit", &n.to_string());
    }
    let durations: [(&str, Option<Duration>); 3] = [
        ("min_backoff_seconds", r.min_backoff),
        ("max_backoff_seconds", r.max_backoff),
        ("task_age_limit", r.task_age_limit),
    ];
    for (key, d) in durations {
        if let Some(d) = d {
            line(out, ind, key, &duration::format(d));
        }
    }
    if let Some(n) = r.max_doublings {
        line(out, ind, "max_doublings", &n.to_string());
    }
}

fn countdown(c: &Countdown) -> String {
    match c {
        Countdown::Fixed(d) => duration::format(*d),
        Countdown::Random { minimum, maximum } => format!(
            "{{minimum: {}, maximum: {}}}",
            duration::format(*minimum),
            duration::format(*maximum)
        ),
    }
}

fn format_rate(rate: Rate) -> String {
    let per = match rate.per.as_secs() {
        1 if rate.per.subsec_nanos() == 0 => "s".to_string(),
        60 if rate.per.subsec_nanos() == 0 => "m".to_string(),
        3600 if rate.per.subsec_nanos() == 0 => "h".to_string(),
        86_400 if rate.per.subsec_nanos() == 0 => "d".to_string(),
        _ => format!("{}ms", rate.per.as_millis()),
    };
    format!("{}/{per}", rate.count)
}

fn pad(out: &mut String, ind: usize) {
    out.extend(std::iter::repeat_n(' ', ind));
}

fn line(out: &mut String, ind: usize, key: &str, value: &str) {
    pad(out, ind);
    let _ = writeln!(out, "{key}: {value}");
}

fn opt(out: &mut String, ind: usize, key: &str, value: &Option<String>) {
    if let Some(v) = value {
        line(out, ind, key, &scalar(v));
    }
}

/// A string as a YAML scalar: plain when that reads back as the same string, else quoted.
fn scalar(s: &str) -> String {
    let plain_chars = s
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '/'));
    let starts_ok = s
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == '/');
    let reserved = matches!(
        s.to_ascii_lowercase().as_str(),
        "true" | "false" | "yes" | "no" | "on" | "off" | "y" | "n" | "null" | "~"
    ) || s.parse::<f64>().is_ok();
    if plain_chars && starts_ok && !reserved {
        s.to_string()
    } else {
        quoted(s)
    }
}

/// A double-quoted YAML scalar.
fn quoted(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}
