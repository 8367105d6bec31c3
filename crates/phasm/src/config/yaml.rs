//! A YAML document as a tree of nodes that each know where they stand in their file.
//!
//! Built from the parser's event stream rather than a ready-made value type, because the
//! validator needs what such types drop: the position of every key and value, and keys that
//! appear twice in one mapping (a value type silently keeps the last one).

use std::collections::HashMap;

use saphyr_parser::{Event, Parser, ScalarStyle, ScanError, Span as RawSpan};

/// A position in a file: 1-based line, 0-based column in characters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Pos {
    pub line: usize,
    pub col: usize,
}

/// Where a node stands: the file (an index into the loader's sources) and its extent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Span {
    pub file: usize,
    pub start: Pos,
    pub end: Pos,
}

impl Span {
    fn from_raw(file: usize, raw: RawSpan) -> Self {
        Span {
            file,
            start: Pos {
                line: raw.start.line(),
                col: raw.start.col(),
            },
            end: Pos {
                line: raw.end.line(),
                col: raw.end.col(),
            },
        }
    }

    /// Characters to underline: the node's width when it fits on one line, else 1.
    pub fn width(&self) -> usize {
        if self.end.line == self.start.line && self.end.col > self.start.col {
            self.end.col - self.start.col
        } else {
            1
        }
    }
}

/// One YAML node.
#[derive(Debug, Clone)]
pub(crate) struct Node {
    pub kind: NodeKind,
    pub span: Span,
}

/// What a node holds. Scalars keep their text: each key decides how to read it, the way
/// Fantasm's loader accepted `'3'` where a number was expected.
#[derive(Debug, Clone)]
pub(crate) enum NodeKind {
    /// A scalar: its text, and whether it was written plain (unquoted, untagged).
    Scalar { text: String, plain: bool },
    /// A sequence.
    Seq(Vec<Node>),
    /// A mapping, in file order, duplicates kept.
    Map(Vec<(Node, Node)>),
}

impl Node {
    /// True for `~`, `null`, an empty value, and the other YAML spellings of null.
    pub fn is_null(&self) -> bool {
        matches!(&self.kind, NodeKind::Scalar { text, plain: true }
            if matches!(text.as_str(), "" | "~" | "null" | "Null" | "NULL"))
    }

    /// The scalar's text, if this is a scalar.
    pub fn scalar(&self) -> Option<&str> {
        match &self.kind {
            NodeKind::Scalar { text, .. } => Some(text),
            _ => None,
        }
    }

    /// The node as a JSON value, plain scalars resolved as YAML's core schema does (`3` is a
    /// number, `true` a boolean, `~` null; quoted text is always a string).
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::Value;
        match &self.kind {
            _ if self.is_null() => Value::Null,
            NodeKind::Scalar { text, plain: false } => Value::String(text.clone()),
            NodeKind::Scalar { text, plain: true } => match text.as_str() {
                "true" | "True" | "TRUE" => Value::Bool(true),
                "false" | "False" | "FALSE" => Value::Bool(false),
                t => t
                    .parse::<i64>()
                    .map(Value::from)
                    .ok()
                    .or_else(|| {
                        t.parse::<f64>()
                            .ok()
                            .filter(|f| {
                                f.is_finite()
                                    && t.starts_with(|c: char| {
                                        c.is_ascii_digit() || c == '-' || c == '+' || c == '.'
                                    })
                            })
                            .and_then(serde_json::Number::from_f64)
                            .map(Value::Number)
                    })
                    .unwrap_or_else(|| Value::String(text.clone())),
            },
            NodeKind::Seq(items) => Value::Array(items.iter().map(Node::to_json).collect()),
            NodeKind::Map(entries) => Value::Object(
                entries
                    .iter()
                    .map(|(k, v)| (k.scalar().unwrap_or_default().to_string(), v.to_json()))
                    .collect(),
            ),
        }
    }

    /// A short description of what this node is, for "expected X, found Y" messages.
    pub fn describe(&self) -> &'static str {
        match &self.kind {
            _ if self.is_null() => "an empty value",
            NodeKind::Scalar { .. } => "a scalar",
            NodeKind::Seq(_) => "a list",
            NodeKind::Map(_) => "a mapping",
        }
    }
}

/// Why a file is not YAML, and where.
#[derive(Debug, Clone)]
pub(crate) struct ParseError {
    pub message: String,
    pub pos: Pos,
}

impl From<ScanError> for ParseError {
    fn from(e: ScanError) -> Self {
        ParseError {
            message: e.info().to_string(),
            pos: Pos {
                line: e.marker().line(),
                col: e.marker().col(),
            },
        }
    }
}

/// Parse a file's text into its single document's root node (`None` for an empty file).
pub(crate) fn parse(text: &str, file: usize) -> Result<Option<Node>, ParseError> {
    let mut events = Vec::new();
    let mut parser = Parser::new_from_str(text);
    while let Some(next) = parser.next_event() {
        let (event, span) = next?;
        let end = matches!(event, Event::StreamEnd);
        events.push((event, Span::from_raw(file, span)));
        if end {
            break;
        }
    }
    let mut builder = Builder {
        events: events.into_iter().peekable(),
        anchors: HashMap::new(),
    };
    builder.document()
}

