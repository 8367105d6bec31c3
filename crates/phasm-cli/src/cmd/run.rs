//! `run`, `start` and `worker`: queueing instances and working on them.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use phasm::action::Registry;
use phasm::clock::{Clock, SystemClock};
use phasm::control::{parse_set, start_on, BatchItem, StartOutcome, StartRequest};
use phasm::engine::{Context, Limits};
use phasm::machine::{Config, Machine};
use phasm::store::{InstanceStatus, Store, Targets};
use phasm::worker::{check_machine, StopWhen, Worker, WorkerEvent, WorkerOptions};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::files::{choose, load_with_sites};
use crate::output::{count, outln};
use crate::{db, exit, DbArgs, StartArgs};

/// The parts of a start that are checked before anything is written.
struct Prepared {
    config: Arc<Config>,
    registry: Arc<Registry>,
    machine: String,
    context: Context,
    store: Arc<dyn Store>,
    limits: Limits,
    /// The definition hash of each machine of the file, as deployed (`run` only).
    own_hashes: HashMap<String, String>,
    /// The version the file's machine is (`run` only): what its instance starts on.
    file_version: Option<u32>,
}

/// Check a start, and (with `hosts`: `phasm run`, which works on the file) deploy the file
/// and start the action hosts of a configuration's Python actions, which also resolves its
/// events written as Python constants.
async fn prepare(args: &StartArgs, connections: usize, hosts: bool) -> Result<Prepared, ExitCode> {
    let invalid = || exit::invalid_reported();
    let (mut config, sites) = load_with_sites(&args.file).ok_or_else(invalid)?;
    let as_loaded = hosts.then(|| config.clone());
    let context = {
        let machine = choose(&config, &args.file, args.machine.as_deref()).ok_or_else(invalid)?;
        build_context(machine, args.context.as_deref(), &args.set).map_err(exit::invalid)?
    };
    let registry = if hosts {
        bind(&mut config, &sites).await.ok_or_else(invalid)?
    } else {
        registry(&config)
    };
    let machine = choose(&config, &args.file, args.machine.as_deref()).ok_or_else(invalid)?;
    if let Err(e) = check_machine(machine, &registry) {
        return Err(exit::invalid(e));
    }
    // `run` works on the chosen machine, and on the other machines of the file that can
    // run (every action bound), which the instance may spawn.
    let runnable: Vec<_> = config
        .machines
        .iter()
        .filter(|m| m.name == machine.name || check_machine(m, &registry).is_ok())
        .cloned()
        .collect();
    let config = Config {
        machines: runnable,
        ..config.clone()
    };
    let store = db::open(&args.db, connections)
        .await
        .map_err(exit::database)?;
    // `run` starts its instance on the version its file is (which the latest may not be).
    let (own_hashes, file_version) = match &as_loaded {
        Some(loaded) => {
            let own = super::versions::deploy_loaded(&*store, loaded, &args.file).await?;
            let version = own.versions.get(&machine.name).copied();
            (own.hashes, version)
        }
        None => (HashMap::new(), None),
    };
    Ok(Prepared {
        machine: machine.name.clone(),
        registry: Arc::new(registry),
        config: Arc::new(config),
        context,
        store,
        own_hashes,
        file_version,
        limits: Limits {
            max_context_bytes: args.max_context_bytes,
            ..Limits::default()
        },
    })
}

fn registry(config: &Config) -> Registry {
    let mut registry = Registry::new();
    registry.bind_config(config);
    registry
}

/// The registry for working on `config`: its bindings, and hosts started for its Python
/// actions (events written as Python constants are resolved into `config`). Prints why not.
pub(crate) async fn bind(config: &mut Config, sites: &phasm::config::Sites) -> Option<Registry> {
    let mut registry = registry(config);
    match phasm::action::python::start(config, sites, &mut registry).await {
        Ok(_) => Some(registry),
        Err(e) => {
            eprintln!("error: {e}");
            None
        }
    }
}

