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
    pub blobs: std::sync::Mutex<Vec<Arc<BlobProgress>>>,
}

impl JobProgress {
    pub fn add(&self, blob: Arc<BlobProgress>) {
        self.blobs.lock().unwrap().push(blob);
    }

    /// (bytes done, bytes total) over all blobs.
    pub fn totals(&self) -> (u64, u64) {
        self.blobs
            .lock()
            .unwrap()
            .iter()
            .fold((0, 0), |(d, t), b| (d + b.done(), t + b.total))
    }
}
