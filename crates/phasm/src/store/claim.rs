//! Claiming due tasks, written once for every backend.
//!
//! A claim, in one transaction:
//!
//! 1. **Room**: for each queue with configured limits, how many more of its tasks may start
//!    now, whoever claims them — its `max_concurrent` less the tasks of it running anywhere,
//!    and the tokens its `rate` bucket holds once topped up for the time since it was last
//!    drawn from ([`Bucket`]). Backends whose claimers run side by side take turns per
//!    limited queue first ([`ClaimTx::lock_queue`]), so two cannot both take the last slot.
//!    The claimer's own share ([`ClaimRequest::queue_limits`]) tightens it.
//! 2. **Candidates**: due, ready, unleased tasks in due order — only of the claimer's queues
//!    and targets and of no queue without room ([`ClaimFilter`]), filtered in the query
//!    itself, so a backlog the claimer may not take never hides the work it may. A few more
//!    than wanted are read ([`candidate_window`]), so per-queue room can skip some.
//! 3. **Choice** ([`choose`]): in that order, up to the limit, each queue within its room.
//! 4. **Lease** the chosen in one statement: claim number + 1, attempt + 1, due when the
//!    lease ends; the instance's version is read again by it (an upgrade may have moved the
//!    instance since the candidates were read, and no upgrade moves a leased task).
//! 5. **Draw** a token per task taken from each rate-limited queue's bucket.
//! 6. **Join items**: each chosen join task takes its group's parked branches not taken by
//!    another join (those an earlier attempt of the same join took stay with it).

use std::collections::HashMap;

use crate::clock::{micros, Micros};
use crate::engine::{Context, Task, TaskKind};
use crate::machine::QueueLimits;

use super::convert::whole;
use super::{ClaimRequest, StoreResult};

/// A due task as the candidates query reads it: the task (its claim number as stored), its
/// instance's row id and, for a join, its fan-in group.
#[derive(Debug, Clone)]
pub(crate) struct Candidate {
    /// The task, as it would be handed out (claim number not yet raised).
    pub task: Task,
    /// Its instance's row id.
    pub instance_id: i64,
    /// A join's fan-in group.
    pub group: Option<String>,
}

/// What the candidates query keeps, as plain values each backend binds its own way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ClaimFilter {
    /// Tasks of any target.
    pub any_target: bool,
    /// Tasks without a target.
    pub untargeted: bool,
    /// Tasks with one of these targets.
    pub targets: Vec<String>,
    /// Only these queues (`None`: every queue).
    pub queues: Option<Vec<String>>,
    /// None of these queues (no room left).
    pub full_queues: Vec<String>,
}

impl ClaimFilter {
    /// The filter of `request`, given each limited queue's `room`.
    pub(crate) fn of(request: &ClaimRequest, room: &[(String, usize)]) -> Self {
        let (any_target, untargeted, targets) = request.targets.filter();
        ClaimFilter {
            any_target,
            untargeted,
            targets: targets.to_vec(),
            queues: request.queues.clone(),
            full_queues: full_queues(room),
        }
    }
}

/// A queue's `rate` as a token bucket: `capacity` tokens at most, refilled at `per_micro`
/// tokens a microsecond.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Bucket {
    /// Most tokens it holds (the rate's count).
    pub capacity: f64,
    /// Tokens added per microsecond.
    pub per_micro: f64,
}

impl Bucket {
    /// The bucket of a queue's limits, if it has a rate.
    pub(crate) fn of(limits: &QueueLimits) -> Option<Self> {
        limits.rate.map(|rate| {
            let capacity = f64::from(rate.count);
            Bucket {
                capacity,
                per_micro: capacity / micros(rate.per).max(1) as f64,
            }
        })
    }

    /// The tokens a bucket holding `tokens` at `then` holds at `now`.
    pub(crate) fn refilled(&self, tokens: f64, then: Micros, now: Micros) -> f64 {
        let elapsed = now.saturating_sub(then).max(0) as f64;
        (tokens + elapsed * self.per_micro).min(self.capacity)
    }
}

/// A claim's operations on one storage transaction (see the module doc for the order and
/// what each step decides, which only [`claim`] does).
pub(crate) trait ClaimTx {
    /// Step 1: take turns with other claimers of this limited queue until the transaction
    /// ends (a backend with one writer has nothing to do).
    async fn lock_queue(&mut self, queue: &str) -> StoreResult<()>;

    /// Step 1: how many tasks of `queue` run now (leased and unexpired at `now`).
    async fn running(&mut self, queue: &str, now: Micros) -> StoreResult<i64>;

