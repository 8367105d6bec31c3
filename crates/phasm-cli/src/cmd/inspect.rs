//! `status`, `list`, `logs`, `retry` and `cancel`: looking at instances and acting on them.

use std::process::ExitCode;

use phasm::clock::{Clock, SystemClock};
use phasm::store::{Control, InstanceStatus, InstanceView, ListFilter, Store};
use serde_json::{json, Value};

use crate::output::{count, duration, outln, printable, time};
use crate::{db, exit, DbArgs};

/// Open the database an inspecting command names: read-only for `status`, `list` and `logs`,
/// an existing file for `retry`, `cancel` and `scrub`; never a new one.
pub(crate) async fn open_db(
    args: &DbArgs,
    access: phasm::store::Access,
) -> Result<std::sync::Arc<dyn Store>, ExitCode> {
    db::open_as(args, 2, access).await.map_err(exit::database)
}

async fn find(store: &dyn Store, name: &str, args: &DbArgs) -> Result<InstanceView, ExitCode> {
    match store.instance(name).await {
        Ok(Some(view)) => Ok(view),
        Ok(None) => Err(exit::invalid(format!(
            "no instance named `{name}` in {}",
            args.db
        ))),
        Err(e) => Err(exit::database(e)),
    }
}

/// `phasm status`: the latest transitions, or with `all` every one (read a page at a time).
pub async fn status(name: &str, as_json: bool, all: bool, args: &DbArgs) -> ExitCode {
    let store = match open_db(args, phasm::store::Access::ReadOnly).await {
        Ok(s) => s,
        Err(code) => return code,
    };
    let view = match find(&*store, name, args).await {
        Ok(v) => v,
        Err(code) => return code,
    };
    let truncated = view.history_total > view.history.len() as u64;
    let workers = match live_workers(&*store).await {
        Ok(w) => w,
        Err(code) => return code,
    };
    if as_json {
        let mut out = phasm::control::instance_json(&view, &workers);
        if all && truncated {
            let mut history = Vec::new();
            if let Err(e) = phasm::store::for_each_transition(&*store, name, |h| {
                history.push(phasm::control::history_json(h));
            })
            .await
            {
                return exit::database(e);
            }
            out["history"] = Value::Array(history);
        }
        outln!("{out}");
        return ExitCode::SUCCESS;
    }
    outln!("instance  {}", view.name);
    match view.version {
        Some(v) => outln!("machine   {} v{v}", view.machine),
        None => outln!("machine   {} (not deployed when it started)", view.machine),
    }
    outln!("status    {}", view.status);
    if let Some(error) = &view.error {
        outln!("error     {}", printable(error));
    }
    outln!("created   {}", time(view.created_at));
    if let Some(ended) = view.ended_at {
        outln!(
            "ended     {} (after {})",
            time(ended),
            duration(ended - view.created_at)
        );
    }
    if let Some(context) = &view.current_context {
        outln!("context   {}", Value::Object(context.clone()));
    }
    let b = &view.branches;
    let held = if b.held > 0 {
        format!(
            ", {} held (stopped by the failure; `phasm retry` resumes them)",
            b.held
        )
    } else {
        String::new()
    };
    let waiting = if b.waiting > 0 {
        format!("{} waiting for events, ", b.waiting)
    } else {
        String::new()
    };
    outln!(
        "branches  {} live, {waiting}{} parked at fan-ins, {} ended, {} failed{held}",
        b.live,
        b.parked,
        b.ended,
        b.failed
    );
    if let Some(parent) = &view.parent {
        outln!("parent    {parent}");
    }
    if !view.children.is_empty() {
        outln!("children  {}", view.children.join(", "));
    }
    outln!("history");
    outln!(
        "  {:>5}  {:<20} {:<20} {:<20} {:>7}  {:<24} took",
        "step",
        "from",
        "event",
        "to",
        "attempt",
        "at"
    );
    // Each step by its id: what `phasm reset --step` and the console's step pages take.
    let row = |h: &phasm::store::HistoryRow| {
        outln!(
            "  {:>5}  {:<20} {:<20} {:<20} {:>7}  {:<24} {}",
            h.id,
            h.from.as_deref().unwrap_or("-"),
            h.event,
            h.to,
            h.attempt,
            time(h.finished_at),
            duration(h.finished_at - h.started_at)
        );
    };
    if all && truncated {
        if let Err(e) = phasm::store::for_each_transition(&*store, name, row).await {
            return exit::database(e);
        }
    } else {
        let skipped = view.history_total.saturating_sub(view.history.len() as u64);
        if skipped > 0 {
            outln!(
                "  … {} not shown (`phasm status {name} --all` shows every one)",
                count(skipped, "earlier transition")
            );
        }
        view.history.iter().for_each(row);
    }
    if !view.waiting.is_empty() {
        outln!("waiting (`phasm send {name} EVENT` delivers an event)");
        for w in &view.waiting {
            let branch = if w.branch.is_empty() {
                String::new()
            } else {
                format!(" (branch {})", w.branch)
            };
            let until = match (w.deadline, &w.timeout_event) {
                (Some(at), Some(event)) => format!("; `{event}` at {}", time(at)),
                _ => "; no timeout".to_string(),
            };
            outln!(
                "  {}{branch}: for {} since {}{until}",
                w.state,
                w.events.join(", "),
                time(w.since)
            );
        }
    }
    if !view.buffered.is_empty() {
        outln!("events kept for a later wait");
        for e in &view.buffered {
            let id =
                e.id.as_deref()
                    .map(|i| format!(" (id {i})"))
                    .unwrap_or_default();
            outln!(
                "  {}{id}, {} bytes of data, at {}",
                e.event,
                e.bytes,
                time(e.at)
            );
        }
    }
    let pending: Vec<_> = view.tasks.iter().filter(|t| !view.is_wait(t)).collect();
    if !pending.is_empty() {
        outln!("pending");
        for t in pending {
            let holder = t
                .leased_by
                .as_deref()
                .map(|w| format!(", running on {w}"))
                .unwrap_or_default();
            let error = t
                .last_error
                .as_deref()
                .map(|e| format!(", last error: {e}"))
                .unwrap_or_default();
            let target = t
                .target
                .as_deref()
                .map(|p| format!("; target `{p}`: only `phasm worker --target {p}` takes it"))
                .unwrap_or_default();
            let when = if t.status == phasm::store::TaskStatus::Held {
                "stopped because the instance failed; `phasm retry` resumes it".to_string()
            } else {
                format!("due {}", time(t.due_at))
            };
            let waiting = phasm::control::unserved(&view.machine, t, &workers)
                .map(|why| format!("; waiting: {why}"))
                .unwrap_or_default();
            outln!(
                "  {} --{}--> ({}; {}; {when}{holder}{target}{error}{waiting})",
                t.from.as_deref().unwrap_or("start"),
                t.event,
                t.status,
                count(u64::from(t.attempts), "attempt"),
            );
        }
        let more = view.tasks_total.saturating_sub(view.tasks.len() as u64);
        if more > 0 {
            outln!("  … and {} more", count(more, "pending step"));
        }
    }
    ExitCode::SUCCESS
}

