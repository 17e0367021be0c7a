//! A counting semaphore served by priority (then arrival), whose waiters may change priority
//! while they wait: tokio's semaphore is FIFO only.
//!
//! The cap holds prewarm work only: urgent work takes a slot at once, even above the cap. A
//! prewarm stream paused for an urgent pull keeps its slot, so an urgent pull that waited for
//! that slot would wait forever.

use parking_lot::Mutex;
use std::cmp::Reverse;
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::watch;

use super::Priority;

type Key = (Reverse<Priority>, u64);

#[derive(Debug)]
struct State {
    /// 0: unlimited.
    capacity: usize,
    in_use: usize,
    waiting: BTreeSet<Key>,
}

/// Limited slots, such as the mirror's prewarm blob streams.
#[derive(Debug)]
pub struct Slots {
    state: Mutex<State>,
    seq: AtomicU64,
    /// Bumped whenever a slot frees up or the queue changes.
    changed: watch::Sender<u64>,
}

/// A held slot, given back on drop.
#[derive(Debug)]
pub struct SlotPermit {
    slots: Option<Arc<Slots>>,
}

impl Drop for SlotPermit {
    fn drop(&mut self) {
        if let Some(s) = self.slots.take() {
            s.state.lock().in_use -= 1;
            s.changed.send_modify(|g| *g += 1);
        }
    }
}

/// Removes a waiter that went away before it got its slot.
struct Waiting<'a> {
    slots: &'a Slots,
    key: Option<Key>,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if let Some(k) = self.key.take() {
            self.slots.state.lock().waiting.remove(&k);
            self.slots.changed.send_modify(|g| *g += 1);
        }
    }
}

impl Slots {
    pub fn new(capacity: usize) -> Arc<Self> {
        Arc::new(Slots {
            state: Mutex::new(State {
                capacity,
                in_use: 0,
                waiting: BTreeSet::new(),
            }),
            seq: AtomicU64::new(0),
            changed: watch::channel(0).0,
        })
    }

    pub fn set_capacity(&self, capacity: usize) {
        self.state.lock().capacity = capacity;
        self.changed.send_modify(|g| *g += 1);
    }

    /// (in use, waiting)
    pub fn usage(&self) -> (usize, usize) {
        let s = self.state.lock();
        (s.in_use, s.waiting.len())
    }

    /// Waits for a slot. `priority` is re-read whenever it changes, so a promoted waiter moves
    /// ahead at once.
    pub async fn acquire(self: &Arc<Self>, mut priority: watch::Receiver<Priority>) -> SlotPermit {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let mut changed = self.changed.subscribe();
        let mut guard = Waiting {
            slots: self,
            key: Some((Reverse(*priority.borrow_and_update()), seq)),
        };
        {
            let mut s = self.state.lock();
            s.waiting.insert(guard.key.unwrap());
        }
        let mut prio_open = true;
        loop {
            {
                let mut s = self.state.lock();
                let key = guard.key.unwrap();
                let free = s.capacity == 0 || s.in_use < s.capacity;
                let urgent = key.0 .0.is_urgent();
                if urgent || (free && s.waiting.first() == Some(&key)) {
                    s.waiting.remove(&key);
                    s.in_use += 1;
                    guard.key = None;
                    drop(s);
                    // The next waiter may fit too.
                    self.changed.send_modify(|g| *g += 1);
                    return SlotPermit {
                        slots: Some(self.clone()),
                    };
                }
            }
            tokio::select! {
                _ = changed.changed() => {}
                r = priority.changed(), if prio_open => {
                    if r.is_ok() {
                        let mut s = self.state.lock();
                        let old = guard.key.unwrap();
                        s.waiting.remove(&old);
                        let new = (Reverse(*priority.borrow_and_update()), old.1);
                        s.waiting.insert(new);
                        guard.key = Some(new);
                    } else {
                        // The priority's owner is gone; its last value stands.
                        prio_open = false;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn prio(p: Priority) -> (watch::Sender<Priority>, watch::Receiver<Priority>) {
        watch::channel(p)
    }

    async fn settle() {
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn served_by_priority_then_arrival_and_promotion_jumps_the_queue() {
        let slots = Slots::new(1);
        let first = slots.acquire(prio(Priority::prewarm(0)).1).await;
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut senders = Vec::new();
        let mut tasks = Vec::new();
        for (name, p) in [
            ("low-a", Priority::prewarm(0)),
            ("low-b", Priority::prewarm(0)),
            ("high", Priority::prewarm(5)),
            ("later-promoted", Priority::prewarm(-1)),
        ] {
            let (tx, rx) = prio(p);
            senders.push(tx);
            let (slots, order) = (slots.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                let _p = slots.acquire(rx).await;
                order.lock().push(name);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }));
            settle().await;
        }
        assert_eq!(slots.usage(), (1, 4));
        senders[3].send(Priority::prewarm(9)).unwrap();
        settle().await;
        drop(first);
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(
            *order.lock(),
            vec!["later-promoted", "high", "low-a", "low-b"]
        );
        assert_eq!(slots.usage(), (0, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn urgent_work_is_never_held_by_the_cap() {
        let slots = Slots::new(1);
        let _prewarm = slots.acquire(prio(Priority::prewarm(0)).1).await;
        let _urgent = slots.acquire(prio(Priority::urgent(0)).1).await;
        assert_eq!(slots.usage(), (2, 0));
        // A waiting prewarm promoted to urgent goes at once.
        let (tx, rx) = prio(Priority::prewarm(0));
        let waiter = tokio::spawn({
            let slots = slots.clone();
            async move { slots.acquire(rx).await }
        });
        settle().await;
        assert!(!waiter.is_finished());
        tx.send(Priority::urgent(0)).unwrap();
        let _p = waiter.await.unwrap();
        assert_eq!(slots.usage(), (3, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_waiter_leaves_the_queue() {
        let slots = Slots::new(1);
        let held = slots.acquire(prio(Priority::prewarm(0)).1).await;
        let (_tx, rx) = prio(Priority::prewarm(1));
        let waiter = tokio::spawn({
            let slots = slots.clone();
            async move {
                let _p = slots.acquire(rx).await;
            }
        });
        settle().await;
        assert_eq!(slots.usage(), (1, 1));
        waiter.abort();
        settle().await;
        assert_eq!(slots.usage(), (1, 0));
        drop(held);
        let _again = slots.acquire(prio(Priority::prewarm(0)).1).await;
    }

    #[tokio::test(start_paused = true)]
    async fn zero_capacity_is_unlimited() {
        let slots = Slots::new(0);
        let _a = slots.acquire(prio(Priority::prewarm(0)).1).await;
        let _b = slots.acquire(prio(Priority::prewarm(0)).1).await;
        assert_eq!(slots.usage(), (2, 0));
    }
}
