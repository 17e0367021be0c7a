//! One scheduler for every byte pullgate fetches.
//!
//! ```text
//! job ──enter──▶ [waiting-for-p2p] ──▶ resolving ──admit(size)──▶ queued ──▶ fetching ──▶ finishing
//!                   prewarm only          │                         │          │              │
//!                                         ▼                         ▼          ▼              ▼
//!                                  gate (P2P ready)     prewarm cap, large lane   stream slots
//!                                                                              bandwidth buckets
//! ```
//! Urgent jobs (a pod waits) pass every queue at once; prewarm jobs are admitted by priority,
//! then configured order, then arrival, at most `max_prewarm_jobs` at a time. Images of at least
//! `large_image_bytes` go through a lane one at a time in a deterministic order: the lane does
//! not start an image while one that sorts before it is still being resolved, so the order never
//! depends on resolution times, and an image leaves it once its last blob has reached containerd
//! ([`Ticket::leave_lane`]), while containerd unpacks. [`LaneOrder::Shared`] (the default) gives
//! every node the same sequence
//! (priority, configured order, reference), which a shared cache rewards;
//! [`LaneOrder::PerNode`] gives each node its own (priority, then a hash of node and
//! reference), which peers that share only finished blobs reward.
//!
//! Owns admission, the lane and the byte budgets. May import `vocab`, `config`, `jobs` and
//! `metrics`; pulls and the mirror call it, never the other way.

pub mod bandwidth;
pub mod slots;

use parking_lot::Mutex;
use std::cmp::Reverse;
use std::collections::BTreeMap;
use std::sync::{Arc, Weak};

use tokio::sync::watch;

pub use crate::vocab::Priority;
pub use bandwidth::{Bandwidth, Limits, UrgentStream};
pub use slots::{SlotPermit, Slots};

use crate::config::{LaneOrderConfig, ScheduleConfig};
use crate::jobs::{JobBoard, JobRecord};
use crate::metrics::{ClassLabels, Metrics};
use crate::vocab::Class;
use crate::vocab::JobState;

/// Admission limits (reloadable).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Admission {
    /// Prewarm images fetched at once (0: unlimited).
    pub max_prewarm_jobs: usize,
    /// Images at least this big go through the large-image lane (0: no lane).
    pub large_image_bytes: u64,
    pub lane_order: LaneOrder,
}

impl From<&ScheduleConfig> for Admission {
    fn from(cfg: &ScheduleConfig) -> Self {
        Admission {
            max_prewarm_jobs: cfg.max_prewarm_jobs,
            large_image_bytes: cfg.large_image_size.0,
            lane_order: match cfg.lane_order {
                LaneOrderConfig::Shared => LaneOrder::Shared,
                LaneOrderConfig::PerNode => LaneOrder::per_node(&cfg.node_name()),
            },
        }
    }
}

/// The sequence the large-image lane walks, among images of one priority.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LaneOrder {
    /// The same on every node: configured order, then reference.
    Shared,
    /// A permutation of its own on each node: the rank of an image is a hash of the node's
    /// seed and the image reference (rendezvous hashing), so nodes start at different images
    /// and an image added later does not reorder the others.
    PerNode { seed: u64 },
}

impl LaneOrder {
    /// The per-node order of the node called `node_name`.
    pub fn per_node(node_name: &str) -> Self {
        LaneOrder::PerNode {
            seed: rank(0, node_name),
        }
    }

    /// Where `image` sorts among images of one priority (and, for the shared order, one
    /// configured position): by this, then by reference.
    pub fn rank(&self, image: &str) -> u64 {
        match *self {
            LaneOrder::Shared => 0,
            LaneOrder::PerNode { seed } => rank(seed, image),
        }
    }
}