/// The workers alive now.
async fn live_workers(store: &dyn Store) -> Result<Vec<phasm::store::WorkerView>, ExitCode> {
    store
        .workers(SystemClock.now())
        .await
        .map_err(exit::database)
}

/// `phasm workers`: the workers alive now and what they take, and those gone in the last day
/// without saying they stopped.
pub async fn workers(as_json: bool, args: &DbArgs) -> ExitCode {
    let store = match open_db(args, phasm::store::Access::ReadOnly).await {
        Ok(s) => s,
        Err(code) => return code,
    };
    let workers = match live_workers(&*store).await {
        Ok(w) => w,
        Err(code) => return code,
    };
    let gone = match store.workers_gone(SystemClock.now()).await {
        Ok(g) => g,
        Err(e) => return exit::database(e),
    };
    if as_json {
        let all: Vec<Value> = workers.iter().map(phasm::control::worker_json).collect();
        let gone: Vec<Value> = gone.iter().map(phasm::control::worker_json).collect();
        outln!("{}", json!({ "workers": all, "gone": gone }));
        return ExitCode::SUCCESS;
    }
    for w in &gone {
        outln!(
            "gone without stopping (killed, or cut off): {} on {} (pid {}), last seen {}",
            w.owner,
            w.about.host,
            w.about.pid,
            time(w.seen_at)
        );
    }
    if workers.is_empty() {
        outln!("no worker is running on {}", args.db);
        return ExitCode::SUCCESS;
    }
    for w in &workers {
        let targets = match &w.targets {
            phasm::store::Targets::Any => "every target".to_string(),
            phasm::store::Targets::Untargeted => "untargeted steps".to_string(),
            phasm::store::Targets::Only(t) => format!("target {}", t.join(", ")),
        };
        let queues = w.queues.as_ref().map_or("every queue".to_string(), |q| {
            format!("queues {}", q.join(", "))
        });
        outln!(
            "{}  on {} (pid {}, phasm {}), running {} of {}; machines {}; {targets}; {queues}; started {}, seen {}",
            w.owner,
            w.about.host,
            w.about.pid,
            w.about.version,
            w.about.running,
            w.about.concurrency,
            w.machines.join(", "),
            time(w.started_at),
            time(w.seen_at)
        );
        for reason in &w.about.cannot_run {
            outln!("  cannot run: {reason}");
        }
    }
    ExitCode::SUCCESS
}

