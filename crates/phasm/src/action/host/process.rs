//! One host process: started in its own process group, spoken to over its stdin and stdout,
//! its stderr forwarded to phasm's log, killed with its whole group when it must go.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::{mpsc, watch, Semaphore};

use super::protocol::{
    parse_line, FromHost, Hello, ProtocolError, Ready, ToHost, PROTOCOL_VERSION,
};

/// The longest line a host may write (a step's whole outcome, contexts and forks included).
pub const MAX_LINE_BYTES: usize = 256 * 1024 * 1024;

/// How long a host may take to import the actions' modules and answer `hello`.
const HELLO_TIMEOUT: Duration = Duration::from_secs(120);

/// How many of a host's last stderr lines an error message quotes.
const STDERR_TAIL_LINES: usize = 20;

/// How to start a host.
#[derive(Debug, Clone)]
pub struct HostCommand {
    /// Program.
    pub program: String,
    /// Arguments.
    pub args: Vec<String>,
    /// Working folder.
    pub working_dir: PathBuf,
    /// What the host is called in messages (`Python host`).
    pub label: String,
}

/// Lock a mutex, taking over a poisoned one (its data is a plain map or text).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

type Pending = Arc<Mutex<HashMap<u64, mpsc::UnboundedSender<FromHost>>>>;

/// A running host process.
pub struct HostProcess {
    /// Its process id (and process group id).
    pub pid: u32,
    /// What it is called in messages, with its pid.
    pub name: String,
    stdin: tokio::sync::Mutex<Option<ChildStdin>>,
    pending: Pending,
    /// Steps it may still take (phasm's bound on its in-flight work).
    pub permits: Arc<Semaphore>,
    kill_reason: Arc<Mutex<Option<String>>>,
    died: watch::Receiver<Option<String>>,
    exited: Arc<AtomicBool>,
    closing: Arc<AtomicBool>,
}

impl std::fmt::Debug for HostProcess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostProcess")
            .field("pid", &self.pid)
            .finish_non_exhaustive()
    }
}

