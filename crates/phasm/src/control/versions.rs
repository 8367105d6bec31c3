//! Deploying machine files: each machine whose definition changed becomes its next stored
//! version (`phasm deploy`, and `worker`, `serve` and `run` before they work).

use std::collections::BTreeMap;
use std::path::Path;

use crate::clock::Clock;
use crate::config::{definitions, load_definition};
use crate::machine::{Config, Machine};
use crate::store::{
    Deployed, InstanceStatus, ListFilter, NewVersion, Store, StoreError, UpgradeRequest, Upgraded,
    VersionCounts, VersionRecord,
};

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
    deploy_as(store, clock, files, false).await
}

/// [`deploy`] for a process about to work on `files` (`worker`, `serve`, `run`): a machine
/// whose definition is stored already, as any version, keeps its versions as they are (see
/// [`NewVersion::if_unknown`]); only new content becomes the latest version.
///
/// # Errors
/// See [`DeployError`].
pub async fn deploy_for_work(
    store: &dyn Store,
    clock: &dyn Clock,
    files: &[DeployFile<'_>],
) -> Result<Vec<Deployed>, DeployError> {
    deploy_as(store, clock, files, true).await
}

async fn deploy_as(
    store: &dyn Store,
    clock: &dyn Clock,
    files: &[DeployFile<'_>],
    if_unknown: bool,
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
                if_unknown,
            });
        }
    }
    Ok(store.deploy(clock.now(), &versions).await?)
}

/// Which instances an upgrade moves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpgradeWhich {
    /// These, by name.
    Instances(Vec<String>),
    /// Every running or failed instance of `machine` on version `from`.
    Machine {
        /// The machine.
        machine: String,
        /// The version they are on.
        from: u32,
    },
}

/// How an upgrade moves them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UpgradeOptions {
    /// The version they move to (`None`: the latest of their machine).
    pub to: Option<u32>,
    /// States renamed on the way (`OLD → NEW`).
    pub map: BTreeMap<String, String>,
    /// Check only: say what would move, and move nothing.
    pub dry_run: bool,
}

/// What became of one instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpgradeReport {
    /// The instance.
    pub instance: String,
    /// Its version before (`None`: unknown instance, or never pinned).
    pub from: Option<u32>,
    /// The version it was to move to.
    pub to: Option<u32>,
    /// Moved (or would move, on a dry run), or why not.
    pub outcome: Result<Upgraded, String>,
}

impl UpgradeReport {
    /// Whether it moved (or would).
    pub fn moved(&self) -> bool {
        matches!(self.outcome, Ok(Upgraded::Moved { .. }))
    }

    /// One line saying what became of it: `NAME: v1 → v2` or `NAME: not moved: WHY`.
    pub fn describe(&self, dry_run: bool) -> String {
        let arrow = match (self.from, self.to) {
            (Some(f), Some(t)) => format!("v{f} → v{t}"),
            _ => String::new(),
        };
        let why = match &self.outcome {
            Ok(Upgraded::Moved { .. }) if dry_run => {
                return format!("{}: would move {arrow}", self.instance)
            }
            Ok(Upgraded::Moved { .. }) => return format!("{}: moved {arrow}", self.instance),
            Ok(Upgraded::NotFound) => "no instance has this name".to_string(),
            Ok(Upgraded::Ended(status)) => format!("it is {status}"),
            Ok(Upgraded::OnVersion(v)) => format!(
                "it is on {} now",
                v.map_or("no version".to_string(), |v| format!("v{v}"))
            ),
            Ok(Upgraded::StepRunning) => {
                "a step of it is running: try again once it has committed".to_string()
            }
            Ok(Upgraded::Refused(reasons)) => reasons.join("; "),
            Err(why) => why.clone(),
        };
        format!("{}: not moved: {why}", self.instance)
    }
}

