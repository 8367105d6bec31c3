//! The `phasm` command: a thin layer over the `phasm` library that parses arguments, calls
//! the library, and turns its results into output and exit codes.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use phasm::config::{self, LoadOptions};
use phasm::diagnostic::Diagnostics;
use phasm::graph;

/// Exit status for invalid input (bad files, bad arguments), as documented in the README.
const EXIT_INVALID: u8 = 2;

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
        /// The machine file.
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
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Dot,
    Mermaid,
    Svg,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Validate {
            files,
            strict,
            deny_warnings,
        } => validate(&files, strict, deny_warnings),
        Command::Graph {
            file,
            machine,
            format,
            output,
        } => draw(&file, machine.as_deref(), format, output.as_deref()),
    }
}

fn validate(files: &[PathBuf], strict: bool, deny_warnings: bool) -> ExitCode {
    let options = LoadOptions {
        strict,
        ..LoadOptions::default()
    };
    let mut failed = false;
    let mut ok_lines = Vec::new();
    for file in files {
        match config::load_file(file, &options) {
            Ok(loaded) => {
                print_diagnostics(&Diagnostics(loaded.warnings.clone()));
                failed |= deny_warnings && !loaded.warnings.is_empty();
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
                    plural(machines, "machine"),
                    plural(states, "state")
                ));
            }
            Err(diags) => {
                print_diagnostics(&diags);
                failed = true;
            }
        }
    }
    if failed {
        return ExitCode::from(EXIT_INVALID);
    }
    for line in ok_lines {
        println!("{line}");
    }
    ExitCode::SUCCESS
}

fn plural(n: usize, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

fn print_diagnostics(diags: &Diagnostics) {
    if !diags.0.is_empty() {
        eprint!("{diags}");
    }
}

fn draw(
    file: &std::path::Path,
    machine: Option<&str>,
    format: Format,
    output: Option<&std::path::Path>,
) -> ExitCode {
    let loaded = match config::load_file(file, &LoadOptions::default()) {
        Ok(loaded) => loaded,
        Err(diags) => {
            print_diagnostics(&diags);
            return ExitCode::from(EXIT_INVALID);
        }
    };
    let machines = &loaded.config.machines;
    let chosen = match machine {
        Some(name) => match loaded.config.machine(name) {
            Some(m) => m,
            None => {
                eprintln!(
                    "error: `{}` has no machine named `{name}`\n = note: its machines: {}",
                    file.display(),
                    names(machines)
                );
                return ExitCode::from(EXIT_INVALID);
            }
        },
        None => match machines.as_slice() {
            [only] => only,
            [] => {
                eprintln!("error: `{}` defines no machine", file.display());
                return ExitCode::from(EXIT_INVALID);
            }
            _ => {
                eprintln!(
                    "error: `{}` defines {} machines; choose one with --machine NAME\n = note: its machines: {}",
                    file.display(),
                    machines.len(),
                    names(machines)
                );
                return ExitCode::from(EXIT_INVALID);
            }
        },
    };
    let text = match format {
        Format::Dot => graph::to_dot(chosen),
        Format::Mermaid => graph::to_mermaid(chosen),
        Format::Svg => graph::to_svg(chosen),
    };
    let written = match output {
        Some(path) => std::fs::write(path, text.as_bytes()),
        None => std::io::stdout().write_all(text.as_bytes()),
    };
    if let Err(e) = written {
        let target = output.map_or("standard output".to_string(), |p| {
            format!("`{}`", p.display())
        });
        eprintln!("error: cannot write to {target}: {e}");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

fn names(machines: &[phasm::machine::Machine]) -> String {
    machines
        .iter()
        .map(|m| m.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}