impl HostProcess {
    /// Start a host, say `hello`, and wait for `ready`.
    ///
    /// # Errors
    /// Why the host could not be started or did not answer as the protocol says.
    pub async fn start(
        command: &HostCommand,
        hello: &Hello,
        in_flight: usize,
    ) -> Result<(Arc<Self>, Ready), String> {
        let describe = format!("{} {}", command.program, command.args.join(" "));
        let mut child = crate::action::withhold_secrets(&mut Command::new(&command.program))
            .args(&command.args)
            // The host exits when this process is gone (see docs/host-protocol.md).
            .env("PHASM_PARENT_PID", std::process::id().to_string())
            .current_dir(&command.working_dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| {
                format!(
                    "cannot start the {} (`{}` in `{}`): {e}",
                    command.label,
                    command.program,
                    command.working_dir.display()
                )
            })?;
        let pid = child.id().unwrap_or(0);
        let name = format!("{} (pid {pid})", command.label);
        let (Some(mut stdin), Some(stdout), Some(stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            return Err(format!("cannot start `{describe}`: its pipes are missing"));
        };
        let tail = Arc::new(Mutex::new(VecDeque::new()));
        let stderr_done = tokio::spawn(forward_stderr(stderr, name.clone(), Arc::clone(&tail)));
        let mut stdout = BufReader::with_capacity(64 * 1024, stdout);
        let hello_line = ToHost::Hello(hello)
            .line()
            .map_err(|e| format!("cannot write the hello message: {e}"))?;
        let handshake = async {
            let written = async {
                stdin.write_all(hello_line.as_bytes()).await?;
                stdin.flush().await
            };
            written
                .await
                .map_err(|e| format!("it exited before reading hello ({e})"))?;
            let mut line = Vec::new();
            match read_line(&mut stdout, &mut line).await {
                Ok(0) => Err("it exited before answering hello".to_string()),
                Ok(_) => serde_json::from_slice::<Ready>(&line).map_err(|e| {
                    format!(
                        "its answer to hello is not a `ready` message ({e}): {}",
                        String::from_utf8_lossy(&line[..line.len().min(200)])
                    )
                }),
                Err(e) => Err(e),
            }
        };
        let ready = match tokio::time::timeout(HELLO_TIMEOUT, handshake).await {
            Ok(Ok(ready)) => ready,
            Ok(Err(e)) => {
                kill_group(pid);
                let status = wait_briefly(&mut child).await;
                let _ = tokio::time::timeout(Duration::from_secs(1), stderr_done).await;
                return Err(format!(
                    "the {name} failed to start: {e}{status}{}",
                    tail_text(&tail)
                ));
            }
            Err(_) => {
                kill_group(pid);
                return Err(format!(
                    "the {name} did not answer hello within {}s (importing the action modules took too long?){}",
                    HELLO_TIMEOUT.as_secs(),
                    tail_text(&tail)
                ));
            }
        };
        if let Some(fatal) = &ready.fatal {
            kill_group(pid);
            return Err(format!("the {name} cannot work: {fatal}"));
        }
        if ready.protocol != PROTOCOL_VERSION {
            kill_group(pid);
            return Err(format!(
                "the {name} speaks protocol {}, phasm speaks {PROTOCOL_VERSION}",
                ready.protocol
            ));
        }
        let pending: Pending = Arc::new(Mutex::new(HashMap::new()));
        let kill_reason = Arc::new(Mutex::new(None));
        let exited = Arc::new(AtomicBool::new(false));
        let closing = Arc::new(AtomicBool::new(false));
        let (died_tx, died) = watch::channel(None);
        tokio::spawn(read_messages(Reader {
            stdout,
            child,
            pid,
            name: name.clone(),
            pending: Arc::clone(&pending),
            kill_reason: Arc::clone(&kill_reason),
            exited: Arc::clone(&exited),
            closing: Arc::clone(&closing),
            tail,
            stderr_done,
            died: died_tx,
        }));
        Ok((
            Arc::new(Self {
                pid,
                name,
                stdin: tokio::sync::Mutex::new(Some(stdin)),
                pending,
                permits: Arc::new(Semaphore::new(in_flight.max(1))),
                kill_reason,
                died,
                exited,
                closing,
            }),
            ready,
        ))
    }

    /// Whether it still runs (and has not been told to die).
    pub fn is_alive(&self) -> bool {
        self.died.borrow().is_none() && lock(&self.kill_reason).is_none()
    }

    /// Register request `id` (its messages go to the returned receiver), then send `line`.
    ///
    /// # Errors
    /// When the host cannot be written to.
    pub async fn request(
        &self,
        id: u64,
        line: &str,
    ) -> Result<mpsc::UnboundedReceiver<FromHost>, String> {
        let (tx, rx) = mpsc::unbounded_channel();
        lock(&self.pending).insert(id, tx);
        if let Some(reason) = self.died.borrow().clone() {
            // It went before the request was registered: nobody would answer.
            lock(&self.pending).remove(&id);
            return Err(reason);
        }
        if let Err(e) = self.write(line).await {
            lock(&self.pending).remove(&id);
            return Err(e);
        }
        Ok(rx)
    }

    /// Write one line (which ends with `\n`).
    ///
    /// # Errors
    /// When the host's stdin is closed or broken.
    pub async fn write(&self, line: &str) -> Result<(), String> {
        let mut stdin = self.stdin.lock().await;
        let Some(pipe) = stdin.as_mut() else {
            return Err(format!("the {} is closing", self.name));
        };
        let written = async {
            pipe.write_all(line.as_bytes()).await?;
            pipe.flush().await
        };
        written
            .await
            .map_err(|e| format!("cannot write to the {}: {e}", self.name))
    }

    /// Stop waiting for request `id`.
    pub fn forget(&self, id: u64) {
        lock(&self.pending).remove(&id);
    }

    /// Kill the host and its whole process group; `reason` is what its in-flight steps
    /// fail with. Only the first reason is kept.
    pub fn kill(&self, reason: String) {
        {
            let mut r = lock(&self.kill_reason);
            if r.is_none() {
                *r = Some(reason);
            }
        }
        if !self.exited.load(Ordering::SeqCst) {
            kill_group(self.pid);
        }
    }

    /// Wait until the host is gone; why it went.
    pub async fn died(&self) -> String {
        let mut died = self.died.clone();
        let reason = match died.wait_for(Option::is_some).await {
            Ok(reason) => reason.clone().unwrap_or_default(),
            Err(_) => format!("the {} is gone", self.name),
        };
        reason
    }

    /// Close its stdin (it finishes its running steps and exits), wait up to `grace`, then
    /// kill what is left of its process group.
    pub async fn close(&self, grace: Duration) {
        self.closing.store(true, Ordering::SeqCst);
        self.stdin.lock().await.take();
        let mut died = self.died.clone();
        if tokio::time::timeout(grace, died.wait_for(Option::is_some))
            .await
            .is_err()
        {
            self.kill(format!(
                "the {} did not exit within {}s of being closed",
                self.name,
                grace.as_secs()
            ));
        }
    }
}

/// Read one `\n`-terminated line onto the end of `buf` (without the newline); `Ok(0)` at end
/// of input. Cancel-safe: what was read of a line stays in `buf` for the next call, so the
/// caller clears `buf` once it has used a whole line.
async fn read_line<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    buf: &mut Vec<u8>,
) -> Result<usize, String> {
    loop {
        let available = reader
            .fill_buf()
            .await
            .map_err(|e| format!("cannot read from it: {e}"))?;
        if available.is_empty() {
            return Ok(buf.len());
        }
        let (taken, done) = match available.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (available.len(), false),
        };
        let end = if done { taken - 1 } else { taken };
        buf.extend_from_slice(&available[..end]);
        reader.consume(taken);
        if buf.len() > MAX_LINE_BYTES {
            return Err(format!(
                "it wrote a line longer than {MAX_LINE_BYTES} bytes"
            ));
        }
        if done {
            // An empty line counts as a line (not the end of input).
            return Ok(buf.len().max(1));
        }
    }
}

