//! The `[[prewarm]]` entries of the config file: one task per entry pulls its image (once, or
//! keeps it present), with per-attempt timeout, backoff and a deadline per round. A reload
//! replaces the list: unchanged entries keep running, removed or changed ones stop once their
//! pull in flight ends (work is never dropped by a reload).

use parking_lot::Mutex;
use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::submit::Prewarm;
use crate::config::{Policy, PrewarmEntry};
use crate::pull::PullCoordinator;
use crate::vocab::Origin;

/// First backoff after a failed attempt; doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_secs(10);
const MAX_BACKOFF: Duration = Duration::from_secs(600);

/// Where a configured image stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EntryStatus {
    Pending,
    /// Pulled successfully (this run); `keep` entries stay here while re-checks succeed.
    Present,
    /// The round was given up (backoff limit or deadline); `keep` entries try again next interval.
    Failed(String),
}

struct Running {
    entry: PrewarmEntry,
    order: u32,
    retire: CancellationToken,
    status: Arc<Mutex<EntryStatus>>,
}

pub struct Prewarmer {
    coordinator: Arc<PullCoordinator>,
    running: Mutex<HashMap<String, Running>>,
    /// Backoff unit: 10 s in production, shorter in tests.
    backoff: Duration,
}

impl Prewarmer {
    pub fn new(coordinator: Arc<PullCoordinator>) -> Arc<Self> {
        Arc::new(Prewarmer {
            coordinator,
            running: Mutex::new(HashMap::new()),
            backoff: FIRST_BACKOFF,
        })
    }

    /// Makes the configured list the running one.
    pub fn apply(&self, entries: &[PrewarmEntry]) {
        let mut running = self.running.lock();
        let mut wanted = HashMap::new();
        for (i, e) in entries.iter().enumerate() {
            wanted.insert(e.image.clone(), (i as u32, e.clone()));
        }
        running.retain(|image, r| {
            let keep = wanted
                .get(image)
                .is_some_and(|(order, e)| *e == r.entry && *order == r.order);
            if !keep {
                info!(image, "prewarm entry removed or changed: no new attempts");
                r.retire.cancel();
            }
            keep
        });
        for (image, (order, entry)) in wanted {
            if running.contains_key(&image) {
                continue;
            }
            let retire = CancellationToken::new();
            let status = Arc::new(Mutex::new(EntryStatus::Pending));
            let entry_loop = run_entry(
                self.coordinator.clone(),
                entry.clone(),
                order,
                retire.clone(),
                status.clone(),
                self.backoff,
            );
            let (coordinator, status_, name) =
                (self.coordinator.clone(), status.clone(), image.clone());
            tokio::spawn(async move {
                // A panic (a bug) ends this entry's loop: logged, counted, shown as failed.
                if let Err(p) = AssertUnwindSafe(entry_loop).catch_unwind().await {
                    let panic = crate::errors::panic_message(&*p);
                    error!(
                        image = name,
                        panic, "prewarm entry task panicked (a bug in pullgate)"
                    );
                    coordinator.count_panic("prewarm");
                    *status_.lock() =
                        EntryStatus::Failed(format!("pullgate hit an internal error: {panic}"));
                }
            });
            running.insert(
                image,
                Running {
                    entry,
                    order,
                    retire,
                    status,
                },
            );
        }
    }

    /// Every configured image with its status, in config order.
    pub fn status(&self) -> Vec<(String, EntryStatus)> {
        let running = self.running.lock();
        let mut v: Vec<_> = running
            .values()
            .map(|r| (r.order, r.entry.image.clone(), r.status.lock().clone()))
            .collect();
        v.sort_by_key(|(order, _, _)| *order);
        v.into_iter().map(|(_, i, s)| (i, s)).collect()
    }

    /// Every configured entry, in config order.
    pub fn entries(&self) -> Vec<PrewarmEntry> {
        let running = self.running.lock();
        let mut v: Vec<_> = running
            .values()
            .map(|r| (r.order, r.entry.clone()))
            .collect();
        v.sort_by_key(|(order, _)| *order);
        v.into_iter().map(|(_, e)| e).collect()
    }

    /// Stops every entry (after their pulls in flight).
    pub fn stop(&self) {
        for r in self.running.lock().values() {
            r.retire.cancel();
        }
    }
}