/// A stable 64-bit hash of `seed` and `text` (sha256: the same on every node, build and version,
/// which a mixed-version cluster needs; std's hashers promise none of that).
fn rank(seed: u64, text: &str) -> u64 {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(seed.to_be_bytes());
    h.update(text.as_bytes());
    let d = h.finalize();
    u64::from_be_bytes(d[..8].try_into().expect("sha256 is 32 bytes"))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Size not known yet (waiting for the gate or resolving).
    Unsized,
    Waiting,
    Running,
}

#[derive(Debug)]
struct Entry {
    record: Arc<JobRecord>,
    seq: u64,
    phase: Phase,
    large: bool,
    holds_lane: bool,
}

impl Entry {
    fn queue_key(&self) -> (Reverse<Priority>, u32, u64) {
        (
            Reverse(self.record.priority()),
            self.record.origin.order(),
            self.seq,
        )
    }

    fn lane_key(&self, order: LaneOrder) -> (Reverse<Priority>, u32, u64, &str, u64) {
        let configured = match order {
            LaneOrder::Shared => self.record.origin.order(),
            // The configured order would give every node the same sequence again.
            LaneOrder::PerNode { .. } => 0,
        };
        let hashed = order.rank(&self.record.image);
        (
            Reverse(self.record.priority()),
            configured,
            hashed,
            &self.record.image,
            self.seq,
        )
    }
}

#[derive(Debug, Default)]
struct State {
    entries: BTreeMap<u64, Entry>,
    seq: u64,
}

pub struct Scheduler {
    state: Mutex<State>,
    admission: Mutex<Admission>,
    pub bandwidth: Arc<Bandwidth>,
    /// Blob streams in flight across all jobs.
    pub streams: Arc<Slots>,
    gate: watch::Receiver<bool>,
    /// Bumped on every admission.
    admitted: watch::Sender<u64>,
    /// Urgent jobs in the scheduler (a pod waits for each).
    urgent: watch::Sender<usize>,
    metrics: Arc<Metrics>,
}

/// What the scheduler is given at start.
pub struct Setup {
    pub admission: Admission,
    pub limits: Limits,
    pub max_blob_streams: usize,
    /// P2P readiness (true: open).
    pub gate: watch::Receiver<bool>,
}

impl Scheduler {
    pub fn new(setup: Setup, board: &JobBoard, metrics: Arc<Metrics>) -> Arc<Self> {
        let s = Arc::new(Scheduler {
            state: Default::default(),
            admission: Mutex::new(setup.admission),
            bandwidth: Arc::new(Bandwidth::new(setup.limits)),
            streams: Slots::new(setup.max_blob_streams),
            gate: setup.gate,
            admitted: watch::channel(0).0,
            urgent: watch::channel(0).0,
            metrics,
        });
        // Promotions and gate changes re-run the dispatch; the task ends with the scheduler.
        let weak = Arc::downgrade(&s);
        let (jobs, gate) = (board.subscribe(), s.gate.clone());
        tokio::spawn(redispatch(weak, jobs, gate));
        s
    }

    /// New admission limits (config reload).
    pub fn set_admission(&self, a: Admission) {
        *self.admission.lock() = a;
        self.dispatch();
    }

    pub fn gate_open(&self) -> bool {
        *self.gate.borrow()
    }

    /// Registers a job; it leaves the scheduler when the ticket is dropped.
    pub fn enter(self: &Arc<Self>, record: Arc<JobRecord>) -> Ticket {
        let id = record.id;
        {
            let mut st = self.state.lock();
            st.seq += 1;
            let seq = st.seq;
            st.entries.insert(
                id,
                Entry {
                    record: record.clone(),
                    seq,
                    phase: Phase::Unsized,
                    large: false,
                    holds_lane: false,
                },
            );
        }
        self.dispatch();
        Ticket {
            scheduler: self.clone(),
            record,
        }
    }

    /// The number of urgent jobs in the scheduler, watched.
    pub fn urgent_jobs(&self) -> watch::Receiver<usize> {
        self.urgent.subscribe()
    }

