//! Long-lived action hosts: processes that run many steps' actions, spoken to in
//! newline-delimited JSON (docs/host-protocol.md).
//!
//! A [`HostPool`] keeps a few host processes running for a worker. Each step's calls go to
//! one host in one `step` request; the host answers `done` (after a `token` for a
//! continuation page with a next page, which phasm queues before answering `go`). A host
//! that dies fails the steps it was running (their attempts retry under their policy) and is
//! restarted with backoff; a step past its timeout takes its host's whole process group down
//! with it. Each host runs at most `in_flight` steps at once.

mod process;
pub mod protocol;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, OwnedSemaphorePermit};

pub use process::{kill_group, killed_by, HostCommand, HostProcess, MAX_LINE_BYTES};
use protocol::{FromHost, Hello, Ready, StepRequest, ToHost};

/// The longest wait before restarting a host that keeps dying.
const MAX_RESTART_BACKOFF: Duration = Duration::from_secs(10);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// How a pool runs its hosts.
#[derive(Debug, Clone)]
pub struct PoolOptions {
    /// Host processes.
    pub processes: usize,
    /// Steps one host runs at once.
    pub in_flight: usize,
    /// Longest a step may take.
    pub timeout: Duration,
}

struct Slot {
    process: Mutex<Option<Arc<HostProcess>>>,
    restart: tokio::sync::Mutex<Restart>,
    restarting: AtomicBool,
}

#[derive(Default)]
struct Restart {
    failures: u32,
    not_before: Option<Instant>,
    last_error: Option<String>,
}

/// A worker's host processes.
pub struct HostPool {
    command: HostCommand,
    hello: Hello,
    options: PoolOptions,
    slots: Vec<Slot>,
    next_id: AtomicU64,
    turn: AtomicUsize,
}

impl std::fmt::Debug for HostPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostPool")
            .field("command", &self.command)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl HostPool {
    /// Start every host and check that each answers `hello`; the first host's answer.
    ///
    /// # Errors
    /// Why a host could not start (the others are stopped).
    pub async fn start(
        command: HostCommand,
        hello: Hello,
        options: PoolOptions,
    ) -> Result<(Arc<Self>, Ready), String> {
        let started = futures_util::future::join_all(
            (0..options.processes.max(1))
                .map(|_| HostProcess::start(&command, &hello, options.in_flight)),
        )
        .await;
        let mut slots = Vec::new();
        let mut first_ready = None;
        let mut failure = None;
        for result in started {
            match result {
                Ok((process, ready)) => {
                    first_ready.get_or_insert(ready);
                    slots.push(Slot {
                        process: Mutex::new(Some(process)),
                        restart: tokio::sync::Mutex::new(Restart::default()),
                        restarting: AtomicBool::new(false),
                    });
                }
                Err(e) => {
                    failure.get_or_insert(e);
                }
            }
        }
        let pool = Arc::new(Self {
            command,
            hello,
            options,
            slots,
            next_id: AtomicU64::new(1),
            turn: AtomicUsize::new(0),
        });
        match (failure, first_ready) {
            (None, Some(ready)) => Ok((pool, ready)),
            (Some(e), _) => {
                pool.kill_all("another host failed to start");
                Err(e)
            }
            (None, None) => Err("no host was started".into()),
        }
    }

    /// How long a step may run.
    pub fn timeout(&self) -> Duration {
        self.options.timeout
    }

    /// The running hosts' process ids.
    pub fn pids(&self) -> Vec<u32> {
        self.slots
            .iter()
            .filter_map(|s| {
                lock(&s.process)
                    .as_ref()
                    .filter(|p| p.is_alive())
                    .map(|p| p.pid)
            })
            .collect()
    }

    /// Send a step to a host with room for it; its messages arrive through the result.
    ///
    /// # Errors
    /// When no host runs (one is being restarted) or the chosen one cannot be written to.
    pub async fn start_step(
        self: &Arc<Self>,
        mut request: StepRequest,
    ) -> Result<RunningStep, String> {
        let (process, permit) = self.acquire().await?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        request.id = id;
        let line = ToHost::Step(&request)
            .line()
            .map_err(|e| format!("cannot encode the step request: {e}"))?;
        let messages = process.request(id, &line).await?;
        Ok(RunningStep {
            deadline: tokio::time::Instant::now() + self.options.timeout,
            timeout: self.options.timeout,
            task: request.task,
            process,
            _permit: permit,
            messages,
            id,
        })
    }

    /// A live host and a place on it: the one with the most room, waiting for room when
    /// every host is busy. Dead hosts are restarted in the background.
    async fn acquire(self: &Arc<Self>) -> Result<(Arc<HostProcess>, OwnedSemaphorePermit), String> {
        // A host may die while a step waits for room on it: then choose again.
        for _ in 0..3 {
            let (process, permit) = self.acquire_once().await?;
            if process.is_alive() {
                return Ok((process, permit));
            }
        }
        self.acquire_once().await
    }

    async fn acquire_once(
        self: &Arc<Self>,
    ) -> Result<(Arc<HostProcess>, OwnedSemaphorePermit), String> {
        let mut best: Option<Arc<HostProcess>> = None;
        let start = self.turn.fetch_add(1, Ordering::Relaxed);
        for k in 0..self.slots.len() {
            let i = (start + k) % self.slots.len();
            let current = lock(&self.slots[i].process).clone();
            match current {
                Some(p) if p.is_alive() => {
                    let room = p.permits.available_permits();
                    if best
                        .as_ref()
                        .is_none_or(|b| room > b.permits.available_permits())
                    {
                        best = Some(p);
                    }
                }
                _ => self.restart_in_background(i),
            }
        }
        let process = match best {
            Some(p) => p,
            None => self.ensure(0).await?,
        };
        let permit = Arc::clone(&process.permits)
            .acquire_owned()
            .await
            .map_err(|_| format!("the {} is closed", process.name))?;
        Ok((process, permit))
    }

    fn restart_in_background(self: &Arc<Self>, i: usize) {
        if self.slots[i].restarting.swap(true, Ordering::SeqCst) {
            return;
        }
        let pool = Arc::clone(self);
        tokio::spawn(async move {
            let _ = pool.ensure(i).await;
            pool.slots[i].restarting.store(false, Ordering::SeqCst);
        });
    }

    /// The host of slot `i`, restarted (with backoff) if it died.
    async fn ensure(&self, i: usize) -> Result<Arc<HostProcess>, String> {
        let slot = &self.slots[i];
        let mut restart = slot.restart.lock().await;
        if let Some(p) = lock(&slot.process).clone().filter(|p| p.is_alive()) {
            return Ok(p);
        }
        if let Some(at) = restart.not_before {
            let now = Instant::now();
            if at > now {
                // Keep the step waiting briefly rather than failing it at once.
                let wait = at - now;
                if wait > Duration::from_secs(2) {
                    return Err(format!(
                        "no {} is running (restarting in {:.1}s after: {})",
                        self.command.label,
                        wait.as_secs_f64(),
                        restart.last_error.as_deref().unwrap_or("it died")
                    ));
                }
                tokio::time::sleep(wait).await;
            }
        }
        match HostProcess::start(&self.command, &self.hello, self.options.in_flight).await {
            Ok((process, ready)) => {
                let unresolved: Vec<String> = ready
                    .actions
                    .iter()
                    .filter_map(|a| a.error.as_ref().map(|e| format!("`{}`: {e}", a.reference)))
                    .collect();
                if !unresolved.is_empty() {
                    process.kill("its actions no longer resolve".into());
                    let e = format!(
                        "a restarted {} cannot resolve actions it resolved before (were the modules changed?): {}",
                        self.command.label,
                        unresolved.join("; ")
                    );
                    restart.failures += 1;
                    restart.not_before = Some(Instant::now() + backoff(restart.failures));
                    restart.last_error = Some(e.clone());
                    return Err(e);
                }
                tracing::info!(host = %process.name, "host started");
                restart.failures = 0;
                restart.not_before = None;
                *lock(&slot.process) = Some(Arc::clone(&process));
                Ok(process)
            }
            Err(e) => {
                restart.failures += 1;
                restart.not_before = Some(Instant::now() + backoff(restart.failures));
                restart.last_error = Some(e.clone());
                tracing::warn!(error = %e, "restarting a host failed");
                Err(e)
            }
        }
    }

    /// Close every host: each finishes its running steps and exits; what is left after
    /// `grace` is killed with its process group.
    pub async fn close(&self, grace: Duration) {
        let running: Vec<Arc<HostProcess>> = self
            .slots
            .iter()
            .filter_map(|s| lock(&s.process).take())
            .collect();
        futures_util::future::join_all(running.iter().map(|p| p.close(grace))).await;
    }

    fn kill_all(&self, reason: &str) {
        for slot in &self.slots {
            if let Some(p) = lock(&slot.process).take() {
                p.kill(reason.to_string());
            }
        }
    }
}

