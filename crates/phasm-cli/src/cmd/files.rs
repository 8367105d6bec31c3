//! Commands on machine files: `validate` and `graph`.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use phasm::config::{self, LoadOptions};
use phasm::diagnostic::Diagnostics;
use phasm::graph;
use phasm::machine::{Config, Machine};

use crate::output::{count, outln, print_diagnostics};
use crate::{exit, Format};

/// Load a machine file for running, printing its diagnostics; `None` after an error.
pub fn load(file: &Path) -> Option<Config> {
    load_with_sites(file).map(|(config, _)| config)
}

/// As [`load`], with where the file names its actions and events.
pub fn load_with_sites(file: &Path) -> Option<(Config, config::Sites)> {
    match config::load_file(file, &LoadOptions::default()) {
        Ok(loaded) => {
            print_diagnostics(&Diagnostics(loaded.warnings));
            Some((loaded.config, loaded.sites))
        }
        Err(diags) => {
            print_diagnostics(&diags);
            None
        }
    }
}

/// The machine a command names, or the only one; prints why not.
pub fn choose<'c>(config: &'c Config, file: &Path, machine: Option<&str>) -> Option<&'c Machine> {
    let machines = &config.machines;
    match machine {
        Some(name) => {
            let found = config.machine(name);
            if found.is_none() {
                eprintln!(
                    "error: `{}` has no machine named `{name}`\n = note: its machines: {}",
                    file.display(),
                    names(machines)
                );
            }
            found
        }
        None => match machines.as_slice() {
            [only] => Some(only),
            [] => {
                eprintln!("error: `{}` defines no machine", file.display());
                None
            }
            _ => {
                eprintln!(
                    "error: `{}` defines {} machines; choose one with --machine NAME\n = note: its machines: {}",
                    file.display(),
                    machines.len(),
                    names(machines)
                );
                None
            }
        },
    }
}

/// `phasm validate`.
pub fn validate(files: &[PathBuf], strict: bool, deny_warnings: bool) -> ExitCode {
    let options = LoadOptions {
        strict,
        warn_unbound: true,
        ..LoadOptions::default()
    };
    let mut failed = false;
    let mut ok_lines = Vec::new();
    for file in files {
        match config::load_file(file, &options) {
            Ok(loaded) => {
                print_diagnostics(&Diagnostics(loaded.warnings.clone()));
                failed |= deny_warnings && !loaded.warnings.is_empty();
                if strict && loaded.config.python.is_some() {
                    if let Err(e) = check_python(&loaded) {
                        eprintln!("error: {e}");
                        failed = true;
                        continue;
                    }
                }
                let machines = loaded.config.machines.len();
                let states: usize = loaded.config.machines.iter().map(|m| m.states.len()).sum();
                let warnings = match loaded.warnings.len() {
                    0 => String::new(),
                    1 => ", 1 warning".to_string(),
                    n => format!(", {n} warnings"),
                };
                ok_lines.push(format!(
                    "ok: {} ({}, {}{warnings})",
                    file.display(),
                    count(machines as u64, "machine"),
                    count(states as u64, "state")
                ));
            }
            Err(diags) => {
                print_diagnostics(&diags);
                failed = true;
            }
        }
    }
    if failed {
        return exit::invalid_reported();
    }
    for line in ok_lines {
        outln!("{line}");
    }
    ExitCode::SUCCESS
}

/// With `--strict`: start one Python host to resolve every Python action name and event
/// constant, as a worker would before running anything.
fn check_python(loaded: &config::Loaded) -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    runtime.block_on(async {
        let mut config = loaded.config.clone();
        if let Some(python) = &mut config.python {
            python.processes = Some(1);
        }
        let mut registry = phasm::action::Registry::new();
        registry.bind_config(&config);
        match phasm::action::python::start(&mut config, &loaded.sites, &mut registry).await {
            Ok(Some(pool)) => {
                pool.close(std::time::Duration::from_secs(5)).await;
                Ok(())
            }
            Ok(None) => Ok(()),
            Err(e) => Err(e.to_string()),
        }
    })
}

/// `phasm graph`.
pub fn draw(
    file: &std::path::Path,
    machine: Option<&str>,
    format: Format,
    output: Option<&std::path::Path>,
) -> ExitCode {
    let Some(config) = load(file) else {
        return exit::invalid_reported();
    };
    let Some(chosen) = choose(&config, file, machine) else {
        return exit::invalid_reported();
    };
    let text = match format {
        Format::Dot => graph::to_dot(chosen),
        Format::Mermaid => graph::to_mermaid(chosen),
        Format::Svg => graph::to_svg(chosen),
    };
    write_out(&text, output)
}

/// Write a drawing to `output`, or to standard output.
pub(crate) fn write_out(text: &str, output: Option<&std::path::Path>) -> ExitCode {
    let written = match output {
        Some(path) => std::fs::write(path, text.as_bytes()),
        None => std::io::stdout().write_all(text.as_bytes()),
    };
    if let Err(e) = written {
        if output.is_none() && e.kind() == std::io::ErrorKind::BrokenPipe {
            return ExitCode::SUCCESS; // `phasm graph … | head`: the reader has what it wanted
        }
        let target = output.map_or("standard output".to_string(), |p| {
            format!("`{}`", p.display())
        });
        return exit::failed(format!("cannot write to {target}: {e}"));
    }
    ExitCode::SUCCESS
}

fn names(machines: &[Machine]) -> String {
    machines
        .iter()
        .map(|m| m.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}