/// `phasm queues`.
pub async fn queues(file: Option<&std::path::Path>, as_json: bool, args: &DbArgs) -> ExitCode {
    let config = match file {
        Some(f) => match super::files::load(f) {
            Some(c) => Some(c),
            None => return exit::invalid_reported(),
        },
        None => None,
    };
    let store = match open_db(args, phasm::store::Access::ReadOnly).await {
        Ok(s) => s,
        Err(code) => return code,
    };
    // Without a file, the limits of the latest deployed versions, when something is deployed.
    let config = match config {
        Some(c) => Some(c),
        None => match phasm::control::deployed_config(&*store).await {
            Ok(d) => Some(d.config),
            Err(phasm::control::DeployedError::Nothing) => None,
            Err(phasm::control::DeployedError::Store(e)) => return exit::database(e),
            Err(e) => return exit::failed(e),
        },
    };
    let (queues, stats) =
        match phasm::control::queue_report(&*store, config.as_ref(), SystemClock.now()).await {
            Ok(report) => report,
            Err(e) => return exit::database(e),
        };
    if as_json {
        outln!("{}", json!({ "queues": queues, "parked": stats.parked }));
        return ExitCode::SUCCESS;
    }
    if queues.is_empty() {
        outln!("no step is pending in any queue of {}", args.db);
    }
    for q in &queues {
        let mut limits = Vec::new();
        if let Some(n) = q.max_concurrent {
            limits.push(format!("max_concurrent {n}"));
        }
        if let Some(r) = &q.rate {
            limits.push(format!("rate {r}"));
        }
        let limits = if limits.is_empty() {
            String::new()
        } else {
            format!("; {}", limits.join(", "))
        };
        let rate = q.steps_per_second.map_or(String::new(), |r| {
            format!("; {r:.1} steps/s over the last minute")
        });
        outln!(
            "{}  {} due, {} scheduled, {} running; oldest due waited {:.1} s{rate}{limits}",
            q.queue,
            q.due,
            q.scheduled,
            q.running,
            q.oldest_due_age_seconds
        );
    }
    if stats.parked > 0 {
        outln!("{} branches parked at fan-in states", stats.parked);
    }
    ExitCode::SUCCESS
}

/// `phasm list`.
pub async fn list(
    machine: Option<String>,
    prefix: Option<String>,
    status: Option<&str>,
    limit: usize,
    as_json: bool,
    args: &DbArgs,
) -> ExitCode {
    let status = match status.map(|s| InstanceStatus::parse(s).ok_or(s)) {
        None => None,
        Some(Ok(s)) => Some(s),
        Some(Err(bad)) => {
            return exit::invalid(format!(
                "unknown status `{bad}`; use running, completed, failed, halted or cancelled"
            ));
        }
    };
    let store = match open_db(args, phasm::store::Access::ReadOnly).await {
        Ok(s) => s,
        Err(code) => return code,
    };
    let filter = ListFilter {
        machine,
        status,
        limit,
        prefix,
        ..ListFilter::default()
    };
    let rows = match store.list(&filter).await {
        Ok(rows) => rows,
        Err(e) => {
            return exit::database(e);
        }
    };
    if as_json {
        let rows: Vec<Value> = rows.iter().map(phasm::control::summary_json).collect();
        outln!("{}", Value::Array(rows));
        return ExitCode::SUCCESS;
    }
    if rows.is_empty() {
        eprintln!("no instances");
        return ExitCode::SUCCESS;
    }
    outln!(
        "{:<44} {:<24} {:<10} created",
        "instance",
        "machine",
        "status"
    );
    for r in rows {
        outln!(
            "{:<44} {:<24} {:<10} {}",
            r.instance,
            r.machine,
            r.status.as_str(),
            time(r.created_at)
        );
    }
    ExitCode::SUCCESS
}

