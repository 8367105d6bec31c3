//! Deploying machine files: each machine whose definition changed becomes its next stored
//! version (`phasm deploy`, and `worker`, `serve` and `run` before they work).

use std::path::Path;

use crate::clock::Clock;
use crate::config::definitions;
use crate::machine::Config;
use crate::store::{Deployed, NewVersion, Store, StoreError};

/// One loaded machine file to deploy.
#[derive(Debug, Clone, Copy)]
pub struct DeployFile<'a> {
    /// The validated configuration it loaded to.
    pub config: &'a Config,
    /// Where it was read from.
    pub path: &'a Path,
    /// Its text, as written.
    pub source: &'a str,
}

/// Why files could not be deployed.
#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    /// Two files define the same machine: which one would be its version is unclear.
    #[error("machine `{machine}` is defined in both `{first}` and `{second}`: deploy one of them, or rename one machine")]
    Twice {
        /// The machine.
        machine: String,
        /// One file.
        first: String,
        /// The other.
        second: String,
    },
    /// The store failed; nothing was stored.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Store every machine of `files` whose definition changed as its next version, in one
/// transaction (all of them, or none); answers per machine, in file order.
///
/// # Errors
/// See [`DeployError`].
pub async fn deploy(
    store: &dyn Store,
    clock: &dyn Clock,
    files: &[DeployFile<'_>],
) -> Result<Vec<Deployed>, DeployError> {
    let mut versions: Vec<NewVersion> = Vec::new();
    let mut seen: Vec<(String, String)> = Vec::new();
    for file in files {
        let path = file.path.display().to_string();
        for d in definitions(file.config) {
            if let Some((_, first)) = seen.iter().find(|(m, _)| *m == d.machine) {
                return Err(DeployError::Twice {
                    machine: d.machine,
                    first: first.clone(),
                    second: path,
                });
            }
            seen.push((d.machine.clone(), path.clone()));
            versions.push(NewVersion {
                machine: d.machine,
                hash: d.hash,
                definition: d.yaml,
                source: file.source.to_string(),
                path: path.clone(),
            });
        }
    }
    Ok(store.deploy(clock.now(), &versions).await?)
}