    /// Admits whatever may run now. Cheap; called on every change.
    fn dispatch(&self) {
        let adm = *self.admission.lock();
        let gate_open = self.gate_open();
        let mut st = self.state.lock();
        let urgent = st
            .entries
            .values()
            .filter(|e| e.record.priority().is_urgent())
            .count();
        self.bandwidth.set_urgent_jobs(urgent);
        self.urgent
            .send_if_modified(|u| std::mem::replace(u, urgent) != urgent);
        let mut lane_busy = st.entries.values().any(|e| e.holds_lane);
        let mut running_prewarm = st
            .entries
            .values()
            .filter(|e| e.phase == Phase::Running && !e.record.priority().is_urgent())
            .count();
        // The lane's next image: the first by lane order among prewarm images that are large or
        // may turn out to be. An unsized one first in line holds the lane back.
        let lane_next = st
            .entries
            .values()
            .filter(|e| !e.record.priority().is_urgent())
            .filter(|e| e.phase == Phase::Unsized || (e.phase == Phase::Waiting && e.large))
            .filter(|_| adm.large_image_bytes > 0)
            // One key (a hash, per node) for each entry, not two per comparison.
            .min_by_key(|e| e.lane_key(adm.lane_order))
            .filter(|e| e.phase == Phase::Waiting)
            .map(|e| e.record.id);

        let mut waiting: Vec<_> = st
            .entries
            .values()
            .filter(|e| e.phase == Phase::Waiting)
            .map(|e| (e.queue_key(), e.record.id))
            .collect();
        waiting.sort();
        let mut admitted = false;
        for (_, id) in waiting {
            let e = st.entries.get_mut(&id).expect("listed above");
            if e.record.priority().is_urgent() {
                e.phase = Phase::Running;
                admitted = true;
                continue;
            }
            if !gate_open {
                continue;
            }
            if adm.max_prewarm_jobs > 0 && running_prewarm >= adm.max_prewarm_jobs {
                break;
            }
            if e.large {
                if lane_busy || lane_next != Some(id) {
                    continue;
                }
                e.holds_lane = true;
                lane_busy = true;
            }
            e.phase = Phase::Running;
            running_prewarm += 1;
            admitted = true;
        }
        drop(st);
        if admitted {
            self.admitted.send_modify(|g| *g += 1);
        }
    }

    fn phase(&self, id: u64) -> Option<Phase> {
        self.state.lock().entries.get(&id).map(|e| e.phase)
    }

    /// Updates the scheduling gauges.
    pub fn sample(&self, board: &JobBoard) {
        let m = &self.metrics;
        let st = self.state.lock();
        for class in [Class::Urgent, Class::Prewarm] {
            let queued = st
                .entries
                .values()
                .filter(|e| e.phase != Phase::Running && e.record.priority().class() == class)
                .count();
            m.queue_length
                .get_or_create(&ClassLabels::new(class))
                .set(queued as i64);
        }
        let lane_running = st.entries.values().filter(|e| e.holds_lane).count();
        let lane_waiting = st
            .entries
            .values()
            .filter(|e| e.large && e.phase == Phase::Waiting)
            .count();
        drop(st);
        m.lane_running.set(lane_running as i64);
        m.lane_waiting.set(lane_waiting as i64);
        m.p2p_gate_open.set(i64::from(self.gate_open()));
        let mut by_state = [0i64; JobState::ALL.len()];
        for r in board.live() {
            if !r.priority().is_urgent() {
                let i = JobState::ALL.iter().position(|s| *s == r.state()).unwrap();
                by_state[i] += 1;
            }
        }
        for (i, s) in JobState::ALL.iter().enumerate() {
            if !s.is_terminal() {
                m.prewarm_jobs
                    .get_or_create(&crate::metrics::StateLabels { state: s.as_str() })
                    .set(by_state[i]);
            }
        }
    }
}

