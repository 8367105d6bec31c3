//! `phasm bench`: measured throughput and latency on this machine.

use std::fmt::Write as _;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use clap::Subcommand;
use phasm::action::Registry;
use phasm::clock::{Clock, SystemClock};
use phasm::config::{load_str, LoadOptions};
use phasm::control::start_instance;
use phasm::engine::{Context, Limits};
use phasm::store::Store;
use phasm::worker::{StopWhen, Worker, WorkerOptions};
use serde_json::json;

use crate::output::outln;
use crate::{db, exit, DbArgs};

/// The benchmarks.
#[derive(Subcommand, Clone, Debug)]
pub enum Bench {
    /// N instances of a K-state linear machine with no-op Rust actions.
    Chain {
        /// Instances.
        #[arg(long, default_value_t = 1000)]
        instances: usize,
        /// States per instance (= steps per instance).
        #[arg(long, default_value_t = 10)]
        steps: usize,
        /// Most steps running at once (per worker).
        #[arg(long, default_value_t = 256)]
        concurrency: usize,
        /// Worker processes (more than 1 needs a PostgreSQL `--db`).
        #[arg(long, default_value_t = 1)]
        workers: usize,
        /// Only work (a worker process started by `--workers`).
        #[arg(long, hide = true)]
        worker_only: bool,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
        /// Database (default: a temporary file in the current folder, removed afterwards).
        #[arg(long, env = "PHASM_DB")]
        db: Option<String>,
        /// SQLite durability.
        #[arg(long, value_enum, default_value_t = super::SyncMode::Full)]
        sync: super::SyncMode,
        /// What the no-op actions are written in: Rust handlers, Python functions run by
        /// phasm's action hosts, or `exec` programs (one `python3` process per call).
        #[arg(long, value_enum, default_value_t = Actions::Rust)]
        actions: Actions,
        /// Python host processes (with `--actions python`; default: the number of cores).
        #[arg(long)]
        processes: Option<u32>,
    },
    /// N instances started from one JSON Lines file, as `phasm start --contexts` does (the
    /// file read and parsed, every context checked, the instances written in transactions of
    /// 10,000).
    Start {
        /// Instances (lines).
        #[arg(long, default_value_t = 10_000)]
        instances: usize,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
        /// Database (default: a temporary file in the current folder, removed afterwards).
        #[arg(long, env = "PHASM_DB")]
        db: Option<String>,
        /// SQLite durability.
        #[arg(long, value_enum, default_value_t = super::SyncMode::Full)]
        sync: super::SyncMode,
    },
    /// Single starts through the HTTP API (`POST /api/machines/{m}/instances`, one instance
    /// per request, kept-alive connections) from C concurrent clients, against a server in
    /// this process on a loopback port.
    Http {
        /// Requests in all, per client count.
        #[arg(long, default_value_t = 2000)]
        requests: usize,
        /// Concurrent clients, one run each.
        #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
        clients: Vec<usize>,
        /// Print one JSON object per run.
        #[arg(long)]
        json: bool,
        /// Database (default: a temporary file in the current folder, removed afterwards).
        #[arg(long, env = "PHASM_DB")]
        db: Option<String>,
        /// SQLite durability.
        #[arg(long, value_enum, default_value_t = super::SyncMode::Full)]
        sync: super::SyncMode,
    },
    /// One instance forks into N branches that each take one no-op step, then join in one
    /// fan-in state (`fan_in: all`).
    Fanout {
        /// Branches.
        #[arg(long, default_value_t = 10_000)]
        branches: usize,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
        /// Database (default: a temporary file in the current folder, removed afterwards).
        #[arg(long, env = "PHASM_DB")]
        db: Option<String>,
        /// SQLite durability.
        #[arg(long, value_enum, default_value_t = super::SyncMode::Full)]
        sync: super::SyncMode,
    },
    /// `phasm versions` on a big database: V versions of a machine, N running instances
    /// spread over them, listed with the live instances on each.
    Versions {
        /// Versions.
        #[arg(long, default_value_t = 1000)]
        versions: u32,
        /// Running instances.
        #[arg(long, default_value_t = 1_000_000)]
        instances: usize,
        /// Timed listings (the median is reported).
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
        /// Database (default: a temporary file in the current folder, removed afterwards).
        #[arg(long, env = "PHASM_DB")]
        db: Option<String>,
        /// SQLite durability.
        #[arg(long, value_enum, default_value_t = super::SyncMode::Normal)]
        sync: super::SyncMode,
    },
}

