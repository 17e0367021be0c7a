//! The mirror's connection table: at most `mirror.max_connections` at once, and a full table
//! never locks containerd out.
//!
//! A connection is *idle* while it waits for a request head (its first, or the next one after a
//! response) and *busy* from a head until its response body is done. When the table is full, a
//! newcomer takes the place of the connection idle the longest, which is closed at once; only if
//! every connection is mid-request is the newcomer refused (containerd then tries its next host).
//! Sockets that connect and never send a head (slowloris) thus cannot hold the mirror: each new
//! connection from containerd pushes one of them out, and `header_read_timeout` ends the rest.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use tokio_util::sync::CancellationToken;

pub struct Table {
    cap: usize,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    next: u64,
    conns: HashMap<u64, Entry>,
}

struct Entry {
    /// Requests whose response is not done yet.
    busy: u32,
    /// Since when it has waited for a request head (accept, or its last response's end).
    idle_since: Instant,
    close: CancellationToken,
}

/// What [`Table::admit`] did.
pub enum Admit {
    /// Room was free.
    Admitted(Slot),
    /// The connection idle the longest was closed to make room.
    Evicted(Slot),
    /// Every connection is mid-request.
    Full,
}

/// A connection's place in the table, given back when dropped.
pub struct Slot {
    table: Arc<Table>,
    id: u64,
    /// Cancelled when the table closes this connection to make room.
    pub close: CancellationToken,
}

/// A request in progress on a connection; the connection is idle again once every one is dropped
/// (with its response body).
pub struct Busy {
    table: Arc<Table>,
    id: u64,
}

impl Table {
    pub fn new(cap: usize) -> Arc<Table> {
        Arc::new(Table {
            cap: cap.max(1),
            inner: Mutex::default(),
        })
    }

    /// Connections held now.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.inner.lock().conns.len()
    }

    /// Makes room for a new connection (see the module comment).
    pub fn admit(self: &Arc<Self>) -> Admit {
        let mut inner = self.inner.lock();
        let mut evicted = false;
        if inner.conns.len() >= self.cap {
            // O(cap) per newcomer at the cap: 1,024 entries, a few µs, only when full.
            let oldest = inner
                .conns
                .iter()
                .filter(|(_, e)| e.busy == 0)
                .min_by_key(|(_, e)| e.idle_since)
                .map(|(id, _)| *id);
            match oldest.and_then(|id| inner.conns.remove(&id)) {
                Some(e) => {
                    e.close.cancel();
                    evicted = true;
                }
                None => return Admit::Full,
            }
        }
        let id = inner.next;
        inner.next += 1;
        let close = CancellationToken::new();
        inner.conns.insert(
            id,
            Entry {
                busy: 0,
                idle_since: Instant::now(),
                close: close.clone(),
            },
        );
        let slot = Slot {
            table: self.clone(),
            id,
            close,
        };
        if evicted {
            Admit::Evicted(slot)
        } else {
            Admit::Admitted(slot)
        }
    }
}

impl Slot {
    /// Marks a request head received: this connection is not closed to make room until
    /// the returned guard (kept with the response body) drops.
    pub fn busy(&self) -> Busy {
        if let Some(e) = self.table.inner.lock().conns.get_mut(&self.id) {
            e.busy += 1;
        }
        Busy {
            table: self.table.clone(),
            id: self.id,
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.table.inner.lock().conns.remove(&self.id);
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        if let Some(e) = self.table.inner.lock().conns.get_mut(&self.id) {
            e.busy = e.busy.saturating_sub(1);
            if e.busy == 0 {
                e.idle_since = Instant::now();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(a: Admit) -> Slot {
        match a {
            Admit::Admitted(s) | Admit::Evicted(s) => s,
            Admit::Full => panic!("full"),
        }
    }

    #[test]
    fn a_full_table_closes_the_longest_idle_and_refuses_only_when_all_are_busy() {
        let t = Table::new(3);
        let a = slot(t.admit());
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = slot(t.admit());
        let c = slot(t.admit());
        // a is mid-request: b, idle since before c, goes first.
        let busy_a = a.busy();
        let d = match t.admit() {
            Admit::Evicted(s) => s,
            _ => panic!("expected an eviction"),
        };
        assert!(b.close.is_cancelled() && !a.close.is_cancelled() && !c.close.is_cancelled());
        assert_eq!(t.len(), 3);
        // Every one busy: the newcomer is refused.
        let (_bc, _bd) = (c.busy(), d.busy());
        assert!(matches!(t.admit(), Admit::Full));
        // a's response ends: a is idle again (the newest idle, but the only one).
        drop(busy_a);
        assert!(matches!(t.admit(), Admit::Evicted(_)));
        assert!(a.close.is_cancelled());
        // Slots dropped give room back, an evicted one's drop is harmless.
        drop((a, b, c, d));
        assert_eq!(t.len(), 0);
        assert!(matches!(t.admit(), Admit::Admitted(_)));
    }
}
