//! Merging of concurrent `PullImage` requests into one upstream pull per image and credentials.
//!
//! Requests with the same normalized reference, runtime handler and credential fingerprint share
//! one job. Requests with other (or no) credentials never ride on an authenticated pull: kubelet's
//! ensure-secret-pulled-images check relies on each pod's credentials being tried. A requester
//! that goes away detaches; when the last one leaves, the job's future is dropped, which cancels
//! the upstream call.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use futures_util::FutureExt;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn, Instrument};

use super::{ForwardRequest, PullJob, PullRequestInfo, Puller};
use crate::grpc::CapturedReply;
use crate::jobs::{JobBoard, JobRecord};
use crate::metrics::{code_label, Metrics, ResultLabels, TaskLabels};
use crate::vocab::JobState;
use crate::vocab::Priority;

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct MergeKey {
    reference: String,
    runtime_handler: String,
    credentials: Option<[u8; 32]>,
}

impl MergeKey {
    fn of(info: &PullRequestInfo) -> Self {
        MergeKey {
            reference: info.reference.clone(),
            runtime_handler: info.runtime_handler.clone(),
            credentials: info.credentials,
        }
    }
}

struct Entry {
    id: u64,
    /// Each attached requester's priority: the job runs at the highest.
    waiters: Vec<(u64, Priority)>,
    cancel: CancellationToken,
    reply: watch::Receiver<Option<Arc<CapturedReply>>>,
    record: Arc<JobRecord>,
}

impl Entry {
    fn priority(&self) -> Option<Priority> {
        self.waiters.iter().map(|(_, p)| *p).max()
    }
}

/// Why a job could not be cancelled.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CancelError {
    #[error("no job {0} in flight")]
    NotFound(u64),
    #[error("job {0} is urgent: a pod waits for it")]
    Urgent(u64),
}

/// Where every intercepted pull goes; cheap to share behind an `Arc`.
pub struct PullCoordinator {
    jobs: Mutex<HashMap<MergeKey, Entry>>,
    puller: Arc<dyn Puller>,
    metrics: Arc<Metrics>,
    board: Arc<JobBoard>,
    next_id: AtomicU64,
    next_waiter: AtomicU64,
}

/// A requester attached to a job: [`Joined::reply`] waits for the answer; dropping it detaches.
pub struct Joined {
    pub id: u64,
    /// True when the request joined a pull already in flight.
    pub joined: bool,
    pub record: Arc<JobRecord>,
    reply: watch::Receiver<Option<Arc<CapturedReply>>>,
    _waiter: Waiter,
}

impl Joined {
    pub async fn reply(mut self) -> Arc<CapturedReply> {
        match self.reply.wait_for(Option::is_some).await {
            Ok(r) => r.clone().expect("waited for Some"),
            // The job ended without a reply: it was cancelled (API), or every requester left.
            Err(_) => Arc::new(CapturedReply::from_status(tonic::Status::cancelled(
                format!("pull of {} cancelled", self.record.image),
            ))),
        }
    }
}

impl PullCoordinator {
    pub fn new(puller: Arc<dyn Puller>, metrics: Arc<Metrics>, board: Arc<JobBoard>) -> Arc<Self> {
        Arc::new(PullCoordinator {
            jobs: Mutex::new(HashMap::new()),
            puller,
            metrics,
            board,
            next_id: AtomicU64::new(1),
            next_waiter: AtomicU64::new(1),
        })
    }

    /// Number of upstream pulls in flight.
    pub fn in_flight(&self) -> usize {
        self.jobs.lock().len()
    }

    pub fn board(&self) -> &Arc<JobBoard> {
        &self.board
    }

    /// Pulls `info`, joining a matching pull in flight if there is one. Dropping the returned
    /// future detaches this requester.
    pub async fn pull(
        self: &Arc<Self>,
        info: PullRequestInfo,
        request: ForwardRequest,
    ) -> Arc<CapturedReply> {
        self.join(info, request).reply().await
    }