struct Reader {
    stdout: BufReader<tokio::process::ChildStdout>,
    child: Child,
    pid: u32,
    name: String,
    pending: Pending,
    kill_reason: Arc<Mutex<Option<String>>>,
    exited: Arc<AtomicBool>,
    closing: Arc<AtomicBool>,
    tail: Arc<Mutex<VecDeque<String>>>,
    stderr_done: tokio::task::JoinHandle<()>,
    died: watch::Sender<Option<String>>,
}

/// Route the host's messages to the steps waiting for them, until it goes away: its stdout
/// ends, or the process itself exits (a child it forked may hold its stdout open long after;
/// what the host wrote before it exited is still read).
async fn read_messages(mut r: Reader) {
    let mut pending_line = Vec::new();
    let mut exit = None;
    let broken = {
        // One wait for the whole life of the host (not a new one per line).
        let exited = r.child.wait();
        tokio::pin!(exited);
        loop {
            let read = if exit.is_some() {
                // The host is gone: read what it left in the pipe, but wait on no child of it.
                let more = read_line(&mut r.stdout, &mut pending_line);
                match tokio::time::timeout(Duration::from_millis(200), more).await {
                    Ok(read) => read,
                    Err(_) => break None,
                }
            } else {
                tokio::select! {
                    biased;
                    read = read_line(&mut r.stdout, &mut pending_line) => read,
                    status = &mut exited => {
                        // At once: what it forked dies with it, and lets go of the pipe.
                        kill_group(r.pid);
                        exit = Some(status);
                        continue;
                    }
                }
            };
            // A whole line: the next one starts empty.
            let line = std::mem::take(&mut pending_line);
            match read {
                Ok(0) => break None,
                Ok(_) if line.iter().all(u8::is_ascii_whitespace) => {}
                Ok(_) => {
                    let text = String::from_utf8_lossy(&line);
                    match parse_line(&text) {
                        Ok(message) => route(&r.pending, &r.name, message.id(), message),
                        Err(e) => match request_id(&line) {
                            // The line names its step: only that step fails, and the host,
                            // which still writes whole lines, goes on.
                            Some(id) => {
                                tracing::warn!(host = %r.name, id, error = %e, "an answer that is not the host protocol");
                                let answer = FromHost::Done(Box::new(unreadable(id, &e)));
                                route(&r.pending, &r.name, id, answer);
                            }
                            None => {
                                // Its words are not quoted: they may hold any step's data.
                                let shown: String = text.chars().take(200).collect();
                                tracing::debug!(host = %r.name, line = %shown, "the line that broke the protocol");
                                break Some(format!(
                                    "it wrote a line that is not the host protocol ({e})"
                                ));
                            }
                        },
                    }
                }
                Err(e) => break Some(e),
            }
        }
    };
    if let Some(why) = &broken {
        let mut reason = lock(&r.kill_reason);
        if reason.is_none() {
            *reason = Some(format!("the {} broke the protocol: {why}", r.name));
        }
        drop(reason);
    }
    let status = match exit {
        // Its group was killed when its exit was seen, before anything could reuse the id.
        Some(status) => describe_exit(status),
        None => {
            // Whatever it started dies with it (a forked child holding the pipe included).
            kill_group(r.pid);
            wait_briefly(&mut r.child).await
        }
    };
    r.exited.store(true, Ordering::SeqCst);
    let _ = tokio::time::timeout(Duration::from_secs(1), &mut r.stderr_done).await;
    let reason = match lock(&r.kill_reason).clone() {
        Some(reason) => reason,
        None => format!("the {} exited{status}{}", r.name, tail_text(&r.tail)),
    };
    if r.closing.load(Ordering::SeqCst) && status == " with status 0" {
        tracing::debug!(host = %r.name, "{reason}");
    } else {
        tracing::warn!(host = %r.name, "{reason}");
    }
    let _ = r.died.send(Some(reason));
    // Dropping the senders tells every waiting step that the host is gone.
    lock(&r.pending).clear();
}

