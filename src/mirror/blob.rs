//! One blob request from containerd: streamed from upstream (the administrator's hosts, then the
//! registry) under the scheduler, and resumed upstream with `Range` when a stream is cut, so
//! containerd sees one unbroken body.
//!
//! Each chunk is paid for in the node's bandwidth buckets at the class the demand table gives
//! the blob *now* (re-read per chunk) before it is passed on, so a paused prewarm stream stops
//! reading upstream, and a promotion speeds up a stream already open. The body channel holds one
//! chunk: what containerd has not read yet is not read upstream either.

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use futures_util::StreamExt;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, StreamBody};
use hyper::body::Frame;
use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::backlog::{Backlog, Conn};
use super::demand::{Access, BlobSource, Key, Presented};
use super::pacing::Held;
use super::parts::{Part, Phase, Probe, Verdict};
use super::Mirror;
use crate::registry::{Credentials, Descriptor, RegistryError, Source};
use crate::schedule::bandwidth::RECHECK;
use crate::vocab::Class;

pub type Body = BoxBody<Bytes, std::io::Error>;

/// Serves `GET`/`HEAD` of blob `key`, honouring containerd's `Range`.
pub async fn serve(
    mirror: &Arc<Mirror>,
    key: Key,
    presented: Option<&Presented>,
    range: Option<&str>,
    head: bool,
    conn: Option<Conn>,
) -> Response<Body> {
    let (source, class) = match source_of(mirror, &key, presented).await {
        Ok(found) => found,
        Err(refused) => return refused,
    };
    serve_source(mirror, key, source, class, range, head, conn).await
}

/// The body of blob `key`, which job `job` needs, from byte `from` on: served as to containerd
/// (paced by the class of the jobs needing it, verified, resumed upstream), for pullgate's own
/// writes into containerd's store. `Err`: why not, for the log.
pub async fn body_for_job(
    mirror: &Arc<Mirror>,
    key: Key,
    job: u64,
    from: u64,
) -> Result<Body, String> {
    let Some(source) = mirror.demand.blob_of_job(&key, job) else {
        return Err("the job no longer needs the blob".into());
    };
    let range = (from > 0).then(|| format!("bytes={from}-"));
    let resp = serve_source(mirror, key, source, None, range.as_deref(), false, None).await;
    match resp.status() {
        StatusCode::OK | StatusCode::PARTIAL_CONTENT => Ok(resp.into_body()),
        code => {
            let why = resp.into_body().collect().await.map(|b| b.to_bytes());
            let why = why
                .as_deref()
                .map(String::from_utf8_lossy)
                .unwrap_or_default();
            Err(format!(
                "{code}: {}",
                why.chars().take(200).collect::<String>()
            ))
        }
    }
}

async fn serve_source(
    mirror: &Arc<Mirror>,
    key: Key,
    source: BlobSource,
    class: Option<Class>,
    range: Option<&str>,
    head: bool,
    conn: Option<Conn>,
) -> Response<Body> {
    let size = source.descriptor.size();
    let range = match super::route::parse_range(range, size) {
        Ok(r) => r,
        Err(super::route::Unsatisfiable) => return unsatisfiable(size),
    };
    // Only what can be checked is served: containerd fetches the rest from its next host.
    let Some(fresh) = super::verify::fresh(&key.name) else {
        return status(
            StatusCode::NOT_FOUND,
            "pullgate verifies sha256 and sha512 blobs only",
        );
    };
    let resp = head_of(&key, size, range.clone());
    let range = range.unwrap_or(0..size);
    if range.end < size && class.is_some() {
        // A range short of the blob's end (containerd 2.1's multipart fetch) cannot be hashed
        // to the digest: served only for blobs of a running job, whose pull containerd verifies.
        return status(
            StatusCode::NOT_FOUND,
            "a partial range of an unscheduled blob cannot be verified",
        );
    }
    if head || range.is_empty() {
        return resp.body(empty()).expect("valid response");
    }
    let (hash_from, verifier) = verifier_for(mirror, &key, size, range.clone(), fresh, class);
    match start(
        mirror,
        source,
        class,
        hash_from..range.end,
        range.start,
        verifier,
        conn,
    )
    .await
    {
        Ok(body) => resp.body(body).expect("valid response"),
        Err(e) => upstream_error(&key, &e),
    }
}

