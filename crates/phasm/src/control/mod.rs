//! What users do to instances, with the checks a command line or HTTP API needs: start one
//! (with typed `KEY=VALUE` context values), and the errors that explain what was wrong.

mod listing;
mod overview;
mod queues;
mod reset;
mod schedules;
mod send;
mod versions;

pub use listing::{pending_state, steps_into, ListParams, MAX_PAGE};
pub use overview::{where_instances_are, StateTally};
pub use queues::{queue_report, queue_statuses, QueueStatus, Throughput, RATE_WINDOW};
pub use reset::{is_whole_line, reset, ResetError};
pub use schedules::{schedule_json, schedule_statuses, statuses, ScheduleStatus};
pub use send::{send, SendError, SendOutcome, SendRequest, SendTo, MAX_EVENT_ID_CHARS};
pub use versions::{
    deploy, deploy_for_work, deployed_config, gather, no_such_version, upgrade, version_json,
    DeployError, DeployFile, DeployedConfig, DeployedError, UpgradeError, UpgradeOptions,
    UpgradeReport, UpgradeWhich,
};

use serde_json::Value;

use crate::clock::{rfc3339, Clock};
use crate::engine::{self, Context, Limits};
use crate::machine::{Config, Machine, ValueKind};
use crate::store::{
    InstanceStatus, InstanceView, NewInstance, Started, Store, StoreError, TaskStatus, TaskView,
    WorkerView,
};

/// What starting an instance did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartOutcome {
    /// A new instance of this name was created and queued.
    Started(String),
    /// An instance of this name already existed; nothing was changed (starting is idempotent).
    AlreadyExists {
        /// Its name.
        name: String,
        /// Its machine.
        machine: String,
        /// Its status.
        status: InstanceStatus,
    },
}

impl StartOutcome {
    /// The instance's name.
    pub fn name(&self) -> &str {
        match self {
            StartOutcome::Started(name) | StartOutcome::AlreadyExists { name, .. } => name,
        }
    }
}

/// Why an instance could not be started.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// No machine of that name.
    #[error("no machine named `{name}`; the configuration has: {}", known.join(", "))]
    UnknownMachine {
        /// Asked for.
        name: String,
        /// Defined.
        known: Vec<String>,
    },
    /// A caller-given name is not usable.
    #[error("invalid instance name `{0}`: use 1 to 200 letters, digits, `-`, `_` and `.`")]
    InvalidName(String),
    /// A batch's idempotency key is not usable.
    #[error("invalid batch key `{0}`: use 1 to 100 letters, digits, `-`, `_` and `.`")]
    InvalidKey(String),
    /// A caller-given name has the shape of names the engine gives (see
    /// [`engine::reserved_shape`]).
    #[error("instance name `{name}` has the shape of {shape}, which phasm keeps for the instances it names itself: choose another name")]
    ReservedName {
        /// The name.
        name: String,
        /// The shape it has.
        shape: &'static str,
    },
    /// The name exists for another machine.
    #[error("instance `{name}` already exists for machine `{machine}`")]
    NameTaken {
        /// The name.
        name: String,
        /// Its machine.
        machine: String,
    },
    /// A context value given as a string does not convert to its `context_types` type.
    #[error("{0}")]
    BadValue(String),
    /// The context is too large.
    #[error("the context is {bytes} bytes, over the limit of {limit} bytes; keep large data outside the context")]
    ContextTooLarge {
        /// Its size.
        bytes: usize,
        /// The limit.
        limit: usize,
    },
    /// The machine has no stored version of that number.
    #[error("{}", no_such_version(machine, *version, known))]
    UnknownVersion {
        /// The machine.
        machine: String,
        /// Asked for.
        version: u32,
        /// Its stored versions.
        known: Vec<u32>,
    },
    /// The version asked for is stored, but this phasm cannot read it.
    #[error(transparent)]
    Unreadable(#[from] crate::config::UnreadableDefinition),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The machine a start uses: version `version` of `machine` as stored, else the
/// configuration's (which the store pins to the latest deployed version).
///
/// # Errors
/// [`StartError::UnknownMachine`], [`StartError::UnknownVersion`],
/// [`StartError::Unreadable`], or the store's.
pub async fn machine_to_start<'a>(
    store: &dyn Store,
    config: &'a Config,
    machine: &str,
    version: Option<u32>,
) -> Result<std::borrow::Cow<'a, Machine>, StartError> {
    let Some(n) = version else {
        return config
            .machine(machine)
            .map(std::borrow::Cow::Borrowed)
            .ok_or_else(|| StartError::UnknownMachine {
                name: machine.to_string(),
                known: config.machines.iter().map(|m| m.name.clone()).collect(),
            });
    };
    let Some(stored) = store.version(machine, n).await? else {
        let known = store.versions(Some(machine)).await?;
        return Err(StartError::UnknownVersion {
            machine: machine.to_string(),
            version: n,
            known: known.iter().map(|r| r.version).collect(),
        });
    };
    let loaded =
        crate::config::load_definition(machine, n, &stored.definition, &stored.record.path)?;
    let found = loaded
        .config
        .machines
        .into_iter()
        .find(|m| m.name == machine);
    found
        .map(std::borrow::Cow::Owned)
        .ok_or_else(|| StartError::UnknownMachine {
            name: machine.to_string(),
            known: Vec::new(),
        })
}

