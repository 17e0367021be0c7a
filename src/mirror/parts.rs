//! Ranged parallel requests for one blob, used only where one connection is observed to be
//! capped (a registry or CDN limiting each connection's rate): the rest of the blob is cut into
//! parts fetched at once over several connections, buffered, and passed on in order.
//!
//! Whether a host caps connections is measured, not assumed: a stream that read at rate `r` for
//! [`PROBE`] without waiting on pullgate's own bandwidth budget opens one more connection; if the
//! two together read at least [`GAIN`] × `r`, the host is marked capped (for [`REMEMBER`]) and its
//! streams use up to `mirror.parallel_ranges` connections, else it is marked uncapped. A host
//! that ignores `Range` (answers 200) is never split. Buffered bytes come from one node-wide
//! budget (`mirror.buffer_budget`), reserved per split blob up front, so they are bounded and
//! no stream ever waits for another's buffer.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tracing::{debug, info};

use super::demand::BlobSource;
use super::Mirror;
use crate::registry::RegistryError;
use crate::vocab::Class;

/// How long a stream is watched alone, then with one more connection, before deciding.
pub const PROBE: Duration = Duration::from_secs(1);
/// Two connections must read this much more than one for the host to count as capped.
pub const GAIN: f64 = 1.5;
/// How long a host's verdict holds before it is measured again.
pub const REMEMBER: Duration = Duration::from_secs(600);
/// A stream that waited this share of its time on pullgate's own budget is not capped upstream.
const BUDGET_BOUND: f64 = 0.2;

/// Per host (`host[:port]`): whether it caps each connection, and since when that is known.
#[derive(Default)]
pub struct HostPace {
    verdicts: Mutex<HashMap<String, (bool, Instant)>>,
}

impl HostPace {
    /// `Some(capped)` while the last verdict is fresh.
    pub fn capped(&self, host: &str) -> Option<bool> {
        let v = self.verdicts.lock();
        v.get(host)
            .filter(|(_, at)| at.elapsed() < REMEMBER)
            .map(|(c, _)| *c)
    }

    pub fn note(&self, host: &str, capped: bool, single: f64, paired: f64) {
        let before = self
            .verdicts
            .lock()
            .insert(host.to_string(), (capped, Instant::now()));
        let changed = before.map(|(c, _)| c) != Some(capped);
        if capped && changed {
            info!(
                host,
                one_connection_mb_s = single / 1e6,
                two_connections_mb_s = paired / 1e6,
                "host caps each connection: its large blobs are fetched in ranged parts over several connections"
            );
        } else if changed {
            debug!(
                host,
                one_connection_mb_s = single / 1e6,
                two_connections_mb_s = paired / 1e6,
                "host does not cap connections: one connection per blob"
            );
        }
    }
}

/// The node-wide budget for bytes fetched ahead of what containerd has read.
pub struct Buffers {
    kib: Arc<Semaphore>,
}

impl Buffers {
    pub fn new(bytes: u64) -> Self {
        Buffers {
            kib: Arc::new(Semaphore::new((bytes / 1024) as usize)),
        }
    }

    /// Reserves `bytes` of it, or `None` when the budget is taken (the blob is then not split).
    pub fn reserve(&self, bytes: u64) -> Option<OwnedSemaphorePermit> {
        let kib = u32::try_from(bytes.div_ceil(1024)).ok()?;
        self.kib.clone().try_acquire_many_owned(kib).ok()
    }
}