/// Where to fetch blob `key` from and its fixed class (`None`: the demand table decides), or
/// the answer that refuses it.
async fn source_of(
    mirror: &Mirror,
    key: &Key,
    presented: Option<&Presented>,
) -> Result<(BlobSource, Option<Class>), Response<Body>> {
    let access = mirror
        .demand
        .after_resolution(key, || mirror.demand.blob(key, presented))
        .await;
    match access {
        Access::Granted(s) => Ok((s, None)),
        Access::Challenge => Err(challenge()),
        Access::Unknown => match mirror.unscheduled_source(key).await {
            Ok(Some(s)) => Ok(s),
            Ok(None) => Err(status(
                StatusCode::NOT_FOUND,
                "blob not scheduled by pullgate",
            )),
            Err(e) => Err(upstream_error(key, &e)),
        },
    }
}

fn unsatisfiable(size: u64) -> Response<Body> {
    let mut r = status(StatusCode::RANGE_NOT_SATISFIABLE, "range not satisfiable");
    r.headers_mut().insert(
        header::CONTENT_RANGE,
        HeaderValue::from_str(&format!("bytes */{size}")).expect("ascii"),
    );
    r
}

/// The verifier of `range` and where upstream reading starts for it. A resumed request: the
/// hash of the bytes before it comes from a checkpoint, and the bytes between the checkpoint and
/// the range are read again, hash-only.
fn verifier_for(
    mirror: &Mirror,
    key: &Key,
    size: u64,
    range: Range<u64>,
    fresh: super::verify::State,
    class: Option<Class>,
) -> (u64, super::verify::Verifier) {
    let (hash_from, state) = if range.end == size {
        mirror
            .checkpoints
            .at_or_below(&key.name, range.start, fresh)
    } else {
        (range.start, fresh)
    };
    let verifier =
        super::verify::Verifier::new(&key.name, size, state, hash_from, range.start, range.end);
    // No checkpoint (pullgate restarted): a running job's resumed blob is served unchecked, as
    // its partial ranges are (containerd verifies the whole blob at commit); re-reading the
    // prefix would cost up to the whole blob again. Anything else is re-read, hash-only, and so
    // is a blob whose upstream just served a mismatch (containerd resumes the cut body at once).
    if hash_from == 0
        && range.start > 0
        && class.is_none()
        && !mirror.checkpoints.has_mismatched(&key.name)
    {
        debug!(blob = %key.name, from = range.start,
               "resumed request with no checkpoint: served unchecked for the job's pull");
        return (range.start, verifier.unchecked());
    }
    if hash_from < range.start {
        mirror
            .metrics
            .rehashed_bytes
            .inc_by(range.start - hash_from);
        debug!(blob = %key.name, from = hash_from, to = range.start,
               "resumed request: re-reading upstream from the last checkpoint, hash-only");
    }
    (hash_from, verifier)
}

/// Takes a stream slot, opens `range` upstream and starts the pump feeding the body
/// (`requested` on is sent; before it, hashed only).
async fn start(
    mirror: &Arc<Mirror>,
    source: BlobSource,
    class: Option<Class>,
    range: Range<u64>,
    requested: u64,
    verifier: super::verify::Verifier,
    conn: Option<Conn>,
) -> Result<Body, RegistryError> {
    let key = &source.key;
    // Upstream headers come before containerd's: a refusal here (404, 401, 5xx) lets
    // containerd try its next host instead of failing mid-body.
    let _slot = mirror.pacing.stream_slot(source.priority.clone()).await;
    // Prewarm yields from the first urgent request on, before its first byte arrives.
    let urgent = (class.unwrap_or_else(|| mirror.demand.class(key, Class::Urgent))
        == Class::Urgent)
        .then(|| mirror.pacing.urgent_stream());
    debug!(blob = %key.name, repository = %key.repository, job = source.job,
           from = requested, to = range.end, urgent = urgent.is_some(), verified = verifier.checks(),
           "serving blob");
    let first = mirror.upstream.fetch(&source, range.clone()).await?;
    let (tx, rx) = mpsc::channel(1);
    let probe = match mirror.pace.capped(&first.host) {
        None if mirror.splits(range.end - range.start) => Probe::new(0),
        _ => Probe::done(),
    };
    let pump = Pump {
        mirror: mirror.clone(),
        key: Arc::new(source.key.clone()),
        from: first.source.clone(),
        source,
        class,
        at: range.start,
        end: range.end,
        _slot,
        urgent,
        head_end: range.end,
        parts: VecDeque::new(),
        next: range.end,
        ahead: 0,
        parts_read: Arc::new(AtomicU64::new(0)),
        head_read: 0,
        probe,
        budget: None,
        keepalive_due: tokio::time::Instant::now() + mirror.keepalive,
        verifier,
        backlog: conn.map(Backlog::new),
    };
    tokio::spawn(pump.run(first, tx));
    let body = StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    Ok(BodyExt::boxed(body))
}