/// Start an instance of `machine` with `context`, named `name` or a generated
/// `MACHINE-YYYYMMDDHHMMSS-XXXXXX`. Starting an existing name again changes nothing.
///
/// # Errors
/// See [`StartError`].
pub async fn start_instance(
    store: &dyn Store,
    config: &Config,
    clock: &dyn Clock,
    machine: &str,
    context: Context,
    name: Option<&str>,
    limits: &Limits,
) -> Result<StartOutcome, StartError> {
    let request = StartRequest {
        machine,
        version: None,
        context,
        name,
    };
    start_on(store, config, clock, request, limits).await
}

/// What [`start_on`] starts.
#[derive(Debug, Clone)]
pub struct StartRequest<'a> {
    /// The machine.
    pub machine: &'a str,
    /// The version of it (`None`: the latest deployed).
    pub version: Option<u32>,
    /// The context.
    pub context: Context,
    /// The instance's name (`None`: `MACHINE-YYYYMMDDHHMMSS-XXXXXX`).
    pub name: Option<&'a str>,
}

/// [`start_instance`] on a chosen version: an instance of `request.machine`, pinned to
/// version `request.version` as stored (its context typed and its start task made by that
/// version), or to the latest. Starting an existing name again changes nothing.
///
/// # Errors
/// See [`StartError`]; a version that is not stored is refused, naming those that are.
pub async fn start_on(
    store: &dyn Store,
    config: &Config,
    clock: &dyn Clock,
    request: StartRequest<'_>,
    limits: &Limits,
) -> Result<StartOutcome, StartError> {
    let StartRequest {
        machine,
        version,
        context,
        name,
    } = request;
    let m = machine_to_start(store, config, machine, version).await?;
    let m = &*m;
    let context = checked_context(m, context, limits)?;
    let now = clock.now();
    let name = match name {
        Some(n) => checked_name(n)?,
        None => engine::instance_name(&m.name, now, &mut fastrand::Rng::new()),
    };
    let start = engine::start_task(m, &name, context.clone(), now);
    let started = store
        .start(
            now,
            NewInstance {
                name: name.clone(),
                machine: m.name.clone(),
                context,
                start,
                version,
            },
        )
        .await?;
    match started {
        Started::Created => Ok(StartOutcome::Started(name)),
        Started::Existing { machine, status } if machine == m.name => {
            Ok(StartOutcome::AlreadyExists {
                name,
                machine,
                status,
            })
        }
        Started::Existing { machine, .. } => Err(StartError::NameTaken { name, machine }),
    }
}

/// The longest reason a cancellation may give.
pub const MAX_CANCEL_REASON_CHARS: usize = 1000;

/// A cancellation's reason as given: trimmed, none when empty.
///
/// # Errors
/// A reason longer than [`MAX_CANCEL_REASON_CHARS`].
pub fn cancel_reason(text: Option<&str>) -> Result<Option<String>, String> {
    let Some(text) = text.map(str::trim).filter(|t| !t.is_empty()) else {
        return Ok(None);
    };
    if text.chars().count() > MAX_CANCEL_REASON_CHARS {
        return Err(format!(
            "the reason is longer than {MAX_CANCEL_REASON_CHARS} characters"
        ));
    }
    Ok(Some(text.to_string()))
}

/// Most instances started in one transaction (and by one HTTP request).
pub const MAX_BATCH_START: usize = 10_000;