/// Hand `message` to the step waiting for request `id`.
fn route(pending: &Pending, host: &str, id: u64, message: FromHost) {
    let done = matches!(message, FromHost::Done(_));
    let tx = {
        let mut pending = lock(pending);
        if done {
            pending.remove(&id)
        } else {
            pending.get(&id).cloned()
        }
    };
    if let Some(tx) = tx {
        let _ = tx.send(message);
    } else {
        tracing::debug!(host = %host, id, "a message for a step nobody waits for");
    }
}

/// The request id a line names near its start (`{"type": "done", "id": 12, …`), when the
/// line as a whole cannot be read.
fn request_id(line: &[u8]) -> Option<u64> {
    let head = &line[..line.len().min(128)];
    let at = head.windows(4).position(|w| w == b"\"id\"")?;
    let rest = head[at + 4..].trim_ascii_start();
    let rest = rest.strip_prefix(b":")?.trim_ascii_start();
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&rest[..digits]).ok()?.parse().ok()
}

/// The answer standing for a step's answer that could not be read.
fn unreadable(id: u64, e: &ProtocolError) -> super::protocol::Done {
    super::protocol::Done {
        id,
        error: Some(super::protocol::DoneError {
            call: None,
            kind: Some("ProtocolError".into()),
            message: format!("the host's answer to this step cannot be read: {e}"),
            traceback: None,
            transient: false,
        }),
        ..Default::default()
    }
}

/// Wait for the process to end (killing its group if it lingers); `" with status N"` or
/// `" (killed by a signal)"`.
async fn wait_briefly(child: &mut Child) -> String {
    let status =
        if let Ok(status) = tokio::time::timeout(Duration::from_secs(5), child.wait()).await {
            status
        } else {
            if let Some(pid) = child.id() {
                kill_group(pid);
            }
            child.wait().await
        };
    describe_exit(status)
}