/// The status and headers of a blob response: 200 for the whole blob, 206 for a range.
fn head_of(key: &Key, size: u64, range: Option<Range<u64>>) -> http::response::Builder {
    let (status, r) = match range {
        Some(r) => (StatusCode::PARTIAL_CONTENT, r),
        None => (StatusCode::OK, 0..size),
    };
    let resp = Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::CONTENT_LENGTH, r.end - r.start)
        .header(header::ACCEPT_RANGES, "bytes")
        .header("docker-content-digest", key.name.as_str());
    if status == StatusCode::OK {
        return resp;
    }
    resp.header(
        header::CONTENT_RANGE,
        format!("bytes {}-{}/{size}", r.start, r.end.saturating_sub(1)),
    )
}

/// Feeds one response body; ends when the range is delivered, upstream fails for good, or
/// containerd goes away (the channel closes).
struct Pump {
    mirror: Arc<Mirror>,
    source: BlobSource,
    /// `source.key`, shared with the bandwidth wait of every chunk.
    key: Arc<Key>,
    /// Where the bytes come from now (for the byte counters).
    from: Source,
    /// Fixed class for blobs no job registered; `None`: the demand table decides.
    class: Option<Class>,
    at: u64,
    end: u64,
    _slot: Held,
    /// Held while the stream is urgent: prewarm yields to it.
    urgent: Option<Held>,
    /// Where the one upstream body stops being read: ranged parts follow from there.
    head_end: u64,
    /// Parts fetched ahead, in order from `head_end` (see [`super::parts`]).
    parts: VecDeque<Part>,
    /// The first byte no part covers yet.
    next: u64,
    /// Parts to keep in flight ahead of the one being read: 0 (one connection), 1 (probing a
    /// host), `parallel_ranges - 1` (a capped host).
    ahead: usize,
    parts_read: Arc<AtomicU64>,
    head_read: u64,
    probe: Probe,
    /// This blob's share of the node's buffer budget while it is split.
    budget: Option<tokio::sync::OwnedSemaphorePermit>,
    /// When containerd has gone a keep-alive interval without a byte: if the stream is a paused
    /// prewarm one then, it gets a few bytes (see [`Pump::keep_alive`]).
    keepalive_due: tokio::time::Instant,
    /// Hashes every byte at `at` on (see [`super::verify`]).
    verifier: super::verify::Verifier,
    /// containerd's unread bytes on the connection, which a prewarm stream keeps low (see
    /// [`super::backlog`]); `None` for pullgate's own writes into containerd.
    backlog: Option<Backlog>,
}

type Tx = mpsc::Sender<Result<Frame<Bytes>, std::io::Error>>;

/// What a paused prewarm stream sends containerd per keep-alive: containerd's CRI cancels a pull
/// whose streams read nothing for `image_pull_progress_timeout`.
pub(super) const KEEPALIVE_BYTES: usize = 1024;

/// Why a body ends early.
enum Stop {
    /// containerd went away: nothing more to send.
    Gone,
    /// Upstream failed for good: containerd's read must fail.
    Failed,
}

