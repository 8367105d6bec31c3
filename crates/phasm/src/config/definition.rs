//! A machine's definition as a deploy stores it: one self-contained `fsm.yaml` text holding
//! the machine with every binding (`actions:`), queue limit (`queues:`), `python:` section
//! and schedule it uses — so the text alone, loaded again, runs the machine as the file did
//! — and the content hash that tells one version from another.

use sha2::{Digest, Sha256};

use super::to_yaml;
use crate::machine::{Config, Machine};

/// One machine's definition, ready to store as a version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Definition {
    /// The machine's name.
    pub machine: String,
    /// The self-contained machine file (see the module's doc).
    pub yaml: String,
    /// SHA-256 of `yaml`, in hex: the same definition always has the same hash.
    pub hash: String,
}

/// The definition of every machine of `config`, in file order.
pub fn definitions(config: &Config) -> Vec<Definition> {
    config
        .machines
        .iter()
        .map(|m| definition(config, m))
        .collect()
}

/// The definition of machine `m` of `config`.
pub fn definition(config: &Config, m: &Machine) -> Definition {
    let mut names = std::collections::BTreeSet::new();
    let mut queues = std::collections::BTreeSet::new();
    queues.insert(m.start_policy.queue.as_str());
    for s in &m.states {
        names.extend(
            [&s.entry, &s.action, &s.exit]
                .into_iter()
                .flatten()
                .map(String::as_str),
        );
        for t in &s.transitions {
            names.extend(t.action.as_deref());
            queues.insert(t.effective.queue.as_str());
        }
    }
    let own = Config {
        root_url: None,
        enable_capabilities_check: None,
        machines: vec![m.clone()],
        actions: config
            .actions
            .iter()
            .filter(|(name, _)| names.contains(name.as_str()))
            .map(|(name, binding)| (name.clone(), binding.clone()))
            .collect(),
        queues: config
            .queues
            .iter()
            .filter(|(name, _)| queues.contains(name.as_str()))
            .map(|(name, limits)| (name.clone(), *limits))
            .collect(),
        python: config.python.clone(),
        schedules: config
            .schedules
            .iter()
            .filter(|s| s.machine == m.name)
            .cloned()
            .collect(),
    };
    let yaml = to_yaml(&own);
    let hash = Sha256::digest(yaml.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Definition {
        machine: m.name.clone(),
        yaml,
        hash,
    }
}

/// A stored definition that this phasm cannot load (written by another phasm, say).
#[derive(Debug, thiserror::Error)]
#[error("this phasm ({}) cannot read the stored definition of `{machine}` v{version} (deployed by another phasm?): {source}", env!("CARGO_PKG_VERSION"))]
pub struct UnreadableDefinition {
    /// The machine.
    pub machine: String,
    /// Its version.
    pub version: u32,
    /// What loading it said.
    #[source]
    pub source: crate::diagnostic::Diagnostics,
}

/// Load version `version` of `machine` from its stored definition text, deployed from `path`
/// (relative paths of its bindings and `python:` section are relative to that file, as they
/// were when it was deployed). The machine is in the answer's configuration, alone.
///
/// # Errors
/// [`UnreadableDefinition`]: the text does not load (it is never guessed at).
pub fn load_definition(
    machine: &str,
    version: u32,
    text: &str,
    path: &str,
) -> Result<super::Loaded, UnreadableDefinition> {
    let unreadable = |source| UnreadableDefinition {
        machine: machine.to_string(),
        version,
        source,
    };
    let loaded = super::load_str(text, path, &super::LoadOptions::default()).map_err(unreadable)?;
    if loaded.config.machine(machine).is_none() {
        return Err(unreadable(crate::diagnostic::Diagnostics(vec![
            crate::diagnostic::Diagnostic::error(format!(
                "the definition does not define machine `{machine}`"
            )),
        ])));
    }
    Ok(loaded)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{load_str, LoadOptions};

    const TWO: &str = "actions:\n  A:\n    exec: [sh, a.sh]\n  B:\n    exec: [sh, b.sh]\nqueues:\n  slow:\n    max_concurrent: 2\nstate_machines:\n- name: One\n  states:\n  - name: s\n    initial: true\n    final: true\n    action: A\n- name: Two\n  queue: slow\n  states:\n  - name: s\n    initial: true\n    final: true\n    action: B\n";

    fn config(text: &str) -> Config {
        load_str(text, "m.yaml", &LoadOptions::default())
            .unwrap_or_else(|e| panic!("{e}"))
            .config
    }

    #[test]
    fn a_definition_holds_its_machine_with_what_it_uses_and_loads_again() {
        let c = config(TWO);
        let defs = definitions(&c);
        assert_eq!(defs.len(), 2);
        assert!(defs[0].yaml.contains("a.sh") && !defs[0].yaml.contains("b.sh"));
        assert!(!defs[0].yaml.contains("slow"));
        assert!(defs[1].yaml.contains("b.sh") && defs[1].yaml.contains("max_concurrent: 2"));
        let again = config(&defs[1].yaml);
        assert_eq!(again.machines, vec![c.machines[1].clone()]);
        assert_eq!(definition(&again, &again.machines[0]), defs[1]);
    }

    #[test]
    fn the_hash_changes_with_the_machine_or_its_bindings_only() {
        let c = config(TWO);
        let other_b = config(&TWO.replace("b.sh", "b2.sh"));
        let (a, b) = (definitions(&c), definitions(&other_b));
        assert_eq!(a[0].hash, b[0].hash, "One uses neither B nor its binding");
        assert_ne!(a[1].hash, b[1].hash);
        assert_eq!(a[0].hash.len(), 64);
    }
}