/// One part being fetched by its own task; its chunks queue here until the stream reaches it.
pub struct Part {
    pub range: Range<u64>,
    /// Where the next chunk from `rx` begins.
    pub pos: u64,
    pub rx: mpsc::UnboundedReceiver<Result<Bytes, RegistryError>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Part {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Part {
    /// Starts fetching `range`; `read` counts every byte it receives (for the probe).
    pub fn spawn(
        mirror: &Arc<Mirror>,
        source: &BlobSource,
        class: Option<Class>,
        range: Range<u64>,
        read: Arc<AtomicU64>,
    ) -> Part {
        let (tx, rx) = mpsc::unbounded_channel();
        let worker = Worker {
            mirror: mirror.clone(),
            source: source.clone(),
            class,
            range: range.clone(),
            read,
        };
        Part {
            pos: range.start,
            range,
            rx,
            task: tokio::spawn(worker.run(tx)),
        }
    }
}

struct Worker {
    mirror: Arc<Mirror>,
    source: BlobSource,
    class: Option<Class>,
    range: Range<u64>,
    read: Arc<AtomicU64>,
}

impl Worker {
    fn class(&self) -> Class {
        self.class
            .unwrap_or_else(|| self.mirror.demand.class(&self.source.key, Class::Urgent))
    }

    async fn run(mut self, tx: mpsc::UnboundedSender<Result<Bytes, RegistryError>>) {
        let mut retries = self.mirror.cfg.retries;
        let pacing = self.mirror.pacing.clone();
        'open: while !self.range.is_empty() {
            let body = match self
                .mirror
                .upstream
                .fetch(&self.source, self.range.clone())
                .await
            {
                Ok(b) => b,
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            let from = body.source.clone();
            let mut body = Some(body);
            while let Some(open) = body.as_mut() {
                match open.stream.next().await {
                    Some(Ok(chunk)) => {
                        self.read.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                        let now = self.class();
                        let paused = now == Class::Prewarm && pacing.prewarm_paused();
                        if paused {
                            // As a whole stream does: close the connection, reopen after. The
                            // blob's head keeps containerd's stream alive meanwhile.
                            body = None;
                            self.mirror.metrics.parked_streams.inc();
                            pacing
                                .yield_to_urgent(&|| self.class() == Class::Urgent)
                                .await;
                        }
                        let n = chunk.len() as u64;
                        let (mirror, key, fixed) = (&self.mirror, &self.source.key, self.class);
                        let class =
                            || fixed.unwrap_or_else(|| mirror.demand.class(key, Class::Urgent));
                        pacing.received(&class, n).await;
                        super::fetch::count(&mirror.metrics, &from, now, n);
                        self.range.start += n;
                        if tx.send(Ok(chunk)).is_err() {
                            return;
                        }
                        if paused {
                            continue 'open;
                        }
                    }
                    None if self.range.is_empty() => return,
                    None | Some(Err(_)) if retries > 0 => {
                        retries -= 1;
                        self.mirror.metrics.blob_retries.inc();
                        continue 'open;
                    }
                    None => {
                        let _ = tx.send(Err(RegistryError::Transport(format!(
                            "part ended at byte {} of {}",
                            self.range.start, self.range.end
                        ))));
                        return;
                    }
                    Some(Err(e)) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                }
            }
        }
    }
}

/// The probe of one stream: its rate alone, then with one more connection.
pub struct Probe {
    pub phase: Phase,
    since: Instant,
    bytes_at: u64,
    waited: Duration,
    single: f64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Measuring one connection.
    Alone,
    /// Measuring two.
    Paired,
    /// Decided (or not applicable).
    Done,
}

/// What the probe concluded at a step.
pub enum Verdict {
    /// Keep going.
    Wait,
    /// Open one more connection and measure again.
    Pair,
    /// Decided: capped or not, with the two rates.
    Decided {
        capped: bool,
        single: f64,
        paired: f64,
    },
    /// The stream was held back by pullgate's own budget: the probe tells nothing.
    Inconclusive,
}

impl Probe {
    pub fn new(bytes: u64) -> Probe {
        Probe {
            phase: Phase::Alone,
            since: Instant::now(),
            bytes_at: bytes,
            waited: Duration::ZERO,
            single: 0.0,
        }
    }

    pub fn done() -> Probe {
        Probe {
            phase: Phase::Done,
            ..Probe::new(0)
        }
    }

    /// Time the stream spent waiting on pullgate's bandwidth budget.
    pub fn waited(&mut self, d: Duration) {
        self.waited += d;
    }

    /// One step, given the bytes the stream has read so far over all its connections.
    pub fn step(&mut self, bytes: u64) -> Verdict {
        let elapsed = self.since.elapsed();
        if self.phase == Phase::Done || elapsed < PROBE {
            return Verdict::Wait;
        }
        let rate = (bytes - self.bytes_at) as f64 / elapsed.as_secs_f64();
        let budget_bound = self.waited.as_secs_f64() > BUDGET_BOUND * elapsed.as_secs_f64();
        (self.since, self.bytes_at, self.waited) = (Instant::now(), bytes, Duration::ZERO);
        if budget_bound {
            self.phase = Phase::Done;
            return Verdict::Inconclusive;
        }
        match self.phase {
            Phase::Alone => {
                self.single = rate;
                self.phase = Phase::Paired;
                Verdict::Pair
            }
            _ => {
                self.phase = Phase::Done;
                Verdict::Decided {
                    capped: rate >= GAIN * self.single,
                    single: self.single,
                    paired: rate,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_probe_calls_a_host_capped_only_when_two_connections_read_faster() {
        // 4 MB/s alone, then 8 MB/s with a second connection: capped.
        let mut p = Probe::new(0);
        tokio::time::advance(Duration::from_millis(500)).await;
        assert!(matches!(p.step(2_000_000), Verdict::Wait));
        tokio::time::advance(Duration::from_millis(500)).await;
        assert!(matches!(p.step(4_000_000), Verdict::Pair));
        tokio::time::advance(PROBE).await;
        match p.step(12_000_000) {
            Verdict::Decided {
                capped,
                single,
                paired,
            } => {
                assert!(capped);
                assert!((single - 4e6).abs() < 1e5 && (paired - 8e6).abs() < 1e5);
            }
            _ => panic!("no verdict"),
        }
        assert_eq!(p.phase, Phase::Done);

        // A shared link: the second connection only splits the same rate.
        let mut p = Probe::new(0);
        tokio::time::advance(PROBE).await;
        assert!(matches!(p.step(4_000_000), Verdict::Pair));
        tokio::time::advance(PROBE).await;
        assert!(matches!(
            p.step(8_500_000),
            Verdict::Decided { capped: false, .. }
        ));

        // Held back by pullgate's own budget: nothing is concluded.
        let mut p = Probe::new(0);
        p.waited(Duration::from_millis(400));
        tokio::time::advance(PROBE).await;
        assert!(matches!(p.step(4_000_000), Verdict::Inconclusive));
    }

    #[test]
    fn the_buffer_budget_is_reserved_whole_or_not_at_all() {
        let b = Buffers::new(8 << 20);
        let first = b.reserve(6 << 20).expect("fits");
        assert!(b.reserve(4 << 20).is_none(), "over the budget");
        drop(first);
        assert!(b.reserve(8 << 20).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn a_host_verdict_expires() {
        let pace = HostPace::default();
        assert_eq!(pace.capped("r:5000"), None);
        pace.note("r:5000", true, 4e6, 8e6);
        assert_eq!(pace.capped("r:5000"), Some(true));
        tokio::time::advance(REMEMBER).await;
        assert_eq!(pace.capped("r:5000"), None);
    }
}
