//! `phasm deploy` (store each changed machine of the files as its next version) and `phasm
//! versions` (list them); `worker`, `serve` and `run` deploy their file first.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use phasm::clock::SystemClock;
use phasm::config::definitions;
use phasm::control::{deploy, DeployError, DeployFile};
use phasm::machine::Config;
use phasm::store::Store;
use serde_json::json;

use super::files::load_with_sites;
use crate::output::{outln, time};
use crate::{db, exit, DbArgs};

/// What deploying a worker's file said: each machine's definition hash (for the worker's
/// [`phasm::worker::WorkerOptions::own_hashes`]) and the version its content is.
pub(crate) struct OwnVersions {
    pub hashes: HashMap<String, String>,
    pub versions: HashMap<String, u32>,
}

/// Deploy `config`, loaded from `path`, before working on it; new versions are logged, and a
/// file whose content is an older version than the latest is warned about (new instances
/// start on the latest).
pub(crate) async fn deploy_loaded(
    store: &dyn Store,
    config: &Config,
    path: &Path,
) -> Result<OwnVersions, ExitCode> {
    let source = std::fs::read_to_string(path)
        .map_err(|e| exit::invalid(format!("cannot read `{}`: {e}", path.display())))?;
    let file = DeployFile {
        config,
        path,
        source: &source,
    };
    let deployed = match phasm::control::deploy_for_work(store, &SystemClock, &[file]).await {
        Ok(deployed) => deployed,
        Err(e) => return Err(failed(e)),
    };
    for d in &deployed {
        if d.new {
            tracing::info!(machine = %d.machine, version = d.version, "deployed a new version");
            continue;
        }
        let latest = store
            .versions(Some(&d.machine))
            .await
            .ok()
            .and_then(|v| v.last().map(|r| r.version));
        if let Some(latest) = latest.filter(|l| *l > d.version) {
            eprintln!(
                "warning: `{}` holds {} v{}, but v{latest} is the latest deployed: new instances start on v{latest}, and this process runs steps of both (`phasm deploy {}` makes this file's content the latest again)",
                path.display(),
                d.machine,
                d.version,
                path.display()
            );
        }
    }
    Ok(OwnVersions {
        hashes: definitions(config)
            .into_iter()
            .map(|d| (d.machine, d.hash))
            .collect(),
        versions: deployed
            .into_iter()
            .map(|d| (d.machine, d.version))
            .collect(),
    })
}

/// The exit for a deploy that failed: the database's fault, or the files'.
fn failed(e: DeployError) -> ExitCode {
    match e {
        DeployError::Store(e) => exit::database(e),
        e => exit::invalid(e),
    }
}

/// `phasm deploy FILE...`: every file is validated first (one that fails changes nothing);
/// then each machine whose definition changed is stored as its next version, all in one
/// transaction. Prints each machine's version, new or unchanged.
pub async fn run(files: &[PathBuf], db_args: &DbArgs) -> ExitCode {
    let mut loaded = Vec::new();
    for path in files {
        let Some((config, _)) = load_with_sites(path) else {
            return exit::invalid_reported();
        };
        let source = match std::fs::read_to_string(path) {
            Ok(s) => s,
            Err(e) => return exit::invalid(format!("cannot read `{}`: {e}", path.display())),
        };
        loaded.push((config, path, source));
    }
    let store = match db::open(db_args, 2).await {
        Ok(s) => s,
        Err(e) => return exit::database(e),
    };
    let deploys: Vec<DeployFile<'_>> = loaded
        .iter()
        .map(|(config, path, source)| DeployFile {
            config,
            path,
            source,
        })
        .collect();
    let deployed = match deploy(&*store, &SystemClock, &deploys).await {
        Ok(deployed) => deployed,
        Err(e) => return failed(e),
    };
    for d in &deployed {
        let what = if d.new { "new" } else { "unchanged" };
        outln!("{} v{} ({what})", d.machine, d.version);
    }
    // Machines deployed before but not in these files keep their versions; say which still
    // have instances on them.
    match store.version_counts(None).await {
        Ok(counts) => {
            let mut absent: std::collections::BTreeMap<&str, u64> = Default::default();
            for c in counts
                .iter()
                .filter(|c| !deployed.iter().any(|d| d.machine == c.machine))
            {
                *absent.entry(&c.machine).or_default() += c.running + c.failed;
            }
            for (machine, live) in absent {
                let verb = if live == 1 { "runs" } else { "run" };
                outln!(
                    "{machine}: not in these files; its versions stay, and {} still {verb} on them",
                    crate::output::count(live, "instance")
                );
            }
        }
        Err(e) => tracing::warn!(error = %e, "counting the instances of other machines failed"),
    }
    ExitCode::SUCCESS
}

