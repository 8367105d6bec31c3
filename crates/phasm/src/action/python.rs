//! Python actions: the `python:` section, phasm's embedded Python package, and starting the
//! hosts that run a configuration's Python actions.
//!
//! With a `python:` section, every action name that no `actions:` entry binds and no Rust
//! handler registers is a Python class or function, resolved as Fantasm resolved classes: a
//! dotted name is `module.Class`, otherwise `NAMESPACE.Name`. [`start`] starts the hosts,
//! which import every such name before any instance runs (each one that cannot be resolved is
//! reported at its place in the YAML), resolves events written as constants (`OK_EVENT`)
//! through the Python modules, and returns the pool the worker sends steps to.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::host::protocol::{Hello, HelloAction, HelloConstant, HelloMachine, PROTOCOL_VERSION};
use super::host::{HostCommand, HostPool, PoolOptions};
use super::Registry;
use crate::config::Sites;
use crate::machine::{is_constant_reference, is_valid_name, Config, PythonSettings};

/// How long a step's Python calls may run when `python: timeout` is not set.
pub const DEFAULT_PYTHON_TIMEOUT: Duration = Duration::from_secs(300);

/// Steps one host process runs at once (its thread pool).
pub const STEPS_PER_HOST: usize = 32;

/// The package's files, carried in the binary so that `phasm run` needs only `python3`.
const PACKAGE: &[(&str, &str)] = &[
    (
        "phasm/__init__.py",
        include_str!("../../python/phasm/__init__.py"),
    ),
    (
        "phasm/_runtime.py",
        include_str!("../../python/phasm/_runtime.py"),
    ),
    ("phasm/host.py", include_str!("../../python/phasm/host.py")),
    (
        "phasm/protocol.py",
        include_str!("../../python/phasm/protocol.py"),
    ),
    (
        "fantasm/__init__.py",
        include_str!("../../python/fantasm/__init__.py"),
    ),
    (
        "fantasm/action.py",
        include_str!("../../python/fantasm/action.py"),
    ),
    (
        "fantasm/constants.py",
        include_str!("../../python/fantasm/constants.py"),
    ),
    (
        "fantasm/exceptions.py",
        include_str!("../../python/fantasm/exceptions.py"),
    ),
    (
        "fantasm/fsm.py",
        include_str!("../../python/fantasm/fsm.py"),
    ),
];

/// The program a host runs: put the package first on `sys.path`, then serve.
const BOOT: &str =
    "import sys; sys.path.insert(0, sys.argv[1]); import phasm.host; phasm.host.main()";

