//! The node's bandwidth budget, enforced on the streams themselves: every chunk the mirror
//! receives from upstream is paid for from token buckets shared by all jobs, before it is passed
//! on to containerd.
//!
//! Prewarm pauses (or drops to its floor) while urgent bytes flow: while at least one stream of
//! urgent class is open at the mirror, not merely while an urgent job is admitted. On containerd
//! 2.x one semaphore limits the downloads of every pull on the node (the transfer service's
//! `max_concurrent_downloads`, default 3), so a pod's pull may wait inside containerd for a slot
//! that a prewarm stream holds; pausing prewarm then would keep that slot forever. Prewarm pauses
//! for at most [`LINGER`] when a pod's job arrives and between its streams, and otherwise only
//! from the pod's first stream on.
//!
//! Buckets run in debt: a stream that just received `n` bytes charges them, then waits until the
//! bucket is out of debt, so the long-run rate is exact whatever the chunk sizes. Waits are cut
//! into slices of at most [`RECHECK`], so a prewarm stream notices within that time that urgent
//! work arrived (or left, or that its own job was promoted) and slows down (or speeds up) without
//! its connection ever being closed.

use parking_lot::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::config::ScheduleConfig;
use crate::vocab::Class;

/// Longest sleep before a waiting stream re-reads the limits.
pub const RECHECK: Duration = Duration::from_millis(50);

/// While an urgent job is in the scheduler, prewarm stays paused this long after its last urgent
/// stream closed (or after the job arrived): the gaps between a pod's manifest, config and layer
/// requests are short, and resuming prewarm in each would reopen its connections only to close
/// them again. Bounded, so a pod's pull waiting inside containerd for a download slot that a
/// paused prewarm stream holds (containerd 2.x) gets it after this long.
pub const LINGER: Duration = Duration::from_millis(500);

/// Burst allowance of a bucket: this much time at its rate (at least [`MIN_BURST`] bytes).
const BURST: f64 = 0.05;
const MIN_BURST: f64 = 64.0 * 1024.0;

/// Limits in bytes per second; 0 means unlimited.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    /// The whole node: urgent and prewarm together.
    pub node: u64,
    /// Prewarm while no urgent work is in flight (0: up to the node budget).
    pub prewarm: u64,
    /// Prewarm while urgent work is in flight (0: paused).
    pub prewarm_floor: u64,
}

impl From<&ScheduleConfig> for Limits {
    fn from(cfg: &ScheduleConfig) -> Self {
        Limits {
            node: cfg.bandwidth.0,
            prewarm: cfg.prewarm_bandwidth.of(cfg.bandwidth.0),
            prewarm_floor: cfg.prewarm_floor.0,
        }
    }
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn new(now: Instant) -> Self {
        Bucket {
            tokens: 0.0,
            last: now,
        }
    }

    /// Adds what `rate` earned since the last refill. Unlimited buckets carry no debt.
    fn refill(&mut self, now: Instant, rate: u64) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        if rate == 0 {
            self.tokens = self.tokens.max(0.0);
            return;
        }
        let rate = rate as f64;
        self.tokens = (self.tokens + dt * rate).min((rate * BURST).max(MIN_BURST));
    }
}

#[derive(Debug)]
struct Buckets {
    node: Bucket,
    prewarm: Bucket,
}

#[derive(Clone, Copy)]
enum Which {
    Node,
    Prewarm,
}

/// An urgent stream's mark on the budget: prewarm yields while any is held.
#[derive(Debug)]
pub struct UrgentStream {
    bw: Arc<Bandwidth>,
}

impl Drop for UrgentStream {
    fn drop(&mut self) {
        self.bw.settle();
        if self.bw.urgent.fetch_sub(1, Ordering::SeqCst) == 1 {
            *self.bw.urgent_mark.lock() = Some(Instant::now());
        }
    }
}