/// `phasm versions [MACHINE]`: each stored version, oldest first.
pub async fn list(machine: Option<&str>, json_out: bool, db_args: &DbArgs) -> ExitCode {
    let store = match super::inspect::open_db(db_args, phasm::store::Access::ReadOnly).await {
        Ok(s) => s,
        Err(code) => return code,
    };
    let versions = match store.versions(machine).await {
        Ok(v) => v,
        Err(e) => return exit::database(e),
    };
    let counts = match store.version_counts(machine).await {
        Ok(c) => c,
        Err(e) => return exit::database(e),
    };
    if json_out {
        let rows: Vec<_> = versions
            .iter()
            .map(|v| phasm::control::version_json(v, &counts))
            .collect();
        outln!("{}", serde_json::Value::from(rows));
        return ExitCode::SUCCESS;
    }
    if versions.is_empty() {
        outln!("no versions deployed");
        return ExitCode::SUCCESS;
    }
    for v in &versions {
        let live = counts
            .iter()
            .find(|c| c.machine == v.machine && c.version == v.version)
            .map_or("no instances".to_string(), |c| {
                format!(
                    "{} running ({} waiting), {} failed",
                    c.running, c.waiting, c.failed
                )
            });
        outln!(
            "{} v{}  {}  {}  {}  {live}",
            v.machine,
            v.version,
            time(v.deployed_at),
            &v.hash[..v.hash.len().min(12)],
            v.path
        );
    }
    ExitCode::SUCCESS
}

/// `phasm upgrade`: one line per instance (moved, or why not); exit 1 when one did not move.
pub async fn upgrade(
    which: phasm::control::UpgradeWhich,
    to: Option<u32>,
    map: &[String],
    dry_run: bool,
    as_json: bool,
    db_args: &DbArgs,
) -> ExitCode {
    let mut renames = std::collections::BTreeMap::new();
    for pair in map {
        match pair.split_once('=') {
            Some((old, new)) if !old.is_empty() && !new.is_empty() => {
                if renames.insert(old.to_string(), new.to_string()).is_some() {
                    return exit::invalid(format!("--map renames `{old}` twice"));
                }
            }
            _ => {
                return exit::invalid(format!(
                    "--map takes OLD=NEW (a state of the instance's version, and its name in the target), not `{pair}`"
                ))
            }
        }
    }
    let store = match db::open(db_args, 2).await {
        Ok(s) => s,
        Err(e) => return exit::database(e),
    };
    let options = phasm::control::UpgradeOptions {
        to,
        map: renames,
        dry_run,
    };
    let reports = match phasm::control::upgrade(&*store, &SystemClock, &which, &options).await {
        Ok(reports) => reports,
        Err(phasm::control::UpgradeError::Store(e)) => return exit::database(e),
        Err(e) => return exit::failed(e),
    };
    let all_moved = reports.iter().all(phasm::control::UpgradeReport::moved);
    if as_json {
        let list: Vec<serde_json::Value> = reports
            .iter()
            .map(|r| {
                json!({
                    "instance": r.instance,
                    "from": r.from,
                    "to": r.to,
                    "moved": r.moved(),
                    "dry_run": dry_run,
                    "message": r.describe(dry_run),
                })
            })
            .collect();
        outln!("{}", serde_json::Value::Array(list));
    } else {
        if reports.is_empty() {
            outln!("no instance to move");
        }
        for r in &reports {
            outln!("{}", r.describe(dry_run));
        }
    }
    if all_moved {
        ExitCode::SUCCESS
    } else {
        exit::failed_reported()
    }
}

