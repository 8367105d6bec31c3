//! Built-in continuation actions, so a machine can page through a file or a list without
//! cursor code: `lines:` (JSON Lines, CSV or plain text) and `list:` (a list in the context).
//!
//! In a continuation state, [`Action::continuation`] reads the current page (the token is a
//! byte offset into the file, or an index into the list) and returns the next page's token,
//! so phasm queues the next page before this one is processed; [`Action::run`] then puts the
//! page into the context under `into` and returns the binding's `event`.

use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::path::PathBuf;

use async_trait::async_trait;
use serde_json::Value;

use super::{Action, ActionContext, ActionError, ActionResult};
use crate::machine::{LinesBinding, ListBinding};

/// Where the page read by `continuation` waits for `run` within one step.
const PAGE: &str = "__phasm_page";

/// Pages through a file's lines.
#[derive(Debug, Clone)]
pub struct LinesAction {
    binding: LinesBinding,
}

impl LinesAction {
    /// The action for a `lines:` binding.
    pub fn new(binding: LinesBinding) -> Self {
        Self { binding }
    }

    fn path(&self) -> PathBuf {
        self.binding.working_dir.join(&self.binding.path)
    }

    /// Read the page starting at byte `offset`: its items, and the next page's offset if any
    /// line is left.
    fn read_page(&self, offset: u64) -> Result<(Vec<Value>, Option<u64>), ActionError> {
        let path = self.path();
        let file = std::fs::File::open(&path)
            .map_err(|e| ActionError::new(format!("cannot read `{}`: {e}", path.display())))?;
        let csv = path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("csv"));
        let json = path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("jsonl") || e.eq_ignore_ascii_case("ndjson"));
        let mut reader = BufReader::new(file);
        let mut header: Option<Vec<String>> = None;
        let mut position = 0u64;
        if csv {
            let mut first = String::new();
            position = reader.read_line(&mut first)? as u64;
            header = Some(csv_fields(first.trim_end_matches(['\r', '\n']))?);
        }
        let start = offset.max(position);
        reader.seek(SeekFrom::Start(start))?;
        position = start;
        let mut items = Vec::new();
        let mut line = String::new();
        while items.len() < self.binding.batch as usize {
            line.clear();
            let read = reader.read_line(&mut line)?;
            if read == 0 {
                return Ok((items, None));
            }
            position += read as u64;
            let text = line.trim_end_matches(['\r', '\n']);
            if text.trim().is_empty() {
                continue;
            }
            let item = match &header {
                Some(names) => {
                    let fields = csv_fields(text)?;
                    Value::Object(
                        names
                            .iter()
                            .cloned()
                            .zip(fields.into_iter().map(Value::String))
                            .collect(),
                    )
                }
                None if json => serde_json::from_str(text).map_err(|e| {
                    ActionError::new(format!(
                        "`{}` at byte {}: not JSON: {e}",
                        path.display(),
                        position - read as u64
                    ))
                })?,
                None => Value::String(text.to_string()),
            };
            items.push(item);
        }
        // Is anything but blank lines left? Then there is a next page.
        let mut rest = String::new();
        let mut peek = position;
        loop {
            rest.clear();
            let read = reader.read_line(&mut rest)?;
            if read == 0 {
                return Ok((items, None));
            }
            if !rest.trim().is_empty() {
                return Ok((items, Some(position)));
            }
            peek += read as u64;
            position = peek;
        }
    }
}

fn csv_fields(line: &str) -> Result<Vec<String>, ActionError> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .from_reader(line.as_bytes());
    match reader.records().next() {
        Some(Ok(record)) => Ok(record.iter().map(str::to_string).collect()),
        Some(Err(e)) => Err(ActionError::new(format!("bad CSV line: {e}"))),
        None => Ok(Vec::new()),
    }
}

fn offset(cx: &ActionContext) -> Result<u64, ActionError> {
    match cx.token() {
        None => Ok(0),
        Some(Value::Number(n)) => n
            .as_u64()
            .ok_or_else(|| ActionError::new(format!("bad page token {n}"))),
        Some(other) => Err(ActionError::new(format!("bad page token {other}"))),
    }
}

fn finish(
    cx: &mut ActionContext,
    into: &str,
    items: Vec<Value>,
    event: Option<&String>,
) -> ActionResult {
    cx.context_mut()
        .insert(into.to_string(), Value::Array(items));
    Ok(event.cloned())
}

#[async_trait]
impl Action for LinesAction {
    async fn continuation(
        &self,
        cx: &mut ActionContext,
    ) -> Option<Result<Option<Value>, ActionError>> {
        Some(
            offset(cx)
                .and_then(|at| self.read_page(at))
                .map(|(items, next)| {
                    cx.scratch().insert(PAGE.into(), Value::Array(items));
                    next.map(Value::from)
                }),
        )
    }

    async fn run(&self, cx: &mut ActionContext) -> ActionResult {
        let items = match cx.scratch().remove(PAGE) {
            Some(Value::Array(items)) => items,
            _ => self.read_page(offset(cx)?)?.0,
        };
        finish(cx, &self.binding.into, items, self.binding.event.as_ref())
    }
}

/// Pages through a list in the context.
#[derive(Debug, Clone)]
pub struct ListAction {
    binding: ListBinding,
}

impl ListAction {
    /// The action for a `list:` binding.
    pub fn new(binding: ListBinding) -> Self {
        Self { binding }
    }

    fn page(&self, cx: &ActionContext) -> Result<(Vec<Value>, Option<u64>), ActionError> {
        let list = match cx.context().get(&self.binding.key) {
            Some(Value::Array(list)) => list,
            Some(_) => {
                return Err(ActionError::new(format!(
                    "context key `{}` is not a list",
                    self.binding.key
                )))
            }
            None => {
                return Err(ActionError::new(format!(
                    "the context has no `{}` to page through",
                    self.binding.key
                )))
            }
        };
        let start = usize::try_from(offset(cx)?)
            .unwrap_or(usize::MAX)
            .min(list.len());
        let end = (start + self.binding.batch as usize).min(list.len());
        let next = (end < list.len()).then_some(end as u64);
        Ok((list[start..end].to_vec(), next))
    }
}

#[async_trait]
impl Action for ListAction {
    async fn continuation(
        &self,
        cx: &mut ActionContext,
    ) -> Option<Result<Option<Value>, ActionError>> {
        Some(self.page(cx).map(|(_, next)| next.map(Value::from)))
    }

    async fn run(&self, cx: &mut ActionContext) -> ActionResult {
        let (items, _) = self.page(cx)?;
        finish(cx, &self.binding.into, items, self.binding.event.as_ref())
    }
}