/// Shared by every stream of every job.
#[derive(Debug)]
pub struct Bandwidth {
    limits: Mutex<Limits>,
    buckets: Mutex<Buckets>,
    /// Urgent streams open; while > 0 prewarm runs at its floor.
    urgent: AtomicUsize,
    /// Urgent jobs in the scheduler, and when the last urgent stream closed or such a job
    /// arrived: prewarm lingers at its floor for [`LINGER`] from then.
    urgent_jobs: AtomicUsize,
    urgent_mark: Mutex<Option<Instant>>,
    /// Bytes received, by class (urgent, prewarm).
    received: [AtomicU64; 2],
}

impl Bandwidth {
    pub fn new(limits: Limits) -> Self {
        let now = Instant::now();
        Bandwidth {
            limits: Mutex::new(limits),
            buckets: Mutex::new(Buckets {
                node: Bucket::new(now),
                prewarm: Bucket::new(now),
            }),
            urgent: AtomicUsize::new(0),
            urgent_jobs: AtomicUsize::new(0),
            urgent_mark: Mutex::new(None),
            received: Default::default(),
        }
    }

    pub fn limits(&self) -> Limits {
        *self.limits.lock()
    }

    /// New limits (config reload); streams pick them up within [`RECHECK`].
    pub fn set_limits(&self, limits: Limits) {
        self.settle();
        *self.limits.lock() = limits;
    }

    /// Marks an urgent stream open until the guard drops.
    pub fn urgent_stream(self: &Arc<Self>) -> UrgentStream {
        // Earned tokens are credited at the rate that was in force while they were earned.
        self.settle();
        self.urgent.fetch_add(1, Ordering::SeqCst);
        UrgentStream { bw: self.clone() }
    }

    /// Urgent streams are open, or an urgent job is between two of its streams ([`LINGER`]).
    pub fn urgent_in_flight(&self) -> bool {
        if self.urgent.load(Ordering::SeqCst) > 0 {
            return true;
        }
        self.urgent_jobs.load(Ordering::SeqCst) > 0
            && self
                .urgent_mark
                .lock()
                .is_some_and(|at| at.elapsed() < LINGER)
    }

    /// The scheduler's count of urgent jobs; a new one pauses prewarm for up to [`LINGER`]
    /// before its first stream opens.
    pub fn set_urgent_jobs(&self, n: usize) {
        self.settle();
        if self.urgent_jobs.swap(n, Ordering::SeqCst) < n {
            *self.urgent_mark.lock() = Some(Instant::now());
        }
    }

    /// Returns once no urgent job is in flight, or at once for urgent work (`is_urgent` is
    /// re-read: a job promoted meanwhile stops waiting). Checked every [`RECHECK`], as paused
    /// streams are.
    pub async fn yield_to_urgent(&self, is_urgent: impl Fn() -> bool) {
        while !is_urgent() && self.urgent_in_flight() {
            tokio::time::sleep(RECHECK).await;
        }
    }

    /// Prewarm is stopped outright (urgent streams open, no floor): a prewarm stream should
    /// close its upstream connection rather than let bytes in flight fill its receive window.
    pub fn prewarm_paused(&self) -> bool {
        self.urgent_in_flight() && self.limits().prewarm_floor == 0
    }

    /// Counts `n` bytes that are not paced (a paused stream's keep-alive): they are charged to
    /// the node bucket, and nobody waits for them.
    pub fn received_unpaced(&self, class: Class, n: u64) {
        self.received[class_index(class)].fetch_add(n, Ordering::Relaxed);
        let rate = self.rate(Which::Node);
        let mut b = self.buckets.lock();
        if rate != 0 {
            b.node.refill(Instant::now(), rate);
            b.node.tokens -= n as f64;
        }
    }

    /// Bytes received so far by class.
    pub fn received(&self, class: Class) -> u64 {
        self.received[class_index(class)].load(Ordering::Relaxed)
    }

    /// The rate a bucket refills at now; 0 = unlimited.
    fn rate(&self, which: Which) -> u64 {
        let l = self.limits();
        match which {
            Which::Node => l.node,
            Which::Prewarm if self.urgent_in_flight() => {
                // Paused is modelled as an (almost) empty trickle: waits re-check every slice.
                if l.prewarm_floor == 0 {
                    u64::MAX
                } else {
                    l.prewarm_floor
                }
            }
            Which::Prewarm => l.prewarm,
        }
    }

