//! Located problems found in machine files, and their compiler-style rendering.
//!
//! A [`Diagnostic`] carries everything needed to show it (file, line, column, the source line
//! itself), so rendering never touches the file system again and a report can outlive the
//! loader that produced it.

use std::fmt;

/// How serious a problem is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    /// The file is accepted, but probably not what its author meant.
    Warning,
    /// The file is rejected.
    Error,
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Severity::Warning => "warning",
            Severity::Error => "error",
        })
    }
}

/// Where a problem is: a file, a 1-based line and column, and how many characters to underline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    /// The file as the user named it (or as an import resolved it).
    pub file: String,
    /// 1-based line number.
    pub line: usize,
    /// 1-based column, counted in characters.
    pub column: usize,
    /// Number of characters to underline (at least 1).
    pub width: usize,
    /// The text of that line, without its line break, for the snippet.
    pub source_line: String,
}

/// One problem: what is wrong, where, and what to do about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// Error or warning.
    pub severity: Severity,
    /// What is wrong, in one sentence.
    pub message: String,
    /// Where it is; `None` for problems that belong to no place in a file (a missing file).
    pub location: Option<Location>,
    /// A short hint shown under the caret ("did you mean `action`?").
    pub label: Option<String>,
    /// Further lines of explanation, each shown as `= note: …`.
    pub notes: Vec<String>,
}

impl Diagnostic {
    /// A new error with no location.
    pub fn error(message: impl Into<String>) -> Self {
        Self {
            severity: Severity::Error,
            message: message.into(),
            location: None,
            label: None,
            notes: Vec::new(),
        }
    }

    /// A new warning with no location.
    pub fn warning(message: impl Into<String>) -> Self {
        Self {
            severity: Severity::Warning,
            ..Self::error(message)
        }
    }

    /// Attach a location.
    pub fn at(mut self, location: Location) -> Self {
        self.location = Some(location);
        self
    }

    /// Attach a hint shown under the caret.
    pub fn with_label(mut self, label: impl Into<String>) -> Self {
        self.label = Some(label.into());
        self
    }

    /// Attach a note line.
    pub fn with_note(mut self, note: impl Into<String>) -> Self {
        self.notes.push(note.into());
        self
    }

    /// True for errors (which reject the file), false for warnings.
    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }
}

impl fmt::Display for Diagnostic {
    /// Renders in the style of C and Rust compilers, which editors and CI logs understand:
    ///
    /// ```text
    /// machines.yaml:14:7: error: unknown state key `acton`
    ///    |
    /// 14 |       acton: DoAction1
    ///    |       ^^^^^ did you mean `action`?
    /// ```
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Some(loc) = &self.location else {
            writeln!(f, "{}: {}", self.severity, self.message)?;
            return self.write_notes(f, 0);
        };
        writeln!(
            f,
            "{}:{}:{}: {}: {}",
            loc.file, loc.line, loc.column, self.severity, self.message
        )?;
        let gutter = loc.line.to_string().len();
        let pad = " ".repeat(gutter);
        writeln!(f, "{pad} |")?;
        writeln!(f, "{} | {}", loc.line, loc.source_line.replace('\t', " "))?;
        let indent = " ".repeat(loc.column.saturating_sub(1));
        let carets = "^".repeat(loc.width.max(1));
        match &self.label {
            Some(label) => writeln!(f, "{pad} | {indent}{carets} {label}")?,
            None => writeln!(f, "{pad} | {indent}{carets}")?,
        }
        self.write_notes(f, gutter)
    }
}

impl Diagnostic {
    fn write_notes(&self, f: &mut fmt::Formatter<'_>, gutter: usize) -> fmt::Result {
        let pad = " ".repeat(gutter);
        if self.location.is_none() {
            if let Some(label) = &self.label {
                writeln!(f, "{pad} = help: {label}")?;
            }
        }
        for note in &self.notes {
            writeln!(f, "{pad} = note: {note}")?;
        }
        Ok(())
    }
}

/// Every problem found in one run, in file order; errors and warnings together.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Diagnostics(pub Vec<Diagnostic>);

impl Diagnostics {
    /// True when at least one diagnostic is an error.
    pub fn has_errors(&self) -> bool {
        self.0.iter().any(Diagnostic::is_error)
    }

    /// Number of errors.
    pub fn error_count(&self) -> usize {
        self.0.iter().filter(|d| d.is_error()).count()
    }

    /// Number of warnings.
    pub fn warning_count(&self) -> usize {
        self.0.len() - self.error_count()
    }
}

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{d}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Diagnostics {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_located_error_with_caret_and_label() {
        let d = Diagnostic::error("unknown state key `acton`")
            .at(Location {
                file: "m.yaml".into(),
                line: 14,
                column: 7,
                width: 5,
                source_line: "      acton: DoAction1".into(),
            })
            .with_label("did you mean `action`?");
        assert_eq!(
            d.to_string(),
            "m.yaml:14:7: error: unknown state key `acton`\n   |\n14 |       acton: DoAction1\n   |       ^^^^^ did you mean `action`?\n"
        );
    }

    #[test]
    fn renders_unlocated_error_with_help_and_notes() {
        let d = Diagnostic::error("cannot read `x.yaml`")
            .with_label("check the path")
            .with_note("No such file");
        assert_eq!(
            d.to_string(),
            "error: cannot read `x.yaml`\n = help: check the path\n = note: No such file\n"
        );
    }
}