/// Why Python actions cannot run.
#[derive(Debug, thiserror::Error)]
pub enum PythonError {
    /// Names that do not resolve to Python actions, or constants that are not events.
    #[error("Python actions cannot be resolved:\n  {}", .0.join("\n  "))]
    Unresolved(Vec<String>),
    /// The hosts did not start.
    #[error("{0}")]
    Start(String),
    /// phasm's Python package could not be written to disk.
    #[error("cannot write phasm's Python package to `{path}`: {source}")]
    Package {
        /// Where.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// The reference a host resolves for an action name: a dotted name as written, otherwise
/// `NAMESPACE.NAME` (or the bare name, which the host reports as naming no module).
pub fn reference(name: &str, namespace: Option<&str>) -> String {
    match namespace {
        Some(ns) if !name.contains('.') => format!("{ns}.{name}"),
        _ => name.to_string(),
    }
}

/// Write the embedded package to a folder of its own (named by its content, reused by later
/// runs) and return that folder; `PHASM_PYTHON_PACKAGE` names a folder to use instead.
///
/// The folder is under `$XDG_CACHE_HOME/phasm` (or `~/.cache/phasm`), else under
/// `$TMPDIR/phasm-UID` — never a folder shared by users. Each time, before the package is
/// used, its folders must belong to this user and be writable by nobody else, and every file
/// must hold exactly what this phasm carries (a file that differs is written again): code
/// another local user planted there never runs.
///
/// # Errors
/// When no folder can be written, or a folder belongs to someone else or is writable by
/// others.
pub fn package_dir() -> Result<PathBuf, PythonError> {
    if let Some(dir) = std::env::var_os("PHASM_PYTHON_PACKAGE") {
        return Ok(PathBuf::from(dir));
    }
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for (name, text) in PACKAGE {
        for b in name.bytes().chain(text.bytes()) {
            hash = (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    match write_package(&base.join("phasm"), hash) {
        Ok(dir) => Ok(dir),
        Err(first) => {
            let uid = rustix::process::geteuid().as_raw();
            write_package(&std::env::temp_dir().join(format!("phasm-{uid}")), hash).map_err(
                |second| match (&first, &second) {
                    (PythonError::Package { path, source }, PythonError::Package { .. }) => {
                        PythonError::Package {
                            path: path.clone(),
                            source: std::io::Error::other(format!("{source}; and {second}")),
                        }
                    }
                    _ => second,
                },
            )
        }
    }
}

/// Make `dir` (and its missing parents) if needed, then check that it is a folder of this
/// user's that nobody else may write to.
fn private_dir(dir: &Path) -> Result<(), PythonError> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    let refuse = |why: String| PythonError::Package {
        path: dir.to_path_buf(),
        source: std::io::Error::other(why),
    };
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| PythonError::Package {
                path: dir.to_path_buf(),
                source,
            })?;
    }
    let meta = std::fs::symlink_metadata(dir).map_err(|source| PythonError::Package {
        path: dir.to_path_buf(),
        source,
    })?;
    if !meta.is_dir() {
        return Err(refuse("it is not a folder (a symbolic link?)".into()));
    }
    let me = rustix::process::geteuid().as_raw();
    if meta.uid() != me {
        return Err(refuse(format!(
            "it belongs to user {}, not to this user ({me}): code there is not run",
            meta.uid()
        )));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(refuse(format!(
            "other users may write to it (mode {:o}): code there is not run",
            meta.mode() & 0o777
        )));
    }
    Ok(())
}

/// Whether every file of the package in `dir` holds what this phasm carries.
fn package_intact(dir: &Path) -> bool {
    dir.join(".complete").is_file()
        && PACKAGE.iter().all(|(name, text)| {
            std::fs::read(dir.join(name)).is_ok_and(|held| held == text.as_bytes())
        })
}

fn write_package(base: &Path, hash: u64) -> Result<PathBuf, PythonError> {
    private_dir(base)?;
    let dir = base.join(format!("python-{hash:016x}"));
    if dir.exists() {
        private_dir(&dir)?;
        if package_intact(&dir) {
            return Ok(dir);
        }
        // Changed since it was written: move it aside, and write it again.
        let stale = base.join(format!(
            ".stale-{hash:016x}-{}-{:04x}",
            std::process::id(),
            fastrand::u16(..)
        ));
        if std::fs::rename(&dir, &stale).is_ok() {
            let _ = std::fs::remove_dir_all(&stale);
        }
    }
    let err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| PythonError::Package { path, source }
    };
    let staging = base.join(format!(
        ".python-{hash:016x}-{}-{:04x}",
        std::process::id(),
        fastrand::u16(..)
    ));
    for (name, text) in PACKAGE {
        let path = staging.join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(err(parent))?;
        }
        std::fs::write(&path, text).map_err(err(&path))?;
    }
    let marker = staging.join(".complete");
    std::fs::write(&marker, "").map_err(err(&marker))?;
    if std::fs::rename(&staging, &dir).is_err() {
        // Another process got there first: use its copy, checked as any.
        let _ = std::fs::remove_dir_all(&staging);
        private_dir(&dir)?;
        if !package_intact(&dir) {
            return Err(PythonError::Package {
                path: dir,
                source: std::io::Error::other(
                    "the folder exists but does not hold this phasm's package",
                ),
            });
        }
    }
    Ok(dir)
}

/// One Python action name used by the configuration, with where it is used.
struct Use {
    reference: String,
    places: Vec<String>,
}