    /// Attaches a requester to the pull of `info`, starting one if none is in flight. A job's
    /// priority is the highest of its requesters': a pod joining a prewarm job promotes it.
    pub fn join(self: &Arc<Self>, info: PullRequestInfo, request: ForwardRequest) -> Joined {
        let key = MergeKey::of(&info);
        let waiter = self.next_waiter.fetch_add(1, Ordering::Relaxed);
        let priority = info.priority();
        let mut jobs = self.jobs.lock();
        let (id, reply, record, joined) = match jobs.get_mut(&key) {
            Some(entry) => {
                entry.waiters.push((waiter, priority));
                self.metrics.pull_requests_merged.inc();
                let before = entry.record.priority();
                let now = entry.priority().expect("one waiter at least");
                entry.record.set_priority(now);
                if !before.is_urgent() && now.is_urgent() {
                    self.metrics.promotions.inc();
                    info!(job = entry.id, image = %info.reference,
                          pod = info.pod.as_deref().unwrap_or("-"),
                          "prewarm job promoted: a pod waits for it");
                }
                info!(job = entry.id, image = %info.reference, class = %info.class,
                      pod = info.pod.as_deref().unwrap_or("-"), waiters = entry.waiters.len(),
                      "pull request joined a pull in flight");
                (entry.id, entry.reply.clone(), entry.record.clone(), true)
            }
            None => {
                let id = self.next_id.fetch_add(1, Ordering::Relaxed);
                let (tx, rx) = watch::channel(None);
                let cancel = CancellationToken::new();
                let record = self.board.create(
                    id,
                    &info.reference,
                    info.origin,
                    priority,
                    JobState::Resolving,
                );
                jobs.insert(
                    key.clone(),
                    Entry {
                        id,
                        waiters: vec![(waiter, priority)],
                        cancel: cancel.clone(),
                        reply: rx.clone(),
                        record: record.clone(),
                    },
                );
                self.metrics.pulls_in_flight.set(jobs.len() as i64);
                let job = PullJob {
                    id,
                    info,
                    request,
                    record: record.clone(),
                };
                tokio::spawn(self.clone().run(key.clone(), job, tx, cancel));
                (id, rx, record, false)
            }
        };
        drop(jobs);
        Joined {
            id,
            joined,
            record,
            reply,
            _waiter: Waiter {
                coordinator: self.clone(),
                key,
                id,
                waiter,
            },
        }
    }

    /// Cancels a job for every requester (`pullgate cancel`). Urgent jobs are refused: a pod
    /// waits for them.
    pub fn cancel(&self, id: u64) -> Result<(), CancelError> {
        let mut jobs = self.jobs.lock();
        let key = jobs
            .iter()
            .find(|(_, e)| e.id == id)
            .map(|(k, _)| k.clone())
            .ok_or(CancelError::NotFound(id))?;
        let entry = &jobs[&key];
        if entry.record.priority().is_urgent() {
            return Err(CancelError::Urgent(id));
        }
        entry
            .record
            .end(JobState::Cancelled, "cancelled on request");
        entry.cancel.cancel();
        jobs.remove(&key);
        self.metrics.pulls_in_flight.set(jobs.len() as i64);
        Ok(())
    }