async fn redispatch(
    weak: Weak<Scheduler>,
    mut jobs: watch::Receiver<u64>,
    mut gate: watch::Receiver<bool>,
) {
    let mut gate_open = true;
    loop {
        tokio::select! {
            r = jobs.changed() => if r.is_err() { return },
            // Gate owner gone: its last value stands.
            r = gate.changed(), if gate_open => gate_open = r.is_ok(),
        }
        match weak.upgrade() {
            Some(s) => s.dispatch(),
            None => return,
        }
    }
}

/// A job's place in the scheduler.
pub struct Ticket {
    scheduler: Arc<Scheduler>,
    record: Arc<JobRecord>,
}

impl Ticket {
    /// Holds a prewarm job until the P2P gate is open; returns at once for urgent work, and as
    /// soon as a waiting job is promoted.
    pub async fn wait_gate(&self) {
        let mut gate = self.scheduler.gate.clone();
        let mut prio = self.record.watch_priority();
        let mut announced = false;
        loop {
            if *gate.borrow_and_update() || prio.borrow_and_update().is_urgent() {
                if announced {
                    self.record.set_state(JobState::Resolving);
                }
                return;
            }
            if !announced {
                self.record.set_state(JobState::WaitingForP2p);
                announced = true;
            }
            tokio::select! {
                r = gate.changed() => if r.is_err() { return },
                r = prio.changed() => if r.is_err() { return },
            }
        }
    }

    /// Waits for the job's turn to fetch, now that its size is known (`None`: unknown, e.g.
    /// containerd fetches it itself).
    pub async fn admit(&self, size: Option<u64>) {
        let s = &self.scheduler;
        let id = self.record.id;
        let mut admitted = s.admitted.subscribe();
        {
            let large_from = s.admission.lock().large_image_bytes;
            let mut st = s.state.lock();
            if let Some(e) = st.entries.get_mut(&id) {
                e.large = large_from > 0 && size.is_some_and(|b| b >= large_from);
                e.phase = Phase::Waiting;
            }
        }
        if let Some(b) = size {
            self.record.set_size(b);
        }
        s.dispatch();
        let started = tokio::time::Instant::now();
        if s.phase(id) != Some(Phase::Running) {
            self.record.set_state(JobState::Queued);
            while s.phase(id) != Some(Phase::Running) {
                if admitted.changed().await.is_err() {
                    break;
                }
            }
        }
        s.metrics
            .queue_wait
            .get_or_create(&ClassLabels::new(self.record.priority().class()))
            .observe(started.elapsed().as_secs_f64());
        self.record.set_state(JobState::Fetching);
    }

    /// Hands the large-image lane to the next image, if this job holds it: its bytes are in
    /// and what is left (containerd's unpacking) needs neither the link nor the P2P caches.
    /// The job keeps its prewarm slot until it ends.
    pub fn leave_lane(&self) -> bool {
        let left = {
            let mut st = self.scheduler.state.lock();
            st.entries
                .get_mut(&self.record.id)
                .is_some_and(|e| std::mem::take(&mut e.holds_lane))
        };
        if left {
            self.scheduler.dispatch();
        }
        left
    }

