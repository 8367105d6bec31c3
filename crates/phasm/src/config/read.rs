//! Reading typed values out of YAML nodes, reporting every problem at its position.
//!
//! Each reader returns `None` after recording an error, so the caller keeps going and one run
//! reports every mistake in a file.

use std::collections::HashMap;
use std::time::Duration;

use super::source::Sources;
use super::yaml::{Node, NodeKind, Span};
use crate::diagnostic::Diagnostic;
use crate::duration;
use crate::machine::Countdown;

/// The collector of diagnostics for one load.
pub(crate) struct Cx<'s> {
    pub sources: &'s Sources,
    pub diags: Vec<Diagnostic>,
}

impl<'s> Cx<'s> {
    pub fn new(sources: &'s Sources) -> Self {
        Self {
            sources,
            diags: Vec::new(),
        }
    }

    /// Record an error at a span, with an optional hint under the caret.
    pub fn error(&mut self, span: Span, message: impl Into<String>, label: Option<String>) {
        let mut d = Diagnostic::error(message).at(self.sources.location(span));
        d.label = label;
        self.diags.push(d);
    }

    /// Record a warning at a span, with an optional hint under the caret.
    pub fn warning(&mut self, span: Span, message: impl Into<String>, label: Option<String>) {
        let mut d = Diagnostic::warning(message).at(self.sources.location(span));
        d.label = label;
        self.diags.push(d);
    }

    /// Errors recorded so far.
    pub fn error_count(&self) -> usize {
        self.diags.iter().filter(|d| d.is_error()).count()
    }

    /// Record a finished diagnostic.
    pub fn push(&mut self, d: Diagnostic) {
        self.diags.push(d);
    }

    /// The keys of a mapping, checked against the keys `what` may have.
    pub fn fields<'n>(
        &mut self,
        node: &'n Node,
        what: &str,
        allowed: &[&str],
    ) -> Option<Fields<'n>> {
        let NodeKind::Map(entries) = &node.kind else {
            self.error(
                node.span,
                format!("expected a mapping for {what}, found {}", node.describe()),
                None,
            );
            return None;
        };
        let mut fields = Fields {
            whole: node.span,
            entries: Vec::new(),
        };
        for (key, value) in entries {
            let Some(name) = key.scalar() else {
                self.error(
                    key.span,
                    format!("keys of {what} must be plain names"),
                    None,
                );
                continue;
            };
            if !allowed.contains(&name) {
                let label = match suggest(name, allowed.iter().copied()) {
                    Some(s) => format!("did you mean `{s}`?"),
                    None => format!("expected one of: {}", allowed.join(", ")),
                };
                self.error(
                    key.span,
                    format!("unknown key `{name}` in {what}"),
                    Some(label),
                );
                continue;
            }
            if let Some((_, first, _)) = fields.entries.iter().find(|(k, _, _)| *k == name) {
                let line = first.span.start.line;
                self.error(
                    key.span,
                    format!("`{name}` is given twice in {what}"),
                    Some(format!("first given on line {line}")),
                );
                continue;
            }
            fields.entries.push((name, key, value));
        }
        Some(fields)
    }

    /// A string value; `None` (with an error) when empty or not a scalar.
    pub fn string(&mut self, node: &Node, key: &str) -> Option<String> {
        match &node.kind {
            _ if node.is_null() => {
                self.error(node.span, format!("`{key}` has no value"), None);
                None
            }
            NodeKind::Scalar { text, .. } => Some(text.clone()),
            _ => {
                self.error(
                    node.span,
                    format!("`{key}` must be a string, found {}", node.describe()),
                    None,
                );
                None
            }
        }
    }

    /// An optional string key of a mapping.
    pub fn optional_string(&mut self, f: &Fields<'_>, key: &str) -> Option<String> {
        f.get(key).and_then(|n| self.string(n, key))
    }

    /// A boolean: YAML's `true`/`false` in any case, YAML 1.1's `yes`/`no`/`on`/`off` (which
    /// Fantasm's PyYAML loader accepted), or `1`/`0`.
    pub fn boolean(&mut self, node: &Node, key: &str) -> Option<bool> {
        let text = self.scalar_text(node, key, "true or false")?;
        match text.to_ascii_lowercase().as_str() {
            "true" | "yes" | "on" | "1" | "y" => Some(true),
            "false" | "no" | "off" | "0" | "n" => Some(false),
            _ => {
                self.error(
                    node.span,
                    format!("`{key}` must be true or false, found `{text}`"),
                    None,
                );
                None
            }
        }
    }

    /// A whole number of zero or more (quoted digits are accepted, as Fantasm's `int()` did).
    pub fn count(&mut self, node: &Node, key: &str) -> Option<u32> {
        let text = self.scalar_text(node, key, "a whole number")?;
        match text.trim().parse::<i64>() {
            Ok(n) if n < 0 => {
                self.error(
                    node.span,
                    format!("`{key}` must not be negative, found {n}"),
                    None,
                );
                None
            }
            Ok(n) => {
                if let Ok(n) = u32::try_from(n) {
                    Some(n)
                } else {
                    self.error(node.span, format!("`{key}` is too large: {n}"), None);
                    None
                }
            }
            Err(_) => {
                self.error(
                    node.span,
                    format!("`{key}` must be a whole number of zero or more, found `{text}`"),
                    None,
                );
                None
            }
        }
    }

    /// A duration: seconds as a number, or a string such as `90s`, `5m`, `12h`.
    pub fn duration(&mut self, node: &Node, key: &str) -> Option<Duration> {
        let text = self.scalar_text(node, key, "a duration")?;
        match duration::parse(&text) {
            Ok(d) => Some(d),
            Err(why) => {
                self.error(
                    node.span,
                    format!("`{key}` must be a duration of zero or more: {why}"),
                    Some("write seconds (`30`) or a duration such as `90s`, `5m`, `12h`".into()),
                );
                None
            }
        }
    }

    /// A countdown: a duration, or `{minimum: D, maximum: D}` for a random delay.
    pub fn countdown(&mut self, node: &Node, key: &str) -> Option<Countdown> {
        if !matches!(node.kind, NodeKind::Map(_)) {
            return self.duration(node, key).map(Countdown::Fixed);
        }
        let fields = self.fields(node, &format!("`{key}`"), &["minimum", "maximum"])?;
        let mut ends = [None, None];
        for (i, end) in ["minimum", "maximum"].into_iter().enumerate() {
            match fields.get(end) {
                Some(n) => ends[i] = self.duration(n, end),
                None => self.error(
                    node.span,
                    format!(
                        "a random `{key}` needs both `minimum` and `maximum`; `{end}` is missing"
                    ),
                    None,
                ),
            }
        }
        let [Some(minimum), Some(maximum)] = ends else {
            return None;
        };
        if minimum > maximum {
            self.error(
                node.span,
                format!(
                    "`{key}` has minimum {} greater than maximum {}",
                    duration::format(minimum),
                    duration::format(maximum)
                ),
                None,
            );
            return None;
        }
        Some(Countdown::Random { minimum, maximum })
    }

    fn scalar_text(&mut self, node: &Node, key: &str, expected: &str) -> Option<String> {
        match &node.kind {
            _ if node.is_null() => {
                self.error(
                    node.span,
                    format!("`{key}` has no value"),
                    Some(format!("expected {expected}")),
                );
                None
            }
            NodeKind::Scalar { text, .. } => Some(text.clone()),
            _ => {
                self.error(
                    node.span,
                    format!("`{key}` must be {expected}, found {}", node.describe()),
                    None,
                );
                None
            }
        }
    }
}