/// Let the action hosts finish and exit (what is left after the grace period is killed).
pub(crate) async fn close_hosts(registry: &Registry) {
    if let Some(pool) = registry.hosts() {
        pool.close(Duration::from_secs(10)).await;
    }
}

fn build_context(
    machine: &Machine,
    json: Option<&str>,
    sets: &[String],
) -> Result<Context, String> {
    let mut context = match json {
        None => Context::new(),
        Some(text) => match serde_json::from_str::<Value>(text) {
            Ok(Value::Object(map)) => map,
            Ok(other) => return Err(format!("--context must be a JSON object, not {other}")),
            Err(e) => return Err(format!("--context is not valid JSON: {e}")),
        },
    };
    for pair in sets {
        let (key, value) = parse_set(machine, pair).map_err(|e| format!("--set {e}"))?;
        context.insert(key, value);
    }
    Ok(context)
}

async fn start_prepared(
    p: &Prepared,
    name: Option<&str>,
    version: Option<u32>,
) -> Result<StartOutcome, ExitCode> {
    let request = StartRequest {
        machine: &p.machine,
        version,
        context: p.context.clone(),
        name,
    };
    start_on(&*p.store, &p.config, &SystemClock, request, &p.limits)
        .await
        .map_err(|e| exit::start_error(&e))
}

/// `phasm start`: queue an instance; its name is the last line of output.
pub async fn start(args: &StartArgs) -> ExitCode {
    let p = match prepare(args, 2, false).await {
        Ok(p) => p,
        Err(code) => return code,
    };
    match start_prepared(&p, args.name.as_deref(), args.version).await {
        Ok(StartOutcome::Started(name)) => {
            outln!("{name}");
            ExitCode::SUCCESS
        }
        Ok(StartOutcome::AlreadyExists { name, status, .. }) => {
            eprintln!("instance `{name}` already exists ({status}); nothing was started");
            outln!("{name}");
            ExitCode::SUCCESS
        }
        Err(code) => code,
    }
}

/// `phasm start --contexts FILE.jsonl`: one instance per line; the names, one per line,
/// printed as each transaction of [`phasm::control::MAX_BATCH_START`] lines commits. A line without a name
/// is named `MACHINE-KEY-LINE` (`KEY`: `--key`, else taken from the file's content), so the
/// same file started again starts nothing twice. SIGINT or SIGTERM stop it between
/// transactions, saying where.
pub async fn start_lines(args: &StartArgs, path: &Path, key: Option<&str>) -> ExitCode {
    let shutdown = Shutdown::install();
    let (lines, digest) = match read_lines(path) {
        Ok(read) => read,
        Err(e) => return exit::invalid(e),
    };
    let p = match prepare(args, 2, false).await {
        Ok(p) => p,
        Err(code) => return code,
    };
    let key = key.map_or(digest, str::to_string);
    let mut numbers = Vec::with_capacity(lines.len());
    let mut items = Vec::with_capacity(lines.len());
    for (line, mut item) in lines {
        if item.name.is_none() {
            item.name = Some(format!("{}-{key}-{line}", p.machine));
        }
        numbers.push(line);
        items.push(item);
    }
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    {
        let stop = Arc::clone(&stop);
        tokio::spawn(async move {
            shutdown.wait().await;
            stop.store(true, std::sync::atomic::Ordering::SeqCst);
        });
    }
    // Every line is checked before anything starts (a bad line anywhere starts nothing);
    // each transaction's names are printed once it has committed.
    let total = items.len();
    let batch = phasm::control::Batch {
        machine: &p.machine,
        items,
        key: None,
        version: args.version,
    };
    let started = phasm::control::start_instances_each(
        &*p.store,
        &p.config,
        &SystemClock,
        batch,
        &p.limits,
        |committed| {
            for o in committed {
                outln!("{}", o.name());
            }
            !stop.load(std::sync::atomic::Ordering::SeqCst)
        },
    )
    .await;
    // The first line from which nothing was started, after `done` lines were.
    let next = |done: usize| numbers.get(done).copied().unwrap_or_default();
    match started {
        Ok(outcomes) if outcomes.len() == total => ExitCode::SUCCESS,
        Ok(outcomes) => exit::failed(format!(
            "stopped by a signal: lines before {next} of {} were started, none from line {next} on; run the same command again to start the rest (nothing is started twice)",
            path.display(),
            next = next(outcomes.len())
        )),
        Err(phasm::control::BatchStartError::Context { index, error }) => exit::invalid(format!(
            "{}:{}: {error}; nothing was started",
            path.display(),
            next(index)
        )),
        Err(phasm::control::BatchStartError::Start(e)) => exit::start_error(&e),
        Err(phasm::control::BatchStartError::Partial { started, error }) => exit::database(format!(
            "{error}; lines before {next} of {} were started, none from line {next} on; run the same command again to start the rest (nothing is started twice)",
            path.display(),
            next = next(started.len())
        )),
    }
}

