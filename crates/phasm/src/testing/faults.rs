//! A store that fails on purpose: [`FaultyStore`] wraps any [`Store`] and, drawing from a
//! seeded random generator, refuses calls, delays them, and — the fault that matters most —
//! applies a commit but loses its answer, as when a connection drops just after the server
//! committed. Workers must lose nothing and commit nothing twice whatever it does.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::store::{AdminStore, ReadStore, WorkStore};
use async_trait::async_trait;

use crate::clock::Micros;
use crate::engine::{Commit, LogLine, Task};
use crate::store::{
    AppliedCommit, ClaimRequest, Control, Delivered, Delivery, InstanceSummary, InstanceView,
    ListFilter, NewInstance, Page, PageRequest, Started, Store, StoreError, StoreResult,
    StoreStats, SuccessorClaim, WorkerView,
};

/// How often each fault happens (each a probability from 0 to 1).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Faults {
    /// A claim, renewal, commit or next-due read fails before reaching the store.
    pub error: f64,
    /// A claim or a commit is applied, and then its answer is lost (the caller sees an
    /// error).
    pub lost_reply: f64,
    /// A call waits up to `max_delay` before reaching the store.
    pub delay: f64,
    /// The longest delay.
    pub max_delay: Duration,
}

/// What a [`FaultyStore`] did, for a test to check that its faults happened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FaultCounts {
    /// Calls refused.
    pub errors: u64,
    /// Claims and commits applied whose answer was lost.
    pub lost_replies: u64,
    /// Calls delayed.
    pub delays: u64,
}

/// A [`Store`] that injects [`Faults`] into the hot path (claim, renew, apply, next due);
/// reads and administration pass through untouched.
#[derive(Debug)]
pub struct FaultyStore {
    inner: Arc<dyn Store>,
    faults: Faults,
    state: Mutex<(fastrand::Rng, FaultCounts)>,
}

impl FaultyStore {
    /// Wrap `inner`; `seed` makes the draws repeatable.
    pub fn new(inner: Arc<dyn Store>, faults: Faults, seed: u64) -> Self {
        Self {
            inner,
            faults,
            state: Mutex::new((fastrand::Rng::with_seed(seed), FaultCounts::default())),
        }
    }

    /// The faults injected so far.
    pub fn counts(&self) -> FaultCounts {
        self.lock().1
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (fastrand::Rng, FaultCounts)> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether the answer of a call that reached the store is lost.
    fn lose_reply(&self) -> bool {
        let mut s = self.lock();
        let lose = s.0.f64() < self.faults.lost_reply;
        s.1.lost_replies += u64::from(lose);
        lose
    }

    /// Draw the faults of one call: maybe a delay, then maybe a refusal.
    async fn before(&self, what: &str) -> StoreResult<()> {
        let (delay, fail) = {
            let mut s = self.lock();
            let delay = (s.0.f64() < self.faults.delay).then(|| {
                let max = u64::try_from(self.faults.max_delay.as_micros()).unwrap_or(u64::MAX);
                Duration::from_micros(s.0.u64(0..=max))
            });
            let fail = s.0.f64() < self.faults.error;
            s.1.delays += u64::from(delay.is_some());
            s.1.errors += u64::from(fail);
            (delay, fail)
        };
        if let Some(d) = delay {
            tokio::time::sleep(d).await;
        }
        if fail {
            return Err(injected(what));
        }
        Ok(())
    }
}

fn injected(what: &str) -> StoreError {
    StoreError::Database {
        message: format!("injected fault: {what}"),
        transient: true,
        source: None,
    }
}

#[async_trait]
impl WorkStore for FaultyStore {
    async fn start_many(
        &self,
        now: Micros,
        instances: Vec<NewInstance>,
    ) -> StoreResult<Vec<Started>> {
        self.inner.start_many(now, instances).await
    }

    async fn claim(&self, now: Micros, request: &ClaimRequest) -> StoreResult<Vec<Task>> {
        self.before("claim").await?;
        let claimed = self.inner.claim(now, request).await?;
        if self.lose_reply() {
            // The tasks are leased to a worker that never heard of them: they run again
            // once the lease expires.
            return Err(injected("the claim was made but its answer was lost"));
        }
        Ok(claimed)
    }

    async fn renew(
        &self,
        now: Micros,
        leases: &[(i64, i64)],
        until: Micros,
    ) -> StoreResult<Vec<bool>> {
        self.before("renew").await?;
        self.inner.renew(now, leases, until).await
    }

    async fn apply(
        &self,
        now: Micros,
        commit: std::sync::Arc<Commit>,
        successors: Option<&SuccessorClaim>,
    ) -> StoreResult<AppliedCommit> {
        self.before("commit").await?;
        let applied = self.inner.apply(now, commit, successors).await?;
        if self.lose_reply() {
            return Err(injected("the commit was applied but its answer was lost"));
        }
        Ok(applied)
    }

    async fn fire_schedule(
        &self,
        now: Micros,
        tick: &crate::store::ScheduleTick,
    ) -> StoreResult<crate::store::Fired> {
        self.before("fire a schedule").await?;
        let fired = self.inner.fire_schedule(now, tick).await?;
        if self.lose_reply() {
            return Err(injected("the tick fired but the answer was lost"));
        }
        Ok(fired)
    }

