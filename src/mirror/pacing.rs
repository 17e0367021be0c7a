//! What the byte path asks of the node's scheduler, as a narrow interface: a stream slot, the
//! urgent mark, whether prewarm is paused, and paying for bytes received. The mirror holds a
//! `dyn Pacing`, so the pump can be driven by a stand-in in its unit tests; the daemon gives it
//! the [`Scheduler`].

use futures_util::future::BoxFuture;
use futures_util::FutureExt;
use tokio::sync::watch;

use crate::schedule::Scheduler;
use crate::vocab::{Class, Priority};

/// A guard held while it counts (a stream slot, an urgent stream's mark); released on drop.
pub type Held = Box<dyn std::any::Any + Send + Sync>;

/// The class a stream's bytes are paid at, re-read while it waits: a promotion applies at once.
pub type ClassNow<'a> = dyn Fn() -> Class + Send + Sync + 'a;

pub trait Pacing: Send + Sync {
    /// Waits for one of the node's blob stream slots, in `priority` order (re-read on change).
    fn stream_slot(&self, priority: watch::Receiver<Priority>) -> BoxFuture<'static, Held>;
    /// Marks an urgent stream open (prewarm yields to it) while the guard is held.
    fn urgent_stream(&self) -> Held;
    /// Prewarm is stopped outright: a prewarm stream closes its upstream connection.
    fn prewarm_paused(&self) -> bool;
    /// Pays for `n` bytes just received, at the class `class()` gives.
    fn received<'a>(&'a self, class: &'a ClassNow<'a>, n: u64) -> BoxFuture<'a, ()>;
    /// Counts `n` bytes nobody waits for (a paused stream's keep-alive).
    fn received_unpaced(&self, class: Class, n: u64);
    /// Returns once prewarm may run, or at once when `is_urgent()` (re-read while waiting).
    fn yield_to_urgent<'a>(
        &'a self,
        is_urgent: &'a (dyn Fn() -> bool + Send + Sync),
    ) -> BoxFuture<'a, ()>;
}

impl Pacing for Scheduler {
    fn stream_slot(&self, priority: watch::Receiver<Priority>) -> BoxFuture<'static, Held> {
        let streams = self.streams.clone();
        async move { Box::new(streams.acquire(priority).await) as Held }.boxed()
    }

    fn urgent_stream(&self) -> Held {
        Box::new(self.bandwidth.urgent_stream())
    }

    fn prewarm_paused(&self) -> bool {
        self.bandwidth.prewarm_paused()
    }

    fn received<'a>(&'a self, class: &'a ClassNow<'a>, n: u64) -> BoxFuture<'a, ()> {
        self.bandwidth.received_bytes(class, n).boxed()
    }

    fn received_unpaced(&self, class: Class, n: u64) {
        self.bandwidth.received_unpaced(class, n)
    }

    fn yield_to_urgent<'a>(
        &'a self,
        is_urgent: &'a (dyn Fn() -> bool + Send + Sync),
    ) -> BoxFuture<'a, ()> {
        self.bandwidth.yield_to_urgent(is_urgent).boxed()
    }
}