/// Why instances of a batch could not be started.
#[derive(Debug, thiserror::Error)]
pub enum BatchStartError {
    /// Context `index` (from 0) cannot start an instance; nothing was started.
    #[error("context {}: {error}", index + 1)]
    Context {
        /// Its position in the batch, from 0.
        index: usize,
        /// What is wrong with it.
        error: StartError,
    },
    /// The machine is unknown, or the store failed before anything was started.
    #[error(transparent)]
    Start(#[from] StartError),
    /// The store failed after the first `started` instances were (their transactions
    /// committed); none from there on was.
    #[error("{error} (the first {} instances were started, none after them)", started.len())]
    Partial {
        /// The instances started, in order.
        started: Vec<StartOutcome>,
        /// What failed.
        error: StoreError,
    },
}

/// One instance of a batch start: its context, and the name to give it (none: one is made).
#[derive(Debug, Clone, PartialEq)]
pub struct BatchItem {
    /// The instance's name; a repeat of a name that exists starts nothing.
    pub name: Option<String>,
    /// Its starting context.
    pub context: Context,
}

impl BatchItem {
    /// A batch item from one JSON object: `{"context": {...}}` or `{"name": NAME, "context":
    /// {...}}` (an object with a `context` object and nothing else but a `name`), or else the
    /// object is itself the context.
    ///
    /// # Errors
    /// A `name` that is not a string.
    pub fn from_object(mut object: Context) -> Result<Self, String> {
        let wrapped = matches!(object.get("context"), Some(Value::Object(_)))
            && object.keys().all(|k| k == "context" || k == "name");
        if !wrapped {
            return Ok(Self {
                name: None,
                context: object,
            });
        }
        let name = match object.remove("name") {
            None => None,
            Some(Value::String(n)) => Some(n),
            Some(other) => return Err(format!("`name` must be a string, not {other}")),
        };
        let Some(Value::Object(context)) = object.remove("context") else {
            return Err("`context` must be an object".into());
        };
        Ok(Self { name, context })
    }
}

impl From<Context> for BatchItem {
    fn from(context: Context) -> Self {
        Self {
            name: None,
            context,
        }
    }
}

/// The longest idempotency key of a batch start.
pub const MAX_BATCH_KEY_CHARS: usize = 100;

/// A batch of instances to start: of one machine, one per item.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch<'a> {
    /// Their machine.
    pub machine: &'a str,
    /// One per instance.
    pub items: Vec<BatchItem>,
    /// The idempotency key that names the items without a name (`MACHINE-KEY-N`).
    pub key: Option<&'a str>,
    /// The version of the machine they start on (`None`: the latest deployed).
    pub version: Option<u32>,
}

/// Start one instance of the batch's machine per item. Every item is checked (its name,
/// typed values, size) before anything is written; they are then written in transactions of
/// [`MAX_BATCH_START`], each all or nothing — so a batch of at most that many starts entirely
/// or not at all. An item without a name is named `MACHINE-KEY-N` with an idempotency `key`
/// (`N` its position), else `MACHINE-YYYYMMDDHHMMSS-XXXXXX-N` (one random part per call).
/// A name that exists starts nothing, so a batch sent again — its answer lost, or its sender
/// stopped part way — with its names or its key starts nothing twice, and answers with the
/// same names. Outcomes are in the order of the items.
///
/// # Errors
/// See [`BatchStartError`].
pub async fn start_instances(
    store: &dyn Store,
    config: &Config,
    clock: &dyn Clock,
    batch: Batch<'_>,
    limits: &Limits,
) -> Result<Vec<StartOutcome>, BatchStartError> {
    start_instances_each(store, config, clock, batch, limits, |_| true).await
}