impl Pump {
    async fn run(mut self, first: crate::registry::BlobBody, tx: Tx) {
        match self.pump(first, &tx).await {
            Ok(()) => {}
            Err(Stop::Gone) => self.verifier.stopped(&self.mirror.checkpoints),
            // Cutting the body short makes containerd's read fail: it keeps what it has written,
            // and its next attempt resumes with a Range.
            Err(Stop::Failed) => {
                self.verifier.stopped(&self.mirror.checkpoints);
                let _ = tx
                    .send(Err(std::io::Error::other("upstream stream failed")))
                    .await;
            }
        }
    }

    /// The blob's class now; the demand table decides unless it is fixed.
    fn class(&self) -> Class {
        self.class
            .unwrap_or_else(|| self.mirror.demand.class(&self.source.key, Class::Urgent))
    }

    async fn pump(&mut self, first: crate::registry::BlobBody, tx: &Tx) -> Result<(), Stop> {
        let mut retries = self.mirror.cfg.retries;
        let mut host = first.host.clone();
        // `None`: parked (closed while prewarm paused), or read up to `head_end`.
        let mut body = Some(first);
        while self.at < self.end {
            if self.at >= self.head_end {
                body = None;
                self.top_up();
                if self.parts.is_empty() {
                    // No part ahead (the host turned out uncapped): one connection again.
                    self.head_end = self.end;
                    self.next = self.end;
                    self.budget = None;
                    body = Some(self.reopen(&mut retries, None).await?);
                    continue;
                }
                self.read_front(&mut body, &mut retries, tx).await?;
                self.consider_split(&host);
                continue;
            }
            let Some(open) = body.as_mut() else {
                body = Some(self.reopen(&mut retries, None).await?);
                continue;
            };
            let due = self.keepalive_due;
            let next = tokio::select! {
                biased;
                next = open.stream.next() => Some(next),
                // Upstream is silent: if prewarm is paused, park now rather than on a chunk.
                _ = tokio::time::sleep_until(due) => None,
            };
            let mut chunk = match next {
                Some(Some(Ok(chunk))) => chunk,
                Some(None) => {
                    let e = RegistryError::Transport(format!(
                        "upstream body ended at byte {} of {}",
                        self.at, self.end
                    ));
                    body = Some(self.reopen(&mut retries, Some(e)).await?);
                    continue;
                }
                Some(Some(Err(e))) => {
                    body = Some(self.reopen(&mut retries, Some(e)).await?);
                    continue;
                }
                None => {
                    if self.class() == Class::Prewarm && self.should_park(&host) {
                        body = None;
                        self.park(&mut Bytes::new(), tx).await?;
                    } else {
                        self.keepalive_due = tokio::time::Instant::now() + RECHECK;
                    }
                    continue;
                }
            };
            host.clone_from(&open.host);
            self.from.clone_from(&open.source);
            self.head_read += chunk.len() as u64;
            // The parts after `head_end` fetch the rest.
            chunk.truncate(chunk.len().min((self.head_end - self.at) as usize));
            // Read once per chunk here (the demand table scan is on every chunk's path); the
            // bandwidth wait re-reads it while it waits.
            let now = self.class();
            match (now, self.urgent.is_some()) {
                (Class::Urgent, false) => self.urgent = Some(self.mirror.pacing.urgent_stream()),
                (Class::Prewarm, true) => self.urgent = None,
                _ => {}
            }
            if now == Class::Prewarm && self.should_park(&host) {
                body = None;
                self.park(&mut chunk, tx).await?;
            }
            let n = chunk.len() as u64;
            if n == 0 {
                continue;
            }
            let paying = tokio::time::Instant::now();
            // Where the open connection stands: a pause long enough for keep-alives to use up
            // the chunk makes them fetch past it, and the connection must then be reopened.
            let body_at = self.at + n;
            self.pay(&mut chunk, tx).await?;
            self.probe.waited(paying.elapsed());
            super::fetch::count(&self.mirror.metrics, &self.from, now, n);
            if !chunk.is_empty() {
                self.send(chunk, tx).await?;
            }
            if self.at > body_at {
                body = None;
            }
            self.consider_split(&host);
        }
        Ok(())
    }