/// `phasm logs`.
pub async fn logs(name: &str, args: &DbArgs) -> ExitCode {
    let store = match open_db(args, phasm::store::Access::ReadOnly).await {
        Ok(s) => s,
        Err(code) => return code,
    };
    if let Err(code) = find(&*store, name, args).await {
        return code;
    }
    match store.logs(name).await {
        Ok(lines) => {
            for l in lines {
                outln!(
                    "{} {:<7} {} [{}]",
                    time(l.at),
                    printable(&l.level),
                    printable(&l.message),
                    l.task
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => exit::database(e),
    }
}

fn report(name: &str, what: &str, result: Result<Control, phasm::store::StoreError>) -> ExitCode {
    match result {
        Ok(Control::Done) => {
            outln!("{name}: {what}");
            ExitCode::SUCCESS
        }
        Ok(Control::NotFound) => exit::invalid(format!("no instance named `{name}`")),
        Ok(Control::NotAllowed(status)) => {
            eprintln!(
                "error: `{name}` is {status}; only {}",
                if what == "resumed" {
                    "failed instances can be retried"
                } else {
                    "running or failed instances can be cancelled"
                }
            );
            exit::failed_reported()
        }
        Err(e) => exit::database(e),
    }
}

/// `phasm retry`.
pub async fn retry(name: &str, args: &DbArgs) -> ExitCode {
    let store = match open_db(args, phasm::store::Access::Existing).await {
        Ok(s) => s,
        Err(code) => return code,
    };
    report(name, "resumed", store.retry(SystemClock.now(), name).await)
}

/// `phasm reset`.
pub async fn reset(
    name: &str,
    step: i64,
    file: Option<&std::path::Path>,
    args: &DbArgs,
) -> ExitCode {
    // The instance's version, as stored, is what the step is built from; a file is needed
    // only for an instance started before its machine was ever deployed.
    let config = match file {
        Some(file) => match super::files::load(file) {
            Some(config) => config,
            None => return exit::invalid_reported(),
        },
        None => phasm::machine::Config::default(),
    };
    let store = match open_db(args, phasm::store::Access::Existing).await {
        Ok(s) => s,
        Err(code) => return code,
    };
    match phasm::control::reset(&*store, &config, &SystemClock, name, step).await {
        Ok(note) => {
            outln!("{name}: running ({note})");
            ExitCode::SUCCESS
        }
        Err(phasm::control::ResetError::Store(e)) => exit::database(e),
        Err(e) => exit::failed(e),
    }
}

/// `phasm cancel`.
pub async fn cancel(name: &str, reason: Option<&str>, args: &DbArgs) -> ExitCode {
    let reason = match phasm::control::cancel_reason(reason) {
        Ok(r) => r,
        Err(e) => return exit::invalid(e),
    };
    let store = match open_db(args, phasm::store::Access::Existing).await {
        Ok(s) => s,
        Err(code) => return code,
    };
    report(
        name,
        "cancelled",
        store
            .cancel_because(SystemClock.now(), name, reason.as_deref())
            .await,
    )
}

/// Delete every ended instance older than `older_than`, `batch` at a time; returns how many.
pub async fn scrub_all(
    store: &dyn Store,
    older_than: std::time::Duration,
    batch: usize,
) -> Result<u64, phasm::store::StoreError> {
    let cutoff = SystemClock.now() - phasm::clock::micros(older_than);
    let mut total = 0;
    loop {
        let n = store.scrub(cutoff, batch.max(1)).await?;
        total += n;
        if n < batch.max(1) as u64 {
            return Ok(total);
        }
    }
}

/// `phasm scrub`.
pub async fn scrub(older_than: std::time::Duration, batch: usize, args: &DbArgs) -> ExitCode {
    let store = match open_db(args, phasm::store::Access::Existing).await {
        Ok(s) => s,
        Err(code) => return code,
    };
    match scrub_all(&*store, older_than, batch).await {
        Ok(n) => {
            outln!(
                "removed {n} ended instance{} older than {} (with their history and logs)",
                if n == 1 { "" } else { "s" },
                age(older_than)
            );
        }
        Err(e) => return exit::database(e),
    }
    // Then the versions no instance is left on (the latest of each machine stays).
    match store.scrub_versions().await {
        Ok(gone) if gone.is_empty() => ExitCode::SUCCESS,
        Ok(gone) => {
            let list: Vec<String> = gone.iter().map(|(m, v)| format!("{m} v{v}")).collect();
            outln!(
                "removed {} no instance is on: {}",
                crate::output::count(gone.len() as u64, "version"),
                list.join(", ")
            );
            ExitCode::SUCCESS
        }
        Err(e) => exit::database(e),
    }
}

/// A whole duration the way users write it (`30d`, `12h`, `90m`, `45s`).
fn age(d: std::time::Duration) -> String {
    let secs = d.as_secs();
    match secs {
        0 => "0s".into(),
        s if s % 86_400 == 0 => format!("{}d", s / 86_400),
        s if s % 3600 == 0 => format!("{}h", s / 3600),
        s if s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}