    async fn run(
        self: Arc<Self>,
        key: MergeKey,
        job: PullJob,
        tx: watch::Sender<Option<Arc<CapturedReply>>>,
        cancel: CancellationToken,
    ) {
        let id = job.id;
        let record = job.record.clone();
        let started = Instant::now();
        let span = tracing::info_span!("pull", job = id, image = %job.info.reference);
        info!(parent: &span, class = %job.info.class, level = job.info.level,
              origin = job.info.origin.as_str(), pod = job.info.pod.as_deref().unwrap_or("-"),
              authenticated = job.info.credentials.is_some(), "pull started");
        let image = job.info.reference.clone();
        // A panic anywhere in the pull (a bug) ends this job like a failure: every requester is
        // answered, the job leaves the map and the board. Unwinding has dropped the future's
        // guards (scheduler tickets, slots, lane) by the time `catch_unwind` returns.
        let puller = self.puller.clone();
        let pull = AssertUnwindSafe(async move { puller.pull(job).await })
            .catch_unwind()
            .instrument(span.clone());
        let outcome = tokio::select! {
            reply = pull => Some(reply.unwrap_or_else(|p| self.panicked(&span, id, &image, &*p))),
            _ = cancel.cancelled() => None,
        };
        // Remove before answering: a request arriving after this point starts a fresh pull.
        {
            let mut jobs = self.jobs.lock();
            if jobs.get(&key).is_some_and(|e| e.id == id) {
                jobs.remove(&key);
            }
            self.metrics.pulls_in_flight.set(jobs.len() as i64);
        }
        let elapsed = started.elapsed();
        match outcome {
            Some(reply) => {
                let status = reply.status();
                let code = status.code();
                self.metrics
                    .upstream_pulls
                    .get_or_create(&ResultLabels {
                        result: code_label(code),
                    })
                    .inc();
                if code == tonic::Code::Ok {
                    info!(parent: &span, elapsed = ?elapsed, "pull finished");
                    record.end(JobState::Done, "");
                } else {
                    warn!(parent: &span, elapsed = ?elapsed, code = ?code,
                          error = status.message(), "pull failed");
                    record.end(JobState::Failed, status.message());
                }
                let _ = tx.send(Some(Arc::new(reply)));
            }
            None => {
                self.metrics
                    .upstream_pulls
                    .get_or_create(&ResultLabels {
                        result: code_label(tonic::Code::Cancelled),
                    })
                    .inc();
                record.end(JobState::Cancelled, "every requester went away");
                info!(parent: &span, elapsed = ?elapsed, "pull cancelled");
            }
        }
        self.board.retire(id);
    }

    /// Counts a panic caught in a task (`pullgate_panics_total{task}`); the caller logs it.
    pub(crate) fn count_panic(&self, task: &'static str) {
        self.metrics
            .panics
            .get_or_create(&TaskLabels { task })
            .inc();
    }

    /// Logs and counts a pull task's panic; the reply its requesters get.
    fn panicked(
        &self,
        span: &tracing::Span,
        id: u64,
        image: &str,
        panic: &(dyn std::any::Any + Send),
    ) -> CapturedReply {
        let message = crate::errors::panic_message(panic);
        error!(parent: span, job = id, image, panic = message,
               "pull task panicked (a bug in pullgate)");
        self.count_panic("pull");
        CapturedReply::from_status(tonic::Status::internal(format!(
            "pullgate hit an internal error pulling {image} (see pullgate's log)"
        )))
    }

    fn detach(&self, key: &MergeKey, id: u64, waiter: u64) {
        let mut jobs = self.jobs.lock();
        let Some(entry) = jobs.get_mut(key) else {
            return;
        };
        if entry.id != id {
            return;
        }
        entry.waiters.retain(|(w, _)| *w != waiter);
        match entry.priority() {
            // The pod that promoted the job left: back to the priority of those still waiting.
            Some(p) => {
                entry.record.set_priority(p);
            }
            None => {
                entry.cancel.cancel();
                jobs.remove(key);
                self.metrics.pulls_in_flight.set(jobs.len() as i64);
            }
        }
    }
}

/// Detaches its requester from the job when dropped: on an answer and on cancellation alike.
struct Waiter {
    coordinator: Arc<PullCoordinator>,
    key: MergeKey,
    id: u64,
    waiter: u64,
}

