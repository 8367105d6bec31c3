//! The `exec` binding: an action carried out by running a program.
//!
//! phasm writes one JSON request to the program's stdin and reads one JSON response from its
//! stdout (see the README for the fields). A non-zero exit, a timeout, output that is not a
//! JSON object, or output larger than [`MAX_EXEC_OUTPUT_BYTES`] fails the attempt; stderr goes
//! to the instance's log.

use std::process::Stdio;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;

use super::{Action, ActionContext, ActionError, ActionResult};
use crate::machine::ExecBinding;

/// How long a call may run when its binding sets no `timeout`.
pub const DEFAULT_EXEC_TIMEOUT: Duration = Duration::from_secs(300);

/// The most a program may write to stdout (and, separately, to stderr).
pub const MAX_EXEC_OUTPUT_BYTES: usize = 16 * 1024 * 1024;

/// How much of stderr an error message quotes.
const STDERR_TAIL: usize = 2000;

/// An action that runs a program per call.
#[derive(Debug, Clone)]
pub struct ExecAction {
    binding: ExecBinding,
}

impl ExecAction {
    /// An action for this binding.
    pub fn new(binding: ExecBinding) -> Self {
        Self { binding }
    }

    fn describe(&self) -> String {
        self.binding.argv.join(" ")
    }
}

#[async_trait]
impl Action for ExecAction {
    fn timeout(&self) -> Option<Duration> {
        Some(self.binding.timeout.unwrap_or(DEFAULT_EXEC_TIMEOUT))
    }

    async fn run(&self, cx: &mut ActionContext) -> ActionResult {
        let request = request(cx);
        let timeout = self.binding.timeout.unwrap_or(DEFAULT_EXEC_TIMEOUT);
        let (program, args) = self
            .binding
            .argv
            .split_first()
            .ok_or_else(|| ActionError::new("exec binding has no program"))?;
        let mut child = super::withhold_secrets(&mut Command::new(program))
            .args(args)
            .current_dir(&self.binding.working_dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group: a timeout kills what it started too.
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| {
                let message = format!(
                    "cannot start `{}` in `{}`: {e}",
                    self.describe(),
                    self.binding.working_dir.display()
                );
                if super::out_of_resources(&e) {
                    ActionError::unavailable(format!(
                        "{message} (this worker is out of file descriptors or processes)"
                    ))
                } else {
                    ActionError::new(message)
                }
            })?;
        let pid = child.id().unwrap_or(0);
        // Whatever happens from here on, nothing of the program's group outlives the call.
        let _group = GroupGuard(pid);
        let stdin = child.stdin.take();
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        let body = serde_json::to_vec(&request)?;
        let mut out = Output::default();
        let mut err = Output::default();
        let early = cx.early_token.clone();
        let run = async {
            let reads = async {
                let write = async {
                    if let Some(mut pipe) = stdin {
                        // A program may exit without reading its input: that is its business.
                        let _ = pipe.write_all(&body).await;
                        let _ = pipe.shutdown().await;
                    }
                };
                tokio::join!(
                    write,
                    read_capped(stdout, &mut out, early.as_ref()),
                    read_capped(stderr, &mut err, None)
                );
            };
            tokio::pin!(reads);
            tokio::select! {
                status = child.wait() => {
                    // It exited: take what is in the pipes, without waiting for the end of
                    // output that a process it left behind may hold open.
                    let _ = tokio::time::timeout(AFTER_EXIT, &mut reads).await;
                    status
                }
                () = &mut reads => child.wait().await,
            }
        };
        let status = match tokio::time::timeout(timeout, run).await {
            Ok(done) => done,
            Err(_) => {
                return Err(ActionError::new(format!(
                    "`{}` timed out after {}s and was killed with its process group",
                    self.describe(),
                    timeout.as_secs_f64()
                )))
            }
        };
        let status = status
            .map_err(|e| ActionError::new(format!("waiting for `{}`: {e}", self.describe())))?;
        let stderr_text = String::from_utf8_lossy(&err.bytes).into_owned();
        for line in stderr_text.lines().filter(|l| !l.trim().is_empty()) {
            cx.log(
                if status.success() { "info" } else { "error" },
                format!("stderr: {line}"),
            );
        }
        if err.over {
            cx.log(
                "warning",
                format!("stderr was cut at {MAX_EXEC_OUTPUT_BYTES} bytes"),
            );
        }
        if !status.success() {
            let code = {
                use std::os::unix::process::ExitStatusExt;
                match (status.code(), status.signal()) {
                    (Some(c), _) => format!("exited with status {c}"),
                    (None, Some(s)) => format!("was {}", super::host::killed_by(s)),
                    (None, None) => "was killed by a signal".to_string(),
                }
            };
            let tail = tail(&stderr_text);
            let tail = if tail.is_empty() {
                String::new()
            } else {
                format!(": {tail}")
            };
            return Err(ActionError::new(format!(
                "`{}` {code}{tail}",
                self.describe()
            )));
        }
        if out.over {
            return Err(ActionError::new(format!(
                "`{}` wrote more than {MAX_EXEC_OUTPUT_BYTES} bytes to stdout",
                self.describe()
            )));
        }
        let reported_early = out.early_token;
        let event = apply_response(cx, &out.bytes)
            .map_err(|e| ActionError::new(format!("`{}`: {e}", self.describe())))?;
        if reported_early && cx.next_token.is_some() {
            return Err(ActionError::new(format!(
                "`{}` reported the next page's token on its first line and again in its response; report it once",
                self.describe()
            )));
        }
        Ok(event)
    }
}