struct Builder<'a, I: Iterator<Item = (Event<'a>, Span)>> {
    events: std::iter::Peekable<I>,
    anchors: HashMap<usize, Node>,
}

impl<'a, I: Iterator<Item = (Event<'a>, Span)>> Builder<'a, I> {
    fn document(&mut self) -> Result<Option<Node>, ParseError> {
        let mut root = None;
        let mut documents = 0;
        while let Some((event, span)) = self.events.next() {
            match event {
                Event::StreamStart | Event::DocumentEnd | Event::Nothing => {}
                Event::StreamEnd => break,
                Event::DocumentStart(_) => {
                    documents += 1;
                    if documents > 1 {
                        return Err(ParseError {
                            message: "a machine file holds one YAML document; found a second `---`"
                                .into(),
                            pos: span.start,
                        });
                    }
                }
                other => root = Some(self.node(other, span)?),
            }
        }
        Ok(root)
    }

    fn node(&mut self, event: Event<'a>, span: Span) -> Result<Node, ParseError> {
        match event {
            Event::Scalar(text, style, anchor, tag) => {
                let node = Node {
                    kind: NodeKind::Scalar {
                        text: text.into_owned(),
                        plain: style == ScalarStyle::Plain && tag.is_none(),
                    },
                    span,
                };
                self.remember(anchor, &node);
                Ok(node)
            }
            Event::SequenceStart(anchor, _) => {
                let mut items = Vec::new();
                let end = loop {
                    let Some((event, s)) = self.events.next() else {
                        return Err(eof(span));
                    };
                    if matches!(event, Event::SequenceEnd) {
                        break s;
                    }
                    items.push(self.node(event, s)?);
                };
                let node = Node {
                    kind: NodeKind::Seq(items),
                    span: Span {
                        end: end.end,
                        ..span
                    },
                };
                self.remember(anchor, &node);
                Ok(node)
            }
            Event::MappingStart(anchor, _) => {
                let mut entries = Vec::new();
                let end = loop {
                    let Some((event, s)) = self.events.next() else {
                        return Err(eof(span));
                    };
                    if matches!(event, Event::MappingEnd) {
                        break s;
                    }
                    let key = self.node(event, s)?;
                    let Some((event, s)) = self.events.next() else {
                        return Err(eof(span));
                    };
                    let value = self.node(event, s)?;
                    entries.push((key, value));
                };
                let node = Node {
                    kind: NodeKind::Map(entries),
                    span: Span {
                        end: end.end,
                        ..span
                    },
                };
                self.remember(anchor, &node);
                Ok(node)
            }
            Event::Alias(id) => match self.anchors.get(&id) {
                // An alias stands where it is written: keep the copy's own position.
                Some(target) => Ok(Node {
                    kind: target.kind.clone(),
                    span,
                }),
                None => Err(ParseError {
                    message: "alias to an unknown anchor".into(),
                    pos: span.start,
                }),
            },
            _ => Err(ParseError {
                message: "unexpected YAML structure".into(),
                pos: span.start,
            }),
        }
    }

    fn remember(&mut self, anchor: usize, node: &Node) {
        if anchor > 0 {
            self.anchors.insert(anchor, node.clone());
        }
    }
}

fn eof(span: Span) -> ParseError {
    ParseError {
        message: "unexpected end of file".into(),
        pos: span.start,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(node: &Node) -> &[(Node, Node)] {
        match &node.kind {
            NodeKind::Map(m) => m,
            _ => panic!("not a map"),
        }
    }

    #[test]
    fn keeps_positions_and_duplicate_keys() {
        let root = parse("a: 1\nb:\n  - x\na: 'q'\n", 0).unwrap().unwrap();
        let m = map(&root);
        assert_eq!(m.len(), 3);
        assert_eq!(m[2].0.scalar(), Some("a"));
        assert_eq!(m[2].0.span.start, Pos { line: 4, col: 0 });
        assert_eq!(m[2].1.span.start, Pos { line: 4, col: 3 });
        assert!(matches!(
            &m[2].1.kind,
            NodeKind::Scalar { plain: false, .. }
        ));
        assert!(matches!(&m[1].1.kind, NodeKind::Seq(items) if items.len() == 1));
    }

    #[test]
    fn empty_values_are_null_but_quoted_null_is_a_string() {
        let root = parse("a:\nb: ~\nc: 'null'\n", 0).unwrap().unwrap();
        let m = map(&root);
        assert!(m[0].1.is_null());
        assert!(m[1].1.is_null());
        assert!(!m[2].1.is_null());
    }

    #[test]
    fn aliases_expand() {
        let root = parse("a: &x {k: v}\nb: *x\n", 0).unwrap().unwrap();
        let m = map(&root);
        assert_eq!(map(&m[1].1)[0].1.scalar(), Some("v"));
    }

    #[test]
    fn malformed_yaml_has_a_position() {
        let err = parse("a: [1, 2\nb: 3\n", 0).unwrap_err();
        assert!(err.pos.line >= 1, "{err:?}");
        assert!(!err.message.is_empty());
    }

    #[test]
    fn empty_file_has_no_root() {
        assert!(parse("# only a comment\n", 0).unwrap().is_none());
    }

    #[test]
    fn two_documents_are_rejected() {
        let err = parse("a: 1\n---\nb: 2\n", 0).unwrap_err();
        assert_eq!(err.pos.line, 2);
    }
}
