//! Every pull job pullgate knows of, live and recently ended: what the API lists and watches, and
//! the one place a job's priority and state live. Any change bumps the board's generation, which
//! is how the scheduler and API watchers learn that something moved.
//!
//! May import only `vocab`: the scheduler, the mirror, pulls and the API all read the board.

use parking_lot::Mutex;
use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::watch;

pub mod progress;

use crate::vocab::{JobState, Origin, Priority};
use progress::JobProgress;

/// Ended jobs kept for `pullgate jobs`.
const KEEP_ENDED: usize = 100;

#[derive(Debug)]
struct Timeline {
    state: JobState,
    /// When the job first started waiting for a slot, and when it got one.
    queued: Option<Instant>,
    admitted: Option<Instant>,
    ended: Option<Instant>,
    message: String,
}

/// One upstream pull.
#[derive(Debug)]
pub struct JobRecord {
    pub id: u64,
    /// Normalized reference.
    pub image: String,
    pub origin: Origin,
    pub created: Instant,
    pub created_at: SystemTime,
    pub progress: Arc<JobProgress>,
    priority: watch::Sender<Priority>,
    timeline: Mutex<Timeline>,
    /// Total bytes, once resolved (0 before).
    size: AtomicU64,
    changed: Arc<watch::Sender<u64>>,
}

impl JobRecord {
    pub fn priority(&self) -> Priority {
        *self.priority.borrow()
    }

    /// Sets the job's priority (promotion or demotion). `true` when it changed.
    pub fn set_priority(&self, p: Priority) -> bool {
        let changed = self.priority.send_if_modified(|cur| {
            let differs = *cur != p;
            *cur = p;
            differs
        });
        if changed {
            self.bump();
        }
        changed
    }

    pub fn watch_priority(&self) -> watch::Receiver<Priority> {
        self.priority.subscribe()
    }

    pub fn state(&self) -> JobState {
        self.timeline.lock().state
    }

    pub fn message(&self) -> String {
        self.timeline.lock().message.clone()
    }

    pub fn set_state(&self, state: JobState) {
        {
            let mut t = self.timeline.lock();
            if t.state.is_terminal() || t.state == state {
                return;
            }
            let now = Instant::now();
            match state {
                JobState::Queued if t.queued.is_none() => t.queued = Some(now),
                JobState::Fetching | JobState::Finishing if t.admitted.is_none() => {
                    t.admitted = Some(now)
                }
                s if s.is_terminal() => t.ended = Some(now),
                _ => {}
            }
            t.state = state;
        }
        self.bump();
    }

    /// Ends the job (a no-op if it has ended already).
    pub fn end(&self, state: JobState, message: impl Into<String>) {
        {
            let mut t = self.timeline.lock();
            if t.state.is_terminal() {
                return;
            }
            t.state = state;
            t.ended = Some(Instant::now());
            t.message = message.into();
        }
        self.bump();
    }

    /// Time spent waiting for a slot (so far, if still waiting).
    pub fn queue_wait(&self) -> Duration {
        let t = self.timeline.lock();
        match (t.queued, t.admitted) {
            (Some(q), Some(a)) => a.saturating_duration_since(q),
            (Some(q), None) => t
                .ended
                .unwrap_or_else(Instant::now)
                .saturating_duration_since(q),
            _ => Duration::ZERO,
        }
    }

    pub fn elapsed(&self) -> Duration {
        let t = self.timeline.lock();
        t.ended
            .unwrap_or_else(Instant::now)
            .saturating_duration_since(self.created)
    }

    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Relaxed)
    }

    pub fn set_size(&self, bytes: u64) {
        self.size.store(bytes, Ordering::Relaxed);
        self.bump();
    }

    /// Something about this job changed.
    pub fn bump(&self) {
        self.changed.send_modify(|g| *g += 1);
    }
}

/// All jobs: live ones by id, and the last [`KEEP_ENDED`] ended ones.
pub struct JobBoard {
    live: Mutex<BTreeMap<u64, Arc<JobRecord>>>,
    ended: Mutex<VecDeque<Arc<JobRecord>>>,
    changed: Arc<watch::Sender<u64>>,
}

impl Default for JobBoard {
    fn default() -> Self {
        JobBoard {
            live: Default::default(),
            ended: Default::default(),
            changed: Arc::new(watch::channel(0).0),
        }
    }
}

impl JobBoard {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    pub fn create(
        &self,
        id: u64,
        image: &str,
        origin: Origin,
        priority: Priority,
        initial: JobState,
    ) -> Arc<JobRecord> {
        let record = Arc::new(JobRecord {
            id,
            image: image.to_string(),
            origin,
            created: Instant::now(),
            created_at: SystemTime::now(),
            progress: Arc::new(JobProgress::default()),
            priority: watch::channel(priority).0,
            timeline: Mutex::new(Timeline {
                state: initial,
                queued: None,
                admitted: None,
                ended: None,
                message: String::new(),
            }),
            size: AtomicU64::new(0),
            changed: self.changed.clone(),
        });
        self.live.lock().insert(id, record.clone());
        record.bump();
        record
    }

    /// Moves an ended job from the live set to the history.
    pub fn retire(&self, id: u64) {
        let Some(record) = self.live.lock().remove(&id) else {
            return;
        };
        if !record.state().is_terminal() {
            record.end(JobState::Cancelled, "abandoned");
        }
        let mut ended = self.ended.lock();
        ended.push_back(record);
        while ended.len() > KEEP_ENDED {
            ended.pop_front();
        }
        drop(ended);
        self.changed.send_modify(|g| *g += 1);
    }

    pub fn get(&self, id: u64) -> Option<Arc<JobRecord>> {
        if let Some(r) = self.live.lock().get(&id) {
            return Some(r.clone());
        }
        self.ended.lock().iter().find(|r| r.id == id).cloned()
    }

    pub fn live(&self) -> Vec<Arc<JobRecord>> {
        self.live.lock().values().cloned().collect()
    }

    /// Live jobs, then ended ones, by id.
    pub fn all(&self) -> Vec<Arc<JobRecord>> {
        let mut all: Vec<_> = self.ended.lock().iter().cloned().collect();
        all.extend(self.live());
        all.sort_by_key(|r| r.id);
        all
    }

    /// A receiver that changes whenever any job does.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_and_history() {
        let board = JobBoard::new();
        let mut rx = board.subscribe();
        let r = board.create(
            1,
            "img",
            Origin::Api,
            Priority::prewarm(0),
            JobState::Resolving,
        );
        assert!(rx.has_changed().unwrap());
        rx.mark_unchanged();
        r.set_state(JobState::Queued);
        r.set_state(JobState::Fetching);
        assert!(rx.has_changed().unwrap());
        assert!(r.set_priority(Priority::urgent(0)));
        assert!(!r.set_priority(Priority::urgent(0)));
        r.end(JobState::Done, "");
        r.set_state(JobState::Fetching);
        assert_eq!(r.state(), JobState::Done, "terminal states stick");
        board.retire(1);
        assert!(board.live().is_empty());
        assert_eq!(board.all().len(), 1);
        assert_eq!(board.get(1).unwrap().state(), JobState::Done);
    }
}
