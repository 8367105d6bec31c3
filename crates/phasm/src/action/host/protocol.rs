//! The messages of the action host protocol (docs/host-protocol.md), as Rust types.
//!
//! One JSON object per line in each direction. phasm sends `hello` once, then `step`
//! requests (many in flight), and `go` or `abort` answers to a continuation's `token`; a host
//! answers `hello` with `ready` and each step with `done` (preceded by `token` when a
//! continuation page has a next page).

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::engine::Context;

/// The protocol version phasm speaks; a host answering another version is refused.
pub const PROTOCOL_VERSION: u32 = 1;

/// An action name to resolve at `hello`.
#[derive(Debug, Clone, Serialize)]
pub struct HelloAction {
    /// The reference the host resolves (`module.Class`), also used in `step` calls.
    #[serde(rename = "ref")]
    pub reference: String,
}

/// A constant (an event written as `OK_EVENT`) to resolve at `hello`.
#[derive(Debug, Clone, Serialize)]
pub struct HelloConstant {
    /// References to try, in order; the first that names a string wins.
    pub candidates: Vec<String>,
}

/// What a host needs to know of a machine.
#[derive(Debug, Clone, Serialize)]
pub struct HelloMachine {
    /// `context_types`, by key: the type names as written.
    pub context_types: std::collections::BTreeMap<String, String>,
}

/// phasm's first message.
#[derive(Debug, Clone, Serialize)]
pub struct Hello {
    /// Always `hello`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// [`PROTOCOL_VERSION`].
    pub protocol: u32,
    /// Import roots, absolute, in order.
    pub path: Vec<String>,
    /// Steps the host may run at once (phasm never sends more).
    pub threads: usize,
    /// How long the host may take to finish running steps once its stdin closes.
    pub drain_seconds: f64,
    /// Action names to resolve.
    pub actions: Vec<HelloAction>,
    /// Constants to resolve.
    pub constants: Vec<HelloConstant>,
    /// Machines, by name.
    pub machines: std::collections::BTreeMap<String, HelloMachine>,
}

/// One resolved (or unresolvable) action of a `ready` answer.
#[derive(Debug, Clone, Deserialize)]
pub struct ReadyAction {
    /// The reference, as sent.
    #[serde(rename = "ref")]
    pub reference: String,
    /// Why it cannot be resolved.
    #[serde(default)]
    pub error: Option<String>,
    /// `fantasm`, `class` or `function`.
    #[serde(default)]
    pub kind: Option<String>,
    /// Whether it has a `continuation` method.
    #[serde(default)]
    pub continuation: bool,
}

/// One constant of a `ready` answer: a value, an error, or neither (use the name as written).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ReadyConstant {
    /// The reference that resolved.
    #[serde(rename = "ref", default)]
    pub reference: Option<String>,
    /// Its value.
    #[serde(default)]
    pub value: Option<String>,
    /// Why it cannot be used.
    #[serde(default)]
    pub error: Option<String>,
}

/// The host's answer to `hello`.
#[derive(Debug, Clone, Deserialize)]
pub struct Ready {
    /// The version the host speaks.
    pub protocol: u32,
    /// The host's process id.
    #[serde(default)]
    pub pid: Option<u32>,
    /// The language runtime's version, for messages.
    #[serde(default)]
    pub python: Option<String>,
    /// The host cannot work at all (e.g. another protocol version).
    #[serde(default)]
    pub fatal: Option<String>,
    /// One entry per action sent, in order.
    #[serde(default)]
    pub actions: Vec<ReadyAction>,
    /// One entry per constant sent, in order.
    #[serde(default)]
    pub constants: Vec<ReadyConstant>,
}

/// One call of a step, in Fantasm's order: `exit`, `transition`, `entry`, `continuation`,
/// `action`.
#[derive(Debug, Clone, Serialize)]
pub struct StepCall {
    /// The slot: `exit`, `transition`, `entry`, `continuation` or `action`.
    pub role: &'static str,
    /// The action's reference, as resolved at `hello`.
    pub action: String,
    /// The state the call belongs to.
    pub state: String,
}

/// A step request: every call of one step, sharing one context and one `obj`.
#[derive(Debug, Clone, Serialize)]
pub struct StepRequest {
    /// Always `step`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// Unique among this host's requests.
    pub id: u64,
    /// The machine.
    pub machine: String,
    /// The instance.
    pub instance: String,
    /// The task: the step's idempotency key.
    pub task: String,
    /// Earlier attempts of this step.
    pub attempt: u32,
    /// The event dispatched.
    pub event: String,
    /// The context.
    pub context: Context,
    /// At a join: the joined contexts.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub contexts: Option<Vec<Context>>,
    /// A continuation page's token.
    pub token: Option<Value>,
    /// In a step entering a waiting state: the token addressing the wait it begins.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wait_token: Option<String>,
    /// The calls, in order.
    pub calls: Vec<StepCall>,
}

