//! One blob request from containerd: streamed from upstream (the administrator's hosts, then the
//! registry) under the scheduler, and resumed upstream with `Range` when a stream is cut, so
//! containerd sees one unbroken body.
//!
//! Each chunk is paid for in the node's bandwidth buckets at the class the demand table gives
//! the blob *now* (re-read per chunk) before it is passed on, so a paused prewarm stream stops
//! reading upstream, and a promotion speeds up a stream already open. The body channel holds one
//! chunk: what containerd has not read yet is not read upstream either.

use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::StreamExt;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, StreamBody};
use hyper::body::Frame;
use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::demand::{Access, BlobSource, Key, Presented};
use super::Mirror;
use crate::metrics::SourceLabels;
use crate::pull::Class;
use crate::registry::{Credentials, Descriptor, RegistryError, Source};
use crate::schedule::UrgentStream;

pub type Body = BoxBody<Bytes, std::io::Error>;

/// Serves `GET`/`HEAD` of blob `key`, honouring containerd's `Range`.
pub async fn serve(
    mirror: &Arc<Mirror>,
    key: Key,
    presented: Option<&Presented>,
    range: Option<&str>,
    head: bool,
) -> Response<Body> {
    let (source, class) = match mirror.demand.blob(&key, presented) {
        Access::Granted(s) => (s, None),
        Access::Challenge => return challenge(),
        Access::Unknown => match mirror.unscheduled_source(&key).await {
            Ok(Some(s)) => s,
            Ok(None) => return status(StatusCode::NOT_FOUND, "blob not scheduled by pullgate"),
            Err(e) => return upstream_error(&key, &e),
        },
    };
    let size = source.descriptor.size();
    let range = match super::route::parse_range(range, size) {
        Ok(r) => r,
        Err(super::route::Unsatisfiable) => {
            let mut r = status(StatusCode::RANGE_NOT_SATISFIABLE, "range not satisfiable");
            r.headers_mut().insert(
                header::CONTENT_RANGE,
                HeaderValue::from_str(&format!("bytes */{size}")).expect("ascii"),
            );
            return r;
        }
    };
    let resp = head_of(&key, size, range.clone());
    let range = range.unwrap_or(0..size);
    if head || range.is_empty() {
        return resp.body(empty()).expect("valid response");
    }
    // Upstream headers come before containerd's: a refusal here (404, 401, 5xx) lets
    // containerd try its next host instead of failing mid-body.
    let _slot = mirror
        .scheduler
        .streams
        .acquire(source.priority.clone())
        .await;
    // Prewarm yields from the first urgent request on, before its first byte arrives.
    let urgent = (class.unwrap_or_else(|| mirror.demand.class(&source.key, Class::Urgent))
        == Class::Urgent)
        .then(|| mirror.scheduler.bandwidth.urgent_stream());
    debug!(blob = %key.name, repository = %key.repository, job = source.job,
           from = range.start, to = range.end, urgent = urgent.is_some(), "serving blob");
    let first = match fetch(mirror, &source, range.clone()).await {
        Ok(b) => b,
        Err(e) => return upstream_error(&key, &e),
    };
    let (tx, rx) = mpsc::channel(1);
    let pump = Pump {
        mirror: mirror.clone(),
        source,
        class,
        at: range.start,
        end: range.end,
        _slot,
        urgent,
    };
    tokio::spawn(pump.run(first, tx));
    let body = StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    resp.body(BodyExt::boxed(body)).expect("valid response")
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
    /// Fixed class for blobs no job registered; `None`: the demand table decides.
    class: Option<Class>,
    at: u64,
    end: u64,
    _slot: crate::schedule::SlotPermit,
    /// Held while the stream is urgent: prewarm yields to it.
    urgent: Option<UrgentStream>,
}

type Tx = mpsc::Sender<Result<Frame<Bytes>, std::io::Error>>;