impl Drop for Waiter {
    fn drop(&mut self) {
        self.coordinator.detach(&self.key, self.id, self.waiter);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grpc::CapturedReply;
    use crate::vocab::Class;
    use futures_util::future::BoxFuture;
    use futures_util::FutureExt;
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;
    use tokio::sync::Notify;

    /// A puller that blocks until released and counts starts and drops.
    #[derive(Default)]
    struct Gate {
        started: AtomicUsize,
        dropped: Arc<AtomicUsize>,
        release: Notify,
    }

    struct DropCount(Arc<AtomicUsize>);
    impl Drop for DropCount {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    impl Puller for Arc<Gate> {
        fn pull(&self, _job: PullJob) -> BoxFuture<'static, CapturedReply> {
            self.started.fetch_add(1, Ordering::SeqCst);
            let me = self.clone();
            async move {
                let _d = DropCount(me.dropped.clone());
                me.release.notified().await;
                CapturedReply::from_status(tonic::Status::ok(""))
            }
            .boxed()
        }
    }

    fn info(image: &str, creds: Option<[u8; 32]>) -> PullRequestInfo {
        PullRequestInfo {
            image: image.into(),
            reference: image.into(),
            class: Class::Urgent,
            pod: None,
            credentials: creds,
            auth: None,
            runtime_handler: String::new(),
            annotations: Default::default(),
            level: 0,
            origin: crate::vocab::Origin::Cri,
        }
    }

    fn fwd() -> ForwardRequest {
        ForwardRequest {
            uri: "/runtime.v1.ImageService/PullImage".parse().unwrap(),
            headers: Default::default(),
            body: Default::default(),
        }
    }

    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn same_image_and_credentials_merge() {
        let gate = Arc::new(Gate::default());
        let c = PullCoordinator::new(
            Arc::new(gate.clone()),
            Arc::new(Metrics::new()),
            JobBoard::new(),
        );
        let a = tokio::spawn({
            let c = c.clone();
            async move { c.pull(info("img", Some([1; 32])), fwd()).await }
        });
        let b = tokio::spawn({
            let c = c.clone();
            async move { c.pull(info("img", Some([1; 32])), fwd()).await }
        });
        settle().await;
        assert_eq!(gate.started.load(Ordering::SeqCst), 1);
        assert_eq!(c.in_flight(), 1);
        gate.release.notify_waiters();
        let (ra, rb) = (a.await.unwrap(), b.await.unwrap());
        assert!(Arc::ptr_eq(&ra, &rb), "both answered from one reply");
        assert_eq!(c.in_flight(), 0);
    }

    #[tokio::test]
    async fn other_credentials_or_anonymous_do_not_merge() {
        let gate = Arc::new(Gate::default());
        let c = PullCoordinator::new(
            Arc::new(gate.clone()),
            Arc::new(Metrics::new()),
            JobBoard::new(),
        );
        let mut tasks = Vec::new();
        for creds in [Some([1; 32]), Some([2; 32]), None] {
            let c = c.clone();
            tasks.push(tokio::spawn(async move {
                c.pull(info("img", creds), fwd()).await
            }));
        }
        settle().await;
        assert_eq!(gate.started.load(Ordering::SeqCst), 3);
        gate.release.notify_waiters();
        for t in tasks {
            t.await.unwrap();
        }
    }

    #[tokio::test]
    async fn last_requester_leaving_cancels_the_pull() {
        let gate = Arc::new(Gate::default());
        let c = PullCoordinator::new(
            Arc::new(gate.clone()),
            Arc::new(Metrics::new()),
            JobBoard::new(),
        );
        let a = tokio::spawn({
            let c = c.clone();
            async move { c.pull(info("img", None), fwd()).await }
        });
        let b = tokio::spawn({
            let c = c.clone();
            async move { c.pull(info("img", None), fwd()).await }
        });
        settle().await;
        a.abort();
        settle().await;
        assert_eq!(gate.dropped.load(Ordering::SeqCst), 0, "b still waits");
        assert_eq!(c.in_flight(), 1);
        b.abort();
        tokio::time::timeout(Duration::from_secs(1), async {
            while gate.dropped.load(Ordering::SeqCst) == 0 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("upstream pull dropped once nobody waits");
        assert_eq!(c.in_flight(), 0);
        // A new request after cancellation starts a fresh pull.
        let d = tokio::spawn({
            let c = c.clone();
            async move { c.pull(info("img", None), fwd()).await }
        });
        settle().await;
        assert_eq!(gate.started.load(Ordering::SeqCst), 2);
        gate.release.notify_waiters();
        d.await.unwrap();
    }

    #[tokio::test]
    async fn a_pod_joining_a_prewarm_promotes_it_and_leaving_demotes_it() {
        let gate = Arc::new(Gate::default());
        let metrics = Arc::new(Metrics::new());
        let c = PullCoordinator::new(Arc::new(gate.clone()), metrics.clone(), JobBoard::new());
        let mut pre = info("img", None);
        pre.class = Class::Prewarm;
        pre.level = 3;
        let prewarm = c.join(pre, fwd());
        let record = prewarm.record.clone();
        assert_eq!(record.priority(), Priority::prewarm(3));
        let pod = c.join(info("img", None), fwd());
        assert!(pod.joined);
        assert_eq!(pod.id, prewarm.id);
        assert_eq!(record.priority(), Priority::urgent(0));
        assert_eq!(metrics.promotions.get(), 1);
        drop(pod);
        assert_eq!(
            record.priority(),
            Priority::prewarm(3),
            "back to its prewarm priority"
        );
        settle().await;
        assert_eq!(
            gate.started.load(Ordering::SeqCst),
            1,
            "one upstream pull throughout"
        );
        // Cancelling: urgent jobs are refused, prewarm ones end for every requester.
        let pod = c.join(info("img", None), fwd());
        assert_eq!(c.cancel(pod.id), Err(CancelError::Urgent(pod.id)));
        drop(pod);
        assert_eq!(c.cancel(record.id), Ok(()));
        let reply = prewarm.reply().await;
        assert_eq!(reply.status().code(), tonic::Code::Cancelled);
        assert_eq!(record.state(), JobState::Cancelled);
    }

    /// Fault injection: panics in `pull` itself (`early`) or in its future, for `boom` images;
    /// other images pass through the scheduler (one prewarm job at a time) and succeed.
    struct Faulty {
        early: bool,
        sched: Arc<crate::schedule::Scheduler>,
    }

    impl Puller for Faulty {
        fn pull(&self, job: PullJob) -> BoxFuture<'static, CapturedReply> {
            let boom = job.info.reference.starts_with("boom");
            assert!(!(boom && self.early), "injected fault in pull()");
            let sched = self.sched.clone();
            async move {
                let ticket = sched.enter(job.record.clone());
                ticket.admit(Some(1)).await;
                assert!(!boom, "injected fault in the pull future");
                CapturedReply::from_status(tonic::Status::ok(""))
            }
            .boxed()
        }
    }

    fn faulty(early: bool, metrics: &Arc<Metrics>, board: &Arc<JobBoard>) -> Arc<PullCoordinator> {
        let (_gate, rx) = watch::channel(true);
        let sched = crate::schedule::Scheduler::new(
            crate::schedule::Setup {
                admission: crate::schedule::Admission {
                    max_prewarm_jobs: 1,
                    large_image_bytes: 0,
                    lane_order: crate::schedule::LaneOrder::Shared,
                },
                limits: Default::default(),
                max_blob_streams: 0,
                gate: rx,
            },
            board,
            metrics.clone(),
        );
        PullCoordinator::new(
            Arc::new(Faulty { early, sched }),
            metrics.clone(),
            board.clone(),
        )
    }

    #[tokio::test]
    async fn a_panicking_pull_answers_every_requester_and_retires_the_job() {
        for early in [false, true] {
            let metrics = Arc::new(Metrics::new());
            let board = JobBoard::new();
            let c = faulty(early, &metrics, &board);
            let mut pre = info("boom:1", None);
            pre.class = Class::Prewarm;
            let a = c.join(pre, fwd());
            let b = c.join(info("boom:1", None), fwd());
            assert!(b.joined);
            let record = a.record.clone();
            let (ra, rb) = tokio::time::timeout(Duration::from_secs(5), async {
                tokio::join!(a.reply(), b.reply())
            })
            .await
            .expect("requesters are answered");
            for r in [ra, rb] {
                let status = r.status();
                assert_eq!(status.code(), tonic::Code::Internal, "{status:?}");
                assert!(
                    status
                        .message()
                        .contains("pullgate hit an internal error pulling boom:1"),
                    "{status:?}"
                );
            }
            assert_eq!(c.in_flight(), 0);
            assert!(board.live().is_empty(), "the job is not listed as live");
            assert_eq!(record.state(), JobState::Failed);
            let counted = metrics
                .panics
                .get_or_create(&TaskLabels { task: "pull" })
                .get();
            assert_eq!(counted, 1);
            assert!(metrics
                .encode()
                .contains("pullgate_panics_total{task=\"pull\"} 1"));
            // The scheduler's only prewarm slot was released: the next prewarm job runs.
            let mut next = info("fine:1", None);
            next.class = Class::Prewarm;
            let reply = tokio::time::timeout(Duration::from_secs(5), c.pull(next, fwd()))
                .await
                .expect("the prewarm slot was released");
            assert_eq!(reply.status().code(), tonic::Code::Ok);
        }
    }
}
