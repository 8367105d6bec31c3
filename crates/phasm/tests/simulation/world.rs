//! One seed's world: the instances it starts, the workers that run them (killed and started
//! again, each on its own skewed clock), the people who poke, cancel and reset instances
//! meanwhile, and the store that fails on purpose beneath them all.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use phasm::clock::{micros, Clock, Micros};
use phasm::config::{load_str, LoadOptions};
use phasm::control::{
    reset, send, start_instance, ResetError, SendError, SendOutcome, SendRequest, SendTo,
};
use phasm::engine::{Context, Limits};
use phasm::machine::Config;
use phasm::store::{Control, HistoryRow, InstanceStatus, ListFilter, Store};
use phasm::testing::{FaultCounts, Faults, FaultyStore};
use phasm::worker::{StopWhen, Worker, WorkerOptions};
use serde_json::json;
use tokio::task::JoinHandle;

use crate::shapes::{registry, Shape, Trouble};

/// A clock `by` ahead of (or, negative, behind) another: each worker's own.
#[derive(Debug)]
struct Skewed {
    base: Arc<dyn Clock>,
    by: Micros,
}

impl Clock for Skewed {
    fn now(&self) -> Micros {
        self.base.now() + self.by
    }
}

/// What happens to one `Line` instance besides its steps.
#[derive(Debug, Clone, Default)]
pub struct LinePlan {
    /// Send `poke` after this long (only for a line that waits).
    pub poke: Option<Duration>,
    /// Send it a second time with the same id.
    pub poke_twice: bool,
    /// Cancel it after this long.
    pub cancel: Option<Duration>,
    /// Once it has completed, run it again from its first step.
    pub reset: bool,
}

/// Everything a seed decides before it runs.
#[derive(Debug, Clone)]
pub struct Plan {
    pub seed: u64,
    pub shape: Shape,
    pub lines: Vec<LinePlan>,
    pub workers: usize,
    pub faults: Faults,
    /// Each worker's clock is off by up to this, either way.
    pub skew: Duration,
    /// The chance, every little while, that a worker is killed mid-step and a fresh one
    /// started in its place.
    pub crashes: f64,
    pub trouble: Trouble,
}

impl Plan {
    /// The plan of seed `seed`.
    pub fn draw(seed: u64) -> Self {
        let mut rng = fastrand::Rng::with_seed(seed);
        let shape = Shape::draw(&mut rng);
        let lines = (0..rng.usize(1..=4))
            .map(|_| {
                let ms = |rng: &mut fastrand::Rng| Duration::from_millis(rng.u64(0..=400));
                let cancel = (rng.u8(..5) == 0).then(|| ms(&mut rng));
                LinePlan {
                    // Any time, or just as the wait times out, to race its timeout.
                    poke: shape
                        .wait
                        .filter(|_| rng.u8(..4) != 0)
                        .map(|w| match rng.bool() {
                            true => ms(&mut rng),
                            false => w.timeout + Duration::from_millis(rng.u64(0..=60)),
                        }),
                    poke_twice: rng.bool(),
                    reset: cancel.is_none() && rng.u8(..4) == 0,
                    cancel,
                }
            })
            .collect();
        Self {
            seed,
            lines,
            workers: rng.usize(1..=3),
            faults: Faults {
                error: rng.f64() * 0.1,
                lost_reply: rng.f64() * 0.1,
                delay: rng.f64() * 0.2,
                max_delay: Duration::from_millis(rng.u64(1..=60)),
            },
            skew: Duration::from_millis([0, 20, 60][rng.usize(..3)]),
            crashes: [0.0, 0.2, 0.6][rng.usize(..3)],
            trouble: Trouble {
                fail: 0.1,
                slow: 0.05,
            },
            shape,
        }
    }

    /// One line describing the plan, for messages.
    pub fn about(&self) -> String {
        let s = &self.shape;
        format!(
            "seed {}: n={} page={} fan_in={} line={} wait={:?} schedule={} lines={:?} workers={} skew={:?} crashes={} {:?}",
            self.seed, s.n, s.page, s.gather, s.line, s.wait, s.schedule, self.lines,
            self.workers, self.skew, self.crashes, self.faults
        )
    }
}