    fn settle(&self) {
        let now = Instant::now();
        let mut b = self.buckets.lock();
        for w in [Which::Node, Which::Prewarm] {
            let rate = self.rate(w);
            if rate != u64::MAX {
                bucket(&mut b, w).refill(now, rate);
            } else {
                bucket(&mut b, w).last = now;
            }
        }
    }

    /// Pays for `n` bytes just received by a stream of `class()` (re-read while waiting: a
    /// promoted job stops paying the prewarm rate at once).
    pub async fn received_bytes(&self, class: impl Fn() -> Class, n: u64) {
        self.received[class_index(class())].fetch_add(n, Ordering::Relaxed);
        self.pay(&class, n).await;
    }

    async fn pay(&self, class: &impl Fn() -> Class, n: u64) {
        let which = buckets_of(class());
        {
            let now = Instant::now();
            let mut b = self.buckets.lock();
            for &w in which {
                let rate = self.rate(w);
                let bk = bucket(&mut b, w);
                if rate == 0 {
                    bk.refill(now, 0);
                    continue;
                }
                if rate != u64::MAX {
                    bk.refill(now, rate);
                } else {
                    bk.last = now;
                }
                bk.tokens -= n as f64;
            }
        }
        loop {
            let wait = self.wait_for(class);
            if wait.is_zero() {
                return;
            }
            tokio::time::sleep(wait.min(RECHECK)).await;
        }
    }

    /// How long until the buckets this stream pays from are out of debt.
    fn wait_for(&self, class: &impl Fn() -> Class) -> Duration {
        let which = buckets_of(class());
        let now = Instant::now();
        let mut b = self.buckets.lock();
        let mut wait = Duration::ZERO;
        for &w in which {
            let rate = self.rate(w);
            let bk = bucket(&mut b, w);
            if rate == u64::MAX {
                // Paused: nothing is earned, keep waiting in slices.
                bk.last = now;
                if bk.tokens < 0.0 {
                    wait = RECHECK;
                }
                continue;
            }
            bk.refill(now, rate);
            if bk.tokens < 0.0 {
                wait = wait.max(Duration::from_secs_f64(-bk.tokens / rate as f64));
            }
        }
        wait
    }
}

fn bucket(b: &mut Buckets, w: Which) -> &mut Bucket {
    match w {
        Which::Node => &mut b.node,
        Which::Prewarm => &mut b.prewarm,
    }
}

/// The buckets a stream of `class` pays from.
fn buckets_of(class: Class) -> &'static [Which] {
    match class {
        Class::Urgent => &[Which::Node],
        Class::Prewarm => &[Which::Node, Which::Prewarm],
    }
}

