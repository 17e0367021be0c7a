//! The pump through its two interfaces: a stand-in for the scheduler (pause, urgent marks,
//! payments) and one for upstream (a blob served in timed chunks, cut where a test says), with
//! the real demand table, verifier and metrics between them. Time is tokio's paused clock.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::FutureExt;
use http_body_util::BodyExt;
use parking_lot::Mutex;
use tokio::sync::watch;

use super::demand::{BlobSource, Key};
use super::pacing::{ClassNow, Held, Pacing};
use super::{Fetch, Mirror};
use crate::config::MirrorConfig;
use crate::jobs::{JobBoard, JobRecord};
use crate::metrics::Metrics;
use crate::registry::{
    BlobBody, Credentials, Descriptor, FetchedManifest, ImageRef, RegistryError, Resolved, Source,
};
use crate::schedule::bandwidth::RECHECK;
use crate::vocab::{Class, JobState, Origin, Priority};

const CHUNK: usize = 64 << 10;
/// Upstream's pace: one chunk per tick (6.4 MB/s).
const TICK: Duration = Duration::from_millis(10);
const KEEPALIVE: Duration = Duration::from_secs(10);

/// The scheduler's side, as the real one behaves: a paused prewarm payment waits until the pause
/// ends or the blob turns urgent.
#[derive(Default)]
struct Pace {
    paused: AtomicBool,
    /// Urgent marks held now, and the most ever held at once.
    urgent: Arc<AtomicUsize>,
    urgent_max: Arc<AtomicUsize>,
    paid: [AtomicU64; 2],
    unpaced: AtomicU64,
}

struct Mark(Arc<AtomicUsize>);

impl Drop for Mark {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn index(c: Class) -> usize {
    usize::from(c == Class::Prewarm)
}

impl Pacing for Pace {
    fn stream_slot(&self, _: watch::Receiver<Priority>) -> BoxFuture<'static, Held> {
        async { Box::new(()) as Held }.boxed()
    }

    fn urgent_stream(&self) -> Held {
        let now = self.urgent.fetch_add(1, Ordering::SeqCst) + 1;
        self.urgent_max.fetch_max(now, Ordering::SeqCst);
        Box::new(Mark(self.urgent.clone()))
    }

    fn prewarm_paused(&self) -> bool {
        self.paused.load(Ordering::SeqCst)
    }

    fn received<'a>(&'a self, class: &'a ClassNow<'a>, n: u64) -> BoxFuture<'a, ()> {
        async move {
            while class() == Class::Prewarm && self.prewarm_paused() {
                tokio::time::sleep(RECHECK).await;
            }
            self.paid[index(class())].fetch_add(n, Ordering::SeqCst);
        }
        .boxed()
    }

    fn received_unpaced(&self, _: Class, n: u64) {
        self.unpaced.fetch_add(n, Ordering::SeqCst);
    }

    fn yield_to_urgent<'a>(
        &'a self,
        is_urgent: &'a (dyn Fn() -> bool + Send + Sync),
    ) -> BoxFuture<'a, ()> {
        async move {
            while !is_urgent() && self.prewarm_paused() {
                tokio::time::sleep(RECHECK).await;
            }
        }
        .boxed()
    }
}

/// Upstream: the blob in chunks, one per tick; the first `cuts` bodies fail at byte `cut_at`.
struct Upstream {
    blob: Bytes,
    opened: Mutex<Vec<Range<u64>>>,
    /// Bodies open now.
    live: Arc<AtomicUsize>,
    sent: Arc<AtomicU64>,
    cut_at: u64,
    cuts: AtomicUsize,
}

struct Open(Arc<AtomicUsize>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Upstream {
    fn new(blob: Bytes) -> Upstream {
        Upstream {
            blob,
            opened: Mutex::default(),
            live: Arc::default(),
            sent: Arc::default(),
            cut_at: u64::MAX,
            cuts: AtomicUsize::new(0),
        }
    }

    fn cutting(mut self, at: u64, times: usize) -> Upstream {
        self.cut_at = at;
        self.cuts = AtomicUsize::new(times);
        self
    }
}

impl Fetch for Upstream {
    fn fetch<'a>(
        &'a self,
        _: &'a BlobSource,
        range: Range<u64>,
    ) -> BoxFuture<'a, Result<BlobBody, RegistryError>> {
        self.opened.lock().push(range.clone());
        self.live.fetch_add(1, Ordering::SeqCst);
        let open = Open(self.live.clone());
        let cut = self
            .cuts
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |c| c.checked_sub(1))
            .is_ok();
        let stop = if cut {
            self.cut_at.max(range.start)
        } else {
            range.end
        };
        let (blob, sent) = (self.blob.clone(), self.sent.clone());
        let stream = futures_util::stream::unfold((range.start, open), move |(at, open)| {
            let (blob, sent) = (blob.clone(), sent.clone());
            async move {
                if at >= range.end {
                    return None;
                }
                if at >= stop {
                    let e = RegistryError::Transport("connection reset".into());
                    return Some((Err(e), (range.end, open)));
                }
                tokio::time::sleep(TICK).await;
                let end = (at + CHUNK as u64).min(stop).min(range.end);
                sent.fetch_add(end - at, Ordering::SeqCst);
                Some((Ok(blob.slice(at as usize..end as usize)), (end, open)))
            }
        });
        let body = BlobBody {
            source: Source::Registry,
            host: "registry.test".into(),
            len: range.end - range.start,
            stream: Box::pin(stream),
        };
        async move { Ok(body) }.boxed()
    }

    fn ranges_work(&self, _: &str) -> Option<bool> {
        Some(true)
    }

    fn blob_size<'a>(
        &'a self,
        _: &'a ImageRef,
        _: &'a Credentials,
        _: &'a str,
    ) -> BoxFuture<'a, Result<u64, RegistryError>> {
        async { Err(RegistryError::NotFound("not in this test".into())) }.boxed()
    }
}