/// How long the pipes of a program that has exited are still read.
const AFTER_EXIT: Duration = Duration::from_millis(200);

/// Kills a process group when dropped.
struct GroupGuard(u32);

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if self.0 != 0 {
            super::host::kill_group(self.0);
        }
    }
}

/// What was read from one of a program's pipes.
#[derive(Default)]
struct Output {
    bytes: Vec<u8>,
    /// More than [`MAX_EXEC_OUTPUT_BYTES`] were written.
    over: bool,
    /// The first line was `{"token": ...}`, handed over before the program finished.
    early_token: bool,
}

/// The JSON request a program (or a webhook) receives for a call.
pub(crate) fn request(cx: &ActionContext) -> Value {
    let mut request = json!({
        "machine": cx.machine,
        "instance": cx.instance,
        "state": cx.state,
        "role": cx.role.as_str(),
        "event": cx.event,
        "task": cx.task,
        "attempt": cx.attempt,
        "context": cx.context,
        "token": cx.token,
    });
    if !cx.contexts.is_empty() {
        request["contexts"] = json!(cx.contexts);
    }
    if let Some(token) = &cx.wait_token {
        request["wait_token"] = json!(token);
    }
    request
}

/// Read a pipe into `out` (at most [`MAX_EXEC_OUTPUT_BYTES`], draining the rest). With
/// `early`, a first line that is `{"token": ...}` alone is the next page's token, sent on at
/// once and not kept.
async fn read_capped(
    pipe: Option<impl AsyncRead + Unpin>,
    out: &mut Output,
    early: Option<&tokio::sync::mpsc::UnboundedSender<Value>>,
) {
    let Some(mut pipe) = pipe else {
        return;
    };
    let mut first_line_checked = early.is_none();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        let n = match pipe.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if out.over {
            continue; // drain, so the program is not blocked writing to a full pipe
        }
        out.bytes.extend_from_slice(&chunk[..n]);
        if out.bytes.len() > MAX_EXEC_OUTPUT_BYTES {
            out.bytes.truncate(MAX_EXEC_OUTPUT_BYTES);
            out.over = true;
            continue;
        }
        if !first_line_checked {
            if let Some(end) = out.bytes.iter().position(|&b| b == b'\n') {
                first_line_checked = true;
                if let (Some(token), Some(tx)) = (early_token(&out.bytes[..end]), early) {
                    let _ = tx.send(token);
                    out.early_token = true;
                    out.bytes.drain(..=end);
                }
            }
        }
    }
}

/// The token of a line `{"token": T}` (nothing else in the object, `T` not null).
fn early_token(line: &[u8]) -> Option<Value> {
    match serde_json::from_slice::<Value>(line).ok()? {
        Value::Object(mut map) if map.len() == 1 => map.remove("token").filter(|t| !t.is_null()),
        _ => None,
    }
}

fn tail(text: &str) -> String {
    let trimmed = text.trim();
    let start = trimmed.len().saturating_sub(STDERR_TAIL);
    let start = (start..=trimmed.len())
        .find(|&i| trimmed.is_char_boundary(i))
        .unwrap_or(trimmed.len());
    trimmed[start..].replace('\n', " | ")
}

/// The levels a `log` line may name.
const LOG_LEVELS: &[&str] = &["debug", "info", "warning", "error", "critical"];

/// The fields of a response.
const RESPONSE_FIELDS: &[&str] = &["event", "context", "forks", "spawn", "token", "log", "halt"];