/// [`start_instances`], calling `committed` with each transaction's outcomes once it has
/// committed. When `committed` answers `false`, no further transaction begins: the answer
/// is then the outcomes so far, fewer than the items.
///
/// # Errors
/// See [`BatchStartError`].
pub async fn start_instances_each(
    store: &dyn Store,
    config: &Config,
    clock: &dyn Clock,
    batch: Batch<'_>,
    limits: &Limits,
    mut committed: impl FnMut(&[StartOutcome]) -> bool,
) -> Result<Vec<StartOutcome>, BatchStartError> {
    let m = machine_to_start(store, config, batch.machine, batch.version).await?;
    let m = &*m;
    if let Some(key) = batch.key {
        if key.chars().count() > MAX_BATCH_KEY_CHARS || !engine::is_valid_instance_name(key) {
            return Err(StartError::InvalidKey(key.to_string()).into());
        }
    }
    let now = clock.now();
    let mut instances = prepared_batch(m, batch.items, batch.key, now, limits)?;
    for instance in &mut instances {
        instance.version = batch.version;
    }
    let mut outcomes = Vec::with_capacity(instances.len());
    let mut rest = instances.into_iter();
    loop {
        let chunk: Vec<NewInstance> = rest.by_ref().take(MAX_BATCH_START).collect();
        if chunk.is_empty() {
            return Ok(outcomes);
        }
        let names: Vec<String> = chunk.iter().map(|n| n.name.clone()).collect();
        let started = match store.start_many(now, chunk).await {
            Ok(started) => started,
            Err(error) if outcomes.is_empty() => return Err(StartError::from(error).into()),
            Err(error) => {
                return Err(BatchStartError::Partial {
                    started: outcomes,
                    error,
                })
            }
        };
        let first = outcomes.len();
        outcomes.extend(
            names
                .into_iter()
                .zip(started)
                .map(|(name, started)| match started {
                    Started::Created => StartOutcome::Started(name),
                    Started::Existing { machine, status } => StartOutcome::AlreadyExists {
                        name,
                        machine,
                        status,
                    },
                }),
        );
        if !committed(&outcomes[first..]) {
            return Ok(outcomes);
        }
    }
}

/// The instances a batch starts, every item checked.
fn prepared_batch(
    m: &Machine,
    items: Vec<BatchItem>,
    key: Option<&str>,
    now: crate::clock::Micros,
    limits: &Limits,
) -> Result<Vec<NewInstance>, BatchStartError> {
    let base = match key {
        Some(key) => format!("{}-{key}", m.name),
        None => engine::instance_name(&m.name, now, &mut fastrand::Rng::new()),
    };
    let width = items.len().to_string().len();
    let mut batch = Vec::with_capacity(items.len());
    for (index, item) in items.into_iter().enumerate() {
        let context = checked_context(m, item.context, limits)
            .map_err(|error| BatchStartError::Context { index, error })?;
        let name = match item.name {
            Some(name) => {
                checked_name(&name).map_err(|error| BatchStartError::Context { index, error })?
            }
            None => format!("{base}-{index:0width$}"),
        };
        let start = engine::start_task(m, &name, context.clone(), now);
        batch.push(NewInstance {
            name,
            machine: m.name.clone(),
            context,
            start,
            version: None,
        });
    }
    Ok(batch)
}

/// A caller-given instance name, if it is usable: valid, and not in a shape the engine keeps
/// for the instances it names itself.
fn checked_name(name: &str) -> Result<String, StartError> {
    if !engine::is_valid_instance_name(name) {
        return Err(StartError::InvalidName(name.to_string()));
    }
    match engine::reserved_shape(name) {
        Some(shape) => Err(StartError::ReservedName {
            name: name.to_string(),
            shape,
        }),
        None => Ok(name.to_string()),
    }
}

/// A starting context converted by the machine's `context_types` and within the size limit.
fn checked_context(m: &Machine, context: Context, limits: &Limits) -> Result<Context, StartError> {
    let context = typed_context(m, context).map_err(StartError::BadValue)?;
    check_depth(&context).map_err(StartError::BadValue)?;
    let bytes = serde_json::to_vec(&context).map_or(0, |v| v.len());
    if bytes > limits.max_context_bytes {
        return Err(StartError::ContextTooLarge {
            bytes,
            limit: limits.max_context_bytes,
        });
    }
    Ok(context)
}

/// How deep a context's values may nest (a value's own level counts as 1): every action
/// host must be able to write the context back inside a message, and serde_json reads at
/// most 128 levels (the Python host writes at most 100, message included).
pub const MAX_VALUE_DEPTH: usize = 90;

/// Refuse a context with a value nested deeper than [`MAX_VALUE_DEPTH`], naming its key.
///
/// # Errors
/// A message naming the key.
pub fn check_depth(context: &Context) -> Result<(), String> {
    fn depth(v: &Value) -> usize {
        // Iterative: a value near serde_json's limit must not exhaust a small stack.
        let mut deepest = 0;
        let mut stack = vec![(v, 1)];
        while let Some((v, d)) = stack.pop() {
            deepest = deepest.max(d);
            match v {
                Value::Array(items) => stack.extend(items.iter().map(|i| (i, d + 1))),
                Value::Object(map) => stack.extend(map.values().map(|i| (i, d + 1))),
                _ => {}
            }
        }
        deepest
    }
    for (key, value) in context {
        let d = depth(value);
        if d > MAX_VALUE_DEPTH {
            return Err(format!(
                "`{key}` nests {d} levels deep; phasm keeps values at most {MAX_VALUE_DEPTH} levels deep (every action host must be able to send it back)"
            ));
        }
    }
    Ok(())
}

