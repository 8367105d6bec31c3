//! The `phasm` command: a thin layer over the `phasm` library that parses arguments, calls
//! the library, and turns its results into output and exit codes (0 success, 1 an instance
//! failed or an operation was refused, 2 invalid input).

mod cmd;
mod db;
mod exit;
mod output;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "phasm",
    version,
    about = "Durable state-machine workflows from fsm.yaml files"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Where instances are stored.
#[derive(Args, Clone, Debug)]
struct DbArgs {
    /// Database: a SQLite file path, or a PostgreSQL URL
    /// (`postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE`).
    #[arg(long, env = "PHASM_DB", default_value = "phasm.db")]
    db: String,
    /// SQLite durability: `full` (fsync every commit; the default), or `normal`/`off`, which
    /// are faster but can lose the last commits on power loss.
    #[arg(long, value_enum, default_value_t = cmd::SyncMode::Full)]
    sync: cmd::SyncMode,
}

/// Where instances are stored, for the commands that only read (no durability to choose).
#[derive(Args, Clone, Debug)]
struct ReadDbArgs {
    /// Database: a SQLite file path, or a PostgreSQL URL
    /// (`postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE`).
    #[arg(long, env = "PHASM_DB", default_value = "phasm.db")]
    db: String,
}

impl ReadDbArgs {
    fn to_db_args(&self) -> DbArgs {
        DbArgs {
            db: self.db.clone(),
            sync: cmd::SyncMode::Full,
        }
    }
}

