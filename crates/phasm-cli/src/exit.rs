//! The one place a command's failure becomes its message and exit status, as the README
//! documents: 0 success, 1 an instance failed or an operation was refused, 2 invalid input
//! (files, arguments, names), 3 the database cannot be opened or fails. Every message goes to
//! standard error as `error: …`.

use std::fmt::Display;
use std::process::ExitCode;

/// Exit status when an instance failed or an operation was refused.
const FAILED: u8 = 1;
/// Exit status for invalid input (bad files, bad arguments), as documented in the README.
const INVALID: u8 = 2;
/// Exit status when the database cannot be opened or fails.
const DATABASE: u8 = 3;

fn report(message: impl Display, status: u8) -> ExitCode {
    eprintln!("error: {message}");
    ExitCode::from(status)
}

/// Invalid input: say what was wrong.
pub fn invalid(message: impl Display) -> ExitCode {
    report(message, INVALID)
}

/// Invalid input whose problems were reported already (a file's diagnostics).
pub fn invalid_reported() -> ExitCode {
    ExitCode::from(INVALID)
}

/// An operation was refused or could not be done: say why.
pub fn failed(message: impl Display) -> ExitCode {
    report(message, FAILED)
}

/// An instance failed, or a check did not hold, and the output said so already.
pub fn failed_reported() -> ExitCode {
    ExitCode::from(FAILED)
}

/// The database cannot be opened or fails: say how.
pub fn database(message: impl Display) -> ExitCode {
    report(message, DATABASE)
}

/// Why an instance could not be started: the database's fault, or the input's.
pub fn start_error(e: &phasm::control::StartError) -> ExitCode {
    match e {
        phasm::control::StartError::Store(_) => database(e),
        phasm::control::StartError::UnknownVersion { .. } => failed(e),
        _ => invalid(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_the_documented_ones() {
        assert_eq!(invalid_reported(), ExitCode::from(2));
        assert_eq!(failed_reported(), ExitCode::from(1));
        assert_eq!(database("gone"), ExitCode::from(3));
        assert_eq!(invalid("bad"), ExitCode::from(2));
        assert_eq!(failed("refused"), ExitCode::from(1));
    }
}