/// What the people around the instances saw.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Seen {
    /// The answer to each `poke` and when it came back, by line.
    pub pokes: BTreeMap<String, Vec<(String, Micros)>>,
    /// Lines canceled, and how many transitions they had right after.
    pub canceled: BTreeMap<String, usize>,
    /// Lines run again from their first step.
    pub reset: Vec<String>,
}

/// What a run did, to check it and to compare two runs of a seed.
#[derive(Debug, PartialEq)]
pub struct Run {
    pub plan_about: String,
    /// Every instance's transitions, by instance.
    pub histories: BTreeMap<String, Vec<HistoryRow>>,
    /// Every instance's status and machine.
    pub ends: BTreeMap<String, (String, InstanceStatus)>,
    pub seen: Seen,
    /// The pager's context at its end.
    pub pager_result: Option<Context>,
    pub faults: FaultCounts,
    /// Workers killed mid-run.
    pub kills: u32,
}

/// The name of the seed's `Pager` instance.
pub fn pager(seed: u64) -> String {
    format!("pager-{seed}")
}

/// The name of line `i`.
pub fn line(seed: u64, i: usize) -> String {
    format!("line-{seed}-{i}")
}

/// Run the plan over `inner` (through a [`FaultyStore`]), every instance to its end.
pub async fn run(plan: &Plan, inner: Arc<dyn Store>, base: Arc<dyn Clock>) -> Run {
    let about = plan.about();
    let config = Arc::new(
        load_str(&plan.shape.yaml(), "sim.yaml", &LoadOptions::default())
            .unwrap_or_else(|e| panic!("{about}: {e}"))
            .config,
    );
    let faulty = Arc::new(FaultyStore::new(Arc::clone(&inner), plan.faults, plan.seed));
    let store: Arc<dyn Store> = Arc::clone(&faulty) as Arc<dyn Store>;
    let start = |machine: &'static str, name: String, context: Context| {
        let (inner, config, base, about) = (&inner, &config, &base, &about);
        async move {
            start_instance(
                &**inner,
                config,
                &**base,
                machine,
                context,
                Some(&name),
                &Limits::default(),
            )
            .await
            .unwrap_or_else(|e| panic!("{about}: {e}"));
        }
    };
    let mut context = Context::new();
    context.insert("n".into(), json!(plan.shape.n));
    start("Pager", pager(plan.seed), context).await;
    for i in 0..plan.lines.len() {
        start("Line", line(plan.seed, i), Context::new()).await;
    }

    let workers = Workers {
        plan: plan.clone(),
        store: Arc::clone(&store),
        config: Arc::clone(&config),
        base: Arc::clone(&base),
        rng: Mutex::new(fastrand::Rng::with_seed(plan.seed ^ 0x5eed)),
        handles: Mutex::new(Vec::new()),
        kills: Mutex::new(0),
        stop: tokio::sync::watch::Sender::new(false),
    };
    let workers = Arc::new(workers);
    for k in 0..plan.workers {
        let handle = workers.spawn(k, 0);
        workers.handles.lock().unwrap().push(Some(handle));
    }
    let monkey = tokio::spawn(Arc::clone(&workers).monkey());

    let seen = Arc::new(Mutex::new(Seen::default()));
    let mut people = Vec::new();
    for (i, lp) in plan.lines.iter().enumerate() {
        people.push(tokio::spawn(person(
            line(plan.seed, i),
            lp.clone(),
            Arc::clone(&inner),
            Arc::clone(&config),
            Arc::clone(&base),
            Arc::clone(&seen),
        )));
    }

    // Wait for every instance, and every person, to be done.
    let give_up = base.now() + micros(Duration::from_secs(120));
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        workers.check_alive(&about).await;
        if people.iter().all(JoinHandle::is_finished) && all_ended(&*inner, plan).await {
            break;
        }
        if base.now() > give_up {
            let left = unended(&*inner).await;
            panic!("{about}: not done after 120 s: {left:#?}");
        }
    }
    monkey.abort();
    workers.stop_all(&about).await;
    for person in people {
        person.await.unwrap_or_else(|e| panic!("{about}: {e}"));
    }
    // Instances a schedule started may still run: finish them on a worker that starts no
    // more. First, time skips ahead to when a sweep takes up what killed workers left
    // undone (PostgreSQL settles an instance after its commit: a worker killed in between
    // leaves that to the sweep, which waits a while for the worker first).
    if plan.shape.schedule {
        inner
            .sweep(base.now() + micros(SWEPT_AFTER))
            .await
            .unwrap_or_else(|e| panic!("{about}: sweep: {e}"));
        let registry = registry(&plan.shape, plan.trouble, plan.seed);
        let drain = Worker::new(
            Arc::clone(&inner),
            Arc::clone(&config),
            Arc::new(registry),
            Arc::clone(&base),
            WorkerOptions {
                owner: "drain".into(),
                stop: StopWhen::Idle,
                poll_interval: Duration::from_millis(20),
                seed: Some(plan.seed),
                ..WorkerOptions::default()
            },
        )
        .unwrap();
        tokio::time::timeout(Duration::from_secs(600), drain.run(std::future::pending()))
            .await
            .unwrap_or_else(|_| panic!("{about}: scheduled instances did not finish"))
            .unwrap_or_else(|e| panic!("{about}: {e}"));
    }

    let mut histories = BTreeMap::new();
    let mut ends = BTreeMap::new();
    for summary in inner
        .list(&ListFilter {
            limit: 100_000,
            ..ListFilter::default()
        })
        .await
        .unwrap()
    {
        let mut rows = Vec::new();
        phasm::store::for_each_transition(&*inner, &summary.instance, |h| rows.push(h.clone()))
            .await
            .unwrap();
        ends.insert(
            summary.instance.clone(),
            (summary.machine.clone(), summary.status),
        );
        histories.insert(summary.instance, rows);
    }
    let seen = seen.lock().unwrap().clone();
    let pager_result = inner
        .instance(&pager(plan.seed))
        .await
        .unwrap()
        .and_then(|v| v.current_context);
    let faults = faulty.counts();
    let kills = *workers.kills.lock().unwrap();
    Run {
        plan_about: about,
        histories,
        ends,
        seen,
        pager_result,
        faults,
        kills,
    }
}

