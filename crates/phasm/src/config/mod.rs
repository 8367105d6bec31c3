//! `fsm.yaml` files → the [`crate::machine`] model, with complete validation.
//!
//! Every problem in a file and its imports is reported in one run, each at its file, line and
//! column ([`crate::diagnostic`]); a configuration is returned only when there is no error.
//! The reverse direction, [`to_yaml`], writes a model back as a file that loads to the same
//! model.

mod build;
mod check;
mod definition;
mod diff;
mod emit;
mod load;
mod read;
mod schedules;
mod source;
mod yaml;

use std::path::Path;

pub use definition::{definition, definitions, load_definition, Definition, UnreadableDefinition};
pub use diff::{diff, Change, ChangeKind};
pub use emit::to_yaml;

use crate::diagnostic::{Diagnostic, Diagnostics};
use crate::machine::Config;

/// A successfully loaded configuration and the warnings found on the way.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The validated model.
    pub config: Config,
    /// Problems that do not reject the file (unreachable states, deprecated keys, …).
    pub warnings: Vec<Diagnostic>,
    /// Where the files name actions and events, for messages about them after loading
    /// (e.g. a Python class that cannot be imported).
    pub sites: Sites,
}

/// Where machine files name actions and events: `FILE:LINE:COL` by machine, state and slot.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sites {
    places: std::collections::HashMap<(String, String, String), String>,
}

impl Sites {
    /// Where the action of a state's `entry`, `action` or `exit` slot, or (with `event`) of
    /// a transition, is named.
    pub fn action(
        &self,
        machine: &str,
        state: &str,
        role: crate::machine::ActionRole,
        event: Option<&str>,
    ) -> Option<&str> {
        let slot = match event {
            Some(e) => format!("transition:{e}"),
            None => role.as_str().to_string(),
        };
        self.places
            .get(&(machine.to_string(), state.to_string(), slot))
            .map(String::as_str)
    }

    /// Where a transition's `event` is written.
    pub fn event(&self, machine: &str, state: &str, event: &str) -> Option<&str> {
        self.places
            .get(&(
                machine.to_string(),
                state.to_string(),
                format!("event:{event}"),
            ))
            .map(String::as_str)
    }

    pub(crate) fn insert(&mut self, machine: &str, state: &str, slot: String, place: String) {
        self.places
            .insert((machine.to_string(), state.to_string(), slot), place);
    }
}

/// What a load checks beyond the language itself.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Report every action name that is neither bound under `actions:` nor in
    /// `registered_actions` (`phasm validate --strict`).
    pub strict: bool,
    /// Action names registered in Rust, which count as bound under `strict`.
    pub registered_actions: Vec<String>,
    /// Without `strict`: report unbound action names as warnings (`phasm validate`), when the
    /// files have no errors.
    pub warn_unbound: bool,
}

/// Parse a duration as machine files write them: seconds (`30`, `2.5`) or `500ms`, `90s`,
/// `5m`, `12h`, `1h30m`.
///
/// # Errors
/// A message saying why the text is not a duration.
pub fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    crate::duration::parse(text)
}

/// Write a duration for people, in its largest whole unit (`10m`, `2h`, `1d`).
pub fn format_duration(d: std::time::Duration) -> String {
    crate::duration::human(d)
}

/// Load and validate a machine file and the files it imports.
///
/// # Errors
/// Every error and warning found, in file order, when at least one is an error (a missing or
/// unreadable file is an error without a location).
pub fn load_file(path: impl AsRef<Path>, options: &LoadOptions) -> Result<Loaded, Diagnostics> {
    load::load_file(path.as_ref(), options)
}

/// Load and validate YAML text as if it were the file at `path`: imports are resolved from
/// `path`'s folder and its ancestors, and `exec` programs run in `path`'s folder.
///
/// # Errors
/// As [`load_file`].
pub fn load_str(
    text: &str,
    path: impl AsRef<Path>,
    options: &LoadOptions,
) -> Result<Loaded, Diagnostics> {
    load::load_text(text, path.as_ref(), options)
}