    /// Whether the job runs in the large-image lane.
    pub fn in_lane(&self) -> bool {
        let st = self.scheduler.state.lock();
        st.entries
            .get(&self.record.id)
            .is_some_and(|e| e.holds_lane)
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.scheduler.state.lock().entries.remove(&self.record.id);
        self.scheduler.dispatch();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule(text: &str) -> ScheduleConfig {
        crate::config::Config::parse(text).unwrap().schedule
    }

    #[test]
    fn the_config_becomes_admission_rules() {
        let a = Admission::from(&schedule("[schedule]\nlarge_image_size = \"512MiB\"\n"));
        assert_eq!(a.large_image_bytes, 512 << 20);
        // One order on every node by default.
        assert_eq!(a.lane_order, LaneOrder::Shared);
        let per_node = |name: &str| {
            Admission::from(&schedule(&format!(
                "[schedule]\nlane_order = \"per-node\"\nnode_name = \"{name}\"\n"
            )))
            .lane_order
        };
        assert_eq!(per_node("worker-7"), LaneOrder::per_node("worker-7"));
        assert_ne!(per_node("worker-7"), per_node("worker-8"));
    }
    use crate::vocab::Origin;
    use std::time::Duration;

    struct World {
        board: Arc<JobBoard>,
        sched: Arc<Scheduler>,
        gate: watch::Sender<bool>,
        log: Arc<Mutex<Vec<String>>>,
        next: u64,
    }

    impl World {
        fn new(max_prewarm_jobs: usize, large_image_bytes: u64, gate_open: bool) -> Self {
            Self::with_order(
                max_prewarm_jobs,
                large_image_bytes,
                gate_open,
                LaneOrder::Shared,
            )
        }

        fn with_order(
            max_prewarm_jobs: usize,
            large_image_bytes: u64,
            gate_open: bool,
            lane_order: LaneOrder,
        ) -> Self {
            let board = JobBoard::new();
            let (gate, rx) = watch::channel(gate_open);
            let sched = Scheduler::new(
                Setup {
                    admission: Admission {
                        max_prewarm_jobs,
                        large_image_bytes,
                        lane_order,
                    },
                    limits: Limits::default(),
                    max_blob_streams: 0,
                    gate: rx,
                },
                &board,
                Arc::new(Metrics::new()),
            );
            World {
                board,
                sched,
                gate,
                log: Default::default(),
                next: 1,
            }
        }

        /// A job that resolves after `resolve`, then fetches for `fetch`; logs its start.
        fn job(
            &mut self,
            image: &str,
            origin: Origin,
            p: Priority,
            size: u64,
            resolve: Duration,
            fetch: Duration,
        ) -> (Arc<JobRecord>, tokio::task::JoinHandle<()>) {
            let id = self.next;
            self.next += 1;
            let record = self.board.create(id, image, origin, p, JobState::Resolving);
            let (sched, log, r) = (self.sched.clone(), self.log.clone(), record.clone());
            let image = image.to_string();
            let task = tokio::spawn(async move {
                let ticket = sched.enter(r.clone());
                ticket.wait_gate().await;
                tokio::time::sleep(resolve).await;
                ticket.admit(Some(size)).await;
                log.lock().push(image);
                tokio::time::sleep(fetch).await;
                r.end(JobState::Done, "");
            });
            (record, task)
        }

        fn started(&self) -> Vec<String> {
            self.log.lock().clone()
        }
    }

    const S: Duration = Duration::from_secs(1);
    const MS: Duration = Duration::from_millis(1);

    #[tokio::test(start_paused = true)]
    async fn prewarm_cap_admits_by_priority_then_order_then_arrival() {
        let mut w = World::new(1, 0, true);
        let (_, first) = w.job("first", Origin::Api, Priority::prewarm(0), 1, MS, S);
        tokio::time::sleep(10 * MS).await;
        let mut tasks = vec![first];
        for (img, origin, level) in [
            ("api-low", Origin::Api, 0),
            ("cfg-1", Origin::Config(1), 0),
            ("cfg-0", Origin::Config(0), 0),
            ("api-high", Origin::Api, 7),
        ] {
            tasks.push(w.job(img, origin, Priority::prewarm(level), 1, MS, S).1);
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(
            w.started(),
            vec!["first", "api-high", "cfg-0", "cfg-1", "api-low"]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn urgent_bypasses_the_cap_and_a_promoted_job_starts_at_once() {
        let mut w = World::new(1, 0, true);
        let (_, a) = w.job("busy", Origin::Api, Priority::prewarm(0), 1, MS, 10 * S);
        tokio::time::sleep(10 * MS).await;
        let (queued, b) = w.job("queued", Origin::Api, Priority::prewarm(0), 1, MS, S);
        let (_, c) = w.job("pod", Origin::Cri, Priority::urgent(0), 1, MS, S);
        tokio::time::sleep(100 * MS).await;
        assert_eq!(w.started(), vec!["busy", "pod"]);
        assert_eq!(queued.state(), JobState::Queued);
        // A pod now waits for the queued prewarm image: promoted, admitted at once.
        queued.set_priority(Priority::urgent(0));
        tokio::time::sleep(MS).await;
        assert_eq!(w.started(), vec!["busy", "pod", "queued"]);
        for t in [a, b, c] {
            t.await.unwrap();
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_job_frees_its_slot() {
        let mut w = World::new(1, 0, true);
        let (_, a) = w.job("a", Origin::Api, Priority::prewarm(0), 1, MS, 100 * S);
        tokio::time::sleep(10 * MS).await;
        let (_, b) = w.job("b", Origin::Api, Priority::prewarm(0), 1, MS, S);
        tokio::time::sleep(S).await;
        assert_eq!(w.started(), vec!["a"]);
        a.abort();
        tokio::time::sleep(10 * MS).await;
        assert_eq!(w.started(), vec!["a", "b"]);
        b.await.unwrap();
        assert!(w.sched.state.lock().entries.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn lane_runs_large_images_one_at_a_time_in_deterministic_order() {
        // Resolution finishes in a different order from the lane order: the lane still follows
        // (priority, configured order, reference), and small images pass beside it.
        let mut w = World::new(0, 100, true);
        let mut tasks = Vec::new();
        for (img, origin, resolve) in [
            ("zeta", Origin::Api, 5 * MS),
            ("alpha", Origin::Api, 40 * MS),
            ("cfg-b", Origin::Config(1), 10 * MS),
            ("cfg-a", Origin::Config(0), 30 * MS),
        ] {
            tasks.push(w.job(img, origin, Priority::prewarm(0), 1000, resolve, S).1);
        }
        tasks.push(
            w.job("small", Origin::Api, Priority::prewarm(0), 10, 20 * MS, S)
                .1,
        );
        tokio::time::sleep(500 * MS).await;
        assert_eq!(
            w.started(),
            vec!["small", "cfg-a"],
            "one large image at a time"
        );
        assert_eq!(w.sched.streams.usage(), (0, 0));
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(
            w.started(),
            vec!["small", "cfg-a", "cfg-b", "alpha", "zeta"]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_job_whose_bytes_are_in_hands_the_lane_on_and_keeps_its_prewarm_slot() {
        let w = World::new(2, 100, true);
        let record = |id, image| {
            w.board.create(
                id,
                image,
                Origin::Api,
                Priority::prewarm(0),
                JobState::Resolving,
            )
        };
        let (a, b, c) = (record(1, "a"), record(2, "b"), record(3, "c"));
        let ta = w.sched.enter(a);
        ta.admit(Some(1000)).await;
        assert!(ta.in_lane());
        let tb = w.sched.enter(b);
        let tc = w.sched.enter(c);
        let admit_b = tokio::spawn(async move {
            tb.admit(Some(1000)).await;
            tb
        });
        let admit_c = tokio::spawn(async move {
            tc.admit(Some(1000)).await;
            tc
        });
        tokio::time::sleep(S).await;
        assert!(!admit_b.is_finished(), "the lane holds b while a fetches");
        assert!(ta.leave_lane());
        assert!(!ta.leave_lane(), "only once");
        let tb = admit_b.await.unwrap();
        assert!(
            tb.in_lane(),
            "b takes the lane while a still runs (unpacking)"
        );
        tokio::time::sleep(S).await;
        assert!(!admit_c.is_finished(), "one image in the lane at a time");
        // a still holds one of the two prewarm slots, b the other: c waits for a to end.
        assert!(tb.leave_lane());
        tokio::time::sleep(S).await;
        assert!(
            !admit_c.is_finished(),
            "the prewarm cap still counts a and b"
        );
        drop(ta);
        assert!(admit_c.await.unwrap().in_lane());
    }

    /// The lane's order on a node with the per-node order: its large images, one at a time.
    async fn per_node_lane(node: &str, images: &[&str]) -> Vec<String> {
        let mut w = World::with_order(0, 100, true, LaneOrder::per_node(node));
        let mut tasks = Vec::new();
        for (i, img) in images.iter().enumerate() {
            // Resolution times differ from node to node; the order must not.
            let resolve = MS * (1 + (i as u32 * 7 + node.len() as u32) % 13);
            let origin = Origin::Config(i as u32);
            tasks.push(w.job(img, origin, Priority::prewarm(0), 1000, resolve, S).1);
        }
        tokio::time::sleep(500 * MS).await;
        assert_eq!(w.started().len(), 1, "one large image at a time");
        for t in tasks {
            t.await.unwrap();
        }
        w.started()
    }

    #[tokio::test(start_paused = true)]
    async fn per_node_lane_order_is_stable_per_node_and_differs_between_nodes() {
        let images = ["img0", "img1", "img2", "img3", "img4", "img5"];
        let a = per_node_lane("node-a", &images).await;
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, images, "every image once");
        // The same node name gives the same sequence, whatever the arrival order.
        let mut reversed = images;
        reversed.reverse();
        assert_eq!(per_node_lane("node-a", &reversed).await, a);
        // Nodes spread over the images: 16 nodes do not all start at one image.
        let mut firsts = std::collections::BTreeSet::new();
        for n in 0..16 {
            firsts.insert(per_node_lane(&format!("node-{n}"), &images).await[0].clone());
        }
        assert!(firsts.len() >= 3, "first images of 16 nodes: {firsts:?}");
        // A higher priority still goes first on every node.
        let mut w = World::with_order(0, 100, true, LaneOrder::per_node("node-a"));
        let mut tasks = Vec::new();
        for img in images {
            let p = Priority::prewarm(if img == "img3" { 5 } else { 0 });
            tasks.push(w.job(img, Origin::Api, p, 1000, MS, S).1);
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(w.started()[0], "img3");
    }

    #[tokio::test(start_paused = true)]
    async fn urgent_large_image_bypasses_the_lane() {
        let mut w = World::new(0, 100, true);
        let (_, a) = w.job(
            "big-prewarm",
            Origin::Api,
            Priority::prewarm(0),
            1000,
            MS,
            10 * S,
        );
        tokio::time::sleep(10 * MS).await;
        let (_, b) = w.job(
            "big-prewarm-2",
            Origin::Api,
            Priority::prewarm(0),
            1000,
            MS,
            S,
        );
        let (_, c) = w.job("big-pod", Origin::Cri, Priority::urgent(0), 1000, MS, S);
        tokio::time::sleep(100 * MS).await;
        assert_eq!(w.started(), vec!["big-prewarm", "big-pod"]);
        for t in [a, b, c] {
            t.await.unwrap();
        }
    }

    #[tokio::test(start_paused = true)]
    async fn closed_gate_holds_prewarm_but_not_urgent() {
        let mut w = World::new(0, 0, false);
        let (pre, a) = w.job("pre", Origin::Api, Priority::prewarm(0), 1, MS, S);
        let (_, b) = w.job("pod", Origin::Cri, Priority::urgent(0), 1, MS, S);
        tokio::time::sleep(5 * S).await;
        assert_eq!(w.started(), vec!["pod"]);
        assert_eq!(pre.state(), JobState::WaitingForP2p);
        w.gate.send(true).unwrap();
        tokio::time::sleep(10 * MS).await;
        assert_eq!(w.started(), vec!["pod", "pre"]);
        for t in [a, b] {
            t.await.unwrap();
        }
    }
}