/// Start the hosts for a configuration's Python actions and bind them into `registry`;
/// events written as constants are replaced by the Python values they name. `None` without
/// a `python:` section.
///
/// # Errors
/// Every action name that does not resolve (each at its place in the YAML), a constant that
/// is not a valid event name, or hosts that do not start.
pub async fn start(
    config: &mut Config,
    sites: &Sites,
    registry: &mut Registry,
) -> Result<Option<Arc<HostPool>>, PythonError> {
    let Some(settings) = config.python.clone() else {
        return Ok(None);
    };
    let uses = python_uses(config, sites, registry);
    let constants = constant_candidates(config, sites);
    let hello = Hello {
        protocol: PROTOCOL_VERSION,
        path: settings
            .path
            .iter()
            .map(|p| p.display().to_string())
            .collect(),
        threads: STEPS_PER_HOST,
        drain_seconds: timeout_of(&settings).as_secs_f64(),
        actions: uses
            .iter()
            .map(|u| HelloAction {
                reference: u.reference.clone(),
            })
            .collect(),
        constants: constants
            .iter()
            .map(|c| HelloConstant {
                candidates: c.candidates.clone(),
            })
            .collect(),
        machines: config
            .machines
            .iter()
            .map(|m| {
                (
                    m.name.clone(),
                    HelloMachine {
                        context_types: m
                            .context_types
                            .iter()
                            .map(|(k, t)| (k.clone(), t.0.clone()))
                            .collect(),
                    },
                )
            })
            .collect(),
    };
    let package = package_dir()?;
    // An interpreter given as a relative path (`venv/bin/python`) is relative to the YAML.
    let program = match settings.interpreter.clone() {
        None => "python3".to_string(),
        Some(i) if i.contains('/') && Path::new(&i).is_relative() => {
            settings.working_dir.join(i).display().to_string()
        }
        Some(i) => i,
    };
    let command = HostCommand {
        program,
        args: vec!["-c".into(), BOOT.into(), package.display().to_string()],
        working_dir: settings.working_dir.clone(),
        label: "Python host".into(),
    };
    let options = PoolOptions {
        processes: settings
            .processes
            .map_or_else(default_processes, |n| n as usize),
        in_flight: STEPS_PER_HOST,
        timeout: timeout_of(&settings),
    };
    let (pool, ready) = HostPool::start(command, hello, options)
        .await
        .map_err(PythonError::Start)?;
    let mut problems = Vec::new();
    for (u, answer) in uses.iter().zip(&ready.actions) {
        if let Some(e) = &answer.error {
            for place in &u.places {
                problems.push(format!("{place}: {e}"));
            }
        }
    }
    if ready.actions.len() != uses.len() {
        problems.push(format!(
            "the Python host answered for {} actions, phasm asked for {}",
            ready.actions.len(),
            uses.len()
        ));
    }
    for (c, answer) in constants.iter().zip(&ready.constants) {
        if let Some(e) = &answer.error {
            problems.push(format!("{}: event `{}`: {e}", c.place, c.event));
        } else if let Some(value) = &answer.value {
            if !is_valid_name(value) {
                problems.push(format!(
                    "{}: event `{}` is `{value}` in Python, which is not a valid event name (letters, digits and `-`, at most 50)",
                    c.place, c.event
                ));
            }
        }
    }
    if !problems.is_empty() {
        pool.close(Duration::from_secs(1)).await;
        return Err(PythonError::Unresolved(problems));
    }
    for (c, answer) in constants.iter().zip(&ready.constants) {
        if let Some(value) = &answer.value {
            rename_event(config, &c.machine, &c.event, value);
        }
    }
    registry.bind_hosts(
        Arc::clone(&pool),
        uses.into_iter().map(|u| u.reference).collect(),
    );
    Ok(Some(pool))
}

fn timeout_of(settings: &PythonSettings) -> Duration {
    settings.timeout.unwrap_or(DEFAULT_PYTHON_TIMEOUT)
}

fn default_processes() -> usize {
    std::thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get)
}