    async fn deliver(&self, now: Micros, delivery: &Delivery) -> StoreResult<Delivered> {
        self.before("deliver").await?;
        let delivered = self.inner.deliver(now, delivery).await?;
        if self.lose_reply() {
            return Err(injected("the event was delivered but the answer was lost"));
        }
        Ok(delivered)
    }

    async fn wait_key(&self) -> StoreResult<Vec<u8>> {
        self.inner.wait_key().await
    }

    async fn next_due(&self) -> StoreResult<Option<Micros>> {
        self.before("next due").await?;
        self.inner.next_due().await
    }

    async fn worker_alive(&self, now: Micros, worker: &WorkerView) -> StoreResult<()> {
        self.inner.worker_alive(now, worker).await
    }

    async fn worker_stopped(&self, owner: &str) -> StoreResult<()> {
        self.inner.worker_stopped(owner).await
    }

    fn changes(&self) -> Arc<tokio::sync::Notify> {
        self.inner.changes()
    }

    fn notifies_other_processes(&self) -> bool {
        self.inner.notifies_other_processes()
    }

    async fn sweep(&self, now: Micros) -> StoreResult<()> {
        self.inner.sweep(now).await
    }
}

#[async_trait]
impl ReadStore for FaultyStore {
    async fn versions(
        &self,
        machine: Option<&str>,
    ) -> StoreResult<Vec<crate::store::VersionRecord>> {
        self.inner.versions(machine).await
    }

    async fn version(
        &self,
        machine: &str,
        version: u32,
    ) -> StoreResult<Option<crate::store::StoredVersion>> {
        self.inner.version(machine, version).await
    }

    async fn version_counts(
        &self,
        machine: Option<&str>,
    ) -> StoreResult<Vec<crate::store::VersionCounts>> {
        self.inner.version_counts(machine).await
    }

    async fn version_by_id(&self, id: i64) -> StoreResult<Option<crate::store::StoredVersion>> {
        self.inner.version_by_id(id).await
    }

    async fn instance(&self, name: &str) -> StoreResult<Option<InstanceView>> {
        self.inner.instance(name).await
    }

    async fn list(&self, filter: &ListFilter) -> StoreResult<Vec<InstanceSummary>> {
        self.inner.list(filter).await
    }

    async fn logs(&self, name: &str) -> StoreResult<Vec<LogLine>> {
        self.inner.logs(name).await
    }

    async fn history_page(
        &self,
        name: &str,
        page: PageRequest,
        branch: Option<&str>,
    ) -> StoreResult<Option<Page<crate::store::HistoryRow>>> {
        self.inner.history_page(name, page, branch).await
    }

    async fn step(&self, name: &str, id: i64) -> StoreResult<Option<crate::store::StepDetail>> {
        self.inner.step(name, id).await
    }

    async fn logs_page(&self, name: &str, page: PageRequest) -> StoreResult<Option<Page<LogLine>>> {
        self.inner.logs_page(name, page).await
    }

    async fn workers(&self, now: Micros) -> StoreResult<Vec<WorkerView>> {
        self.inner.workers(now).await
    }

    async fn workers_gone(&self, now: Micros) -> StoreResult<Vec<WorkerView>> {
        self.inner.workers_gone(now).await
    }

    async fn stats(&self, now: Micros) -> StoreResult<StoreStats> {
        self.inner.stats(now).await
    }

    async fn recent_steps(&self, since: Micros) -> StoreResult<crate::store::RecentSteps> {
        self.inner.recent_steps(since).await
    }

    async fn schedules(&self) -> StoreResult<Vec<crate::store::ScheduleRecord>> {
        self.inner.schedules().await
    }

    async fn machine_overview(
        &self,
        machine: &str,
        hour: Micros,
        day: Micros,
    ) -> StoreResult<crate::store::MachineOverview> {
        self.inner.machine_overview(machine, hour, day).await
    }
}

#[async_trait]
impl AdminStore for FaultyStore {
    async fn deploy(
        &self,
        now: Micros,
        versions: &[crate::store::NewVersion],
    ) -> StoreResult<Vec<crate::store::Deployed>> {
        self.inner.deploy(now, versions).await
    }

    async fn scrub_versions(&self) -> StoreResult<Vec<(String, u32)>> {
        self.inner.scrub_versions().await
    }

    async fn upgrade(
        &self,
        now: Micros,
        request: &crate::store::UpgradeRequest,
    ) -> StoreResult<crate::store::Upgraded> {
        self.inner.upgrade(now, request).await
    }

    async fn retry(&self, now: Micros, name: &str) -> StoreResult<Control> {
        self.inner.retry(now, name).await
    }

    async fn reset(
        &self,
        now: Micros,
        name: &str,
        task: &crate::engine::NewTask,
        note: &str,
    ) -> StoreResult<Control> {
        self.inner.reset(now, name, task, note).await
    }

    async fn cancel_because(
        &self,
        now: Micros,
        name: &str,
        reason: Option<&str>,
    ) -> StoreResult<Control> {
        self.inner.cancel_because(now, name, reason).await
    }

    async fn scrub(&self, cutoff: Micros, batch: usize) -> StoreResult<u64> {
        self.inner.scrub(cutoff, batch).await
    }

    async fn probe_commit_rate(&self, commits: usize) -> StoreResult<f64> {
        self.inner.probe_commit_rate(commits).await
    }
}
