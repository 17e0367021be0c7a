//! Per-job and per-blob progress, kept in memory for the API and metrics.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Progress of one blob of a job.
#[derive(Debug)]
pub struct BlobProgress {
    pub digest: String,
    pub total: u64,
    done: AtomicU64,
}

impl BlobProgress {
    pub fn new(digest: String, total: u64) -> Arc<Self> {
        Arc::new(BlobProgress {
            digest,
            total,
            done: AtomicU64::new(0),
        })
    }

    pub fn done(&self) -> u64 {
        self.done.load(Ordering::Relaxed)
    }

    pub fn set(&self, bytes: u64) {
        self.done.store(bytes.min(self.total), Ordering::Relaxed);
    }
}

/// Progress of one job: its blobs in manifest order.
#[derive(Debug, Default)]
pub struct JobProgress {
    pub blobs: parking_lot::Mutex<Vec<Arc<BlobProgress>>>,
    /// Told when one of the blobs is complete.
    blob_done: tokio::sync::Notify,
}

impl JobProgress {
    /// One of the job's blobs has reached containerd in full.
    pub fn blob_complete(&self) {
        self.blob_done.notify_waiters();
    }

    /// Returns once every blob is known and has reached containerd in full.
    pub async fn completed(&self) {
        loop {
            let told = self.blob_done.notified();
            if self.complete() {
                return;
            }
            told.await;
        }
    }

    pub fn add(&self, blob: Arc<BlobProgress>) {
        self.blobs.lock().push(blob);
    }

    /// Whether every blob is known and has reached containerd in full.
    pub fn complete(&self) -> bool {
        let blobs = self.blobs.lock();
        !blobs.is_empty() && blobs.iter().all(|b| b.done() >= b.total)
    }

    /// (bytes done, bytes total) over all blobs.
    pub fn totals(&self) -> (u64, u64) {
        self.blobs
            .lock()
            .iter()
            .fold((0, 0), |(d, t), b| (d + b.done(), t + b.total))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn complete_once_every_known_blob_is_in() {
        let job = JobProgress::default();
        assert!(!job.complete(), "no blobs known yet");
        let (config, layer) = (
            BlobProgress::new("c".into(), 10),
            BlobProgress::new("l".into(), 100),
        );
        job.add(config.clone());
        job.add(layer.clone());
        config.set(10);
        layer.set(99);
        assert!(!job.complete());
        layer.set(100);
        assert!(job.complete());
        job.blob_complete();
        futures_util::FutureExt::now_or_never(job.completed()).expect("complete: returns at once");
        assert_eq!(job.totals(), (110, 110));
    }
}