/// True when the pager, its children and every line have ended.
async fn all_ended(store: &dyn Store, plan: &Plan) -> bool {
    let mut names = vec![pager(plan.seed)];
    names.extend((0..plan.lines.len()).map(|i| line(plan.seed, i)));
    if let Ok(children) = store.children(&pager(plan.seed)).await {
        names.extend(children);
    }
    for name in names {
        match store.status(&name).await {
            Ok(Some(status)) if status.is_end() => {}
            _ => return false,
        }
    }
    true
}

async fn unended(store: &dyn Store) -> Vec<phasm::store::InstanceView> {
    let mut left = Vec::new();
    for s in store.list(&ListFilter::default()).await.unwrap_or_default() {
        if !s.status.is_end() {
            if let Ok(Some(view)) = store.instance(&s.instance).await {
                left.push(view);
            }
        }
    }
    left
}

/// How long after a commit a sweep settles what it left undone (PostgreSQL's grace, and
/// a little more).
const SWEPT_AFTER: Duration = Duration::from_secs(11);

/// A worker's task: it ends only when stopped, with its error if it failed.
type Running = JoinHandle<Result<(), String>>;

/// How long workers are killed for.
const CRASHING: Duration = Duration::from_secs(3);

/// The workers, killed and replaced at random.
struct Workers {
    plan: Plan,
    store: Arc<dyn Store>,
    config: Arc<Config>,
    base: Arc<dyn Clock>,
    rng: Mutex<fastrand::Rng>,
    /// Each worker's task (`None` while a killed one is not yet replaced).
    handles: Mutex<Vec<Option<Running>>>,
    kills: Mutex<u32>,
    /// Set when the run is over: every worker stops.
    stop: tokio::sync::watch::Sender<bool>,
}

