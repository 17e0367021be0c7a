//! Merging of concurrent `PullImage` requests into one upstream pull per image and credentials.
//!
//! Requests with the same normalized reference, runtime handler and credential fingerprint share
//! one job. Requests with other (or no) credentials never ride on an authenticated pull: kubelet's
//! ensure-secret-pulled-images check relies on each pod's credentials being tried. A requester
//! that goes away detaches; when the last one leaves, the job's future is dropped, which cancels
//! the upstream call.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn, Instrument};

use super::{ForwardRequest, PullJob, PullRequestInfo, Puller};
use crate::grpc::CapturedReply;
use crate::metrics::{code_label, Metrics, ResultLabels};

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
    waiters: usize,
    cancel: CancellationToken,
    reply: watch::Receiver<Option<Arc<CapturedReply>>>,
}

/// Where every intercepted pull goes; cheap to share behind an `Arc`.
pub struct PullCoordinator {
    jobs: Mutex<HashMap<MergeKey, Entry>>,
    puller: Arc<dyn Puller>,
    metrics: Arc<Metrics>,
    next_id: AtomicU64,
}

impl PullCoordinator {
    pub fn new(puller: Arc<dyn Puller>, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(PullCoordinator {
            jobs: Mutex::new(HashMap::new()),
            puller,
            metrics,
            next_id: AtomicU64::new(1),
        })
    }

    /// Number of upstream pulls in flight.
    pub fn in_flight(&self) -> usize {
        self.jobs.lock().unwrap().len()
    }

    /// Pulls `info`, joining a matching pull in flight if there is one. Dropping the returned
    /// future detaches this requester.
    pub async fn pull(
        self: &Arc<Self>,
        info: PullRequestInfo,
        request: ForwardRequest,
    ) -> Arc<CapturedReply> {
        let key = MergeKey::of(&info);
        let (id, mut reply) = {
            let mut jobs = self.jobs.lock().unwrap();
            match jobs.get_mut(&key) {
                Some(entry) => {
                    entry.waiters += 1;
                    self.metrics.pull_requests_merged.inc();
                    info!(job = entry.id, image = %info.reference, class = %info.class,
                          pod = info.pod.as_deref().unwrap_or("-"), waiters = entry.waiters,
                          "pull request joined a pull in flight");
                    (entry.id, entry.reply.clone())
                }
                None => {
                    let id = self.next_id.fetch_add(1, Ordering::Relaxed);
                    let (tx, rx) = watch::channel(None);
                    let cancel = CancellationToken::new();
                    jobs.insert(
                        key.clone(),
                        Entry {
                            id,
                            waiters: 1,
                            cancel: cancel.clone(),
                            reply: rx.clone(),
                        },
                    );
                    self.metrics.pulls_in_flight.set(jobs.len() as i64);
                    let job = PullJob { id, info, request };
                    tokio::spawn(self.clone().run(key.clone(), job, tx, cancel));
                    (id, rx)
                }
            }
        };
        let _guard = Waiter {
            coordinator: self,
            key,
            id,
        };
        let result = reply.wait_for(Option::is_some).await;
        match result {
            Ok(r) => r.clone().expect("waited for Some"),
            // The job was dropped without a reply: only happens when it was cancelled, which
            // only happens once no waiter is left, so no one reads this.
            Err(_) => Arc::new(CapturedReply::from_status(tonic::Status::cancelled(
                "pull cancelled",
            ))),
        }
    }

    async fn run(
        self: Arc<Self>,
        key: MergeKey,
        job: PullJob,
        tx: watch::Sender<Option<Arc<CapturedReply>>>,
        cancel: CancellationToken,
    ) {
        let id = job.id;
        let started = Instant::now();
        let span = tracing::info_span!("pull", job = id, image = %job.info.reference);
        info!(parent: &span, class = %job.info.class, pod = job.info.pod.as_deref().unwrap_or("-"),
              authenticated = job.info.credentials.is_some(), "pull started");
        let pull = self.puller.pull(job).instrument(span.clone());
        let outcome = tokio::select! {
            reply = pull => Some(reply),
            _ = cancel.cancelled() => None,
        };
        // Remove before answering: a request arriving after this point starts a fresh pull.
        {
            let mut jobs = self.jobs.lock().unwrap();
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
                } else {
                    warn!(parent: &span, elapsed = ?elapsed, code = ?code,
                          error = status.message(), "pull failed");
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
                info!(parent: &span, elapsed = ?elapsed,
                      "pull cancelled: every requester went away");
            }
        }
    }

    fn detach(&self, key: &MergeKey, id: u64) {
        let mut jobs = self.jobs.lock().unwrap();
        let Some(entry) = jobs.get_mut(key) else {
            return;
        };
        if entry.id != id {
            return;
        }
        entry.waiters -= 1;
        if entry.waiters == 0 {
            entry.cancel.cancel();
            jobs.remove(key);
            self.metrics.pulls_in_flight.set(jobs.len() as i64);
        }
    }
}

/// Detaches its requester from the job when dropped: on an answer and on cancellation alike.
struct Waiter<'a> {
    coordinator: &'a Arc<PullCoordinator>,
    key: MergeKey,
    id: u64,
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        self.coordinator.detach(&self.key, self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grpc::CapturedReply;
    use crate::pull::Class;
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
        let c = PullCoordinator::new(Arc::new(gate.clone()), Arc::new(Metrics::new()));
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
        let c = PullCoordinator::new(Arc::new(gate.clone()), Arc::new(Metrics::new()));
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
        let c = PullCoordinator::new(Arc::new(gate.clone()), Arc::new(Metrics::new()));
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
}
