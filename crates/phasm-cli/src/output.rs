//! Output helpers shared by the commands: logging setup, diagnostics, times.

use std::io::IsTerminal;

use phasm::diagnostic::Diagnostics;

/// Log to stderr, filtered by `RUST_LOG` (default: warnings, and info for phasm itself).
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,phasm=warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}

/// Print diagnostics (errors and warnings) to stderr.
pub fn print_diagnostics(diags: &Diagnostics) {
    if !diags.0.is_empty() {
        eprint!("{diags}");
    }
}

/// A timestamp for people.
pub fn time(at: i64) -> String {
    phasm::clock::rfc3339(at)
}

/// A duration in microseconds, for people.
pub fn duration(micros: i64) -> String {
    let ms = micros as f64 / 1000.0;
    if ms < 1000.0 {
        format!("{ms:.1}ms")
    } else {
        format!("{:.2}s", ms / 1000.0)
    }
}