/// A one-state machine for `bench start` (its instances are only started, never run).
const START_YAML: &str = "state_machines:
- name: Order
  states:
  - name: take
    initial: true
    final: true
    action: Take
";

/// What the chain benchmark's actions are written in.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Actions {
    /// Rust closures.
    Rust,
    /// Python functions in phasm's action hosts.
    Python,
    /// A `python3` program per call (`exec`).
    Exec,
}

/// The no-op Python actions of `--actions python` and `--actions exec`.
const CHAIN_PY: &str = r#""""No-op actions of `phasm bench chain`."""
import json
import sys


def Step(ctx):
    return "next"


def Last(ctx):
    return None


if __name__ == "__main__":
    request = json.load(sys.stdin)
    json.dump({"event": "next" if sys.argv[1] == "Step" else None}, sys.stdout)
"#;

const FANOUT_YAML: &str = "state_machines:
- name: Fanout
  states:
  - name: fan
    initial: true
    action: Fan
    transitions:
    - event: go
      to: work
  - name: work
    action: Work
    transitions:
    - event: done
      to: join
  - name: join
    fan_in: all
    action: Join
    final: true
";

/// Peak resident memory of this process, from Linux's /proc (None elsewhere).
fn peak_rss_bytes() -> Option<u64> {
    peak_rss_of("self")
}