impl Workers {
    /// Start worker `k`'s generation `generation`, on its own skewed clock.
    fn spawn(&self, k: usize, generation: u64) -> Running {
        let skew = micros(self.plan.skew);
        let (by, seed) = {
            let mut rng = self.rng.lock().unwrap();
            (rng.i64(-skew..=skew), rng.u64(..))
        };
        let clock: Arc<dyn Clock> = Arc::new(Skewed {
            base: Arc::clone(&self.base),
            by,
        });
        let registry = registry(&self.plan.shape, self.plan.trouble, seed);
        let worker = Worker::new(
            Arc::clone(&self.store),
            Arc::clone(&self.config),
            Arc::new(registry),
            clock,
            WorkerOptions {
                owner: format!("w{k}.{generation}"),
                concurrency: 4,
                // Renewed every 40 ms: a slow step, a few failed renewals or a skewed clock
                // lose it.
                lease: Duration::from_millis(120),
                poll_interval: Duration::from_millis(20),
                stop: StopWhen::Never,
                seed: Some(seed),
                schedules: self.plan.shape.schedule,
                ..WorkerOptions::default()
            },
        )
        .unwrap();
        let mut stop = self.stop.subscribe();
        tokio::spawn(async move {
            let stop = async move {
                let _ = stop.wait_for(|s| *s).await;
            };
            worker
                .run(stop)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        })
    }

    /// Now and then, for the first few seconds, kill a worker wherever it is (its running
    /// steps are dropped mid-await, their leases left to expire, the follow-up of a commit
    /// maybe left undone) and start a fresh one in its place a little later. (Then the
    /// workers live long enough to sweep what the dead left undone.)
    async fn monkey(self: Arc<Self>) {
        if self.plan.crashes == 0.0 {
            return;
        }
        let mut generation = 0;
        let calm = self.base.now() + micros(CRASHING);
        while self.base.now() < calm {
            let (wait, kill, k, down) = {
                let mut rng = self.rng.lock().unwrap();
                (
                    rng.u64(20..=200),
                    rng.f64() < self.plan.crashes,
                    rng.usize(..self.plan.workers),
                    rng.u64(0..=300),
                )
            };
            tokio::time::sleep(Duration::from_millis(wait)).await;
            if !kill {
                continue;
            }
            if let Some(killed) = self.handles.lock().unwrap()[k].take() {
                killed.abort();
            }
            *self.kills.lock().unwrap() += 1;
            tokio::time::sleep(Duration::from_millis(down)).await;
            generation += 1;
            let fresh = self.spawn(k, generation);
            self.handles.lock().unwrap()[k] = Some(fresh);
        }
    }

    /// Panic if a worker stopped on its own: it must run until killed or stopped.
    async fn check_alive(&self, about: &str) {
        let finished: Option<(usize, Running)> = {
            let mut handles = self.handles.lock().unwrap();
            handles
                .iter_mut()
                .enumerate()
                .find_map(|(k, slot)| slot.take_if(|h| h.is_finished()).map(|h| (k, h)))
        };
        if let Some((k, handle)) = finished {
            match handle.await {
                Err(e) => panic!("{about}: worker {k} panicked: {e}"),
                Ok(Err(e)) => panic!("{about}: worker {k} failed: {e}"),
                Ok(Ok(())) => panic!("{about}: worker {k} stopped on its own"),
            }
        }
    }