    /// Passes on the next chunk of the front part (trimmed of what keep-alives already sent),
    /// pops it when done, or takes its rest over one connection (`body`) when it failed.
    async fn read_front(
        &mut self,
        body: &mut Option<crate::registry::BlobBody>,
        retries: &mut u32,
        tx: &Tx,
    ) -> Result<(), Stop> {
        let due = self.keepalive_due;
        let front = self.parts.front_mut().expect("a part ahead");
        if self.at >= front.range.end {
            // Delivered (partly by keep-alives): whatever the part still reads is not needed.
            self.parts.pop_front();
            return Ok(());
        }
        let got = tokio::select! {
            biased;
            got = front.rx.recv() => got,
            // The front part may be paused (or waiting out the pause to pay for a chunk): the
            // keep-alive comes from here, whatever the part is doing.
            _ = tokio::time::sleep_until(due) => {
                let limit = front.range.end;
                return self.keep_alive(&mut Bytes::new(), true, limit, tx).await;
            }
        };
        match got {
            // Paid for in the bandwidth buckets by the part's task.
            Some(Ok(mut chunk)) => {
                let pos = front.pos;
                front.pos += chunk.len() as u64;
                if front.pos <= self.at {
                    return Ok(());
                }
                if pos < self.at {
                    let _ = chunk.split_to((self.at - pos) as usize);
                }
                self.send(chunk, tx).await
            }
            None if self.at >= front.range.end => {
                self.parts.pop_front();
                Ok(())
            }
            failed => {
                // The part failed for good: its rest comes over one connection.
                let e = match failed {
                    Some(Err(e)) => e,
                    _ => RegistryError::Transport("part ended early".into()),
                };
                self.head_end = front.range.end;
                self.parts.pop_front();
                *body = Some(self.reopen(retries, Some(e)).await?);
                Ok(())
            }
        }
    }

    /// Bytes received upstream so far over every connection of this stream.
    fn read(&self) -> u64 {
        self.head_read + self.parts_read.load(Ordering::Relaxed)
    }

    /// Decides whether (and how far) to fetch ahead in ranged parts: at once for a host known
    /// to cap connections, after the probe for one not measured yet.
    fn consider_split(&mut self, host: &str) {
        let k = self.mirror.cfg.parallel_ranges;
        if self.ahead + 1 >= k || self.mirror.upstream.ranges_work(host) == Some(false) {
            return;
        }
        let want = match self.mirror.pace.capped(host) {
            Some(false) => return,
            Some(true) => k - 1,
            None => match self.probe.step(self.read()) {
                Verdict::Wait => return,
                Verdict::Pair => 1,
                Verdict::Inconclusive => 0,
                Verdict::Decided {
                    capped,
                    single,
                    paired,
                } => {
                    self.mirror.pace.note(host, capped, single, paired);
                    if capped {
                        k - 1
                    } else {
                        0
                    }
                }
            },
        };
        if want <= self.ahead {
            self.ahead = want;
            return;
        }
        let part = self.mirror.cfg.range_part.0;
        if self.end - self.at < 2 * part {
            return;
        }
        // The budget is reserved for the most this blob may hold ahead; without it the blob
        // stays on one connection (asked again on its next chunk).
        let Some(budget) = self.mirror.buffers.reserve(want as u64 * part) else {
            debug!(blob = %self.source.key.name, "buffer budget taken: not split");
            return;
        };
        self.budget = Some(budget);
        self.ahead = want;
        if self.parts.is_empty() && self.next >= self.end {
            // Not split yet: the open body reads one more part's worth, the parts the rest.
            self.head_end = (self.at + part).min(self.end);
            self.next = self.head_end;
        }
        self.top_up();
    }

    /// Starts parts until `ahead` are in flight past the one being read.
    fn top_up(&mut self) {
        let part = self.mirror.cfg.range_part.0;
        // The part being read (past `head_end`) is not one ahead.
        let reading = usize::from(self.at >= self.head_end);
        while self.parts.len() < self.ahead + reading && self.next < self.end {
            let range = self.next..(self.next + part).min(self.end);
            self.next = range.end;
            self.mirror.metrics.range_parts.inc();
            self.parts.push_back(Part::spawn(
                &self.mirror,
                &self.source,
                self.class,
                range,
                self.parts_read.clone(),
            ));
        }
    }