/// Peak resident memory of a process (`self` or a pid), from Linux's /proc.
fn peak_rss_of(process: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{process}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

async fn start_lines(
    instances: usize,
    as_json: bool,
    db_path: Option<String>,
    sync: super::SyncMode,
) -> ExitCode {
    if instances == 0 {
        return exit::invalid("--instances must be at least 1");
    }
    let (_temp, path) = match crate::db::bench_db(db_path) {
        Ok(x) => x,
        Err(code) => return code,
    };
    let store = match db::open(&DbArgs { db: path, sync }, 4).await {
        Ok(s) => s,
        Err(e) => return exit::database(e),
    };
    let config = match load_str(START_YAML, "bench-start.yaml", &LoadOptions::default()) {
        Ok(l) => l.config,
        Err(e) => return exit::failed(e),
    };
    let dir = match tempfile::tempdir() {
        Ok(d) => d,
        Err(e) => return exit::failed(format!("cannot create a temporary folder: {e}")),
    };
    let file = dir.path().join("contexts.jsonl");
    let mut lines = String::with_capacity(instances * 48);
    for i in 0..instances {
        let _ = writeln!(
            lines,
            "{}",
            json!({"order": i, "customer": format!("c-{}", i % 997)})
        );
    }
    if let Err(e) = std::fs::write(&file, lines) {
        return exit::failed(format!("cannot write {}: {e}", file.display()));
    }
    let began = Instant::now();
    let items = match super::run::read_lines(&file) {
        Ok((items, _)) => items.into_iter().map(|(_, item)| item).collect(),
        Err(e) => return exit::failed(e),
    };
    let batch = phasm::control::Batch {
        machine: "Order",
        items,
        key: None,
        version: None,
    };
    let started =
        phasm::control::start_instances(&*store, &config, &SystemClock, batch, &Limits::default())
            .await;
    let elapsed = began.elapsed().as_secs_f64();
    let created = match started {
        Ok(outcomes) => outcomes
            .iter()
            .filter(|o| matches!(o, phasm::control::StartOutcome::Started(_)))
            .count(),
        Err(e) => return exit::failed(e),
    };
    if created != instances {
        return exit::failed(format!(
            "expected {instances} instances started, {created} were"
        ));
    }
    let rate = instances as f64 / elapsed.max(1e-9);
    if as_json {
        outln!(
            "{}",
            json!({"bench": "start", "instances": instances, "seconds": elapsed, "instances_per_second": rate})
        );
    } else {
        outln!("start: {instances} instances from one JSON Lines file");
        outln!("  {elapsed:.3}s, {rate:.0} instances/s");
    }
    ExitCode::SUCCESS
}

async fn http_starts(
    requests: usize,
    clients: &[usize],
    as_json: bool,
    db_path: Option<String>,
    sync: super::SyncMode,
) -> ExitCode {
    if requests == 0 || clients.is_empty() || clients.contains(&0) {
        return exit::invalid("--requests and every --clients count must be at least 1");
    }
    let (_temp, path) = match crate::db::bench_db(db_path) {
        Ok(x) => x,
        Err(code) => return code,
    };
    let most = clients.iter().copied().max().unwrap_or(1);
    let store = match db::open(&DbArgs { db: path, sync }, most + 2).await {
        Ok(s) => s,
        Err(e) => return exit::database(e),
    };
    let config = match load_str(START_YAML, "bench-http.yaml", &LoadOptions::default()) {
        Ok(l) => Arc::new(l.config),
        Err(e) => return exit::failed(e),
    };
    let state = Arc::new(phasm::server::ServerState {
        store,
        config,
        clock: Arc::new(SystemClock),
        limits: Limits::default(),
        token: None,
        metrics: None,
        throttle: phasm::server::auth::Throttle::default(),
        allowed_hosts: None,
        trusted_proxies: Vec::new(),
    });
    let listener = match tokio::net::TcpListener::bind("127.0.0.1:0").await {
        Ok(l) => l,
        Err(e) => return exit::failed(format!("cannot listen on a loopback port: {e}")),
    };
    let addr = match listener.local_addr() {
        Ok(a) => a,
        Err(e) => return exit::failed(e),
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(phasm::server::serve(listener, state, async {
        let _ = stopped.await;
    }));
    if !as_json {
        outln!("http: {requests} single starts through POST /api/machines/Order/instances");
    }
    for &c in clients {
        let began = Instant::now();
        let mut running = tokio::task::JoinSet::new();
        for i in 0..c {
            let share = requests / c + usize::from(i < requests % c);
            running.spawn(http_client(addr, share));
        }
        let mut latencies = Vec::with_capacity(requests);
        while let Some(done) = running.join_next().await {
            match done {
                Ok(Ok(mut l)) => latencies.append(&mut l),
                Ok(Err(e)) => return exit::failed(format!("a client failed: {e}")),
                Err(e) => return exit::failed(format!("a client failed: {e}")),
            }
        }
        let elapsed = began.elapsed().as_secs_f64();
        latencies.sort_unstable_by(f64::total_cmp);
        let pct = |p: f64| {
            let i = ((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1));
            latencies.get(i).copied().unwrap_or_default() * 1e3
        };
        let rate = requests as f64 / elapsed.max(1e-9);
        if as_json {
            outln!(
                "{}",
                json!({"bench": "http", "clients": c, "requests": requests, "seconds": elapsed,
                       "starts_per_second": rate, "p50_ms": pct(0.5), "p99_ms": pct(0.99)})
            );
        } else {
            outln!(
                "  {c:>3} clients: {rate:.0} starts/s, latency p50 {:.2} ms, p99 {:.2} ms",
                pct(0.5),
                pct(0.99)
            );
        }
    }
    let _ = stop.send(());
    let _ = server.await;
    ExitCode::SUCCESS
}

/// One kept-alive connection sending `n` single-start requests one after another; each
/// request's latency in seconds.
async fn http_client(addr: std::net::SocketAddr, n: usize) -> Result<Vec<f64>, String> {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let mut stream = BufReader::new(stream);
    let mut latencies = Vec::with_capacity(n);
    for i in 0..n {
        let body = json!({"context": {"order": i}}).to_string();
        let request = format!(
            "POST /api/machines/Order/instances HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let sent = Instant::now();
        stream
            .get_mut()
            .write_all(request.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut status = String::new();
        stream
            .read_line(&mut status)
            .await
            .map_err(|e| e.to_string())?;
        if !status.starts_with("HTTP/1.1 201") {
            return Err(format!("answered {}", status.trim_end()));
        }
        let mut length = 0usize;
        loop {
            let mut line = String::new();
            stream
                .read_line(&mut line)
                .await
                .map_err(|e| e.to_string())?;
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = value
                        .trim()
                        .parse()
                        .map_err(|_| format!("bad header {line}"))?;
                }
            }
        }
        let mut reply = vec![0; length];
        stream
            .read_exact(&mut reply)
            .await
            .map_err(|e| e.to_string())?;
        latencies.push(sent.elapsed().as_secs_f64());
    }
    Ok(latencies)
}

async fn fanout(
    branches: usize,
    as_json: bool,
    db_path: Option<String>,
    sync: super::SyncMode,
) -> ExitCode {
    if branches == 0 {
        return exit::invalid("--branches must be at least 1");
    }
    let (_temp, path) = match crate::db::bench_db(db_path) {
        Ok(x) => x,
        Err(code) => return code,
    };
    let store = match db::open(&DbArgs { db: path, sync }, 64).await {
        Ok(s) => s,
        Err(e) => {
            return exit::invalid(e);
        }
    };
    let config = match load_str(FANOUT_YAML, "bench-fanout.yaml", &LoadOptions::default()) {
        Ok(l) => Arc::new(l.config),
        Err(e) => {
            return exit::failed(e);
        }
    };
    let mut registry = Registry::new();
    registry.register_fn("Fan", move |cx| {
        for _ in 1..branches {
            cx.fork(phasm::engine::Context::new());
        }
        Ok(Some("go".into()))
    });
    registry.register_fn("Work", |_| Ok(Some("done".into())));
    let joined = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = Arc::clone(&joined);
    registry.register_fn("Join", move |cx| {
        seen.fetch_add(cx.contexts().len(), std::sync::atomic::Ordering::SeqCst);
        Ok(None)
    });
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let began = Instant::now();
    let name = match start_instance(
        &*store,
        &config,
        &*clock,
        "Fanout",
        Context::new(),
        None,
        &Limits::default(),
    )
    .await
    {
        Ok(o) => o.name().to_string(),
        Err(e) => {
            return exit::failed(e);
        }
    };
    let options = WorkerOptions {
        stop: StopWhen::Ended(vec![name.clone()]),
        schedules: false,
        ..WorkerOptions::default()
    };
    let worker = match Worker::new(
        Arc::clone(&store),
        config,
        Arc::new(registry),
        clock,
        options,
    ) {
        Ok(w) => w,
        Err(e) => return exit::failed(e),
    };
    if let Err(e) = worker.run(std::future::pending()).await {
        return exit::failed(e);
    }
    let wall = began.elapsed().as_secs_f64();
    let status = store.instance(&name).await.ok().flatten().map(|v| v.status);
    let joined = joined.load(std::sync::atomic::Ordering::SeqCst);
    let rss = peak_rss_bytes();
    if as_json {
        outln!(
            "{}",
            json!({
                "bench": "fanout",
                "branches": branches,
                "joined": joined,
                "wall_s": wall,
                "peak_rss_bytes": rss,
                "status": status,
                "sync": format!("{sync:?}").to_lowercase(),
            })
        );
    } else {
        let rss = rss.map_or("unknown".to_string(), |b| {
            format!("{:.0} MB", b as f64 / 1e6)
        });
        outln!("fanout: {branches} branches, one no-op step each, joined in one fan-in ({joined} contexts joined)");
        outln!("  {wall:.2}s, peak RSS {rss}");
    }
    if joined != branches || status != Some(phasm::store::InstanceStatus::Completed) {
        return exit::failed(format!(
            "expected {branches} contexts joined and a completed instance"
        ));
    }
    ExitCode::SUCCESS
}

fn actions_name(actions: Actions) -> &'static str {
    match actions {
        Actions::Rust => "rust",
        Actions::Python => "python",
        Actions::Exec => "exec",
    }
}

fn chain_yaml(steps: usize, namespaced: bool) -> String {
    let mut y = String::from("state_machines:\n- name: Chain\n");
    if namespaced {
        y.push_str("  namespace: bench_actions\n");
    }
    y.push_str("  states:\n");
    for i in 1..=steps {
        let _ = writeln!(y, "  - name: s{i}");
        if i == 1 {
            y.push_str("    initial: true\n");
        }
        if i == steps {
            y.push_str("    final: true\n    action: Last\n");
        } else {
            let _ = write!(
                y,
                "    action: Step\n    transitions:\n    - event: next\n      to: s{}\n",
                i + 1
            );
        }
    }
    y
}

fn percentile(sorted: &[i64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)] as f64 / 1000.0
}

