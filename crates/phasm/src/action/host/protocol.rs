//! The messages of the action host protocol (docs/host-protocol.md), as Rust types.
//!
//! One JSON object per line in each direction, its kind in its `type` field. phasm sends
//! [`ToHost`]: `hello` once, then `step` requests (many in flight), and `go` or `abort`
//! answers to a continuation's `token`. A host answers `hello` with [`Ready`], and then
//! writes [`FromHost`]: each step's `done`, preceded by `token` when a continuation page
//! has a next page. Both are serde tagged enums, so a message of an unknown kind, or one
//! missing a field, is refused with what was wrong.

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

/// A message phasm writes to a host.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum ToHost<'a> {
    /// The first message: what to resolve.
    Hello(&'a Hello),
    /// Run a step.
    Step(&'a StepRequest),
    /// The next page a `token` announced is queued: go on.
    Go {
        /// The step's request id.
        id: u64,
    },
    /// The next page could not be queued: stop the step.
    Abort {
        /// The step's request id.
        id: u64,
        /// Why.
        error: &'a str,
    },
}

impl ToHost<'_> {
    /// The message as one protocol line, newline included.
    ///
    /// # Errors
    /// Serializing failed (a context holding what JSON cannot say).
    pub fn line(&self) -> Result<String, serde_json::Error> {
        let mut line = serde_json::to_string(self)?;
        line.push('\n');
        Ok(line)
    }
}

/// phasm's first message ([`ToHost::Hello`]).
#[derive(Debug, Clone, Serialize)]
pub struct Hello {
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

/// A step request ([`ToHost::Step`]): every call of one step, sharing one context and one
/// `obj`.
#[derive(Debug, Clone, Serialize)]
pub struct StepRequest {
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

/// The outcome of a step ([`FromHost::Done`]).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Done {
    /// The request's id.
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
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum FromHost {
    /// A continuation page's next token: phasm queues the next page and answers `go`.
    Token {
        /// The step's request id.
        id: u64,
        /// The token (`null` when missing).
        #[serde(default)]
        token: Value,
    },
    /// The step's outcome.
    Done(Box<Done>),
}

impl FromHost {
    /// The request the message answers.
    pub fn id(&self) -> u64 {
        match self {
            FromHost::Token { id, .. } => *id,
            FromHost::Done(done) => done.id,
        }
    }
}

/// Why a line from a host is not a message of the protocol.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// The line is not JSON.
    #[error("not a JSON object ({0})")]
    NotJson(#[source] serde_json::Error),
    /// JSON, but not a message of the protocol: an unknown `type`, a missing or unknown
    /// field, a value of the wrong kind.
    #[error("a message that does not fit the protocol: {0}")]
    Unfit(#[source] serde_json::Error),
}

/// Parse one line a host wrote after `ready`.
///
/// # Errors
/// What is wrong with the line.
pub fn parse_line(line: &str) -> Result<FromHost, ProtocolError> {
    serde_json::from_str(line).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => ProtocolError::Unfit(e),
        _ => ProtocolError::NotJson(e),
    })
}

/// phasm's answer to a `token`: `go` (the next page is queued) or `abort` (it could not be).
pub fn answer(id: u64, outcome: &Result<(), String>) -> ToHost<'_> {
    match outcome {
        Ok(()) => ToHost::Go { id },
        Err(error) => ToHost::Abort { id, error },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_done_and_token_and_rejects_garbage() {
        let m = parse_line(r#"{"type":"token","id":3,"token":"7"}"#).unwrap();
        assert_eq!(m.id(), 3);
        assert!(matches!(m, FromHost::Token { token: Value::String(t), .. } if t == "7"));
        let m = parse_line(
            r#"{"type":"done","id":4,"context":{"a":1},"event":"ok","log":[{"level":"warning","message":"x\ny"}]}"#,
        )
        .unwrap();
        assert_eq!(m.id(), 4);
        let FromHost::Done(d) = m else { panic!() };
        assert_eq!(d.event.as_deref(), Some("ok"));
        assert_eq!(d.log[0].level, "warning");
        assert!(matches!(
            parse_line("hello world"),
            Err(ProtocolError::NotJson(_))
        ));
        let missing = parse_line(r#"{"type":"done"}"#).unwrap_err();
        assert!(matches!(missing, ProtocolError::Unfit(_)));
        assert!(missing.to_string().contains("`id`"), "{missing}");
        let typo = parse_line(r#"{"type":"done","id":1,"evnet":"x"}"#).unwrap_err();
        assert!(typo.to_string().contains("evnet"), "{typo}");
        let unknown = parse_line(r#"{"type":"what","id":1}"#).unwrap_err();
        assert!(unknown.to_string().contains("what"), "{unknown}");
    }

    #[test]
    fn phasm_writes_each_message_with_its_type_first() {
        let go = answer(7, &Ok(())).line().unwrap();
        assert_eq!(go, "{\"type\":\"go\",\"id\":7}\n");
        let abort = answer(8, &Err("full".into())).line().unwrap();
        assert_eq!(abort, "{\"type\":\"abort\",\"id\":8,\"error\":\"full\"}\n");
        let hello = Hello {
            protocol: PROTOCOL_VERSION,
            path: vec!["/app".into()],
            threads: 2,
            drain_seconds: 1.5,
            actions: Vec::new(),
            constants: Vec::new(),
            machines: std::collections::BTreeMap::new(),
        };
        let line = ToHost::Hello(&hello).line().unwrap();
        assert!(
            line.starts_with("{\"type\":\"hello\",\"protocol\":1,"),
            "{line}"
        );
    }
}
