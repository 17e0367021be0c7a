//! One download per blob across jobs: a job needing a blob another job is already downloading
//! waits for that download instead of starting its own.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures_util::future::{BoxFuture, Shared, WeakShared};
use futures_util::FutureExt;
use tokio::sync::watch;

use super::blob::{BlobError, BlobOutcome};
use crate::pull::Class;
use crate::schedule::Priority;

/// The jobs waiting for one download: it is paced as the most urgent of them, so a pod that needs
/// a layer a prewarm job is downloading is not held to the prewarm rate.
#[derive(Debug)]
pub struct Interest {
    jobs: Mutex<Vec<watch::Receiver<Priority>>>,
}

impl Interest {
    pub fn new(first: watch::Receiver<Priority>) -> Arc<Self> {
        Arc::new(Interest {
            jobs: Mutex::new(vec![first]),
        })
    }

    fn add(&self, job: watch::Receiver<Priority>) {
        self.jobs.lock().unwrap().push(job);
    }

    pub fn priority(&self) -> Priority {
        self.jobs
            .lock()
            .unwrap()
            .iter()
            .map(|r| *r.borrow())
            .max()
            .unwrap_or_default()
    }

    pub fn class(&self) -> Class {
        self.priority().class()
    }
}

type DownloadFuture = BoxFuture<'static, Result<BlobOutcome, BlobError>>;
type Download = Shared<DownloadFuture>;
type Running = (WeakShared<DownloadFuture>, Arc<Interest>);

/// The map holds weak handles only: when every job waiting for a download is gone, the download
/// itself is dropped (its connection closed), and the next job starts afresh.
#[derive(Default)]
pub struct SharedDownloads {
    inflight: Mutex<HashMap<String, Running>>,
}

impl SharedDownloads {
    /// Runs `start()` for `digest` unless a download of it is in flight; `true` in the result
    /// when this caller joined someone else's download.
    pub async fn run<F>(
        self: &Arc<Self>,
        digest: &str,
        priority: watch::Receiver<Priority>,
        start: F,
    ) -> (Result<BlobOutcome, BlobError>, bool)
    where
        F: FnOnce(Arc<Interest>) -> DownloadFuture,
    {
        let (download, joined) = {
            let mut map = self.inflight.lock().unwrap();
            let running = map
                .get(digest)
                .and_then(|(w, i)| w.upgrade().map(|d| (d, i.clone())));
            match running {
                Some((d, interest)) => {
                    interest.add(priority);
                    (d, true)
                }
                None => {
                    let me = self.clone();
                    let key = digest.to_string();
                    let interest = Interest::new(priority);
                    let fut = start(interest.clone());
                    // The entry goes away with the download, whoever polled it last.
                    let d: Download = async move {
                        let r = fut.await;
                        me.inflight.lock().unwrap().remove(&key);
                        r
                    }
                    .boxed()
                    .shared();
                    if let Some(weak) = d.downgrade() {
                        map.insert(digest.to_string(), (weak, interest));
                    }
                    (d, false)
                }
            }
        };
        (download.await, joined)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn prio() -> watch::Receiver<Priority> {
        watch::channel(Priority::prewarm(0)).1
    }

    #[tokio::test]
    async fn concurrent_callers_share_one_download() {
        let shared = Arc::new(SharedDownloads::default());
        let starts = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let rx = rx.shared();
        let mut tasks = Vec::new();
        for _ in 0..3 {
            let shared = shared.clone();
            let starts = starts.clone();
            let rx = rx.clone();
            tasks.push(tokio::spawn(async move {
                shared
                    .run("sha256:x", prio(), move |_| {
                        starts.fetch_add(1, Ordering::SeqCst);
                        async move {
                            let _ = rx.await;
                            Ok(BlobOutcome::Fetched)
                        }
                        .boxed()
                    })
                    .await
            }));
        }
        tokio::task::yield_now().await;
        tx.send(()).unwrap();
        let mut joined = 0;
        for t in tasks {
            let (r, j) = t.await.unwrap();
            assert_eq!(r.unwrap(), BlobOutcome::Fetched);
            joined += usize::from(j);
        }
        assert_eq!(starts.load(Ordering::SeqCst), 1);
        assert_eq!(joined, 2);
        assert!(shared.inflight.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn abandoned_download_is_dropped_and_restarted() {
        let shared = Arc::new(SharedDownloads::default());
        let starts = Arc::new(AtomicUsize::new(0));
        let start = |starts: Arc<AtomicUsize>| {
            move |_| {
                starts.fetch_add(1, Ordering::SeqCst);
                futures_util::future::pending::<Result<BlobOutcome, BlobError>>().boxed()
            }
        };
        let first = tokio::spawn({
            let (shared, starts) = (shared.clone(), starts.clone());
            async move { shared.run("sha256:y", prio(), start(starts)).await }
        });
        tokio::task::yield_now().await;
        first.abort();
        let _ = first.await;
        // Nobody holds the download any more: a new caller starts its own.
        let second = tokio::spawn({
            let (shared, starts) = (shared.clone(), starts.clone());
            async move { shared.run("sha256:y", prio(), start(starts)).await }
        });
        tokio::task::yield_now().await;
        assert_eq!(starts.load(Ordering::SeqCst), 2);
        second.abort();
    }
}