/// `" with status N"`, `" (killed by SIGKILL, perhaps out of memory)"` or `" (killed by
/// SIGSEGV)"`: how a process ended.
fn describe_exit(status: std::io::Result<std::process::ExitStatus>) -> String {
    use std::os::unix::process::ExitStatusExt;
    match status {
        Ok(s) => match (s.code(), s.signal()) {
            (Some(code), _) => format!(" with status {code}"),
            (None, Some(signal)) => format!(" ({})", killed_by(signal)),
            (None, None) => " (killed by a signal)".to_string(),
        },
        Err(e) => format!(" (cannot tell how: {e})"),
    }
}

/// `killed by SIGSEGV`, or `killed by SIGKILL, perhaps out of memory` (what the kernel's
/// out-of-memory killer sends): how a process ended by `signal` is described.
pub fn killed_by(signal: i32) -> String {
    match signal {
        9 => "killed by SIGKILL, perhaps out of memory".to_string(),
        other => format!("killed by {}", signal_name(other)),
    }
}

/// A signal's name (`SIGSEGV`), or its number.
fn signal_name(signal: i32) -> String {
    let name = match signal {
        1 => "SIGHUP",
        2 => "SIGINT",
        3 => "SIGQUIT",
        4 => "SIGILL",
        6 => "SIGABRT",
        7 => "SIGBUS",
        8 => "SIGFPE",
        9 => "SIGKILL",
        11 => "SIGSEGV",
        13 => "SIGPIPE",
        14 => "SIGALRM",
        15 => "SIGTERM",
        24 => "SIGXCPU",
        25 => "SIGXFSZ",
        _ => return format!("signal {signal}"),
    };
    name.to_string()
}

/// Most of a host's stderr lines written to phasm's log each second; the rest are counted,
/// and the count is logged once the next second begins. (What a step's own thread writes
/// reaches that step's log through the host instead: see docs/host-protocol.md.)
const STDERR_LINES_PER_SECOND: u32 = 100;

async fn forward_stderr(
    stderr: tokio::process::ChildStderr,
    name: String,
    tail: Arc<Mutex<VecDeque<String>>>,
) {
    let mut lines = BufReader::new(stderr).lines();
    let mut second = tokio::time::Instant::now();
    let (mut shown, mut hidden) = (0u32, 0u64);
    let summarise = |hidden: u64| {
        if hidden > 0 {
            tracing::warn!(host = %name, "stderr: … {hidden} more lines not shown (over {STDERR_LINES_PER_SECOND} a second)");
        }
    };
    while let Ok(Some(line)) = lines.next_line().await {
        let line = crate::engine::text::storable(line);
        if second.elapsed() >= Duration::from_secs(1) {
            summarise(hidden);
            second = tokio::time::Instant::now();
            (shown, hidden) = (0, 0);
        }
        if shown < STDERR_LINES_PER_SECOND {
            shown += 1;
            tracing::warn!(host = %name, "stderr: {line}");
        } else {
            hidden += 1;
        }
        let mut tail = lock(&tail);
        if tail.len() == STDERR_TAIL_LINES {
            tail.pop_front();
        }
        tail.push_back(line);
    }
    summarise(hidden);
}

fn tail_text(tail: &Mutex<VecDeque<String>>) -> String {
    let tail = lock(tail);
    if tail.is_empty() {
        String::new()
    } else {
        let lines: Vec<&str> = tail.iter().map(String::as_str).collect();
        format!("; its last words on stderr:\n{}", lines.join("\n"))
    }
}

/// SIGKILL a process group (the host and everything its actions started).
pub fn kill_group(pid: u32) {
    let group = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw);
    if let Some(group) = group {
        // ESRCH (already gone) is fine.
        let _ = rustix::process::kill_process_group(group, rustix::process::Signal::KILL);
    }
}