/// A log line of a `done` answer.
#[derive(Debug, Clone, Deserialize)]
pub struct DoneLog {
    /// `debug`, `info`, `warning`, `error` or `critical`.
    #[serde(default = "info")]
    pub level: String,
    /// The text (may span lines).
    pub message: String,
}

fn info() -> String {
    "info".into()
}

/// An instance to start, from a `done` answer.
#[derive(Debug, Clone, Deserialize)]
pub struct DoneSpawn {
    /// The machine.
    pub machine: String,
    /// One instance per context.
    pub contexts: Vec<Context>,
    /// Seconds after the commit.
    #[serde(default)]
    pub countdown: Option<f64>,
}

/// Which call failed, and how.
#[derive(Debug, Clone, Deserialize)]
pub struct DoneError {
    /// Index of the failed call in the request (`None`: before or after the calls).
    #[serde(default)]
    pub call: Option<usize>,
    /// The exception's type.
    #[serde(rename = "type", default)]
    pub kind: Option<String>,
    /// The message.
    #[serde(default)]
    pub message: String,
    /// The whole traceback, multi-line.
    #[serde(default)]
    pub traceback: Option<String>,
    /// A passing fault the user marked as such (logged as a warning).
    #[serde(default)]
    pub transient: bool,
}

/// The outcome of a step.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Done {
    /// Always `done`.
    #[serde(rename = "type", default)]
    pub kind: String,
    /// The request's id.
    #[serde(default)]
    pub id: u64,
    /// The context after the calls.
    #[serde(default)]
    pub context: Option<Context>,
    /// The main action's event.
    #[serde(default)]
    pub event: Option<String>,
    /// New branches' contexts (taken when `fork` was called).
    #[serde(default)]
    pub forks: Vec<Context>,
    /// Instances to start.
    #[serde(default)]
    pub spawns: Vec<DoneSpawn>,
    /// Stop the machine, with this reason.
    #[serde(default)]
    pub halt: Option<String>,
    /// A continuation's next token known only after the page ran.
    #[serde(default)]
    pub next_token: Option<Value>,
    /// Log lines, in order.
    #[serde(default)]
    pub log: Vec<DoneLog>,
    /// The failure, if a call failed.
    #[serde(default)]
    pub error: Option<DoneError>,
}

/// A message from a host, after `ready`.
#[derive(Debug, Clone)]
pub enum FromHost {
    /// A continuation page's next token: phasm queues the next page and answers `go`.
    Token(Value),
    /// The step's outcome.
    Done(Box<Done>),
}

/// Parse one line a host wrote after `ready`: `(id, message)`.
///
/// # Errors
/// A description of what is wrong with the line.
pub fn parse_line(line: &str) -> Result<(u64, FromHost), String> {
    let value: Value =
        serde_json::from_str(line).map_err(|e| format!("not a JSON object ({e})"))?;
    let kind = value
        .get("type")
        .and_then(Value::as_str)
        .ok_or("no `type` field")?
        .to_string();
    let id = value
        .get("id")
        .and_then(Value::as_u64)
        .ok_or("no numeric `id` field")?;
    match kind.as_str() {
        "token" => Ok((
            id,
            FromHost::Token(value.get("token").cloned().unwrap_or(Value::Null)),
        )),
        "done" => serde_json::from_value::<Done>(value)
            .map(|d| (id, FromHost::Done(Box::new(d))))
            .map_err(|e| format!("a `done` message that does not fit the protocol: {e}")),
        other => Err(format!("unknown message type `{other}`")),
    }
}

/// phasm's answer to a `token`: `go` (the next page is queued) or `abort` (it could not be).
pub fn answer_line(id: u64, outcome: &Result<(), String>) -> String {
    let value = match outcome {
        Ok(()) => serde_json::json!({"type": "go", "id": id}),
        Err(e) => serde_json::json!({"type": "abort", "id": id, "error": e}),
    };
    format!("{value}\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_done_and_token_and_rejects_garbage() {
        let (id, m) = parse_line(r#"{"type":"token","id":3,"token":"7"}"#).unwrap();
        assert_eq!(id, 3);
        assert!(matches!(m, FromHost::Token(Value::String(t)) if t == "7"));
        let (id, m) = parse_line(
            r#"{"type":"done","id":4,"context":{"a":1},"event":"ok","log":[{"level":"warning","message":"x\ny"}]}"#,
        )
        .unwrap();
        assert_eq!(id, 4);
        let FromHost::Done(d) = m else { panic!() };
        assert_eq!(d.event.as_deref(), Some("ok"));
        assert_eq!(d.log[0].level, "warning");
        assert!(parse_line("hello world").is_err());
        assert!(parse_line(r#"{"type":"done"}"#).unwrap_err().contains("id"));
        assert!(parse_line(r#"{"type":"done","id":1,"evnet":"x"}"#)
            .unwrap_err()
            .contains("evnet"));
        assert!(parse_line(r#"{"type":"what","id":1}"#).is_err());
    }
}