/// Run a benchmark.
pub async fn run(bench: Bench) -> ExitCode {
    match bench {
        Bench::Chain {
            instances,
            steps,
            concurrency,
            workers,
            worker_only,
            json,
            db,
            sync,
            actions,
            processes,
        } => {
            if worker_only {
                return chain_worker(steps, concurrency, db, sync, actions, processes).await;
            }
            chain(ChainArgs {
                instances,
                steps,
                concurrency,
                workers,
                as_json: json,
                db_path: db,
                sync,
                actions,
                processes,
            })
            .await
        }
        Bench::Start {
            instances,
            json,
            db,
            sync,
        } => start_lines(instances, json, db, sync).await,
        Bench::Http {
            requests,
            clients,
            json,
            db,
            sync,
        } => http_starts(requests, &clients, json, db, sync).await,
        Bench::Fanout {
            branches,
            json,
            db,
            sync,
        } => fanout(branches, json, db, sync).await,
        Bench::Versions {
            versions,
            instances,
            runs,
            json,
            db,
            sync,
        } => super::bench_versions::versions(versions, instances, runs, json, db, sync).await,
    }
}

/// The chain machine and its actions; for Python and exec, the module lives in `dir`. The
/// machine is deployed to `store` first, as `phasm worker` does, so its instances are pinned
/// to a version and every step looks its version up (the definition hashes of the worker's
/// own configuration are the third part of the answer).
async fn chain_setup(
    store: &dyn Store,
    steps: usize,
    actions: Actions,
    processes: Option<u32>,
    dir: &std::path::Path,
) -> Result<ChainSetup, ExitCode> {
    let mut yaml = chain_yaml(steps, actions != Actions::Rust);
    match actions {
        Actions::Rust => {}
        Actions::Python => {
            let processes = processes
                .map(|n| format!("  processes: {n}\n"))
                .unwrap_or_default();
            yaml = format!("python:\n  path: [.]\n{processes}{yaml}");
        }
        Actions::Exec => {
            yaml = format!(
                "actions:\n  bench_actions.Step:\n    exec: [python3, bench_actions.py, Step]\n  bench_actions.Last:\n    exec: [python3, bench_actions.py, Last]\n{yaml}"
            );
        }
    }
    if actions != Actions::Rust {
        std::fs::write(dir.join("bench_actions.py"), CHAIN_PY).map_err(exit::failed)?;
    }
    let loaded = load_str(&yaml, dir.join("bench-chain.yaml"), &LoadOptions::default())
        .map_err(exit::failed)?;
    let mut config = loaded.config;
    let file = phasm::control::DeployFile {
        config: &config,
        path: std::path::Path::new("bench-chain.yaml"),
        source: &yaml,
    };
    phasm::control::deploy_for_work(store, &SystemClock, &[file])
        .await
        .map_err(exit::failed)?;
    let own_hashes = phasm::config::definitions(&config)
        .into_iter()
        .map(|d| (d.machine, d.hash))
        .collect();
    let mut registry = Registry::new();
    registry.bind_config(&config);
    if actions == Actions::Rust {
        registry.register_fn("Step", |_| Ok(Some("next".into())));
        registry.register_fn("Last", |_| Ok(None));
    }
    phasm::action::python::start(&mut config, &loaded.sites, &mut registry)
        .await
        .map_err(exit::failed)?;
    Ok((Arc::new(config), registry, own_hashes))
}