    /// Stop every worker as an operator would (each finishes what it runs).
    async fn stop_all(&self, about: &str) {
        self.stop.send_replace(true);
        let handles = std::mem::take(&mut *self.handles.lock().unwrap());
        for (k, handle) in handles.into_iter().enumerate() {
            // A worker killed and not yet replaced is gone already.
            let Some(handle) = handle else { continue };
            match tokio::time::timeout(Duration::from_secs(60), handle).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => panic!("{about}: worker {k} failed: {e}"),
                Ok(Err(e)) => panic!("{about}: worker {k} panicked: {e}"),
                Err(_) => panic!("{about}: worker {k} did not stop"),
            }
        }
    }
}

/// Call `call` until it succeeds or fails for good, as an operator runs a command again
/// after a passing failure (on PostgreSQL, a deadlock with a step committing meanwhile).
async fn again<T, F, Fut>(call: F) -> T
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = phasm::store::StoreResult<T>>,
{
    let mut tries = 0;
    loop {
        match call().await {
            Ok(answer) => return answer,
            Err(e) if e.is_transient() && tries < 5 => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("{e}"),
        }
    }
}

/// The people around line `name`: one pokes it, one cancels it, one runs it again once it
/// has completed.
async fn person(
    name: String,
    plan: LinePlan,
    store: Arc<dyn Store>,
    config: Arc<Config>,
    clock: Arc<dyn Clock>,
    seen: Arc<Mutex<Seen>>,
) {
    let poke = async {
        let Some(after) = plan.poke else { return };
        tokio::time::sleep(after).await;
        let times = if plan.poke_twice { 2 } else { 1 };
        for _ in 0..times {
            let answer = send(
                &*store,
                Some(&config),
                &*clock,
                SendRequest {
                    to: SendTo::Instance(name.clone()),
                    event: "poke".into(),
                    data: Context::new(),
                    id: Some("poke-1".into()),
                },
                &Limits::default(),
            )
            .await;
            // When it was answered: it reached the store before.
            let at = clock.now();
            let answer = match answer {
                Ok(SendOutcome::Delivered { branches, .. }) => format!("delivered {branches}"),
                Ok(SendOutcome::Buffered { .. }) => "buffered".into(),
                Ok(SendOutcome::Duplicate { .. }) => "duplicate".into(),
                Err(SendError::NotRunning { .. }) => "not running".into(),
                Err(SendError::NotAccepted { .. }) => "not accepted".into(),
                Err(SendError::CannotWait { .. }) => "cannot wait".into(),
                Err(e) => panic!("{name}: poke: {e}"),
            };
            seen.lock()
                .unwrap()
                .pokes
                .entry(name.clone())
                .or_default()
                .push((answer, at));
        }
    };
    let cancel = async {
        let Some(after) = plan.cancel else { return };
        tokio::time::sleep(after).await;
        match again(|| store.cancel(clock.now(), &name)).await {
            Control::Done => {
                let mut n = 0;
                phasm::store::for_each_transition(&*store, &name, |_| n += 1)
                    .await
                    .unwrap();
                seen.lock().unwrap().canceled.insert(name.clone(), n);
            }
            Control::NotAllowed(_) => {}
            Control::NotFound => panic!("{name}: not found to cancel"),
        }
    };
    let reset = async {
        if !plan.reset {
            return;
        }
        loop {
            tokio::time::sleep(Duration::from_millis(30)).await;
            match store.status(&name).await.unwrap() {
                Some(InstanceStatus::Completed) => break,
                Some(s) if s.is_end() => return,
                _ => {}
            }
        }
        let mut first = None;
        phasm::store::for_each_transition(&*store, &name, |h| {
            if h.from.is_none() && first.is_none() {
                first = Some(h.id);
            }
        })
        .await
        .unwrap();
        let step = first.unwrap_or_else(|| panic!("{name}: no first step"));
        let mut tries = 0;
        while let Err(e) = reset(&*store, &config, &*clock, &name, step).await {
            // A deadlock with a step committing at that moment: the operator tries again.
            let transient = matches!(&e, ResetError::Store(e) if e.is_transient());
            tries += 1;
            assert!(transient && tries < 5, "{name}: reset: {e}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        seen.lock().unwrap().reset.push(name.clone());
    };
    tokio::join!(poke, cancel, reset);
}