impl Drop for HostPool {
    fn drop(&mut self) {
        self.kill_all("phasm stopped");
    }
}

fn backoff(failures: u32) -> Duration {
    let ms = 100u64.saturating_mul(1 << failures.min(10));
    Duration::from_millis(ms).min(MAX_RESTART_BACKOFF)
}

/// A step sent to a host, until its `done` arrives.
pub struct RunningStep {
    process: Arc<HostProcess>,
    _permit: OwnedSemaphorePermit,
    messages: mpsc::UnboundedReceiver<FromHost>,
    id: u64,
    task: String,
    deadline: tokio::time::Instant,
    timeout: Duration,
}

impl RunningStep {
    /// The next message of this step.
    ///
    /// # Errors
    /// The host died (why), or the step ran past its timeout (the host was killed with its
    /// process group, and every other step it ran fails too).
    pub async fn next(&mut self) -> Result<FromHost, String> {
        match tokio::time::timeout_at(self.deadline, self.messages.recv()).await {
            Ok(Some(message)) => Ok(message),
            Ok(None) => Err(self.process.died().await),
            Err(_) => {
                self.process.kill(format!(
                    "the {} was killed because step `{}` ran past its timeout of {}s",
                    self.process.name,
                    self.task,
                    self.timeout.as_secs_f64()
                ));
                Err(format!(
                    "timed out after {}s; the {} running it was killed with its process group",
                    self.timeout.as_secs_f64(),
                    self.process.name
                ))
            }
        }
    }

    /// Answer the host's `token`: `go` when the next page is queued, `abort` with why not.
    ///
    /// # Errors
    /// When the host cannot be written to.
    pub async fn answer(&self, outcome: &Result<(), String>) -> Result<(), String> {
        let line = protocol::answer(self.id, outcome)
            .line()
            .map_err(|e| format!("cannot encode the answer: {e}"))?;
        self.process.write(&line).await
    }

    /// The host running it.
    pub fn host(&self) -> &str {
        &self.process.name
    }
}

impl Drop for RunningStep {
    fn drop(&mut self) {
        self.process.forget(self.id);
    }
}