/// The chain's configuration, its registry and its definitions' hashes.
type ChainSetup = (
    Arc<phasm::machine::Config>,
    Registry,
    std::collections::HashMap<String, String>,
);

/// A folder for the benchmark's action module (removed afterwards).
fn bench_dir() -> Result<tempfile::TempDir, ExitCode> {
    tempfile::Builder::new()
        .prefix("phasm-bench-")
        .tempdir()
        .map_err(exit::failed)
}

/// Peak resident memory of each host process, in bytes.
fn host_memory(registry: &Registry) -> Vec<u64> {
    let Some(pool) = registry.hosts() else {
        return Vec::new();
    };
    pool.pids()
        .into_iter()
        .filter_map(|pid| peak_rss_of(&pid.to_string()))
        .collect()
}

/// A worker process of `--workers`: work until nothing is pending.
async fn chain_worker(
    steps: usize,
    concurrency: usize,
    db: Option<String>,
    sync: super::SyncMode,
    actions: Actions,
    processes: Option<u32>,
) -> ExitCode {
    let Some(db) = db else {
        return exit::failed("--worker-only needs --db");
    };
    let store = match db::open(&DbArgs { db, sync }, concurrency).await {
        Ok(s) => s,
        Err(e) => return exit::failed(e),
    };
    let dir = match bench_dir() {
        Ok(d) => d,
        Err(code) => return code,
    };
    let (config, registry, own_hashes) =
        match chain_setup(&*store, steps, actions, processes, dir.path()).await {
            Ok(x) => x,
            Err(code) => return code,
        };
    let registry = Arc::new(registry);
    let options = WorkerOptions {
        concurrency,
        stop: StopWhen::Idle,
        schedules: false,
        own_hashes,
        ..WorkerOptions::default()
    };
    let worker = match Worker::new(
        store,
        config,
        Arc::clone(&registry),
        Arc::new(SystemClock),
        options,
    ) {
        Ok(w) => w,
        Err(e) => return exit::failed(e),
    };
    let result = worker.run(std::future::pending()).await;
    super::run::close_hosts(&registry).await;
    match result {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => exit::failed(e),
    }
}