fn class_index(c: Class) -> usize {
    match c {
        Class::Urgent => 0,
        Class::Prewarm => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_becomes_limits() {
        let cfg = crate::config::Config::parse(
            "[schedule]\nbandwidth = \"100MB/s\"\nprewarm_bandwidth = \"30%\"\nprewarm_floor = \"1MiB\"\n",
        )
        .unwrap();
        let l = Limits::from(&cfg.schedule);
        assert_eq!(
            (l.node, l.prewarm, l.prewarm_floor),
            (100_000_000, 30_000_000, 1 << 20)
        );
    }

    const MB: u64 = 1_000_000;

    /// A stream receiving 16 KiB chunks as fast as the limiter lets it, for `class`.
    fn stream(
        bw: Arc<Bandwidth>,
        class: Class,
        bytes: Arc<AtomicU64>,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            loop {
                bw.received_bytes(|| class, 16 * 1024).await;
                bytes.fetch_add(16 * 1024, Ordering::Relaxed);
            }
        })
    }

    fn rate_over(bytes: &AtomicU64, before: u64, secs: f64) -> f64 {
        (bytes.load(Ordering::Relaxed) - before) as f64 / secs
    }

    #[tokio::test(start_paused = true)]
    async fn prewarm_share_is_held_across_streams() {
        let bw = Arc::new(Bandwidth::new(Limits {
            node: 100 * MB,
            prewarm: 10 * MB,
            ..Default::default()
        }));
        let bytes = Arc::new(AtomicU64::new(0));
        let tasks: Vec<_> = (0..4)
            .map(|_| stream(bw.clone(), Class::Prewarm, bytes.clone()))
            .collect();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let before = bytes.load(Ordering::Relaxed);
        tokio::time::sleep(Duration::from_secs(10)).await;
        let rate = rate_over(&bytes, before, 10.0);
        assert!((rate - 10e6).abs() < 0.02 * 10e6, "prewarm rate {rate}");
        tasks.iter().for_each(|t| t.abort());
    }

    #[tokio::test(start_paused = true)]
    async fn node_budget_caps_urgent() {
        let bw = Arc::new(Bandwidth::new(Limits {
            node: 20 * MB,
            ..Default::default()
        }));
        let _urgent = bw.urgent_stream();
        let bytes = Arc::new(AtomicU64::new(0));
        let t = stream(bw.clone(), Class::Urgent, bytes.clone());
        tokio::time::sleep(Duration::from_secs(1)).await;
        let before = bytes.load(Ordering::Relaxed);
        tokio::time::sleep(Duration::from_secs(5)).await;
        let rate = rate_over(&bytes, before, 5.0);
        assert!((rate - 20e6).abs() < 0.02 * 20e6, "urgent rate {rate}");
        t.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn prewarm_pauses_within_100ms_of_urgent_work_and_resumes_after() {
        let bw = Arc::new(Bandwidth::new(Limits {
            node: 50 * MB,
            prewarm: 40 * MB,
            prewarm_floor: 0,
        }));
        let prewarm = Arc::new(AtomicU64::new(0));
        let t = stream(bw.clone(), Class::Prewarm, prewarm.clone());
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(prewarm.load(Ordering::Relaxed) > 30 * MB);
        let urgent = bw.urgent_stream();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let paused_at = prewarm.load(Ordering::Relaxed);
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(
            prewarm.load(Ordering::Relaxed),
            paused_at,
            "no prewarm byte 100 ms after urgent work arrived"
        );
        assert!(!t.is_finished(), "paused, not killed");
        drop(urgent);
        tokio::time::sleep(Duration::from_secs(1)).await;
        let resumed = prewarm.load(Ordering::Relaxed) - paused_at;
        assert!(resumed > 30 * MB, "prewarm resumed: {resumed}");
        t.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn floor_keeps_prewarm_trickling_under_urgent_work() {
        let bw = Arc::new(Bandwidth::new(Limits {
            node: 50 * MB,
            prewarm: 40 * MB,
            prewarm_floor: 2 * MB,
        }));
        let _urgent = bw.urgent_stream();
        let (p, u) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let tp = stream(bw.clone(), Class::Prewarm, p.clone());
        let tu = stream(bw.clone(), Class::Urgent, u.clone());
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (p0, u0) = (p.load(Ordering::Relaxed), u.load(Ordering::Relaxed));
        tokio::time::sleep(Duration::from_secs(10)).await;
        let (pr, ur) = (rate_over(&p, p0, 10.0), rate_over(&u, u0, 10.0));
        assert!((pr - 2e6).abs() < 0.05 * 2e6, "prewarm at floor: {pr}");
        assert!(
            (pr + ur - 50e6).abs() < 0.03 * 50e6,
            "node budget used: {}",
            pr + ur
        );
        tp.abort();
        tu.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn promoted_stream_stops_paying_the_prewarm_rate() {
        let bw = Arc::new(Bandwidth::new(Limits {
            prewarm: MB,
            ..Default::default()
        }));
        let urgent = Arc::new(std::sync::atomic::AtomicBool::new(false));
        // A big chunk puts the prewarm bucket 8 s in debt.
        let task = tokio::spawn({
            let (bw, urgent) = (bw.clone(), urgent.clone());
            async move {
                let class = || {
                    if urgent.load(Ordering::Relaxed) {
                        Class::Urgent
                    } else {
                        Class::Prewarm
                    }
                };
                bw.received_bytes(class, 8 * MB).await;
            }
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!task.is_finished());
        urgent.store(true, Ordering::Relaxed);
        tokio::time::sleep(RECHECK * 2).await;
        assert!(task.is_finished(), "promotion ends the wait");
    }
}