/// The items of a JSON Lines file (`-`: standard input), each with its line number (blank
/// lines are skipped), and a digest of the file's content (16 hex digits of SHA-256).
pub(crate) fn read_lines(path: &Path) -> Result<(Vec<(usize, BatchItem)>, String), String> {
    use sha2::Digest;
    use std::io::Read;
    let mut text = String::new();
    let read = if path.as_os_str() == "-" {
        std::io::stdin().lock().read_to_string(&mut text)
    } else {
        std::fs::File::open(path).and_then(|mut f| f.read_to_string(&mut text))
    };
    read.map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let digest = sha2::Sha256::digest(text.as_bytes());
    let digest: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    let mut items = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let number = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Value>(line) {
            Ok(Value::Object(map)) => items.push((
                number,
                BatchItem::from_object(map)
                    .map_err(|e| format!("{}:{number}: {e}", path.display()))?,
            )),
            Ok(other) => {
                return Err(format!(
                    "{}:{number}: each line must be a JSON object (a context, or {{\"name\": …, \"context\": {{…}}}}), not {}",
                    path.display(),
                    kind_of(&other)
                ))
            }
            Err(e) => return Err(format!("{}:{number}: not JSON: {e}", path.display())),
        }
    }
    Ok((items, digest))
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// SIGINT and SIGTERM, listened for from the moment this is created (so a signal that arrives
/// while a worker is still starting is not lost).
struct Shutdown {
    #[cfg(unix)]
    signals: Option<(tokio::signal::unix::Signal, tokio::signal::unix::Signal)>,
}