    /// Whether to close the upstream connection of this prewarm stream: prewarm is paused, and
    /// the host honours `Range` (else reopening would read the blob again from its start).
    fn should_park(&self, host: &str) -> bool {
        self.mirror.pacing.prewarm_paused() && self.mirror.upstream.ranges_work(host) != Some(false)
    }

    /// Sends blob bytes `at..at + chunk.len()`, all hashed first; those before the requested
    /// range are hashed only.
    async fn send(&mut self, chunk: Bytes, tx: &Tx) -> Result<(), Stop> {
        let n = chunk.len() as u64;
        let (out, mismatch) = match self.verifier.feed(chunk, &self.mirror.checkpoints) {
            super::verify::Fed::Send(b) => (b, None),
            super::verify::Fed::Mismatch { send, actual } => (send, Some(actual)),
        };
        // An urgent stream (it holds the urgent mark) is never held back, nor looked up.
        if let Some(mut backlog) = self.backlog.take_if(|_| self.urgent.is_none()) {
            let prewarm = || self.class() == Class::Prewarm && !tx.is_closed();
            let waited = backlog.settle(out.len() as u64, prewarm).await;
            if !waited.is_zero() {
                self.mirror
                    .metrics
                    .backlog_waits
                    .inc_by(waited.as_secs_f64());
            }
            self.backlog = Some(backlog);
        }
        if !out.is_empty() && tx.send(Ok(Frame::data(out))).await.is_err() {
            debug!(blob = %self.source.key.name, at = self.at, "containerd closed the stream");
            return Err(Stop::Gone);
        }
        if let Some(actual) = mismatch {
            self.mismatch(&actual).await;
            return Err(Stop::Failed);
        }
        self.at += n;
        self.keepalive_due = tokio::time::Instant::now() + self.mirror.keepalive;
        self.mirror.demand.progress(&self.source.key, self.at);
        Ok(())
    }

    /// The blob's bytes did not hash to its digest: the body is cut before its last byte (the
    /// caller fails it), and containerd's download of it is dropped first. containerd keeps a
    /// cut download and resumes it, corrupt bytes included; while this stream is open its
    /// writer holds the ingest's ref, so no other download of the blob is dropped with it.
    async fn mismatch(&self, actual: &str) {
        let key = &self.source.key;
        let upstream = match &self.from {
            Source::Mirror(h) => h.as_str(),
            Source::Registry => key.registry.as_str(),
        };
        self.mirror.metrics.digest_mismatches.inc();
        warn!(blob = %key.name, repository = %key.repository, upstream, actual,
              "upstream's bytes do not match the blob's digest: response cut before its last byte");
        if let Some((channel, namespace)) = self.mirror.ingests.clone() {
            let drop = super::drop_download(channel, &namespace, &key.name);
            if tokio::time::timeout(std::time::Duration::from_secs(5), drop)
                .await
                .is_err()
            {
                warn!(blob = %key.name, "containerd did not answer within 5s: its cut download of the blob is kept");
            }
        }
    }

    /// Pays for `chunk` in the bandwidth buckets; a pause that begins meanwhile holds the payment
    /// up, so the keep-alive runs beside it (sending the front of `chunk`).
    async fn pay(&mut self, chunk: &mut Bytes, tx: &Tx) -> Result<(), Stop> {
        let (mirror, key, fixed) = (self.mirror.clone(), self.key.clone(), self.class);
        let class = move || fixed.unwrap_or_else(|| mirror.demand.class(&key, Class::Urgent));
        let pacing = self.mirror.pacing.clone();
        let paid = pacing.received(&class, chunk.len() as u64);
        tokio::pin!(paid);
        loop {
            tokio::select! {
                biased;
                _ = &mut paid => return Ok(()),
                _ = tokio::time::sleep_until(self.keepalive_due) => {
                    let limit = self.head_end;
                    self.keep_alive(chunk, true, limit, tx).await?;
                }
            }
        }
    }