fn descriptor(data: &[u8]) -> Descriptor {
    let digest = crate::registry::digest::sha256_digest(data);
    Descriptor::new(
        oci_spec::image::MediaType::ImageLayerGzip,
        data.len() as u64,
        digest.parse::<oci_spec::image::Digest>().unwrap(),
    )
}

/// A mirror whose one registered job (at `priority`) needs a 4 MiB blob.
struct World {
    mirror: Arc<Mirror>,
    pace: Arc<Pace>,
    upstream: Arc<Upstream>,
    key: Key,
    job: Arc<JobRecord>,
    blob: Bytes,
    _board: Arc<JobBoard>,
    _registration: super::Registration,
}

fn blob() -> Bytes {
    (0..4u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect()
}

fn world(priority: Priority, upstream: Upstream) -> World {
    let blob = upstream.blob.clone();
    let image = ImageRef::parse("registry.test/app:1").unwrap();
    let layer = descriptor(&blob);
    let resolved = Resolved {
        index: None,
        manifest: FetchedManifest {
            descriptor: descriptor(b"{}"),
            bytes: Bytes::from_static(b"{}"),
        },
        config: descriptor(b"config"),
        layers: vec![layer.clone()],
        source: Source::Registry,
    };
    let board = JobBoard::new();
    let job = board.create(1, &image.whole(), Origin::Cri, priority, JobState::Fetching);
    let demand = super::Demand::new();
    let registration = demand.register(&job, &image, &Credentials::Anonymous, &resolved);
    let cfg = MirrorConfig {
        retries: 2,
        ..Default::default()
    };
    let pace = Arc::new(Pace::default());
    let upstream = Arc::new(upstream);
    let mirror = Arc::new(Mirror::new(
        cfg,
        demand,
        upstream.clone(),
        pace.clone(),
        Arc::new(Metrics::new()),
        KEEPALIVE,
    ));
    let key = Key {
        registry: image.registry.clone(),
        repository: image.repository.clone(),
        name: layer.digest().to_string(),
    };
    World {
        mirror,
        pace,
        upstream,
        key,
        job,
        blob,
        _board: board,
        _registration: registration,
    }
}

/// containerd's side: reads the body to its end; `got` counts the bytes as they come.
struct Reader {
    got: Arc<AtomicU64>,
    done: tokio::task::JoinHandle<(Vec<u8>, Option<std::io::Error>)>,
}

impl World {
    async fn get(&self) -> Reader {
        let resp =
            super::blob::serve(&self.mirror, self.key.clone(), None, None, false, None).await;
        assert_eq!(resp.status(), http::StatusCode::OK);
        let got = Arc::new(AtomicU64::new(0));
        let counter = got.clone();
        let mut body = resp.into_body();
        let done = tokio::spawn(async move {
            let mut out = Vec::new();
            while let Some(frame) = body.frame().await {
                match frame {
                    Ok(f) => {
                        let data = f.into_data().unwrap_or_default();
                        counter.fetch_add(data.len() as u64, Ordering::SeqCst);
                        out.extend_from_slice(&data);
                    }
                    Err(e) => return (out, Some(e)),
                }
            }
            (out, None)
        });
        Reader { got, done }
    }
}

async fn until(what: impl Fn() -> bool) {
    for _ in 0..100_000 {
        if what() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    panic!("condition not reached");
}

#[tokio::test(start_paused = true)]
async fn a_paused_prewarm_stream_closes_upstream_keeps_containerd_alive_and_resumes_with_a_range() {
    let w = world(Priority::prewarm(0), Upstream::new(blob()));
    let r = w.get().await;
    until(|| r.got.load(Ordering::SeqCst) >= 1 << 20).await;

    w.pace.paused.store(true, Ordering::SeqCst);
    until(|| w.upstream.live.load(Ordering::SeqCst) == 0).await;
    let (at_pause, fetched_at_pause) = (
        r.got.load(Ordering::SeqCst),
        w.upstream.sent.load(Ordering::SeqCst),
    );
    tokio::time::sleep(KEEPALIVE * 3 + KEEPALIVE / 2).await;
    let during = r.got.load(Ordering::SeqCst) - at_pause;
    // Three keep-alive intervals: a few bytes each, from the chunk held when the pause began.
    assert_eq!(
        during,
        3 * super::blob::KEEPALIVE_BYTES as u64,
        "bytes sent while paused"
    );
    assert_eq!(
        w.upstream.sent.load(Ordering::SeqCst),
        fetched_at_pause,
        "nothing read upstream while paused"
    );
    assert_eq!(
        w.upstream.live.load(Ordering::SeqCst),
        0,
        "upstream connection closed"
    );

    w.pace.paused.store(false, Ordering::SeqCst);
    let (bytes, err) = r.done.await.unwrap();
    assert!(err.is_none(), "{err:?}");
    assert!(
        bytes == w.blob,
        "containerd receives the blob, byte for byte"
    );
    let opened = w.upstream.opened.lock().clone();
    assert_eq!(opened.len(), 2, "{opened:?}");
    assert_eq!(opened[0], 0..w.blob.len() as u64);
    assert!(
        opened[1].start > at_pause && opened[1].end == w.blob.len() as u64,
        "{opened:?}"
    );
    // What keep-alives took from the held chunk is not fetched again.
    assert_eq!(w.upstream.sent.load(Ordering::SeqCst), w.blob.len() as u64);
    assert_eq!(w.pace.paid[index(Class::Urgent)].load(Ordering::SeqCst), 0);
    assert_eq!(w.pace.urgent_max.load(Ordering::SeqCst), 0);
    assert_eq!(w.mirror.metrics.parked_streams.get(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_promotion_mid_stream_resumes_a_paused_stream_and_marks_it_urgent() {
    let w = world(Priority::prewarm(0), Upstream::new(blob()));
    let r = w.get().await;
    until(|| r.got.load(Ordering::SeqCst) >= 1 << 20).await;
    w.pace.paused.store(true, Ordering::SeqCst);
    until(|| w.upstream.live.load(Ordering::SeqCst) == 0).await;
    tokio::time::sleep(KEEPALIVE / 2).await;
    assert_eq!(w.pace.urgent.load(Ordering::SeqCst), 0);

    // A pod now needs the image: the stream runs although prewarm stays paused.
    w.job.set_priority(Priority::urgent(0));
    let (bytes, err) = r.done.await.unwrap();
    assert!(err.is_none(), "{err:?}");
    assert!(bytes == w.blob);
    assert_eq!(
        w.pace.urgent_max.load(Ordering::SeqCst),
        1,
        "marked urgent once"
    );
    assert_eq!(
        w.pace.urgent.load(Ordering::SeqCst),
        0,
        "mark dropped with the stream"
    );
    let urgent_paid = w.pace.paid[index(Class::Urgent)].load(Ordering::SeqCst);
    let prewarm_paid = w.pace.paid[index(Class::Prewarm)].load(Ordering::SeqCst);
    assert!(
        urgent_paid >= 2 << 20,
        "the rest is paid at urgent: {urgent_paid}"
    );
    assert!((1 << 20..2 << 20).contains(&prewarm_paid), "{prewarm_paid}");
}

#[tokio::test(start_paused = true)]
async fn an_urgent_stream_is_not_paused_and_holds_the_urgent_mark() {
    let w = world(Priority::urgent(0), Upstream::new(blob()));
    w.pace.paused.store(true, Ordering::SeqCst);
    let r = w.get().await;
    until(|| r.got.load(Ordering::SeqCst) > 0).await;
    assert_eq!(w.pace.urgent.load(Ordering::SeqCst), 1);
    let (bytes, err) = r.done.await.unwrap();
    assert!(err.is_none() && bytes == w.blob);
    assert_eq!(
        w.upstream.opened.lock().len(),
        1,
        "one connection, never parked"
    );
    assert_eq!(w.pace.urgent.load(Ordering::SeqCst), 0);
}

#[tokio::test(start_paused = true)]
async fn a_cut_upstream_is_resumed_with_a_range_and_containerd_sees_one_body() {
    let cut = (1 << 20) + 12_345;
    let w = world(Priority::prewarm(0), Upstream::new(blob()).cutting(cut, 1));
    let r = w.get().await;
    let (bytes, err) = r.done.await.unwrap();
    assert!(err.is_none(), "{err:?}");
    assert!(bytes == w.blob, "one unbroken, correct body");
    let opened = w.upstream.opened.lock().clone();
    assert_eq!(
        opened,
        vec![0..w.blob.len() as u64, cut..w.blob.len() as u64]
    );
    assert_eq!(w.mirror.metrics.blob_retries.get(), 1);
}

#[tokio::test(start_paused = true)]
async fn an_upstream_that_keeps_failing_fails_containerds_read_instead_of_ending_it() {
    let w = world(
        Priority::prewarm(0),
        Upstream::new(blob()).cutting(1 << 20, usize::MAX),
    );
    let r = w.get().await;
    let (bytes, err) = r.done.await.unwrap();
    assert!(
        err.is_some(),
        "a body cut short must end in an error, not a clean end"
    );
    assert!(bytes.len() < w.blob.len() && w.blob.starts_with(&bytes));
    // The first open and one per retry (`retries = 2`).
    assert_eq!(w.upstream.opened.lock().len(), 3);
}