/// Parse a `KEY=VALUE` pair, converting the value by the machine's `context_types`
/// (`int`, `float`, `bool`, `json`, `datetime`; anything else stays a string).
///
/// # Errors
/// A message saying what is wrong with the pair.
pub fn parse_set(machine: &Machine, pair: &str) -> Result<(String, Value), String> {
    let Some((key, raw)) = pair.split_once('=') else {
        return Err(format!("`{pair}` is not KEY=VALUE"));
    };
    let key = key.trim();
    if key.is_empty() {
        return Err(format!("`{pair}` has an empty key"));
    }
    Ok((key.to_string(), convert(machine, key, raw)?))
}

/// A starting context with every string value whose key has a `context_types` entry
/// converted as `--set` converts it (`{"quantity": "2"}` with `quantity: int` becomes 2), as
/// Fantasm converted the string values of a start request. Values that are not strings are
/// kept as given.
///
/// # Errors
/// A message naming the first value that does not convert.
pub fn typed_context(machine: &Machine, mut context: Context) -> Result<Context, String> {
    for key in machine.context_types.keys() {
        if let Some(Value::String(raw)) = context.get(key) {
            let value = convert(machine, key, raw)?;
            context.insert(key.clone(), value);
        }
    }
    Ok(context)
}

/// The value of `raw` for `key`, by the machine's `context_types` (a string when untyped).
fn convert(machine: &Machine, key: &str, raw: &str) -> Result<Value, String> {
    let Some(t) = machine.context_types.get(key) else {
        return Ok(Value::String(raw.to_string()));
    };
    let bad = |what: &str| {
        format!(
            "`{key}` is typed `{}` in machine `{}`, but `{raw}` is not {what}",
            t.0, machine.name
        )
    };
    let value = match t.kind() {
        ValueKind::Int => raw
            .trim()
            .parse::<i64>()
            .map(Value::from)
            .map_err(|_| bad("a whole number"))?,
        ValueKind::Float => raw
            .trim()
            .parse::<f64>()
            .ok()
            .and_then(|f| serde_json::Number::from_f64(f).map(Value::Number))
            .ok_or_else(|| bad("a number"))?,
        ValueKind::Bool => match raw.trim().to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "on" => Value::Bool(true),
            "false" | "0" | "no" | "off" => Value::Bool(false),
            _ => return Err(bad("true or false")),
        },
        ValueKind::Json => serde_json::from_str(raw).map_err(|e| bad(&format!("JSON ({e})")))?,
        ValueKind::Datetime => {
            let parsed = chrono::DateTime::parse_from_rfc3339(raw.trim())
                .map(|d| d.with_timezone(&chrono::Utc).to_rfc3339())
                .or_else(|_| {
                    // A date-time without a zone (Python's naive datetimes) is kept as written.
                    chrono::NaiveDateTime::parse_from_str(raw.trim(), "%Y-%m-%dT%H:%M:%S%.f")
                        .map(|_| raw.trim().to_string())
                })
                .or_else(|_| {
                    chrono::NaiveDate::parse_from_str(raw.trim(), "%Y-%m-%d").map(|d| d.to_string())
                })
                .map_err(|_| {
                    bad("an RFC 3339 date-time (2024-05-01T12:00:00Z) or a date (2024-05-01)")
                })?;
            Value::String(parsed)
        }
        ValueKind::Str | ValueKind::Other => Value::String(raw.to_string()),
    };
    Ok(value)
}