    /// Step 1: `queue`'s bucket as last written: its tokens and when (`None` before the
    /// first draw from it).
    async fn read_bucket(&mut self, queue: &str) -> StoreResult<Option<(f64, Micros)>>;

    /// Step 2: at most `window` due candidates passing `filter`, in due order (locked or
    /// skipped where claimers run side by side).
    async fn candidates(
        &mut self,
        now: Micros,
        window: usize,
        filter: &ClaimFilter,
    ) -> StoreResult<Vec<Candidate>>;

    /// Step 4: lease the tasks `ids` to `owner` until `until`; the instance version of
    /// each leased task whose instance may have been upgraded since the candidates were read
    /// (a backend whose transactions run one at a time returns none: the candidates'
    /// versions stand).
    async fn lease(
        &mut self,
        ids: &[i64],
        owner: &str,
        until: Micros,
        now: Micros,
    ) -> StoreResult<HashMap<i64, Option<i64>>>;

    /// Step 5: write `queue`'s bucket: `tokens` at `now`.
    async fn write_bucket(&mut self, queue: &str, tokens: f64, now: Micros) -> StoreResult<()>;

    /// Step 6: give the join task `join` (of instance `instance_id`, fan-in `state` and
    /// `group`) its parked branches, and return their contexts in parking order.
    async fn take_items(
        &mut self,
        join: i64,
        instance_id: i64,
        state: &str,
        group: &str,
    ) -> StoreResult<Vec<Context>>;
}

/// How many candidates to read for a claim of `limit`: a few more than wanted, so
/// per-queue room can skip some. (Reading exactly `limit` when no queue has room to skip
/// was measured: the chain benchmark ran at half speed.)
pub(crate) fn candidate_window(limit: usize) -> usize {
    (limit.saturating_mul(2)).max(16)
}

/// The queues with no room left in `room`: a claim reads none of their tasks.
pub(crate) fn full_queues(room: &[(String, usize)]) -> Vec<String> {
    room.iter()
        .filter(|(_, left)| *left == 0)
        .map(|(q, _)| q.clone())
        .collect()
}

/// How many more tasks of a queue may start, given its `max_concurrent` with `running`
/// running, and its bucket's `tokens`.
pub(crate) fn allowed(max_concurrent: Option<u32>, running: i64, tokens: Option<f64>) -> usize {
    let by_count = max_concurrent.map_or(usize::MAX, |max| {
        usize::try_from(i64::from(max).saturating_sub(running)).unwrap_or(0)
    });
    let by_rate = tokens.map_or(usize::MAX, whole);
    by_count.min(by_rate)
}

/// Step 3: in candidate order, up to `limit`, each queue within its `room` (queues not in
/// `room` are unlimited). `room` is used up as tasks are chosen.
pub(crate) fn choose(
    candidates: Vec<Candidate>,
    limit: usize,
    room: &mut [(String, usize)],
) -> Vec<Candidate> {
    let mut chosen = Vec::new();
    for c in candidates {
        if chosen.len() >= limit {
            break;
        }
        if let Some((_, left)) = room.iter_mut().find(|(q, _)| *q == c.task.queue) {
            if *left == 0 {
                continue;
            }
            *left -= 1;
        }
        chosen.push(c);
    }
    chosen
}