async fn run_entry(
    coordinator: Arc<PullCoordinator>,
    entry: PrewarmEntry,
    order: u32,
    retire: CancellationToken,
    status: Arc<Mutex<EntryStatus>>,
    backoff_unit: Duration,
) {
    let prewarm = Prewarm {
        image: entry.image.clone(),
        level: entry.priority,
        origin: Origin::Config(order),
        docker_config: entry.docker_config.clone(),
    };
    loop {
        let outcome = round(&coordinator, &prewarm, &entry, &retire, backoff_unit).await;
        match &outcome {
            Some(Ok(())) => *status.lock() = EntryStatus::Present,
            Some(Err(e)) => *status.lock() = EntryStatus::Failed(e.clone()),
            None => return,
        }
        if entry.policy == Policy::Once {
            return;
        }
        // Spread re-checks so a fleet restarted together does not re-resolve together.
        let jitter = entry.interval.mul_f64(spread());
        tokio::select! {
            _ = retire.cancelled() => return,
            _ = tokio::time::sleep(entry.interval.saturating_add(jitter)) => {}
        }
    }
}

/// A number in [0, 0.1), different on every call and every node: std's `RandomState` is seeded
/// from the OS per process and stepped per instance, which is all a jitter needs (no `rand`).
fn spread() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let bits = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    (bits >> 11) as f64 / (1u64 << 53) as f64 * 0.1
}

/// One round: attempts until success, the backoff limit or the deadline. `None`: retired.
async fn round(
    coordinator: &Arc<PullCoordinator>,
    prewarm: &Prewarm,
    entry: &PrewarmEntry,
    retire: &CancellationToken,
    backoff_unit: Duration,
) -> Option<Result<(), String>> {
    let started = tokio::time::Instant::now();
    let mut backoff = backoff_unit;
    let mut failures = 0;
    loop {
        if retire.is_cancelled() {
            return None;
        }
        let joined = match prewarm.submit(coordinator) {
            Ok(j) => j,
            Err(e) => {
                warn!(image = %entry.image, error = %e, "prewarm entry cannot be pulled");
                return Some(Err(e));
            }
        };
        let job = joined.id;
        let attempt = joined.reply();
        let limit = [entry.timeout, remaining(entry.deadline, started)]
            .into_iter()
            .filter(|d| !d.is_zero())
            .min();
        let result = match limit {
            Some(l) => match tokio::time::timeout(l, attempt).await {
                Ok(r) => r.status_result(),
                Err(_) => Err(format!("attempt timed out after {l:?}")),
            },
            None => attempt.await.status_result(),
        };
        match result {
            Ok(()) => {
                info!(image = %entry.image, job, "prewarm image present");
                return Some(Ok(()));
            }
            Err(e) => {
                failures += 1;
                let over_deadline =
                    !entry.deadline.is_zero() && started.elapsed() + backoff >= entry.deadline;
                if failures > entry.backoff_limit || over_deadline {
                    warn!(image = %entry.image, job, failures, error = %e,
                          "prewarm round given up");
                    return Some(Err(e));
                }
                warn!(image = %entry.image, job, failures, retry_in = ?backoff, error = %e,
                      "prewarm attempt failed");
                tokio::select! {
                    _ = retire.cancelled() => return None,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

fn remaining(deadline: Duration, started: tokio::time::Instant) -> Duration {
    if deadline.is_zero() {
        return Duration::ZERO;
    }
    deadline
        .saturating_sub(started.elapsed())
        .max(Duration::from_millis(1))
}

trait StatusResult {
    fn status_result(&self) -> Result<(), String>;
}

impl StatusResult for Arc<crate::grpc::CapturedReply> {
    fn status_result(&self) -> Result<(), String> {
        let s = self.status();
        match s.code() {
            tonic::Code::Ok => Ok(()),
            c => Err(format!("{c:?}: {}", s.message())),
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_jitter_stays_under_a_tenth_and_differs_between_calls() {
        let v: Vec<f64> = (0..200).map(|_| super::spread()).collect();
        assert!(v.iter().all(|x| (0.0..0.1).contains(x)), "{v:?}");
        let mut sorted = v.clone();
        sorted.sort_by(f64::total_cmp);
        sorted.dedup();
        assert!(sorted.len() > 190, "{} distinct of 200", sorted.len());
        let mean = v.iter().sum::<f64>() / v.len() as f64;
        assert!((0.03..0.07).contains(&mean), "mean {mean}");
    }
}