/// Why no running worker will take a pending step of an instance of `machine`, if none will
/// (`workers`: those alive now, from [`ReadStore::workers`](crate::store::ReadStore::workers)). Steps already running, failed or
/// held need no worker now and give `None`.
pub fn unserved(machine: &str, task: &TaskView, workers: &[WorkerView]) -> Option<String> {
    if task.status != TaskStatus::Ready || task.leased_by.is_some() {
        return None;
    }
    let target = task.target.as_deref();
    if workers
        .iter()
        .any(|w| w.takes(machine, &task.queue, target))
    {
        return None;
    }
    Some(if workers.is_empty() {
        "no worker is running: start one with `phasm worker FILE`".to_string()
    } else if let Some(t) = target.filter(|t| !workers.iter().any(|w| w.targets.takes(Some(t)))) {
        format!(
            "no running worker takes target `{t}`: start one with `phasm worker FILE --target {t}`"
        )
    } else if !workers
        .iter()
        .any(|w| w.machines.iter().any(|m| m == machine))
    {
        format!(
            "no running worker knows machine `{machine}`: start one with the file that defines it"
        )
    } else {
        format!(
            "no running worker takes queue `{}`{}: start one with `phasm worker FILE --queues {}`",
            task.queue,
            target
                .map(|t| format!(" with target `{t}`"))
                .unwrap_or_default(),
            task.queue
        )
    })
}

/// The JSON form of an instance in a list: `phasm list --json` and `GET /api/instances`.
pub fn summary_json(r: &crate::store::InstanceSummary) -> serde_json::Value {
    summary_json_in(None, r)
}

/// [`summary_json`], with the state the instance's oldest pending step puts it in (`state`)
/// when the machine is known.
pub fn summary_json_in(
    config: Option<&Config>,
    r: &crate::store::InstanceSummary,
) -> serde_json::Value {
    let machine = config.and_then(|c| c.machine(&r.machine));
    serde_json::json!({
        "instance": r.instance,
        "machine": r.machine,
        "status": r.status,
        "created_at": rfc3339(r.created_at),
        "updated_at": rfc3339(r.updated_at),
        "ended_at": r.ended_at.map(rfc3339),
        "error": r.error,
        "parent": r.parent,
        "steps": r.steps,
        "state": r.pending.as_ref().map(|p| pending_state(machine, p)),
        "waiting_since": r.pending.as_ref().map(|p| rfc3339(p.queued_at)),
    })
}

/// The JSON form of a worker: `phasm workers --json` and `GET /api/workers`.
pub fn worker_json(w: &WorkerView) -> serde_json::Value {
    serde_json::json!({
        "owner": w.owner,
        "machines": w.machines,
        "targets": w.targets,
        "queues": w.queues,
        "started_at": rfc3339(w.started_at),
        "seen_at": rfc3339(w.seen_at),
        "expires_at": rfc3339(w.expires_at),
        "host": w.about.host,
        "pid": w.about.pid,
        "version": w.about.version,
        "concurrency": w.about.concurrency,
        "running": w.about.running,
        "cannot_run": w.about.cannot_run,
    })
}

/// The JSON form of one committed transition (in an instance's JSON and in history pages):
/// `id` finds the step in full (`GET /api/instances/{name}/history/{id}`).
pub fn history_json(h: &crate::store::HistoryRow) -> serde_json::Value {
    serde_json::json!({
        "id": h.id,
        "step": h.step,
        "from": h.from,
        "event": h.event,
        "to": h.to,
        "attempt": h.attempt,
        "at": rfc3339(h.finished_at),
        "started_at": rfc3339(h.started_at),
        "duration_ms": (h.finished_at - h.started_at) as f64 / 1000.0,
        "branch": h.branch,
        "ends_branch": h.ends_branch,
        "task": h.task,
    })
}

/// The JSON form of one step in full (`GET /api/instances/{name}/history/{id}`): the
/// transition, the context it was given (`null`: a join's, or not kept), what it passed on
/// along its branch (`passed_on.to`: `step` with its `id`, `pending`, or `nothing`), and the
/// log lines of its task.
pub fn step_json(detail: &crate::store::StepDetail) -> serde_json::Value {
    use crate::store::PassedOn;
    let passed_on = match &detail.passed_on {
        PassedOn::Step(id, context) => {
            serde_json::json!({"to": "step", "id": id, "context": context})
        }
        PassedOn::Pending(context) => serde_json::json!({"to": "pending", "context": context}),
        PassedOn::Nothing => serde_json::json!({"to": "nothing"}),
    };
    let logs: Vec<serde_json::Value> = detail
        .logs
        .iter()
        .map(|l| serde_json::json!({"at": rfc3339(l.at), "level": l.level, "message": l.message}))
        .collect();
    let mut json = history_json(&detail.row);
    if let Some(object) = json.as_object_mut() {
        object.insert("given".into(), serde_json::json!(detail.given));
        object.insert("passed_on".into(), passed_on);
        object.insert("logs".into(), serde_json::Value::Array(logs));
    }
    json
}

