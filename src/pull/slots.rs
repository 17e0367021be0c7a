//! containerd 2.x's shared download slots, as pullgate counts them. Its transfer service limits
//! the downloads of every pull on the node with one semaphore (`max_concurrent_downloads`), and a
//! prewarm stream paused at the mirror keeps its slot. A prewarm pull is handed back from
//! containerd for a pod's pull only when the prewarm pulls forwarded could hold so many slots
//! that fewer than [`POD_SLOTS`] are left: the hand-back itself costs the pod time (containerd
//! removes the layer it was unpacking, and its metadata writes wait meanwhile: about 250 ms on
//! 2.1.9 on a fast link), where a limit with room lets the mirror pause prewarm instead.

use tokio::sync::watch;

/// The slots a pod's pull should find free: its manifest, its config and one layer at a time
/// (containerd 1.x gives every pull 3 of its own by default).
pub const POD_SLOTS: usize = 3;

/// Whether prewarm pulls that may hold `prewarm` of containerd's `limit` shared slots leave a
/// pod's pull fewer than [`POD_SLOTS`].
pub fn crowded(limit: usize, prewarm: usize) -> bool {
    prewarm + POD_SLOTS > limit
}

/// The slots the prewarm pulls forwarded to containerd may hold: one per blob (config and
/// layers) of each, as containerd takes one per descriptor it fetches.
#[derive(Debug)]
pub struct SlotBook {
    prewarm: watch::Sender<usize>,
}

impl Default for SlotBook {
    fn default() -> Self {
        SlotBook {
            prewarm: watch::channel(0).0,
        }
    }
}

impl SlotBook {
    /// Counts `slots` as held until the guard drops.
    pub fn hold(&self, slots: usize) -> Held<'_> {
        self.prewarm.send_modify(|n| *n += slots);
        Held { book: self, slots }
    }

    pub fn watch(&self) -> watch::Receiver<usize> {
        self.prewarm.subscribe()
    }
}

/// Slots counted for one forwarded prewarm pull.
pub struct Held<'a> {
    book: &'a SlotBook,
    slots: usize,
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.book.prewarm.send_modify(|n| *n -= self.slots);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn containerds_default_limit_is_crowded_by_any_prewarm() {
        assert!(crowded(3, 1));
        assert!(!crowded(3, 0));
    }

    #[test]
    fn a_limit_with_room_leaves_the_pod_its_slots() {
        // A 4-layer prewarm: config and 4 layers.
        assert!(!crowded(16, 5));
        assert!(!crowded(8, 5));
        assert!(crowded(7, 5));
        // Two such prewarm pulls at once.
        assert!(crowded(12, 10));
    }

    #[test]
    fn held_slots_are_counted_until_dropped() {
        let book = SlotBook::default();
        let rx = book.watch();
        let a = book.hold(5);
        {
            let _b = book.hold(2);
            assert_eq!(*rx.borrow(), 7);
        }
        assert_eq!(*rx.borrow(), 5);
        drop(a);
        assert_eq!(*rx.borrow(), 0);
    }
}