impl Shutdown {
    fn install() -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            let signals = signal(SignalKind::interrupt())
                .and_then(|i| Ok((i, signal(SignalKind::terminate())?)))
                .ok();
            Self { signals }
        }
        #[cfg(not(unix))]
        Self {}
    }

    /// Resolve on the first SIGINT or SIGTERM.
    async fn wait(self) {
        #[cfg(unix)]
        if let Some((mut int, mut term)) = self.signals {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
            return;
        }
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// `phasm run`: start an instance and work it to the end, showing progress.
pub async fn run(args: &StartArgs, json_out: bool, concurrency: usize) -> ExitCode {
    let shutdown = Shutdown::install();
    let p = match prepare(args, concurrency, true).await {
        Ok(p) => p,
        Err(code) => return code,
    };
    let started_at = Instant::now();
    let version = args.version.or(p.file_version);
    let name = match start_prepared(&p, args.name.as_deref(), version).await {
        Ok(outcome) => outcome.name().to_string(),
        Err(code) => return code,
    };
    let (tx, rx) = mpsc::unbounded_channel();
    let options = WorkerOptions {
        concurrency,
        stop: StopWhen::Ended(vec![name.clone()]),
        limits: p.limits,
        events: Some(tx),
        poll_interval: Duration::from_millis(200),
        // `run` follows one instance; schedules are fired by `worker` and `serve`.
        schedules: false,
        own_hashes: p.own_hashes.clone(),
        ..WorkerOptions::default()
    };
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let worker = match Worker::new(
        Arc::clone(&p.store),
        Arc::clone(&p.config),
        Arc::clone(&p.registry),
        clock,
        options,
    ) {
        Ok(w) => w,
        Err(e) => {
            return exit::invalid(e);
        }
    };
    let progress = tokio::spawn(show_progress(rx, name.clone(), json_out));
    let interrupted = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = Arc::clone(&interrupted);
    let result = worker
        .run(async move {
            shutdown.wait().await;
            flag.store(true, std::sync::atomic::Ordering::SeqCst);
        })
        .await;
    let _ = progress.await;
    close_hosts(&p.registry).await;
    if let Err(e) = result {
        return exit::failed(e);
    }
    let view = match p.store.instance(&name).await {
        Ok(Some(view)) => view,
        Ok(None) => {
            return exit::failed(format!("instance `{name}` vanished"));
        }
        Err(e) => {
            return exit::failed(e);
        }
    };
    let elapsed = started_at.elapsed();
    if interrupted.load(std::sync::atomic::Ordering::SeqCst)
        && view.status == InstanceStatus::Running
    {
        eprintln!(
            "interrupted: `{name}` is still running; `phasm worker {}` continues it",
            args.file.display()
        );
    }
    let steps = view.history_total as usize;
    let end_states = end_states(&view);
    if json_out {
        let out = json!({
            "instance": name,
            "machine": view.machine,
            "status": view.status,
            "state": end_states.last(),
            "states": end_states,
            "steps": steps,
            "error": view.error,
            "context": view.current_context,
            "children": view.children,
            "elapsed_ms": elapsed.as_millis() as u64,
        });
        outln!("{out}");
    } else {
        let error = view
            .error
            .as_deref()
            .map(|e| format!(": {e}"))
            .unwrap_or_default();
        let place = match end_states.as_slice() {
            [] => String::new(),
            [one] => format!(" in state `{one}`"),
            many => format!(
                " in states {}",
                many.iter()
                    .map(|s| format!("`{s}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        let after = if steps == 0 {
            "before its first step".to_string()
        } else {
            format!("after {}", count(steps as u64, "step"))
        };
        outln!(
            "{name} {}{place} {after} in {:.2}s{error}",
            view.status,
            elapsed.as_secs_f64()
        );
        if let Some(context) = &view.current_context {
            outln!("context: {}", Value::Object(context.clone()));
        }
    }
    match view.status {
        InstanceStatus::Completed | InstanceStatus::Halted => ExitCode::SUCCESS,
        _ => exit::failed_reported(),
    }
}

/// The states an instance's branches ended in (in the order they ended, each once); for an
/// instance that has not ended, the state its last step entered.
fn end_states(view: &phasm::store::InstanceView) -> Vec<String> {
    let mut states = view.end_states.clone();
    if states.is_empty() {
        if let Some(last) = view.history.last() {
            states.push(last.to.clone());
        }
    }
    states
}

async fn show_progress(mut rx: mpsc::UnboundedReceiver<WorkerEvent>, name: String, quiet: bool) {
    let terminal = std::io::stderr().is_terminal() && !quiet;
    let bar = terminal.then(|| {
        let bar = ProgressBar::new_spinner();
        bar.set_style(
            ProgressStyle::with_template("{spinner} {elapsed_precise} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        bar.enable_steady_tick(Duration::from_millis(100));
        bar
    });
    let (mut steps, mut retries) = (0u64, 0u64);
    let mut current = String::from("starting");
    while let Some(event) = rx.recv().await {
        let line = match &event {
            WorkerEvent::Step {
                from,
                event,
                to,
                attempt,
                instance,
            } => {
                steps += 1;
                current = to.clone();
                let retry = if *attempt > 0 {
                    format!(" (attempt {attempt})")
                } else {
                    String::new()
                };
                let from = from.as_deref().unwrap_or("start");
                let who = if *instance == name {
                    String::new()
                } else {
                    format!("[{instance}] ")
                };
                Some(format!("{who}{from} --{event}--> {to}{retry}"))
            }
            WorkerEvent::Retry { error, due_at, .. } => {
                retries += 1;
                let wait = (*due_at - SystemClock.now()).max(0) as f64 / 1e6;
                Some(format!("retrying in {wait:.1}s: {error}"))
            }
            WorkerEvent::Postponed { reason, due_at, .. } => {
                let wait = (*due_at - SystemClock.now()).max(0) as f64 / 1e6;
                Some(format!(
                    "postponed {wait:.1}s (not counted as an attempt): {reason}"
                ))
            }
            WorkerEvent::Changed { .. } => None,
        };
        match (&bar, line) {
            (Some(bar), line) => {
                // Above the spinner, the transitions stay on the screen.
                if let Some(line) = line {
                    bar.println(line);
                }
                bar.set_message(format!(
                    "{name}: in `{current}`, {}, {}",
                    count(steps, "step"),
                    count(retries, "retry")
                ));
            }
            (None, Some(line)) if !quiet => eprintln!("{line}"),
            _ => {}
        }
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
}

/// `phasm worker`'s line per committed step and per retry, on stderr.
async fn print_steps(mut rx: mpsc::UnboundedReceiver<WorkerEvent>) {
    while let Some(event) = rx.recv().await {
        match event {
            WorkerEvent::Step {
                instance,
                from,
                event,
                to,
                attempt,
            } => {
                let retry = if attempt > 0 {
                    format!(" (attempt {attempt})")
                } else {
                    String::new()
                };
                eprintln!(
                    "{instance}: {} --{event}--> {to}{retry}",
                    from.as_deref().unwrap_or("start")
                );
            }
            WorkerEvent::Retry {
                instance,
                error,
                due_at,
                ..
            } => {
                let wait = (due_at - SystemClock.now()).max(0) as f64 / 1e6;
                eprintln!("{instance}: retrying in {wait:.1}s: {error}");
            }
            WorkerEvent::Postponed {
                instance,
                reason,
                due_at,
            } => {
                let wait = (due_at - SystemClock.now()).max(0) as f64 / 1e6;
                eprintln!("{instance}: postponed {wait:.1}s (not counted as an attempt): {reason}");
            }
            WorkerEvent::Changed { .. } => {}
        }
    }
}

/// The options of `phasm worker`.
pub struct WorkerArgs {
    /// Only these queues.
    pub queues: Option<Vec<String>>,
    /// Only these worker pools (none: untargeted tasks).
    pub targets: Vec<String>,
    /// Most steps at once.
    pub concurrency: usize,
    /// Lease length.
    pub lease: Duration,
    /// Largest context.
    pub max_context_bytes: usize,
    /// No line per step.
    pub quiet: bool,
}

/// What a worker or a server works on.
struct WorkOn {
    store: Arc<dyn Store>,
    config: Config,
    registry: Registry,
    own_hashes: HashMap<String, String>,
    /// The file, or what the database has deployed, for messages.
    label: String,
}

/// Open the store and take what to work on: one file (validated, deployed, its Python hosts
/// started); several (each validated, all deployed, gathered: every machine runs on its own
/// deployed version with its own file's bindings, Python hosts started per version); or
/// without one the latest deployed version of every machine (each step bound by its own
/// version; see [`phasm::control::deployed_config`]).
async fn work_on(
    files: &[std::path::PathBuf],
    db_args: &DbArgs,
    connections: usize,
) -> Result<WorkOn, ExitCode> {
    if files.len() > 1 {
        return work_on_files(files, db_args, connections).await;
    }
    let Some(file) = files.first() else {
        let store = db::open(db_args, connections)
            .await
            .map_err(exit::database)?;
        let deployed = match phasm::control::deployed_config(&*store).await {
            Ok(d) => d,
            Err(phasm::control::DeployedError::Store(e)) => return Err(exit::database(e)),
            Err(e) => return Err(exit::invalid(e)),
        };
        let label = deployed
            .versions
            .iter()
            .map(|(m, v)| format!("{m} v{v}"))
            .collect::<Vec<_>>()
            .join(", ");
        return Ok(WorkOn {
            store,
            registry: registry(&deployed.config),
            config: deployed.config,
            own_hashes: HashMap::new(),
            label: format!("the deployed versions ({label})"),
        });
    };
    let (mut config, sites) = load_with_sites(file).ok_or_else(exit::invalid_reported)?;
    let store = db::open(db_args, connections)
        .await
        .map_err(exit::database)?;
    let own_hashes = super::versions::deploy_loaded(&*store, &config, file)
        .await?
        .hashes;
    let registry = bind(&mut config, &sites)
        .await
        .ok_or_else(exit::invalid_reported)?;
    Ok(WorkOn {
        store,
        config,
        registry,
        own_hashes,
        label: file.display().to_string(),
    })
}

/// [`work_on`] several files: all validated, then deployed in one transaction (a machine in
/// two of them is refused), then gathered. No own hashes are given: a worker recognises a
/// machine as its own only where the gathered configuration holds its file's definition
/// unchanged (no Python, no binding name another file binds differently); every other
/// machine runs on its stored version with its own bindings.
async fn work_on_files(
    files: &[std::path::PathBuf],
    db_args: &DbArgs,
    connections: usize,
) -> Result<WorkOn, ExitCode> {
    let mut loaded = Vec::with_capacity(files.len());
    for path in files {
        let (config, _) = load_with_sites(path).ok_or_else(exit::invalid_reported)?;
        let source = std::fs::read_to_string(path)
            .map_err(|e| exit::invalid(format!("cannot read `{}`: {e}", path.display())))?;
        loaded.push((config, path, source));
    }
    let store = db::open(db_args, connections)
        .await
        .map_err(exit::database)?;
    let deploys: Vec<phasm::control::DeployFile<'_>> = loaded
        .iter()
        .map(|(config, path, source)| phasm::control::DeployFile {
            config,
            path,
            source,
        })
        .collect();
    match phasm::control::deploy_for_work(&*store, &SystemClock, &deploys).await {
        Ok(deployed) => {
            for d in deployed.iter().filter(|d| d.new) {
                tracing::info!(machine = %d.machine, version = d.version, "deployed a new version");
            }
        }
        Err(phasm::control::DeployError::Store(e)) => return Err(exit::database(e)),
        Err(e) => return Err(exit::invalid(e)),
    }
    let label = files
        .iter()
        .map(|f| f.display().to_string())
        .collect::<Vec<_>>()
        .join(", ");
    let config = phasm::control::gather(loaded.into_iter().map(|(c, _, _)| c).collect());
    Ok(WorkOn {
        store,
        registry: registry(&config),
        config,
        own_hashes: HashMap::new(),
        label,
    })
}

/// `phasm worker`: work until stopped.
pub async fn worker(files: &[std::path::PathBuf], args: WorkerArgs, db_args: &DbArgs) -> ExitCode {
    let WorkerArgs {
        queues,
        targets,
        concurrency,
        lease,
        max_context_bytes,
        quiet,
    } = args;
    let shutdown = Shutdown::install();
    let WorkOn {
        store,
        config,
        registry,
        own_hashes,
        label,
    } = match work_on(files, db_args, concurrency).await {
        Ok(w) => w,
        Err(code) => return code,
    };
    let pools = if targets.is_empty() {
        "untargeted tasks".to_string()
    } else {
        format!("target {}", targets.join(", "))
    };
    let options = WorkerOptions {
        concurrency,
        lease,
        queues,
        targets: if targets.is_empty() {
            Targets::Untargeted
        } else {
            Targets::Only(targets.clone())
        },
        limits: Limits {
            max_context_bytes,
            ..Limits::default()
        },
        events: (!quiet).then(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(print_steps(rx));
            tx
        }),
        own_hashes,
        ..WorkerOptions::default()
    };
    let owner = options.owner.clone();
    let served = targets;
    let config = Arc::new(config);
    let worker_config = Arc::clone(&config);
    let registry = Arc::new(registry);
    let worker = match Worker::new(
        store,
        config,
        Arc::clone(&registry),
        Arc::new(SystemClock),
        options,
    ) {
        Ok(w) => w,
        Err(e) => {
            return exit::invalid(e);
        }
    };
    eprintln!(
        "worker {owner} started on {} ({pools}), working on {label}",
        db::redact(&db_args.db)
    );
    let unserved = unserved_targets(&worker_config, &served);
    if !unserved.is_empty() {
        eprintln!(
            "warning: this worker does not take steps with target {} (used in {}): they wait for `phasm worker {}--target NAME`",
            unserved
                .iter()
                .map(|t| format!("`{t}`"))
                .collect::<Vec<_>>()
                .join(", "),
            label,
            files
                .iter()
                .map(|f| format!("{} ", f.display()))
                .collect::<String>()
        );
    }
    let result = worker.run(shutdown.wait()).await;
    close_hosts(&registry).await;
    match result {
        Ok(report) => {
            let postponed = if report.postponed > 0 {
                format!(
                    ", {} postponed (out of file descriptors or processes)",
                    count(report.postponed, "step")
                )
            } else {
                String::new()
            };
            eprintln!(
                "worker {owner} stopped: {}, {}, {} failed, {} stopped or refused (lease lost), {} given up (database unavailable; those steps run again){postponed}",
                count(report.steps, "step"),
                count(report.retries, "retry"),
                report.failures,
                count(report.fenced, "step"),
                count(report.given_up, "commit"),
            );
            ExitCode::SUCCESS
        }
        Err(e) => exit::database(e),
    }
}

/// The `target`s a configuration's machines and transitions name that a worker serving
/// `targets` (none: untargeted steps only) does not take.
fn unserved_targets(config: &Config, targets: &[String]) -> Vec<String> {
    let mut used = std::collections::BTreeSet::new();
    for m in &config.machines {
        used.extend(m.start_policy.target.clone());
        for s in &m.states {
            for t in &s.transitions {
                used.extend(t.effective.target.clone());
            }
        }
    }
    used.into_iter().filter(|t| !targets.contains(t)).collect()
}

/// How `phasm serve` serves.
#[derive(Debug)]
pub struct ServeSettings {
    /// Where it listens.
    pub listen: std::net::SocketAddr,
    /// The API token (`--token` or `PHASM_TOKEN`).
    pub token: Option<String>,
    /// A file holding the token (`--token-file` or `PHASM_TOKEN_FILE`).
    pub token_file: Option<std::path::PathBuf>,
    /// More `Host` names to answer to.
    pub allow_hosts: Vec<String>,
    /// Proxies whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<std::net::IpAddr>,
    /// Most events an instance keeps before a wait takes them.
    pub max_kept_events: usize,
    /// Most steps at once.
    pub concurrency: usize,
    /// Scrub ended instances older than this every hour.
    pub scrub_older_than: Option<Duration>,
}

/// The token `phasm serve` requires: from `--token-file` (its first line), or `--token` /
/// `PHASM_TOKEN` — with a warning when it was typed on the command line, where `ps` shows it
/// to every local user.
fn serve_token(settings: &ServeSettings) -> Result<Option<String>, String> {
    if let Some(path) = &settings.token_file {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("--token-file `{}`: {e}", path.display()))?;
        let token = text.lines().next().unwrap_or_default().trim().to_string();
        return Ok(Some(token));
    }
    let on_command_line =
        std::env::args_os().any(|a| a == "--token" || a.to_string_lossy().starts_with("--token="));
    if settings.token.is_some() && on_command_line {
        tracing::warn!(
            "--token on the command line is visible to every local user (ps, /proc): use --token-file or PHASM_TOKEN"
        );
    }
    Ok(settings.token.clone())
}

/// `phasm serve`: a worker and the HTTP API, until SIGINT or SIGTERM.
pub async fn serve(
    files: &[std::path::PathBuf],
    settings: ServeSettings,
    db_args: &DbArgs,
) -> ExitCode {
    let token = match serve_token(&settings) {
        Ok(t) => t,
        Err(e) => return exit::invalid(e),
    };
    let ServeSettings {
        listen,
        allow_hosts,
        trusted_proxies,
        max_kept_events,
        concurrency,
        scrub_older_than,
        ..
    } = settings;
    // On loopback only the loopback names are served (a page elsewhere cannot reach the API
    // through a name that resolves to 127.0.0.1); elsewhere any, unless names are given.
    let allowed_hosts = if listen.ip().is_loopback() || !allow_hosts.is_empty() {
        let mut names: Vec<String> = allow_hosts;
        if listen.ip().is_loopback() {
            names.extend(
                phasm::server::LOOPBACK_HOSTS
                    .iter()
                    .map(|h| (*h).to_string()),
            );
        }
        Some(names)
    } else {
        None
    };
    let shutdown = Shutdown::install();
    if let Some(Err(e)) = token.as_deref().map(phasm::server::auth::check_token) {
        return exit::invalid(format!(
            "the token (--token, --token-file or PHASM_TOKEN): {e}"
        ));
    }
    if !listen.ip().is_loopback() && token.as_deref().is_none_or(str::is_empty) {
        return exit::invalid(format!("listening on {listen} would expose the API beyond this host; set a token with --token or PHASM_TOKEN"));
    }
    let WorkOn {
        store,
        config,
        registry,
        own_hashes,
        label,
    } = match work_on(files, db_args, concurrency).await {
        Ok(w) => w,
        Err(code) => return code,
    };
    let config = Arc::new(config);
    let registry = Arc::new(registry);
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let options = WorkerOptions {
        concurrency,
        own_hashes,
        ..WorkerOptions::default()
    };
    let worker = match Worker::new(
        Arc::clone(&store),
        Arc::clone(&config),
        Arc::clone(&registry),
        Arc::clone(&clock),
        options,
    ) {
        Ok(w) => w,
        Err(e) => {
            return exit::invalid(e);
        }
    };
    let listener = match tokio::net::TcpListener::bind(listen).await {
        Ok(l) => l,
        Err(e) => {
            return exit::invalid(format!("cannot listen on {listen}: {e}"));
        }
    };
    if let Some(age) = scrub_older_than {
        let store = Arc::clone(&store);
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(3600));
            loop {
                every.tick().await;
                match super::inspect::scrub_all(&*store, age, 1000).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(removed = n, "scrubbed ended instances"),
                    Err(e) => tracing::warn!(error = %e, "scrubbing failed"),
                }
            }
        });
    }
    let metrics = match phasm::server::install_metrics() {
        Ok(handle) => Some(handle),
        Err(e) => {
            tracing::warn!(error = %e, "metrics are disabled");
            None
        }
    };
    let state = Arc::new(phasm::server::ServerState {
        store,
        config,
        clock,
        limits: Limits {
            max_kept_events,
            ..Limits::default()
        },
        token,
        metrics,
        throttle: Default::default(),
        allowed_hosts,
        trusted_proxies,
    });
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut api_stop = stop_rx.clone();
    let api = tokio::spawn(phasm::server::serve(listener, state, async move {
        let _ = api_stop.changed().await;
    }));
    eprintln!(
        "phasm serving http://{listen} (API under /api, health at /healthz) on {}, working on {label}",
        db::redact(&db_args.db)
    );
    let mut worker_stop = stop_rx;
    let work = tokio::spawn(worker.run(async move {
        let _ = worker_stop.changed().await;
    }));
    shutdown.wait().await;
    eprintln!("shutting down: finishing running steps");
    let _ = stop_tx.send(true);
    let _ = api.await;
    let worked = work.await;
    close_hosts(&registry).await;
    match worked {
        Ok(Ok(_)) => ExitCode::SUCCESS,
        Ok(Err(e)) => exit::failed(e),
        Err(e) => exit::failed(e),
    }
}
