//! Output helpers shared by the commands: logging setup, diagnostics, times.

use std::io::{IsTerminal, Write};

use phasm::diagnostic::Diagnostics;

/// Log to stderr, filtered by `RUST_LOG` (default: warnings; the connection pool's only as
/// errors, since phasm reports each failure it meets once, in its own words).
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,phasm=warn,deadpool=error"));
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

/// `1 step`, `2 steps`, `1 retry`, `3 retries`.
pub fn count(n: u64, noun: &str) -> String {
    match (n, noun.strip_suffix('y')) {
        (1, _) => format!("1 {noun}"),
        (_, Some(stem)) => format!("{n} {stem}ies"),
        _ => format!("{n} {noun}s"),
    }
}

/// `text` safe to print to a terminal: control characters other than newline and tab (an
/// escape sequence that recolours or clears the screen, a carriage return that overwrites a
/// line) are shown escaped (`\u{1b}`), never sent raw.
pub fn printable(text: &str) -> std::borrow::Cow<'_, str> {
    let raw = |c: char| c.is_control() && c != '\n' && c != '\t';
    if !text.chars().any(raw) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if raw(c) {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
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

/// Print a line to stdout, like `println!`, but a closed pipe (`phasm list | head -1`) ends
/// the program quietly (exit status 0) instead of panicking.
macro_rules! outln {
    () => {
        $crate::output::write_out(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::output::write_out(format_args!("{}\n", format_args!($($arg)*)))
    };
}
pub(crate) use outln;

/// Write to stdout; on a closed pipe, exit quietly; on another error, say so and exit 1.
pub fn write_out(args: std::fmt::Arguments<'_>) {
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_fmt(args).and_then(|()| out.flush()) {
        exit_on_write_error(&e);
    }
}

/// A failed write to stdout ends the program: quietly for a closed pipe (the reader has all
/// it wanted), with a message otherwise.
pub fn exit_on_write_error(e: &std::io::Error) -> ! {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        std::process::exit(0);
    }
    eprintln!("error: cannot write to stdout: {e}");
    std::process::exit(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped_but_lines_and_tabs_kept() {
        assert_eq!(printable("plain\ttext\nnext"), "plain\ttext\nnext");
        assert_eq!(
            printable("\u{1b}[31mred\r\u{7}"),
            "\\u{1b}[31mred\\u{d}\\u{7}"
        );
    }
}