/// The options of `bench chain`.
struct ChainArgs {
    instances: usize,
    steps: usize,
    concurrency: usize,
    workers: usize,
    as_json: bool,
    db_path: Option<String>,
    sync: super::SyncMode,
    actions: Actions,
    processes: Option<u32>,
}

async fn chain(args: ChainArgs) -> ExitCode {
    let ChainArgs {
        instances,
        steps,
        concurrency,
        workers,
        as_json,
        db_path,
        sync,
        actions,
        processes,
    } = args;
    if instances == 0 || steps == 0 || workers == 0 {
        return exit::invalid("--instances, --steps and --workers must be at least 1");
    }
    if workers > 1 && !db_path.as_deref().is_some_and(db::is_postgres) {
        return exit::invalid(format!(
            "--workers {workers} needs a database the processes can share: --db postgres://..."
        ));
    }
    let temp = match &db_path {
        Some(_) => None,
        None => match tempfile::Builder::new()
            .prefix("phasm-bench-")
            .suffix(".db")
            .tempfile_in(".")
        {
            Ok(t) => Some(t),
            Err(e) => {
                return exit::failed(format!("cannot create a temporary database here: {e}"));
            }
        },
    };
    let path = db_path.unwrap_or_else(|| {
        temp.as_ref()
            .map(|t| t.path().display().to_string())
            .unwrap_or_default()
    });
    let store = match db::open(
        &DbArgs {
            db: path.clone(),
            sync,
        },
        concurrency,
    )
    .await
    {
        Ok(s) => s,
        Err(e) => {
            return exit::invalid(e);
        }
    };
    let dir = match bench_dir() {
        Ok(d) => d,
        Err(code) => return code,
    };
    // The Python hosts of the measuring process work only when it runs the worker itself.
    let own_actions = if workers == 1 { actions } else { Actions::Rust };
    let (config, registry, own_hashes) =
        match chain_setup(&*store, steps, own_actions, processes, dir.path()).await {
            Ok(x) => x,
            Err(code) => return code,
        };
    let registry = Arc::new(registry);
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);

    let start_began = Instant::now();
    let mut names = Vec::with_capacity(instances);
    for _ in 0..instances {
        match start_instance(
            &*store,
            &config,
            &*clock,
            "Chain",
            Context::new(),
            None,
            &Limits::default(),
        )
        .await
        {
            Ok(o) => names.push(o.name().to_string()),
            Err(e) => {
                return exit::failed(e);
            }
        }
    }
    let start_secs = start_began.elapsed().as_secs_f64();

    let began = Instant::now();
    let began_at = SystemClock.now();
    let report_steps = if workers == 1 {
        let options = WorkerOptions {
            concurrency,
            stop: StopWhen::Idle,
            seed: Some(1),
            schedules: false,
            own_hashes,
            ..WorkerOptions::default()
        };
        let worker = match Worker::new(
            Arc::clone(&store),
            config,
            Arc::clone(&registry),
            clock,
            options,
        ) {
            Ok(w) => w,
            Err(e) => return exit::failed(e),
        };
        match worker.run(std::future::pending()).await {
            Ok(r) => r.steps,
            Err(e) => return exit::failed(e),
        }
    } else {
        let exe = match std::env::current_exe() {
            Ok(exe) => exe,
            Err(e) => return exit::failed(e),
        };
        let children: Vec<_> = (0..workers)
            .map(|_| {
                std::process::Command::new(&exe)
                    .args([
                        "bench",
                        "chain",
                        "--worker-only",
                        "--steps",
                        &steps.to_string(),
                    ])
                    .args(["--concurrency", &concurrency.to_string(), "--db", &path])
                    .args(["--actions", actions_name(actions)])
                    .args(
                        processes
                            .map(|n| vec!["--processes".to_string(), n.to_string()])
                            .unwrap_or_default(),
                    )
                    .spawn()
            })
            .collect();
        let mut ok = true;
        for child in children {
            match child.and_then(|mut c| c.wait()) {
                Ok(status) => ok &= status.success(),
                Err(e) => return exit::failed(e),
            }
        }
        if !ok {
            return exit::failed("a worker process failed");
        }
        (instances * steps) as u64
    };
    let secs = began.elapsed().as_secs_f64();
    let total = instances * steps;
    let host_rss = host_memory(&registry);
    super::run::close_hosts(&registry).await;

    let (latencies, completed, committed, last_commit) = match latencies(&*store, &names).await {
        Ok(x) => x,
        Err(e) => {
            return exit::failed(e);
        }
    };
    // Until the last commit: worker processes noticing that nothing is left is not work.
    let secs = if last_commit > began_at {
        (last_commit - began_at) as f64 / 1e6
    } else {
        secs
    };
    let fsync_rate = store.probe_commit_rate(300).await.unwrap_or(0.0);
    // Every step of every instance, counted from the committed history (the worker's own
    // count, where there is one, must agree).
    debug_assert!(workers > 1 || report_steps == committed);
    let report_steps = committed;
    let steps_per_sec = report_steps as f64 / secs;
    let (p50, p99) = (percentile(&latencies, 0.5), percentile(&latencies, 0.99));
    if as_json {
        outln!(
            "{}",
            json!({
                "bench": "chain",
                "instances": instances,
                "steps_per_instance": steps,
                "steps": report_steps,
                "completed": completed,
                "wall_s": secs,
                "steps_per_s": steps_per_sec,
                "step_latency_p50_ms": p50,
                "step_latency_p99_ms": p99,
                "start_s": start_secs,
                "fsync_commits_per_s": fsync_rate,
                "concurrency": concurrency,
                "sync": format!("{sync:?}").to_lowercase(),
                "actions": actions_name(actions),
                "host_peak_rss_bytes": host_rss,
            })
        );
    } else {
        outln!("chain: {instances} instances × {steps} steps = {total} steps ({} committed, {completed} instances completed)", report_steps);
        outln!("  {secs:.2}s, {steps_per_sec:.0} steps/s (starting the instances took {start_secs:.2}s)");
        outln!("  step latency p50 {p50:.2} ms, p99 {p99:.2} ms");
        outln!("  reference: {fsync_rate:.0} durable single-row commits/s on this store");
        if !host_rss.is_empty() {
            let mib: Vec<String> = host_rss
                .iter()
                .map(|b| format!("{:.1} MiB", *b as f64 / 1048576.0))
                .collect();
            outln!(
                "  {} Python host processes, peak memory {}",
                host_rss.len(),
                mib.join(", ")
            );
        }
    }
    if report_steps as usize != total || completed != instances {
        return exit::failed(format!(
            "expected {total} steps and {instances} completed instances"
        ));
    }
    ExitCode::SUCCESS
}

/// Time between consecutive commits of each instance: how long one step takes once the
/// previous one has committed (the wait of a freshly started instance for a free worker
/// slot is queueing, not step latency, and is left out).
async fn latencies(
    store: &dyn Store,
    names: &[String],
) -> Result<(Vec<i64>, usize, u64, i64), phasm::store::StoreError> {
    let mut all = Vec::new();
    let mut completed = 0;
    let mut committed = 0u64;
    let mut last = 0;
    for name in names {
        let Some(view) = store.instance(name).await? else {
            continue;
        };
        if view.status == phasm::store::InstanceStatus::Completed {
            completed += 1;
        }
        committed += view.history_total;
        // Every transition, a page at a time (the view holds only the latest).
        let mut previous = None;
        phasm::store::for_each_transition(store, name, |h| {
            last = last.max(h.finished_at);
            if let Some(p) = previous {
                all.push(h.finished_at - p);
            }
            previous = Some(h.finished_at);
        })
        .await?;
    }
    all.sort_unstable();
    Ok((all, completed, committed, last))
}