/// The JSON form of an instance: `phasm status --json` and `GET /api/instances/{name}`.
/// `history` holds the latest transitions (`history_total` counts them all; the history
/// pages read every one), `tasks` the first pending ones (`tasks_total` counts them all).
/// `workers` (those alive now) say which pending steps no worker will take (`unserved`).
pub fn instance_json(view: &InstanceView, workers: &[WorkerView]) -> serde_json::Value {
    let history: Vec<serde_json::Value> = view.history.iter().map(history_json).collect();
    let tasks: Vec<serde_json::Value> = view
        .tasks
        .iter()
        .map(|t| {
            let waiting = view.is_wait(t);
            serde_json::json!({
                "task": t.name,
                "from": t.from,
                "event": t.event,
                "status": t.status,
                "due_at": rfc3339(t.due_at),
                "leased_by": t.leased_by,
                "attempts": t.attempts,
                "last_error": t.last_error,
                "queue": t.queue,
                "target": t.target,
                "waiting": waiting,
                "unserved": if waiting { None } else { unserved(&view.machine, t, workers) },
            })
        })
        .collect();
    serde_json::json!({
        "instance": view.name,
        "machine": view.machine,
        "version": view.version,
        "status": view.status,
        "error": view.error,
        "created_at": rfc3339(view.created_at),
        "updated_at": rfc3339(view.updated_at),
        "ended_at": view.ended_at.map(rfc3339),
        "context": view.current_context,
        "initial_context": view.context,
        "parent": view.parent,
        "children": view.children,
        "branches": view.branches,
        "history": history,
        "history_total": view.history_total,
        "tasks": tasks,
        "tasks_total": view.tasks_total,
        "end_states": view.end_states,
        "waiting": view.waiting.iter().map(|w| serde_json::json!({
            "state": w.state,
            "branch": w.branch,
            "events": w.events,
            "deadline": w.deadline.map(rfc3339),
            "timeout_event": w.timeout_event,
            "since": rfc3339(w.since),
        })).collect::<Vec<_>>(),
        "buffered": view.buffered.iter().map(|e| serde_json::json!({
            "event": e.event,
            "id": e.id,
            "bytes": e.bytes,
            "at": rfc3339(e.at),
        })).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{load_str, LoadOptions};

    fn machine() -> Machine {
        let yaml = "state_machines:\n- name: M\n  context_types:\n    n: int\n    f: float\n    b: bool\n    j: json\n    d: datetime\n    k: google.appengine.ext.db.Key\n  states:\n  - name: a\n    initial: true\n    final: true\n";
        load_str(yaml, "m.yaml", &LoadOptions::default())
            .unwrap()
            .config
            .machines[0]
            .clone()
    }

    #[test]
    fn values_convert_by_context_types() {
        let m = machine();
        assert_eq!(parse_set(&m, "n=42"), Ok(("n".into(), Value::from(42))));
        assert_eq!(parse_set(&m, "f=2.5"), Ok(("f".into(), Value::from(2.5))));
        assert_eq!(parse_set(&m, "b=True"), Ok(("b".into(), Value::Bool(true))));
        assert_eq!(
            parse_set(&m, r#"j={"a":[1]}"#).unwrap().1,
            serde_json::json!({"a": [1]})
        );
        assert_eq!(
            parse_set(&m, "d=2024-05-01T12:00:00+02:00").unwrap().1,
            Value::from("2024-05-01T10:00:00+00:00")
        );
        assert_eq!(parse_set(&m, "k=agxz").unwrap().1, Value::from("agxz"));
        assert_eq!(
            parse_set(&m, "untyped=a=b").unwrap(),
            ("untyped".into(), Value::from("a=b"))
        );
    }

    #[test]
    fn bad_values_say_what_was_expected() {
        let m = machine();
        let err = parse_set(&m, "n=abc").unwrap_err();
        assert_eq!(
            err,
            "`n` is typed `int` in machine `M`, but `abc` is not a whole number"
        );
        assert!(parse_set(&m, "b=maybe")
            .unwrap_err()
            .contains("true or false"));
        assert!(parse_set(&m, "j={").unwrap_err().contains("JSON"));
        assert!(parse_set(&m, "novalue")
            .unwrap_err()
            .contains("not KEY=VALUE"));
    }
}
