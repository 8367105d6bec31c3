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

/// Deploy `config`, loaded from `path`, before working on it; new versions are logged. The
/// definition hash of each machine deployed, for the worker's
/// [`phasm::worker::WorkerOptions::own_hashes`].
pub(crate) async fn deploy_loaded(
    store: &dyn Store,
    config: &Config,
    path: &Path,
) -> Result<HashMap<String, String>, ExitCode> {
    let source = std::fs::read_to_string(path)
        .map_err(|e| exit::invalid(format!("cannot read `{}`: {e}", path.display())))?;
    let file = DeployFile {
        config,
        path,
        source: &source,
    };
    match deploy(store, &SystemClock, &[file]).await {
        Ok(deployed) => {
            for d in deployed.iter().filter(|d| d.new) {
                tracing::info!(machine = %d.machine, version = d.version, "deployed a new version");
            }
            Ok(definitions(config)
                .into_iter()
                .map(|d| (d.machine, d.hash))
                .collect())
        }
        Err(e) => Err(failed(e)),
    }
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
    match deploy(&*store, &SystemClock, &deploys).await {
        Ok(deployed) => {
            for d in deployed {
                let what = if d.new { "new" } else { "unchanged" };
                outln!("{} v{} ({what})", d.machine, d.version);
            }
            ExitCode::SUCCESS
        }
        Err(e) => failed(e),
    }
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
    if json_out {
        let rows: Vec<_> = versions
            .iter()
            .map(|v| {
                json!({
                    "machine": v.machine,
                    "version": v.version,
                    "hash": v.hash,
                    "path": v.path,
                    "deployed_at": phasm::clock::rfc3339(v.deployed_at),
                })
            })
            .collect();
        outln!("{}", serde_json::Value::from(rows));
        return ExitCode::SUCCESS;
    }
    if versions.is_empty() {
        outln!("no versions deployed");
        return ExitCode::SUCCESS;
    }
    for v in &versions {
        outln!(
            "{} v{}  {}  {}  {}",
            v.machine,
            v.version,
            time(v.deployed_at),
            &v.hash[..v.hash.len().min(12)],
            v.path
        );
    }
    ExitCode::SUCCESS
}