/// What a new instance starts with.
#[derive(Args, Clone, Debug)]
struct StartArgs {
    /// The machine file.
    file: PathBuf,
    /// The machine to start (needed when the file has several).
    #[arg(long, short)]
    machine: Option<String>,
    /// The initial context, a JSON object.
    #[arg(long)]
    context: Option<String>,
    /// A context value, converted by the machine's `context_types`; repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Name the instance (starting an existing name again changes nothing).
    #[arg(long)]
    name: Option<String>,
    /// Start on this deployed version of the machine (default: the latest; `phasm versions`
    /// lists them).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    version: Option<u32>,
    /// Largest context allowed, in bytes of JSON.
    #[arg(long, default_value_t = phasm::engine::DEFAULT_MAX_CONTEXT_BYTES)]
    max_context_bytes: usize,
    #[command(flatten)]
    db: DbArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Check machine files and report every problem with its file, line and column.
    Validate {
        /// Machine files (each is checked with the files it imports).
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Also report action names that have no `exec` binding under `actions:`.
        #[arg(long)]
        strict: bool,
        /// Fail (exit 2) on warnings too.
        #[arg(long)]
        deny_warnings: bool,
    },
    /// Draw a machine as Graphviz DOT, Mermaid or SVG.
    Graph {
        /// A machine file; or, read from the database, `MACHINE` (its latest version),
        /// `MACHINE@N` (version N), or an instance (the version it runs on, with the states
        /// its branches are in highlighted).
        file: PathBuf,
        /// The machine to draw (needed when the file has more than one).
        #[arg(long, short)]
        machine: Option<String>,
        /// Output format.
        #[arg(long, short, value_enum, default_value_t = Format::Svg)]
        format: Format,
        /// Write to this file instead of standard output.
        #[arg(long, short)]
        output: Option<PathBuf>,
        #[command(flatten)]
        db: ReadDbArgs,
    },
    /// Start an instance and work it to the end with an embedded worker.
    Run {
        #[command(flatten)]
        start: StartArgs,
        /// Print a JSON object with the result as the last line.
        #[arg(long)]
        json: bool,
        /// Most steps running at once.
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
    },
    /// Queue an instance for a worker and print its name (with `--contexts`, one instance per
    /// line of a JSON Lines file, their names one per line).
    Start {
        #[command(flatten)]
        start: StartArgs,
        /// Start one instance per line of this JSON Lines file (`-`: standard input), each
        /// line a context object or `{"name": NAME, "context": {...}}`, in transactions of
        /// 10,000; every line is checked first. Each committed transaction's names are
        /// printed at once. Starting the same file again starts nothing twice: a line
        /// without a name is named from the file's content and its line number.
        #[arg(long, value_name = "FILE.jsonl", conflicts_with_all = ["name", "context", "set"])]
        contexts: Option<PathBuf>,
        /// With --contexts: name the lines without a name `MACHINE-KEY-LINE` instead of
        /// from the file's content (give a new key to start the same file anew).
        #[arg(long, requires = "contexts")]
        key: Option<String>,
    },
    /// Work on every instance of the file's machines until stopped (SIGINT/SIGTERM finish the
    /// running steps, then exit).
    Worker {
        /// The machine files (deployed first; each keeps its own action bindings). Without
        /// one, the worker works on what the database has deployed: the latest version of
        /// every machine.
        files: Vec<PathBuf>,
        /// Only tasks of these queues (comma-separated).
        #[arg(long, value_delimiter = ',')]
        queues: Option<Vec<String>>,
        /// Most steps running at once.
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        /// Work only on tasks of this worker pool (a transition's `target`); repeatable.
        /// Without it, the worker takes only tasks that name no target.
        #[arg(long = "target", value_name = "NAME")]
        targets: Vec<String>,
        /// Lease of a claimed task, renewed while it runs; a dead worker's tasks run again
        /// after it expires.
        #[arg(long, default_value = "30s", value_parser = cmd::parse_duration)]
        lease: std::time::Duration,
        /// Largest context allowed, in bytes of JSON.
        #[arg(long, default_value_t = phasm::engine::DEFAULT_MAX_CONTEXT_BYTES)]
        max_context_bytes: usize,
        /// Print nothing per step (by default each committed step and each retry is a
        /// line on stderr).
        #[arg(long, short)]
        quiet: bool,
        #[command(flatten)]
        db: DbArgs,
    },
    /// Run a worker and the HTTP API in one process.
    Serve {
        /// The machine files (deployed first; each keeps its own action bindings). Without
        /// one, the server works on what the database has deployed: the latest version of
        /// every machine.
        files: Vec<PathBuf>,
        /// Address to listen on. Any address other than loopback needs --token.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: std::net::SocketAddr,
        /// Require `Authorization: Bearer TOKEN` on every API call. On the command line the
        /// token is visible to every local user (in `ps`): prefer --token-file or PHASM_TOKEN.
        #[arg(long, env = "PHASM_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// Read the token from this file (its first line; keep the file private).
        #[arg(long, env = "PHASM_TOKEN_FILE", conflicts_with = "token")]
        token_file: Option<PathBuf>,
        /// Also answer to this `Host` name (repeatable); on loopback only `localhost`,
        /// `127.0.0.1` and `[::1]` are served otherwise.
        #[arg(long = "allow-host", value_name = "NAME")]
        allow_hosts: Vec<String>,
        /// A reverse proxy's address whose `X-Forwarded-For` names the client (repeatable):
        /// wrong tokens are then throttled per forwarded address, not per proxy.
        #[arg(long = "trusted-proxy", value_name = "IP")]
        trusted_proxies: Vec<std::net::IpAddr>,
        /// Most events an instance keeps before a wait takes them; one more is refused (409).
        #[arg(long, default_value_t = phasm::engine::DEFAULT_MAX_KEPT_EVENTS)]
        max_kept_events: usize,
        /// Most steps running at once.
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        /// Every hour, delete instances that ended longer ago than this (as `phasm scrub`).
        #[arg(long, value_parser = cmd::parse_duration)]
        scrub_older_than: Option<std::time::Duration>,
        #[command(flatten)]
        db: DbArgs,
    },
    /// Delete ended instances (with their history and logs) older than a cutoff, then the
    /// deployed versions no instance is left on (never the latest of a machine).
    Scrub {
        /// Age of the instances to delete, counted from when they ended (`30d`, `12h`).
        #[arg(long, value_parser = cmd::parse_duration)]
        older_than: std::time::Duration,
        /// Instances deleted per transaction.
        #[arg(long, default_value_t = 1000)]
        batch: usize,
        #[command(flatten)]
        db: DbArgs,
    },
    /// Show an instance: status, history, pending tasks, context.
    Status {
        /// The instance's name.
        instance: String,
        /// As JSON.
        #[arg(long)]
        json: bool,
        /// Every committed transition, not only the latest 100.
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        db: ReadDbArgs,
    },
    /// The schedules of a machine file: when each last fired, what it started, when it
    /// fires next.
    Schedules {
        /// The machine file. Without it, the schedules of the latest deployed versions (the
        /// ones workers fire).
        file: Option<PathBuf>,
        /// As JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        db: ReadDbArgs,
    },
    /// Store each machine of the files whose definition changed as its next version (every
    /// file is validated first; one that fails changes nothing). `worker`, `serve` and `run`
    /// deploy their file themselves.
    Deploy {
        /// The machine files.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        #[command(flatten)]
        db: DbArgs,
    },
    /// The deployed versions of a machine (of every machine without one), oldest first.
    Versions {
        /// The machine.
        machine: Option<String>,
        /// As JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        db: ReadDbArgs,
    },
    /// What changed between two deployed versions of a machine: its states, transitions,
    /// action bindings, queue limits, python section, schedules and settings, each added
    /// (+), removed (-) or changed (~).
    Diff {
        /// The machine.
        machine: String,
        /// The older version.
        from: u32,
        /// The newer version.
        to: u32,
        /// As JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        db: ReadDbArgs,
    },
    /// Move instances to a later version of their machine: each only if every state its
    /// branches are in, and every pending step's transition, exists in the target (directly
    /// or renamed with --map), and no step of it is running. Exit 1 if one did not move.
    #[command(group(clap::ArgGroup::new("which").required(true).args(["instances", "machine"])))]
    Upgrade {
        /// The instances.
        instances: Vec<String>,
        /// Every running or failed instance of this machine on the --from version.
        #[arg(long, requires = "from", conflicts_with = "instances")]
        machine: Option<String>,
        /// The version they are on (with --machine).
        #[arg(long, value_name = "N", requires = "machine")]
        from: Option<u32>,
        /// The version to move to (default: the latest).
        #[arg(long, value_name = "V")]
        to: Option<u32>,
        /// Rename a state on the way (repeatable): `--map approval=review`.
        #[arg(long = "map", value_name = "OLD=NEW")]
        map: Vec<String>,
        /// Say what would move, and move nothing.
        #[arg(long)]
        dry_run: bool,
        /// As JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        db: DbArgs,
    },
    /// The steps waiting in each queue: due, scheduled, running, how long the oldest due one
    /// waited (with --file, also each queue's limits and the empty queues that have them).
    Queues {
        /// The machine file whose `queues:` limits to show (without it, the limits of the
        /// latest deployed versions, if any).
        #[arg(long)]
        file: Option<PathBuf>,
        /// As JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        db: ReadDbArgs,
    },
    /// The workers running now (on any host sharing the database) and what they take.
    Workers {
        /// As JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        db: ReadDbArgs,
    },
    /// List instances, newest first.
    List {
        /// Only this machine.
        #[arg(long, short)]
        machine: Option<String>,
        /// Only names that start with this text.
        #[arg(long)]
        prefix: Option<String>,
        /// Only this status (running, completed, failed, halted, cancelled).
        #[arg(long)]
        status: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// As JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        db: ReadDbArgs,
    },
    /// Show an instance's log.
    Logs {
        /// The instance's name.
        instance: String,
        #[command(flatten)]
        db: ReadDbArgs,
    },
    /// Send an event to an instance waiting for it (`wait:` states): `phasm send INSTANCE
    /// EVENT`, or `phasm send --token TOKEN EVENT` for the one wait a token addresses. An
    /// event no branch waits for yet is kept for the next wait that accepts it.
    Send {
        /// `INSTANCE EVENT`, or `EVENT` with --token.
        #[arg(required = true, num_args = 1..=2, value_name = "INSTANCE EVENT")]
        args: Vec<String>,
        /// A JSON object merged into the waiting branch's context (top-level keys replace).
        #[arg(long)]
        data: Option<String>,
        /// An id for this event: sending the same id to the instance again changes nothing.
        #[arg(long)]
        id: Option<String>,
        /// A wait token (from an entry action's `wait_token`) instead of an instance name.
        #[arg(long)]
        token: Option<String>,
        /// The machine file: checks that a waiting state of the instance's machine accepts
        /// the event (otherwise nothing could ever take it).
        #[arg(long)]
        file: Option<PathBuf>,
        /// Most events an instance keeps before a wait takes them; one more is refused.
        #[arg(long, default_value_t = phasm::engine::DEFAULT_MAX_KEPT_EVENTS)]
        max_kept_events: usize,
        #[command(flatten)]
        db: DbArgs,
    },
    /// Resume a failed instance: its failed steps run again.
    Retry {
        /// The instance's name.
        instance: String,
        #[command(flatten)]
        db: DbArgs,
    },
    /// Run an instance again from a step of its history (its pending work is dropped).
    ///
    /// The step (an id from `phasm status`'s history, or the console's) runs again with the
    /// context it was given, whatever the instance's status. Only a step of the main line,
    /// not of a forked branch, and not a fan-in's join.
    Reset {
        /// The instance's name.
        instance: String,
        /// The step to run again: its id in the history.
        #[arg(long)]
        step: i64,
        /// The machine file, for an instance started before its machine was ever deployed
        /// (the step is built again from the version the instance runs on, as stored).
        #[arg(long)]
        file: Option<PathBuf>,
        #[command(flatten)]
        db: DbArgs,
    },
    /// Cancel a running or failed instance.
    Cancel {
        /// The instance's name.
        instance: String,
        /// Why: kept as the instance's error, shown by `status` and the console.
        #[arg(long)]
        reason: Option<String>,
        #[command(flatten)]
        db: DbArgs,
    },
    /// Measure phasm on this machine.
    Bench {
        #[command(subcommand)]
        bench: cmd::bench::Bench,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Dot,
    Mermaid,
    Svg,
}

fn main() -> ExitCode {
    output::init_tracing();
    let cli = Cli::parse();
    match cli.command {
        Command::Validate {
            files,
            strict,
            deny_warnings,
        } => cmd::files::validate(&files, strict, deny_warnings),
        Command::Graph {
            file,
            machine,
            format,
            output,
            ..
        } if names_a_file(&file) => {
            cmd::files::draw(&file, machine.as_deref(), format, output.as_deref())
        }
        other => runtime().map_or_else(
            |e| exit::failed(format!("cannot start the async runtime: {e}")),
            |rt| rt.block_on(run_async(other)),
        ),
    }
}

/// Whether `phasm graph`'s argument is a machine file (it exists, or it is written as a path
/// or a YAML file name) rather than a machine or an instance in the database.
fn names_a_file(target: &std::path::Path) -> bool {
    target.exists()
        || target.components().count() > 1
        || target
            .extension()
            .is_some_and(|e| e == "yaml" || e == "yml")
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
}

async fn run_async(command: Command) -> ExitCode {
    match command {
        Command::Run {
            start,
            json,
            concurrency,
        } => cmd::run::run(&start, json, concurrency).await,
        Command::Start {
            start,
            contexts,
            key,
        } => match contexts {
            Some(path) => cmd::run::start_lines(&start, &path, key.as_deref()).await,
            None => cmd::run::start(&start).await,
        },
        Command::Worker {
            files,
            queues,
            targets,
            concurrency,
            lease,
            max_context_bytes,
            quiet,
            db,
        } => {
            let options = cmd::run::WorkerArgs {
                queues,
                targets,
                concurrency,
                lease,
                max_context_bytes,
                quiet,
            };
            cmd::run::worker(&files, options, &db).await
        }
        Command::Serve {
            files,
            listen,
            token,
            token_file,
            allow_hosts,
            trusted_proxies,
            max_kept_events,
            concurrency,
            scrub_older_than,
            db,
        } => {
            let settings = cmd::run::ServeSettings {
                listen,
                token,
                token_file,
                allow_hosts,
                trusted_proxies,
                max_kept_events,
                concurrency,
                scrub_older_than,
            };
            cmd::run::serve(&files, settings, &db).await
        }
        Command::Scrub {
            older_than,
            batch,
            db,
        } => cmd::inspect::scrub(older_than, batch, &db).await,
        Command::Workers { json, db } => cmd::inspect::workers(json, &db.to_db_args()).await,
        Command::Deploy { files, db } => cmd::versions::run(&files, &db).await,
        Command::Versions { machine, json, db } => {
            cmd::versions::list(machine.as_deref(), json, &db.to_db_args()).await
        }
        Command::Diff {
            machine,
            from,
            to,
            json,
            db,
        } => cmd::versions::diff(&machine, from, to, json, &db.to_db_args()).await,
        Command::Upgrade {
            instances,
            machine,
            from,
            to,
            map,
            dry_run,
            json,
            db,
        } => {
            let which = match (machine, from) {
                (Some(machine), Some(from)) => {
                    phasm::control::UpgradeWhich::Machine { machine, from }
                }
                _ => phasm::control::UpgradeWhich::Instances(instances),
            };
            cmd::versions::upgrade(which, to, &map, dry_run, json, &db).await
        }
        Command::Queues { file, json, db } => {
            cmd::inspect::queues(file.as_deref(), json, &db.to_db_args()).await
        }
        Command::Schedules { file, json, db } => {
            cmd::schedules::schedules(file.as_deref(), json, &db.to_db_args()).await
        }
        Command::Status {
            instance,
            json,
            all,
            db,
        } => cmd::inspect::status(&instance, json, all, &db.to_db_args()).await,
        Command::List {
            machine,
            prefix,
            status,
            limit,
            json,
            db,
        } => {
            cmd::inspect::list(
                machine,
                prefix,
                status.as_deref(),
                limit,
                json,
                &db.to_db_args(),
            )
            .await
        }
        Command::Logs { instance, db } => cmd::inspect::logs(&instance, &db.to_db_args()).await,
        Command::Retry { instance, db } => cmd::inspect::retry(&instance, &db).await,
        Command::Reset {
            instance,
            step,
            file,
            db,
        } => cmd::inspect::reset(&instance, step, file.as_deref(), &db).await,
        Command::Send {
            args,
            data,
            id,
            token,
            file,
            max_kept_events,
            db,
        } => {
            let send = cmd::send::SendArgs {
                args,
                data,
                id,
                token,
                file,
                max_kept_events,
            };
            cmd::send::send(send, &db).await
        }
        Command::Cancel {
            instance,
            reason,
            db,
        } => cmd::inspect::cancel(&instance, reason.as_deref(), &db).await,
        Command::Bench { bench } => cmd::bench::run(bench).await,
        Command::Graph {
            file,
            format,
            output,
            db,
            ..
        } => {
            cmd::versions::draw(
                &file.to_string_lossy(),
                format,
                output.as_deref(),
                &db.to_db_args(),
            )
            .await
        }
        Command::Validate { .. } => exit::invalid_reported(),
    }
}