/// Why an upgrade could not be tried at all.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    /// The version to move to is not stored, or is not later.
    #[error("{0}")]
    Invalid(String),
    /// The target's stored definition cannot be read by this phasm.
    #[error(transparent)]
    Unreadable(#[from] crate::config::UnreadableDefinition),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Move instances to a later version of their machine, one transaction each
/// ([`AdminStore::upgrade`](crate::store::AdminStore::upgrade)): each is moved only if every
/// place its branches are in exists in the target, directly or renamed by `options.map`,
/// and no step of it is running; the answer says, per instance, what became of it. Moving to
/// an earlier version, or to the one an instance is on, is refused.
///
/// # Errors
/// See [`UpgradeError`]; a store failure part way leaves the instances already moved moved.
pub async fn upgrade(
    store: &dyn Store,
    clock: &dyn Clock,
    which: &UpgradeWhich,
    options: &UpgradeOptions,
) -> Result<Vec<UpgradeReport>, UpgradeError> {
    let names = match which {
        UpgradeWhich::Instances(names) => names.clone(),
        UpgradeWhich::Machine { machine, from } => instances_on(store, machine, *from).await?,
    };
    let mut targets: BTreeMap<(String, u32), Machine> = BTreeMap::new();
    let mut reports = Vec::with_capacity(names.len());
    for name in names {
        let Some(view) = store.instance(&name).await? else {
            reports.push(UpgradeReport {
                instance: name,
                from: None,
                to: options.to,
                outcome: Ok(Upgraded::NotFound),
            });
            continue;
        };
        let report = |to, outcome| UpgradeReport {
            instance: name.clone(),
            from: view.version,
            to,
            outcome,
        };
        let Some(from) = view.version else {
            let why = format!(
                "it records no version: `{}` was never deployed (`phasm deploy FILE`)",
                view.machine
            );
            reports.push(report(options.to, Err(why)));
            continue;
        };
        let to = match options.to {
            Some(to) => to,
            None => latest(store, &view.machine).await?.unwrap_or(from),
        };
        if to <= from {
            let why = if to == from {
                format!("it is on v{to} already")
            } else {
                format!("v{to} is older than v{from}: an instance only moves forward")
            };
            reports.push(report(Some(to), Err(why)));
            continue;
        }
        let key = (view.machine.clone(), to);
        if !targets.contains_key(&key) {
            let Some(stored) = store.version(&view.machine, to).await? else {
                let known: Vec<u32> = store
                    .versions(Some(&view.machine))
                    .await?
                    .iter()
                    .map(|r| r.version)
                    .collect();
                let why = no_such_version(&view.machine, to, &known);
                // Refused before anything moved: the whole request is bad.
                if reports.is_empty() {
                    return Err(UpgradeError::Invalid(why));
                }
                reports.push(report(Some(to), Err(why)));
                continue;
            };
            let loaded =
                load_definition(&view.machine, to, &stored.definition, &stored.record.path)?;
            let machine = loaded
                .config
                .machines
                .into_iter()
                .find(|m| m.name == view.machine);
            if let Some(machine) = machine {
                targets.insert(key.clone(), machine);
            }
        }
        let Some(target) = targets.get(&key) else {
            let why = format!("v{to} of `{}` does not define the machine", view.machine);
            reports.push(report(Some(to), Err(why)));
            continue;
        };
        let request = UpgradeRequest {
            instance: name.clone(),
            from,
            to,
            target: target.clone(),
            map: options.map.clone(),
            dry_run: options.dry_run,
        };
        let outcome = store.upgrade(clock.now(), &request).await?;
        reports.push(report(Some(to), Ok(outcome)));
    }
    Ok(reports)
}

/// The latest version of `machine`, if it was ever deployed.
async fn latest(store: &dyn Store, machine: &str) -> Result<Option<u32>, StoreError> {
    Ok(store
        .versions(Some(machine))
        .await?
        .last()
        .map(|r| r.version))
}

/// The running and failed instances of `machine` on version `version`, by name.
async fn instances_on(
    store: &dyn Store,
    machine: &str,
    version: u32,
) -> Result<Vec<String>, StoreError> {
    let mut names = Vec::new();
    for status in [InstanceStatus::Running, InstanceStatus::Failed] {
        let mut before = None;
        loop {
            let filter = ListFilter {
                machine: Some(machine.to_string()),
                version: Some(version),
                status: Some(status),
                limit: super::MAX_PAGE,
                before: before.take(),
                ..ListFilter::default()
            };
            let page = store.list(&filter).await?;
            let full = page.len() >= super::MAX_PAGE;
            before = page.last().map(|s| s.instance.clone());
            names.extend(page.into_iter().map(|s| s.instance));
            if !full {
                break;
            }
        }
    }
    Ok(names)
}

/// The JSON form of a version with its live instances (`counts` among those of
/// [`crate::store::ReadStore::version_counts`]; a version not among them has none).
pub fn version_json(v: &VersionRecord, counts: &[VersionCounts]) -> serde_json::Value {
    let c = counts
        .iter()
        .find(|c| c.machine == v.machine && c.version == v.version)
        .cloned()
        .unwrap_or_default();
    serde_json::json!({
        "machine": v.machine,
        "version": v.version,
        "hash": v.hash,
        "path": v.path,
        "deployed_at": crate::clock::rfc3339(v.deployed_at),
        "running": c.running,
        "waiting": c.waiting,
        "failed": c.failed,
    })
}

/// What a database has deployed: the latest version of every machine, gathered into one
/// configuration (`phasm worker` and `phasm serve` without a file work on it).
#[derive(Debug, Clone)]
pub struct DeployedConfig {
    /// The machines of the latest versions, with the bindings, queue limits and schedules
    /// they use. Where two machines bind the same action name differently, this holds one of
    /// them; each step still runs on its own version's bindings.
    pub config: Config,
    /// Each machine and its latest version, by machine.
    pub versions: Vec<(String, u32)>,
}

/// Why what is deployed cannot be worked on.
#[derive(Debug, thiserror::Error)]
pub enum DeployedError {
    /// The database holds no version at all.
    #[error("no machine is deployed in this database: give the machine FILE, or store it first with `phasm deploy FILE`")]
    Nothing,
    /// A latest version cannot be read by this phasm.
    #[error(transparent)]
    Unreadable(#[from] crate::config::UnreadableDefinition),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Configurations of separate files (or versions) gathered into one: every machine; where
/// two bind the same action name, queue or `python:` section differently, the first one's.
/// Binding names are scoped to their file: a worker working on the gathered configuration
/// runs each machine on its own deployed version, with that file's bindings (see
/// [`crate::worker::WorkerOptions::own_hashes`]).
pub fn gather(configs: Vec<Config>) -> Config {
    let mut all = Config::default();
    for one in configs {
        gather_into(&mut all, one);
    }
    all
}

fn gather_into(all: &mut Config, one: Config) {
    all.machines.extend(one.machines);
    for (name, binding) in one.actions {
        all.actions.entry(name).or_insert(binding);
    }
    for (name, limits) in one.queues {
        all.queues.entry(name).or_insert(limits);
    }
    if all.python.is_none() {
        all.python = one.python;
    }
    all.schedules.extend(one.schedules);
}

/// The latest version of every deployed machine, loaded and gathered (see
/// [`DeployedConfig`]).
///
/// # Errors
/// See [`DeployedError`].
pub async fn deployed_config(store: &dyn Store) -> Result<DeployedConfig, DeployedError> {
    let records = store.versions(None).await?;
    let mut latest: BTreeMap<&str, u32> = BTreeMap::new();
    for r in &records {
        latest.insert(&r.machine, r.version);
    }
    if latest.is_empty() {
        return Err(DeployedError::Nothing);
    }
    let mut config = Config::default();
    let mut versions = Vec::with_capacity(latest.len());
    for (machine, version) in latest {
        let Some(stored) = store.version(machine, version).await? else {
            continue;
        };
        let loaded = load_definition(machine, version, &stored.definition, &stored.record.path)?;
        gather_into(&mut config, loaded.config);
        versions.push((machine.to_string(), version));
    }
    Ok(DeployedConfig { config, versions })
}

/// The message for a version of `machine` that is not stored, naming those that are (`known`,
/// oldest first): ``machine `Order` has no version 9; its versions are v1, v2``.
pub fn no_such_version(machine: &str, version: u32, known: &[u32]) -> String {
    if known.is_empty() {
        return format!(
            "machine `{machine}` has no version {version}; it was never deployed (`phasm deploy FILE` stores its versions)"
        );
    }
    let list: Vec<String> = known.iter().map(|v| format!("v{v}")).collect();
    format!(
        "machine `{machine}` has no version {version}; its versions are {}",
        list.join(", ")
    )
}

/// The configuration of version `version` of `machine`, as stored: what an instance pinned to
/// it runs on (`None` without a version, or when it is no longer stored).
///
/// # Errors
/// The store's, or a definition this phasm cannot read (never guessed at).
pub(crate) async fn version_config<E>(
    store: &dyn Store,
    machine: &str,
    version: Option<u32>,
) -> Result<Option<Config>, E>
where
    E: From<StoreError> + From<crate::config::UnreadableDefinition>,
{
    let Some(n) = version else {
        return Ok(None);
    };
    let Some(stored) = store.version(machine, n).await? else {
        return Ok(None);
    };
    let loaded = load_definition(machine, n, &stored.definition, &stored.record.path)?;
    Ok(Some(loaded.config))
}