impl Pump {
    async fn run(mut self, first: crate::registry::BlobBody, tx: Tx) {
        let mut body = first;
        let mut retries = self.mirror.cfg.retries;
        loop {
            match body.stream.next().await {
                Some(Ok(chunk)) => {
                    let n = chunk.len() as u64;
                    let (mirror, key, fixed) = (&self.mirror, &self.source.key, self.class);
                    let class = || fixed.unwrap_or_else(|| mirror.demand.class(key, Class::Urgent));
                    // Read once per chunk here (the demand table scan is on every chunk's path);
                    // the bandwidth wait re-reads it while it waits.
                    let now = class();
                    match (now, self.urgent.is_some()) {
                        (Class::Urgent, false) => {
                            self.urgent = Some(mirror.scheduler.bandwidth.urgent_stream())
                        }
                        (Class::Prewarm, true) => self.urgent = None,
                        _ => {}
                    }
                    mirror.scheduler.bandwidth.received_bytes(class, n).await;
                    mirror.count_bytes(&body.source, now, n);
                    if tx.send(Ok(Frame::data(chunk))).await.is_err() {
                        debug!(blob = %self.source.key.name, at = self.at, "containerd closed the stream");
                        return;
                    }
                    self.at += n;
                    mirror.demand.progress(key, self.at);
                }
                None if self.at >= self.end => return,
                None => {
                    let e = RegistryError::Transport(format!(
                        "upstream body ended at byte {} of {}",
                        self.at, self.end
                    ));
                    if !self.resume(&mut body, &mut retries, e).await {
                        break;
                    }
                }
                Some(Err(e)) => {
                    if !self.resume(&mut body, &mut retries, e).await {
                        break;
                    }
                }
            }
        }
        // Cutting the body short makes containerd's read fail: it keeps what it has written, and
        // its next attempt resumes with a Range.
        let _ = tx
            .send(Err(std::io::Error::other("upstream stream failed")))
            .await;
    }

    /// Opens the rest of the range again; false when out of retries or upstream refuses.
    async fn resume(
        &mut self,
        body: &mut crate::registry::BlobBody,
        retries: &mut u32,
        e: RegistryError,
    ) -> bool {
        self.mirror.metrics.blob_retries.inc();
        if *retries == 0 {
            warn!(blob = %self.source.key.name, repository = %self.source.key.repository,
                  error = %e, "blob stream failed upstream, out of retries: containerd's read fails");
            return false;
        }
        *retries -= 1;
        warn!(blob = %self.source.key.name, at = self.at, error = %e, retries_left = *retries,
              "blob stream cut upstream: resuming with a Range");
        match fetch(&self.mirror, &self.source, self.at..self.end).await {
            Ok(b) => {
                *body = b;
                true
            }
            Err(e) => {
                warn!(blob = %self.source.key.name, error = %e, "cannot resume the blob stream");
                false
            }
        }
    }
}

async fn fetch(
    mirror: &Mirror,
    source: &BlobSource,
    range: Range<u64>,
) -> Result<crate::registry::BlobBody, RegistryError> {
    mirror
        .registry
        .fetch_blob(&source.image, &source.creds, &source.descriptor, range)
        .await
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
        let image = crate::registry::ImageRef {
            registry: key.registry.clone(),
            repository: key.repository.clone(),
            tag: None,
            digest: Some(key.name.clone()),
        };
        let creds = Credentials::Anonymous;
        let size = match self.registry.blob_size(&image, &creds, &key.name).await {
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
            Class::Urgent => crate::schedule::Priority::urgent(0),
            Class::Prewarm => crate::schedule::Priority::prewarm(0),
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

    fn count_bytes(&self, source: &Source, class: Class, n: u64) {
        let source = match source {
            Source::Registry => "registry",
            Source::Mirror(_) => "mirror",
        };
        self.metrics
            .fetched_bytes
            .get_or_create(&SourceLabels { source })
            .inc_by(n);
        self.metrics
            .class_bytes
            .get_or_create(&crate::metrics::ClassLabels::new(class))
            .inc_by(n);
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