/// Every action name the configuration leaves to Python, with its places.
fn python_uses(config: &Config, sites: &Sites, registry: &Registry) -> Vec<Use> {
    let mut uses: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for m in &config.machines {
        for r in m.action_refs() {
            if registry.binds_outside_python(&r.lookup_names()) {
                continue;
            }
            let place = sites
                .action(&m.name, r.state, r.role, r.event)
                .map_or_else(|| format!("machine `{}`", m.name), str::to_string);
            let slot = match r.event {
                Some(e) => format!("transition `{}--{e}`", r.state),
                None => format!("state `{}` {}", r.state, r.role.as_str()),
            };
            uses.entry(reference(r.name, r.namespace))
                .or_default()
                .push(format!("{place}: {slot} `{}`", r.name));
        }
    }
    uses.into_iter()
        .map(|(reference, places)| Use { reference, places })
        .collect()
}

struct Constant {
    machine: String,
    event: String,
    candidates: Vec<String>,
    place: String,
}

/// Events written as constants, with the Python names they may refer to: in the machine's
/// namespace, or as written when dotted.
fn constant_candidates(config: &Config, sites: &Sites) -> Vec<Constant> {
    let mut out: Vec<Constant> = Vec::new();
    for m in &config.machines {
        for s in &m.states {
            for t in &s.transitions {
                if !is_constant_reference(&t.event)
                    || out
                        .iter()
                        .any(|c| c.machine == m.name && c.event == t.event)
                {
                    continue;
                }
                let mut candidates = Vec::new();
                if t.event.contains('.') {
                    candidates.push(t.event.clone());
                }
                if let Some(ns) = &m.namespace {
                    candidates.push(format!("{ns}.{}", t.event));
                }
                if candidates.is_empty() {
                    continue;
                }
                out.push(Constant {
                    machine: m.name.clone(),
                    event: t.event.clone(),
                    candidates,
                    place: sites.event(&m.name, &s.name, &t.event).map_or_else(
                        || format!("machine `{}` state `{}`", m.name, s.name),
                        str::to_string,
                    ),
                });
            }
        }
    }
    out
}

fn rename_event(config: &mut Config, machine: &str, from: &str, to: &str) {
    for m in config.machines.iter_mut().filter(|m| m.name == machine) {
        for s in &mut m.states {
            for t in &mut s.transitions {
                if t.event == from {
                    t.event = to.to_string();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_follow_fantasm_class_resolution() {
        assert_eq!(reference("Foo", Some("app.actions")), "app.actions.Foo");
        assert_eq!(reference("mod.Foo", Some("ignored")), "mod.Foo");
        assert_eq!(reference("Foo", None), "Foo");
    }

    #[test]
    fn a_package_folder_that_was_changed_is_written_again() {
        let dir = tempfile::tempdir().unwrap();
        let a = write_package(dir.path(), 7).unwrap();
        let (name, text) = PACKAGE[0];
        std::fs::write(a.join(name), "import os; os.system('planted')\n").unwrap();
        let b = write_package(dir.path(), 7).unwrap();
        assert_eq!(a, b);
        assert_eq!(std::fs::read_to_string(b.join(name)).unwrap(), text);
    }

    #[test]
    fn a_package_folder_others_may_write_or_own_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let shared = dir.path().join("shared");
        std::fs::create_dir(&shared).unwrap();
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = write_package(&shared, 7).unwrap_err().to_string();
        assert!(e.contains("other users may write to it"), "{e}");
        // Planted in advance by another user (only root can make one here).
        if rustix::process::geteuid().is_root() {
            let theirs = dir.path().join("theirs");
            let planted = theirs.join(format!("python-{:016x}", 7));
            std::fs::create_dir_all(&planted).unwrap();
            std::fs::write(planted.join(".complete"), "").unwrap();
            for path in [&theirs, &planted] {
                std::os::unix::fs::chown(path, Some(65534), Some(65534)).unwrap();
            }
            let e = write_package(&theirs, 7).unwrap_err().to_string();
            assert!(e.contains("belongs to user 65534"), "{e}");
        }
    }

    #[test]
    fn the_package_is_written_once_and_complete() {
        let dir = tempfile::tempdir().unwrap();
        let a = write_package(dir.path(), 42).unwrap();
        let b = write_package(dir.path(), 42).unwrap();
        assert_eq!(a, b);
        for (name, text) in PACKAGE {
            assert_eq!(std::fs::read_to_string(a.join(name)).unwrap(), *text);
        }
    }
}