    /// Closes the upstream connection of this prewarm stream and waits while prewarm is paused
    /// and the blob still prewarm, keeping containerd's stream alive from `held` (the chunk
    /// received as the pause began, not paid for). A paused stream that keeps its connection
    /// keeps receiving until its TCP window is full: megabytes per stream that take the link from
    /// the pod. The rest is asked for with a Range afterwards.
    async fn park(&mut self, held: &mut Bytes, tx: &Tx) -> Result<(), Stop> {
        self.mirror.metrics.parked_streams.inc();
        debug!(blob = %self.source.key.name, at = self.at,
               "prewarm paused: upstream connection closed, reopened with a Range afterwards");
        while self.class() == Class::Prewarm && self.mirror.pacing.prewarm_paused() {
            if tx.is_closed() {
                return Err(Stop::Gone);
            }
            let now = tokio::time::Instant::now();
            tokio::time::sleep_until(self.keepalive_due.min(now + RECHECK)).await;
            if tokio::time::Instant::now() >= self.keepalive_due {
                let limit = self.head_end;
                self.keep_alive(held, false, limit, tx).await?;
            }
        }
        if self.probe.phase != Phase::Done {
            self.probe = Probe::new(self.read());
        }
        Ok(())
    }

    /// Due once containerd has gone a keep-alive interval without a byte. If this is a paused
    /// prewarm stream, sends containerd a few bytes so that its CRI does not cancel the pull as
    /// stalled: from `held` (bytes received and not sent yet; `paid` says whether the buckets
    /// were charged for them), else fetched at `at` (not past `limit`). Otherwise checks again
    /// in a moment.
    async fn keep_alive(
        &mut self,
        held: &mut Bytes,
        paid: bool,
        limit: u64,
        tx: &Tx,
    ) -> Result<(), Stop> {
        if self.class() != Class::Prewarm || !self.mirror.pacing.prewarm_paused() {
            self.keepalive_due = tokio::time::Instant::now() + RECHECK;
            return Ok(());
        }
        let charged = !held.is_empty() && paid;
        let piece = if held.is_empty() {
            let want = self.at..limit.min(self.at + KEEPALIVE_BYTES as u64);
            if want.is_empty() {
                self.keepalive_due = tokio::time::Instant::now() + RECHECK;
                return Ok(());
            }
            match self.mirror.upstream.fetch(&self.source, want).await {
                Ok(b) => {
                    self.from = b.source;
                    let got: Vec<Bytes> = b.stream.filter_map(|r| async { r.ok() }).collect().await;
                    Bytes::from(got.concat())
                }
                Err(e) => {
                    debug!(blob = %self.source.key.name, error = %e, "keep-alive fetch failed");
                    Bytes::new()
                }
            }
        } else {
            held.split_to(held.len().min(KEEPALIVE_BYTES))
        };
        if piece.is_empty() {
            // Try again after another interval.
            self.keepalive_due = tokio::time::Instant::now() + self.mirror.keepalive;
            return Ok(());
        }
        if !charged {
            let n = piece.len() as u64;
            self.mirror.pacing.received_unpaced(Class::Prewarm, n);
            super::fetch::count(&self.mirror.metrics, &self.from, Class::Prewarm, n);
        }
        self.send(piece, tx).await
    }

    /// Opens the rest of the range again: after a cut upstream (`cut`, counted against the
    /// retries) or after a pause.
    async fn reopen(
        &mut self,
        retries: &mut u32,
        cut: Option<RegistryError>,
    ) -> Result<crate::registry::BlobBody, Stop> {
        if let Some(e) = cut {
            self.mirror.metrics.blob_retries.inc();
            if *retries == 0 {
                warn!(blob = %self.source.key.name, repository = %self.source.key.repository,
                      error = %e, "blob stream failed upstream, out of retries: containerd's read fails");
                return Err(Stop::Failed);
            }
            *retries -= 1;
            warn!(blob = %self.source.key.name, at = self.at, error = %e, retries_left = *retries,
                  "blob stream cut upstream: resuming with a Range");
        }
        loop {
            match self
                .mirror
                .upstream
                .fetch(&self.source, self.at..self.end)
                .await
            {
                Ok(b) => return Ok(b),
                Err(e) if *retries > 0 && matches!(e, RegistryError::Transport(_)) => {
                    *retries -= 1;
                    self.mirror.metrics.blob_retries.inc();
                    warn!(blob = %self.source.key.name, error = %e, retries_left = *retries,
                          "cannot reopen the blob stream yet: retrying");
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                }
                Err(e) => {
                    warn!(blob = %self.source.key.name, error = %e, "cannot resume the blob stream");
                    return Err(Stop::Failed);
                }
            }
        }
    }
}