/// Claim for `request` at `now` over `tx` (see the module doc).
pub(crate) async fn claim<T: ClaimTx>(
    tx: &mut T,
    now: Micros,
    request: &ClaimRequest,
) -> StoreResult<Vec<Task>> {
    if request.limit == 0 {
        return Ok(Vec::new());
    }
    // 1. Room.
    let mut shared = Vec::new();
    let mut buckets = Vec::new();
    for (queue, limits) in &request.shared_limits {
        let bucket = Bucket::of(limits);
        if limits.max_concurrent.is_none() && bucket.is_none() {
            continue;
        }
        tx.lock_queue(queue).await?;
        let running = match limits.max_concurrent {
            Some(_) => tx.running(queue, now).await?,
            None => 0,
        };
        let tokens = match bucket {
            Some(bucket) => {
                let (tokens, then) = tx
                    .read_bucket(queue)
                    .await?
                    .unwrap_or((bucket.capacity, now));
                let tokens = bucket.refilled(tokens, then, now);
                buckets.push((queue, tokens));
                Some(tokens)
            }
            None => None,
        };
        shared.push((
            queue.clone(),
            allowed(limits.max_concurrent, running, tokens),
        ));
    }
    let mut room = request.room(shared);
    // 2. Candidates, 3. choice.
    let filter = ClaimFilter::of(request, &room);
    let window = candidate_window(request.limit);
    let candidates = tx.candidates(now, window, &filter).await?;
    let mut chosen = choose(candidates, request.limit, &mut room);
    // 4. Lease.
    if !chosen.is_empty() {
        let ids: Vec<i64> = chosen.iter().map(|c| c.task.id).collect();
        let until = now.saturating_add(micros(request.lease));
        let versions = tx.lease(&ids, &request.owner, until, now).await?;
        for c in &mut chosen {
            if let Some(version) = versions.get(&c.task.id) {
                c.task.version = *version;
            }
        }
    }
    // 5. Draw (a bucket nothing was drawn from is left as it was: topping it up later
    // from its old time comes to the same tokens).
    for (queue, tokens) in buckets {
        let taken = chosen.iter().filter(|c| &c.task.queue == queue).count();
        if taken > 0 {
            tx.write_bucket(queue, (tokens - taken as f64).max(0.0), now)
                .await?;
        }
    }
    // 6. Join items.
    let mut claimed = Vec::with_capacity(chosen.len());
    for Candidate {
        mut task,
        instance_id,
        group,
    } in chosen
    {
        task.claim += 1;
        if task.kind == TaskKind::Join {
            let state = task.from_state.clone().unwrap_or_default();
            task.contexts = tx
                .take_items(
                    task.id,
                    instance_id,
                    &state,
                    group.as_deref().unwrap_or_default(),
                )
                .await?;
        }
        claimed.push(task);
    }
    Ok(claimed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn candidate(id: i64, queue: &str) -> Candidate {
        Candidate {
            task: Task {
                id,
                claim: 0,
                instance: "i".into(),
                machine: "M".into(),
                name: format!("t{id}"),
                from_state: None,
                event: "go".into(),
                kind: TaskKind::Dispatch,
                context: Context::new(),
                step: 0,
                branch: String::new(),
                attempt: 0,
                first_attempt_at: 0,
                queue: queue.into(),
                token: None,
                contexts: Vec::new(),
                next_page_queued: false,
                version: None,
            },
            instance_id: 1,
            group: None,
        }
    }

    #[test]
    fn the_choice_keeps_order_limit_and_each_queues_room() {
        let candidates = vec![
            candidate(1, "slow"),
            candidate(2, "slow"),
            candidate(3, "default"),
            candidate(4, "slow"),
            candidate(5, "default"),
        ];
        let mut room = vec![("slow".to_string(), 1)];
        let chosen = choose(candidates.clone(), 3, &mut room);
        let ids: Vec<i64> = chosen.iter().map(|c| c.task.id).collect();
        assert_eq!(ids, [1, 3, 5]);
        assert_eq!(room, [("slow".to_string(), 0)]);
        assert_eq!(choose(candidates, 2, &mut Vec::new()).len(), 2);
    }

    #[test]
    fn allowance_is_the_tighter_of_count_and_whole_tokens() {
        assert_eq!(allowed(None, 0, None), usize::MAX);
        assert_eq!(allowed(Some(5), 3, None), 2);
        assert_eq!(allowed(Some(5), 9, None), 0, "over the limit is no room");
        assert_eq!(allowed(None, 0, Some(2.9)), 2);
        assert_eq!(allowed(Some(5), 0, Some(1.0)), 1);
        assert_eq!(allowed(None, 0, Some(-1.0)), 0);
        assert_eq!(allowed(None, 0, Some(f64::NAN)), 0);
    }

    #[test]
    fn a_bucket_refills_with_time_up_to_its_capacity() {
        let limits = QueueLimits {
            max_concurrent: None,
            rate: Some(crate::machine::Rate {
                count: 10,
                per: std::time::Duration::from_secs(1),
            }),
        };
        let bucket = Bucket::of(&limits).expect("has a rate");
        assert_eq!(bucket.capacity, 10.0);
        assert!((bucket.refilled(0.0, 0, 500_000) - 5.0).abs() < 1e-9);
        assert_eq!(bucket.refilled(4.0, 0, 10_000_000), 10.0);
        assert_eq!(
            bucket.refilled(4.0, 10, 0),
            4.0,
            "a clock going back adds none"
        );
        assert_eq!(Bucket::of(&QueueLimits::default()), None);
    }

    #[test]
    fn full_queues_are_those_without_room() {
        let room = vec![("a".to_string(), 0), ("b".to_string(), 3)];
        assert_eq!(full_queues(&room), ["a"]);
        assert_eq!(candidate_window(1), 16);
        assert_eq!(candidate_window(100), 200);
    }
}