/// `phasm diff MACHINE FROM TO`: one line per difference (`+`, `-`, `~`), or that there is
/// none.
pub async fn diff(machine: &str, from: u32, to: u32, as_json: bool, db_args: &DbArgs) -> ExitCode {
    let store = match super::inspect::open_db(db_args, phasm::store::Access::ReadOnly).await {
        Ok(s) => s,
        Err(code) => return code,
    };
    let mut configs = Vec::with_capacity(2);
    for n in [from, to] {
        let stored = match store.version(machine, n).await {
            Ok(Some(stored)) => stored,
            Ok(None) => {
                let known = match store.versions(Some(machine)).await {
                    Ok(v) => v,
                    Err(e) => return exit::database(e),
                };
                let known: Vec<u32> = known.iter().map(|r| r.version).collect();
                return exit::invalid(phasm::control::no_such_version(machine, n, &known));
            }
            Err(e) => return exit::database(e),
        };
        match phasm::config::load_definition(machine, n, &stored.definition, &stored.record.path) {
            Ok(loaded) => configs.push(loaded.config),
            Err(e) => return exit::failed(e),
        }
    }
    let changes = phasm::config::diff(&configs[0], &configs[1], machine);
    if as_json {
        let list: Vec<serde_json::Value> = changes
            .iter()
            .map(|c| json!({ "change": c.kind.as_str(), "what": c.what, "how": c.how }))
            .collect();
        outln!("{}", serde_json::Value::Array(list));
    } else if changes.is_empty() {
        outln!("{machine} v{from} and v{to} do not differ");
    } else {
        for c in &changes {
            outln!("{c}");
        }
    }
    ExitCode::SUCCESS
}

/// `phasm graph TARGET` when TARGET is not a file: `MACHINE`, `MACHINE@N` or an instance,
/// drawn from the version stored in the database.
pub async fn draw(
    target: &str,
    format: crate::Format,
    output: Option<&Path>,
    db_args: &DbArgs,
) -> ExitCode {
    let store = match super::inspect::open_db(db_args, phasm::store::Access::ReadOnly).await {
        Ok(s) => s,
        Err(code) => return code,
    };
    // An instance first (its version, and where its branches are), then a machine.
    let (machine, version, here) = match target.split_once('@') {
        Some((machine, n)) => match n.trim_start_matches('v').parse::<u32>() {
            Ok(n) => (machine.to_string(), Some(n), Vec::new()),
            Err(_) => return exit::invalid(format!("`{n}` is not a version number (1, 2, …)")),
        },
        None => match store.instance(target).await {
            Ok(Some(view)) => {
                let Some(n) = view.version else {
                    return exit::invalid(format!(
                        "instance `{target}` records no version (its machine `{}` was never deployed): draw the machine file with `phasm graph FILE`",
                        view.machine
                    ));
                };
                let mut here: Vec<String> =
                    view.tasks.iter().filter_map(|t| t.from.clone()).collect();
                here.sort();
                here.dedup();
                (view.machine, Some(n), here)
            }
            Ok(None) => (target.to_string(), None, Vec::new()),
            Err(e) => return exit::database(e),
        },
    };
    let versions = match store.versions(Some(&machine)).await {
        Ok(v) => v,
        Err(e) => return exit::database(e),
    };
    let Some(n) = version.or_else(|| versions.last().map(|v| v.version)) else {
        return exit::invalid(format!(
            "`{target}` is not a file, an instance, or a deployed machine (`phasm versions` lists the deployed machines)"
        ));
    };
    let stored = match store.version(&machine, n).await {
        Ok(Some(v)) => v,
        Ok(None) => {
            let known: Vec<u32> = versions.iter().map(|r| r.version).collect();
            return exit::invalid(phasm::control::no_such_version(&machine, n, &known));
        }
        Err(e) => return exit::database(e),
    };
    let loaded = match phasm::config::load_definition(
        &machine,
        n,
        &stored.definition,
        &stored.record.path,
    ) {
        Ok(l) => l,
        Err(e) => return exit::failed(e),
    };
    let Some(m) = loaded.config.machine(&machine) else {
        return exit::failed(format!("`{machine}` v{n} is not in its stored definition"));
    };
    let text = match format {
        crate::Format::Dot => phasm::graph::to_dot(m),
        crate::Format::Mermaid => phasm::graph::to_mermaid(m),
        crate::Format::Svg if here.is_empty() => phasm::graph::to_svg(m),
        crate::Format::Svg => {
            let here: Vec<&str> = here.iter().map(String::as_str).collect();
            phasm::graph::to_svg_annotated(m, &here, &[])
        }
    };
    super::files::write_out(&text, output)
}
