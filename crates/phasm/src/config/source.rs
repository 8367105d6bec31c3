//! The files of one load, so that a node's span can become a [`Location`] with its line's text.

use std::path::PathBuf;

use super::yaml::{Pos, Span};
use crate::diagnostic::Location;

/// One file read during a load.
#[derive(Debug)]
pub(crate) struct SourceFile {
    /// How the file is shown in messages.
    pub display: String,
    /// The file's canonical path (imports are resolved and de-duplicated by it).
    pub path: PathBuf,
    /// Its text.
    pub text: String,
}

/// Every file of one load, indexed by [`Span::file`].
#[derive(Debug, Default)]
pub(crate) struct Sources {
    pub files: Vec<SourceFile>,
}

impl Sources {
    /// Add a file and return its index.
    pub fn add(&mut self, file: SourceFile) -> usize {
        self.files.push(file);
        self.files.len() - 1
    }

    /// The location of a span, with its line's text for the snippet.
    pub fn location(&self, span: Span) -> Location {
        self.location_at(span.file, span.start, span.width())
    }

    /// The location of one position in a file.
    pub fn location_at(&self, file: usize, pos: Pos, width: usize) -> Location {
        let (display, line_text) = match self.files.get(file) {
            Some(f) => (
                f.display.clone(),
                f.text
                    .lines()
                    .nth(pos.line.saturating_sub(1))
                    .unwrap_or("")
                    .to_string(),
            ),
            None => (String::from("<unknown>"), String::new()),
        };
        let line_len = line_text.chars().count();
        // Underline no further than the end of the line.
        let width = width.min(line_len.saturating_sub(pos.col)).max(1);
        Location {
            file: display,
            line: pos.line.max(1),
            column: pos.col + 1,
            width,
            source_line: line_text,
        }
    }
}