impl Mirror {
    /// Where to fetch a blob no running job needs, and its fixed class; `None` when such blobs
    /// are bypassed or the repository is not readable anonymously (containerd then fetches it
    /// itself, with its own credentials).
    async fn unscheduled_source(
        &self,
        key: &Key,
    ) -> Result<Option<(BlobSource, Option<Class>)>, RegistryError> {
        let Some(class) = self.cfg.unscheduled.class() else {
            return Ok(None);
        };
        if !self.may_fetch_unscheduled(&key.registry) {
            return Ok(None);
        }
        let image = crate::registry::ImageRef {
            registry: key.registry.clone(),
            repository: key.repository.clone(),
            tag: None,
            digest: Some(key.name.clone()),
        };
        let creds = Credentials::Anonymous;
        let size = match self.upstream.blob_size(&image, &creds, &key.name).await {
            Ok(s) => s,
            Err(RegistryError::Unauthorized(_)) | Err(RegistryError::NotFound(_)) => {
                return Ok(None)
            }
            Err(e) => return Err(e),
        };
        let digest: oci_spec::image::Digest = key
            .name
            .parse()
            .map_err(|e| RegistryError::Protocol(format!("digest {}: {e}", key.name)))?;
        let media_type = oci_spec::image::MediaType::Other("application/octet-stream".into());
        let descriptor = Descriptor::new(media_type, size, digest);
        let priority = tokio::sync::watch::channel(match class {
            Class::Urgent => crate::vocab::Priority::urgent(0),
            Class::Prewarm => crate::vocab::Priority::prewarm(0),
        })
        .1;
        self.metrics.mirror_unscheduled.inc();
        Ok(Some((
            BlobSource {
                key: key.clone(),
                descriptor,
                image,
                creds,
                job: 0,
                priority,
            },
            Some(class),
        )))
    }

    /// Whether a stream of `len` bytes is long enough to be worth probing and splitting.
    fn splits(&self, len: u64) -> bool {
        let part = self.cfg.range_part.0;
        self.cfg.parallel_ranges > 1 && part > 0 && self.cfg.buffer_budget.0 > 0 && len >= 4 * part
    }
}

/// An upstream failure before any byte: containerd tries its next host on any non-2xx.
fn upstream_error(key: &Key, e: &RegistryError) -> Response<Body> {
    let code = match e {
        RegistryError::NotFound(_) => StatusCode::NOT_FOUND,
        RegistryError::Unauthorized(_) => StatusCode::NOT_FOUND,
        _ => StatusCode::BAD_GATEWAY,
    };
    debug!(blob = %key.name, repository = %key.repository, registry = %key.registry, error = %e,
           "upstream refused: containerd falls back to its next host");
    status(code, &e.to_string())
}

/// Asks containerd for the pull's credentials (it sends them to a mirror that challenges).
pub fn challenge() -> Response<Body> {
    let mut r = status(StatusCode::UNAUTHORIZED, "credentials required");
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Basic realm=\"pullgate\""),
    );
    r
}

pub fn status(code: StatusCode, message: &str) -> Response<Body> {
    let body = serde_json::json!({"errors": [{"code": code_name(code), "message": message}]});
    Response::builder()
        .status(code)
        .header(header::CONTENT_TYPE, "application/json")
        .body(full(Bytes::from(body.to_string())))
        .expect("valid response")
}

fn code_name(code: StatusCode) -> &'static str {
    match code {
        StatusCode::NOT_FOUND => "BLOB_UNKNOWN",
        StatusCode::RANGE_NOT_SATISFIABLE => "RANGE_INVALID",
        StatusCode::UNAUTHORIZED => "UNAUTHORIZED",
        _ => "UNAVAILABLE",
    }
}

pub fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed()
}

pub fn full(bytes: Bytes) -> Body {
    http_body_util::Full::new(bytes)
        .map_err(|never| match never {})
        .boxed()
}