/// The checked keys of one mapping, with their positions.
pub(crate) struct Fields<'n> {
    pub whole: Span,
    pub entries: Vec<(&'n str, &'n Node, &'n Node)>,
}

impl<'n> Fields<'n> {
    /// The value of a key, if present.
    pub fn get(&self, key: &str) -> Option<&'n Node> {
        self.entries
            .iter()
            .find(|(k, _, _)| *k == key)
            .map(|(_, _, v)| *v)
    }

    /// Where each key and value stand, for checks that run after the model is built.
    pub fn spans(&self) -> ObjSpans {
        ObjSpans {
            whole: self.whole,
            keys: self
                .entries
                .iter()
                .map(|(k, key, value)| (k.to_string(), (key.span, value.span)))
                .collect(),
        }
    }
}

/// Where an object and each of its keys and values stand.
#[derive(Debug, Clone, Default)]
pub(crate) struct ObjSpans {
    pub whole: Span,
    pub keys: HashMap<String, (Span, Span)>,
}

impl ObjSpans {
    /// The span of a key, or of the whole object when the key is absent.
    pub fn key(&self, key: &str) -> Span {
        self.keys.get(key).map_or(self.whole, |(k, _)| *k)
    }

    /// The span of a key's value, or of the whole object when the key is absent.
    pub fn value(&self, key: &str) -> Span {
        self.keys.get(key).map_or(self.whole, |(_, v)| *v)
    }
}

/// The closest candidate to a misspelt word, if one is close enough to be a likely typo.
pub(crate) fn suggest<'a>(
    word: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    let word_lower = word.to_ascii_lowercase();
    candidates
        .into_iter()
        .map(|c| {
            (
                strsim::damerau_levenshtein(&word_lower, &c.to_ascii_lowercase()),
                c,
            )
        })
        .filter(|(d, c)| *d <= (c.len().max(word.len()) / 3).max(1))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

#[cfg(test)]
mod tests {
    use super::suggest;

    #[test]
    fn suggests_near_misses_only() {
        let keys = ["action", "entry", "exit", "transitions"];
        assert_eq!(suggest("acton", keys), Some("action"));
        assert_eq!(suggest("transition", keys), Some("transitions"));
        assert_eq!(suggest("Entry", keys), Some("entry"));
        assert_eq!(suggest("colour", keys), None);
    }
}