/// Apply a program's (or a webhook's) response to the action context; returns the event.
pub(crate) fn apply_response(cx: &mut ActionContext, stdout: &[u8]) -> ActionResult {
    if stdout.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    let value: Value = serde_json::from_slice(stdout).map_err(|e| {
        let shown = String::from_utf8_lossy(&stdout[..stdout.len().min(200)]).into_owned();
        ActionError::new(format!("output is not JSON ({e}): {shown}"))
    })?;
    let Value::Object(mut response) = value else {
        return Err(ActionError::new("output must be a JSON object"));
    };
    if let Some(unknown) = response
        .keys()
        .find(|k| !RESPONSE_FIELDS.contains(&k.as_str()))
    {
        let hint = RESPONSE_FIELDS
            .iter()
            .map(|f| (strsim::jaro_winkler(unknown, f), f))
            .filter(|(score, _)| *score > 0.8)
            .max_by(|a, b| a.0.total_cmp(&b.0))
            .map_or(String::new(), |(_, f)| format!(" (did you mean `{f}`?)"));
        return Err(ActionError::new(format!(
            "unknown field `{unknown}` in the response{hint}; the fields are {}",
            RESPONSE_FIELDS
                .iter()
                .map(|f| format!("`{f}`"))
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    // The new context first: forks are copies of it.
    if let Some(context) = response.remove("context") {
        match context {
            Value::Object(map) => cx.context = map,
            Value::Null => {}
            _ => return Err(ActionError::new("`context` must be a JSON object")),
        }
    }
    match response.remove("forks") {
        None | Some(Value::Null) => {}
        Some(Value::Array(forks)) => {
            for fork in forks {
                match fork {
                    Value::Object(data) => cx.fork(data),
                    _ => return Err(ActionError::new("each of `forks` must be a JSON object")),
                }
            }
        }
        Some(_) => return Err(ActionError::new("`forks` must be an array of objects")),
    }
    match response.remove("spawn") {
        None | Some(Value::Null) => {}
        Some(Value::Array(spawns)) => {
            for spawn in spawns {
                let machine = spawn
                    .get("machine")
                    .and_then(Value::as_str)
                    .map(str::to_string);
                let contexts = spawn.get("contexts").and_then(Value::as_array).map(|cs| {
                    cs.iter()
                        .map(|c| c.as_object().cloned())
                        .collect::<Option<Vec<_>>>()
                });
                let countdown = match spawn.get("countdown") {
                    None | Some(Value::Null) => Some(Duration::ZERO),
                    Some(v) => v
                        .as_f64()
                        .filter(|s| s.is_finite() && *s >= 0.0)
                        .and_then(|s| Duration::try_from_secs_f64(s).ok()),
                };
                match (machine, contexts, countdown) {
                    (Some(machine), Some(Some(contexts)), Some(countdown)) => {
                        cx.spawn_after(&machine, contexts, countdown);
                    }
                    _ => {
                        return Err(ActionError::new(
                            "each of `spawn` must be {\"machine\": NAME, \"contexts\": [objects], \"countdown\": SECONDS (optional)}",
                        ))
                    }
                }
            }
        }
        Some(_) => return Err(ActionError::new("`spawn` must be an array")),
    }
    match response.remove("token") {
        None | Some(Value::Null) => {}
        Some(token) => cx.set_next_token(token),
    }
    if let Some(log) = response.remove("log") {
        match log {
            Value::Array(lines) => {
                for line in lines {
                    match line {
                        Value::String(s) => cx.info(s),
                        // {"level": "warning", "message": "..."}
                        Value::Object(mut entry) => {
                            let level = match entry.remove("level") {
                                None | Some(Value::Null) => "info".to_string(),
                                Some(Value::String(l)) if LOG_LEVELS.contains(&l.as_str()) => l,
                                Some(other) => {
                                    return Err(ActionError::new(format!(
                                        "a `log` line's `level` must be one of {}, found {other}",
                                        LOG_LEVELS.join(", ")
                                    )))
                                }
                            };
                            let message = match entry.remove("message") {
                                Some(Value::String(m)) => m,
                                Some(other) => other.to_string(),
                                None => String::new(),
                            };
                            cx.log(&level, message);
                        }
                        other => cx.info(other.to_string()),
                    }
                }
            }
            Value::String(s) => cx.info(s),
            Value::Null => {}
            _ => return Err(ActionError::new("`log` must be an array of strings")),
        }
    }
    match response.remove("halt") {
        None | Some(Value::Null | Value::Bool(false)) => {}
        Some(Value::Bool(true)) => cx.halt("halted by the action"),
        Some(Value::String(reason)) => cx.halt(reason),
        Some(_) => return Err(ActionError::new("`halt` must be true, false or a reason")),
    }
    match response.remove("event") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(e)) => Ok(Some(e)),
        Some(other) => Err(ActionError::new(format!(
            "`event` must be a string, found {other}"
        ))),
    }
}
