//! One blob from a registry into containerd's content store: streamed, sha256-verified, resumed
//! after an interruption, retried with backoff, committed only when complete and correct.

use std::sync::Arc;
use std::time::Duration;

use std::ops::Range;

use bytes::Bytes;
use futures_util::stream::BoxStream;
use futures_util::{StreamExt, TryStreamExt};
use tonic::{Code, Status};
use tracing::{debug, warn};

use super::progress::BlobProgress;
use super::shared::Interest;
use super::FetchContext;
use crate::metrics::{ClassLabels, OutcomeLabels, SourceLabels};
use crate::registry::{Credentials, Descriptor, ImageRef, RegistryError, Source};
use crate::upstream::content::ContentWriter;
use crate::upstream::ContentStore;

/// Bytes gathered per content write: few round trips to containerd, little memory.
const WRITE_BATCH: usize = 1 << 20;

/// What one blob needs.
#[derive(Clone, Debug)]
pub struct BlobSpec {
    pub digest: String,
    pub size: u64,
    descriptor: Descriptor,
}

impl BlobSpec {
    pub fn from_descriptor(d: &Descriptor) -> Self {
        BlobSpec {
            digest: d.digest().to_string(),
            size: d.size(),
            descriptor: d.clone(),
        }
    }

    fn descriptor(&self) -> Descriptor {
        self.descriptor.clone()
    }

    /// The ingest this blob is written through.
    pub fn reference(&self) -> String {
        ingest_ref(self.descriptor.media_type().as_ref(), &self.digest)
    }
}

/// Stores a small blob already in memory (index, manifest), verified by the caller.
pub async fn write_small(
    store: &ContentStore,
    media_type: &str,
    digest: &str,
    data: bytes::Bytes,
    lease: &str,
) -> Result<(), Status> {
    if store.info(digest).await?.is_none() {
        let reference = ingest_ref(media_type, digest);
        let mut writer = store
            .writer(&reference, data.len() as u64, digest, lease)
            .await?;
        if writer.as_ref().is_some_and(|w| w.offset() != 0) {
            // A leftover of an earlier attempt: small enough to start over.
            drop(writer);
            store.abort(&reference).await?;
            writer = store
                .writer(&reference, data.len() as u64, digest, lease)
                .await?;
        }
        if let Some(mut w) = writer {
            w.write(data).await?;
            w.commit().await?;
        }
    }
    store.lease_content(lease, digest).await
}

/// How a blob got into the store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlobOutcome {
    /// It was there already.
    Present,
    /// pullgate downloaded it.
    Fetched,
}

/// Why a blob could not be stored.
#[derive(Clone, Debug, thiserror::Error)]
pub enum BlobError {
    /// The registry's answer cannot be used by pullgate; containerd may manage.
    #[error("{0}")]
    Fallback(String),
    /// The content is wrong: never committed.
    #[error("blob {digest} is corrupt: {cause}")]
    Corrupt { digest: String, cause: String },
    /// No byte arrived for the configured time.
    #[error("blob {digest} stalled: no data for {after:?} at byte {offset} of {size}")]
    Stalled {
        digest: String,
        after: Duration,
        offset: u64,
        size: u64,
    },
    /// Network or registry failure that retries did not cure.
    #[error("blob {digest}: {cause}")]
    Transport { digest: String, cause: String },
    /// containerd's content store refused.
    #[error("blob {digest}: containerd content store: {}", .status.message())]
    Store { digest: String, status: Status },
}

impl BlobError {
    /// The gRPC status kubelet sees.
    pub fn status(&self, image: &str) -> Status {
        let msg = format!("pulling {image}: {self}");
        match self {
            BlobError::Corrupt { .. } => Status::data_loss(msg),
            BlobError::Stalled { .. } => Status::deadline_exceeded(msg),
            BlobError::Transport { .. } | BlobError::Fallback(_) => Status::unavailable(msg),
            BlobError::Store { status, .. } => Status::new(status.code(), msg),
        }
    }
}

const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";

/// The ingest name, the one containerd's own fetch uses (`remotes.MakeRefKey`): while pullgate
/// writes a blob, containerd finishing the same pull waits on this ingest's lock instead of
/// downloading the blob a second time, and a restarted pullgate resumes its own ingest.
pub fn ingest_ref(media_type: &str, digest: &str) -> String {
    let kind =
        if media_type.contains("manifest.list") || media_type.ends_with("image.index.v1+json") {
            "index"
        } else if media_type.contains("manifest") {
            "manifest"
        } else if media_type.contains("layer") || media_type.contains("rootfs.diff") {
            "layer"
        } else if media_type.contains("config") || media_type == DOCKER_CONFIG {
            "config"
        } else {
            "unknown"
        };
    format!("{kind}-{digest}")
}

/// Takes the ingest lock of `blob` now, when nobody holds it: `Some` writer to download into
/// later. `None` when the blob is present or another writer (a download of pullgate's own, or
/// containerd's) holds the lock.
pub async fn claim(
    store: &ContentStore,
    blob: &BlobSpec,
    lease: &str,
) -> Result<Option<ContentWriter>, Status> {
    match store
        .writer(&blob.reference(), blob.size, &blob.digest, lease)
        .await
    {
        Err(s) if is_locked(&s) => Ok(None),
        other => other,
    }
}

fn is_locked(s: &Status) -> bool {
    s.code() == Code::Unavailable && s.message().contains("locked")
}

/// Where a job's blobs come from and the lease they are stored under.
#[derive(Clone, Debug)]
pub struct BlobSource {
    pub image: ImageRef,
    pub creds: Credentials,
    pub lease: String,
}

/// Downloads `blob` into the store under the source's lease, unless it is there already, into
/// `claimed` when the caller took the ingest lock beforehand. The lock is kept across attempts, so
/// nobody else starts the same download in between.
pub async fn download(
    ctx: Arc<FetchContext>,
    src: BlobSource,
    blob: BlobSpec,
    progress: Arc<BlobProgress>,
    claimed: Option<ContentWriter>,
    interest: Arc<Interest>,
) -> Result<BlobOutcome, BlobError> {
    let store = &ctx.store;
    let store_err = |status: Status| BlobError::Store {
        digest: blob.digest.clone(),
        status,
    };
    if claimed.is_none() && store.info(&blob.digest).await.map_err(store_err)?.is_some() {
        progress.set(blob.size);
        count(&ctx, BlobOutcome::Present);
        return Ok(BlobOutcome::Present);
    }
    let mut writer = claimed;
    let mut last_error = None;
    for attempt in 0..=ctx.cfg.retries {
        if attempt > 0 {
            ctx.metrics.blob_retries.inc();
            let backoff = Duration::from_millis(250 * (1 << attempt.min(5)));
            tokio::time::sleep(backoff.min(Duration::from_secs(5))).await;
        }
        let once = attempt_once(&ctx, &src, &blob, &progress, &mut writer, &interest);
        match once.await {
            Ok(outcome) => {
                count(&ctx, outcome);
                return Ok(outcome);
            }
            Err(e @ (BlobError::Fallback(_) | BlobError::Store { .. })) => return Err(e),
            Err(e) => {
                warn!(digest = %blob.digest, attempt = attempt + 1, error = %e, "blob attempt failed");
                if matches!(e, BlobError::Corrupt { .. }) {
                    // Never resume on top of bad bytes. Start over within the same ingest when
                    // the writer is still open: the lock stays ours, so containerd keeps waiting
                    // instead of downloading the bad blob itself.
                    match writer.as_mut() {
                        Some(w) => w.restart(),
                        None => {
                            let _ = store.abort(&blob.reference()).await;
                        }
                    }
                    progress.set(0);
                }
                last_error = Some(e);
            }
        }
    }
    ctx.metrics
        .blobs
        .get_or_create(&OutcomeLabels { outcome: "failed" })
        .inc();
    let error = last_error.expect("at least one attempt");
    if matches!(error, BlobError::Corrupt { .. }) {
        // Nothing of a corrupt blob stays behind for anyone to resume.
        drop(writer);
        let _ = store.abort(&blob.reference()).await;
    }
    Err(error)
}

fn count(ctx: &FetchContext, outcome: BlobOutcome) {
    let outcome = match outcome {
        BlobOutcome::Present => "present",
        BlobOutcome::Fetched => "fetched",
    };
    ctx.metrics
        .blobs
        .get_or_create(&OutcomeLabels { outcome })
        .inc();
}

async fn attempt_once(
    ctx: &FetchContext,
    src: &BlobSource,
    blob: &BlobSpec,
    progress: &BlobProgress,
    slot: &mut Option<ContentWriter>,
    interest: &Arc<Interest>,
) -> Result<BlobOutcome, BlobError> {
    let (image, creds, lease) = (&src.image, &src.creds, src.lease.as_str());
    let store_err = |status: Status| BlobError::Store {
        digest: blob.digest.clone(),
        status,
    };
    if slot.is_none() {
        *slot = open_writer(ctx, blob, lease).await.map_err(store_err)?;
    }
    let Some(writer) = slot.as_mut() else {
        progress.set(blob.size);
        return Ok(BlobOutcome::Present);
    };
    let mut offset = writer.offset();
    if offset > blob.size {
        // Bigger than the blob: cannot be resumed (download() starts it over).
        return Err(BlobError::Corrupt {
            digest: blob.digest.clone(),
            cause: format!(
                "unfinished ingest holds {offset} bytes, more than the {} expected",
                blob.size
            ),
        });
    }
    if offset > 0 {
        debug!(digest = %blob.digest, offset, size = blob.size, "resuming ingest");
    }
    // No hashing here: containerd's writer digests every byte as it arrives and refuses a commit
    // whose digest or size differs (mapped to `Corrupt` below). A second pass in pullgate would
    // cost about 0.6 s of CPU per GiB on the hottest path, on nodes already CPU-bound on
    // containerd's own hashing.
    progress.set(offset);
    if offset < blob.size {
        let mut chunks = body_chunks(ctx, image, creds, blob, offset, interest);
        // HTTP bodies arrive in pieces of a few KiB; each containerd write is a round trip, so
        // pieces are gathered into batches. What is buffered when the body breaks is still
        // written: the next attempt resumes after it.
        let mut batch = bytes::BytesMut::new();
        let mut failure = None;
        loop {
            let item = chunks.next().await;
            let done = match item {
                None => true,
                Some(Err(e)) => {
                    failure = Some(e);
                    true
                }
                Some(Ok((chunk, source))) => {
                    let len = chunk.len() as u64;
                    if offset + batch.len() as u64 + len > blob.size {
                        return Err(BlobError::Corrupt {
                            digest: blob.digest.clone(),
                            cause: format!(
                                "registry sent more than the {} bytes expected",
                                blob.size
                            ),
                        });
                    }
                    ctx.metrics
                        .fetched_bytes
                        .get_or_create(&SourceLabels { source })
                        .inc_by(len);
                    batch.extend_from_slice(&chunk);
                    false
                }
            };
            // Whole batches; at the end, the rest. A ranged chunk is bigger than a batch and is
            // cut up: containerd takes messages of at most 16 MiB.
            while batch.len() >= WRITE_BATCH || (done && !batch.is_empty()) {
                let data = batch.split_to(batch.len().min(WRITE_BATCH)).freeze();
                let len = data.len() as u64;
                ctx.scheduler
                    .bandwidth
                    .writing(|| interest.class(), len)
                    .await;
                writer.write(data).await.map_err(store_err)?;
                offset += len;
                progress.set(offset);
            }
            if done {
                break;
            }
        }
        if let Some(e) = failure {
            writer.flush().await.map_err(store_err)?;
            return Err(e);
        }
        if offset < blob.size {
            return Err(BlobError::Transport {
                digest: blob.digest.clone(),
                cause: format!("body ended at byte {offset} of {}", blob.size),
            });
        }
    }
    let writer = slot.take().expect("writer checked above");
    match writer.commit().await {
        Ok(()) => Ok(BlobOutcome::Fetched),
        Err(s) if s.code() == Code::FailedPrecondition || s.code() == Code::InvalidArgument => {
            Err(BlobError::Corrupt {
                digest: blob.digest.clone(),
                cause: format!("containerd refused the commit: {}", s.message()),
            })
        }
        Err(s) => Err(store_err(s)),
    }
}

type Chunks<'a> = BoxStream<'a, Result<(Bytes, &'static str), BlobError>>;

/// The bytes of `blob` from `offset` on, in order, each with its source. A big remainder is
/// fetched as parallel ranged requests (`range_connections` at a time, `range_chunk_mib` each,
/// held in memory until their turn); otherwise one streamed request.
fn body_chunks<'a>(
    ctx: &'a FetchContext,
    image: &'a ImageRef,
    creds: &'a Credentials,
    blob: &'a BlobSpec,
    offset: u64,
    interest: &'a Arc<Interest>,
) -> Chunks<'a> {
    let chunk = ctx.cfg.range_chunk_mib * (1 << 20);
    let connections = ctx.cfg.range_connections;
    if connections > 1 && blob.size - offset >= 2 * chunk {
        let ranges = (offset..blob.size)
            .step_by(chunk as usize)
            .map(move |start| start..(start + chunk).min(blob.size));
        return futures_util::stream::iter(ranges)
            .map(move |range| fetch_range(ctx, image, creds, blob, range, interest))
            .buffered(connections)
            .boxed();
    }
    futures_util::stream::once(open(ctx, image, creds, blob, offset..blob.size))
        .map(move |opened| -> Chunks<'a> {
            match opened {
                Ok((stream, source)) => metered(ctx, blob, offset, stream, interest)
                    .map_ok(move |b| (b, source))
                    .boxed(),
                Err(e) => futures_util::stream::once(async { Err(e) }).boxed(),
            }
        })
        .flatten()
        .boxed()
}

/// One request for `range` of the blob.
async fn open(
    ctx: &FetchContext,
    image: &ImageRef,
    creds: &Credentials,
    blob: &BlobSpec,
    range: Range<u64>,
) -> Result<
    (
        BoxStream<'static, Result<Bytes, RegistryError>>,
        &'static str,
    ),
    BlobError,
> {
    let body = ctx
        .registry
        .fetch_blob(image, creds, &blob.descriptor(), range)
        .await
        .map_err(|e| registry_error(&blob.digest, e))?;
    let source = match &body.source {
        Source::Registry => "registry",
        Source::Mirror(_) => "mirror",
    };
    Ok((body.stream, source))
}

/// A body stream paced by the scheduler's bandwidth buckets, ending in `Stalled` when no byte
/// arrives for `no_progress_timeout`. The stall clock runs only while the registry is asked for
/// bytes, not while the stream waits for its bandwidth share: a paused prewarm stream is not a
/// stalled one.
fn metered<'a>(
    ctx: &'a FetchContext,
    blob: &'a BlobSpec,
    start: u64,
    stream: BoxStream<'static, Result<Bytes, RegistryError>>,
    interest: &'a Arc<Interest>,
) -> BoxStream<'a, Result<Bytes, BlobError>> {
    let after = ctx.cfg.no_progress_timeout;
    futures_util::stream::unfold(
        (stream, start, false),
        move |(mut stream, at, failed)| async move {
            if failed {
                return None;
            }
            let item = match tokio::time::timeout(after, stream.next()).await {
                Err(_) => Err(BlobError::Stalled {
                    digest: blob.digest.clone(),
                    after,
                    offset: at,
                    size: blob.size,
                }),
                Ok(None) => return None,
                Ok(Some(Err(e))) => Err(BlobError::Transport {
                    digest: blob.digest.clone(),
                    cause: format!("stream broke at byte {at} of {}: {e}", blob.size),
                }),
                Ok(Some(Ok(b))) => Ok(b),
            };
            match item {
                Ok(b) => {
                    let n = b.len() as u64;
                    ctx.metrics
                        .class_bytes
                        .get_or_create(&ClassLabels::new(interest.class()))
                        .inc_by(n);
                    ctx.scheduler
                        .bandwidth
                        .received_bytes(|| interest.class(), n)
                        .await;
                    Some((Ok(b), (stream, at + n, false)))
                }
                // The first error ends the stream: what follows an error is not to be trusted.
                Err(e) => Some((Err(e), (stream, at, true))),
            }
        },
    )
    .boxed()
}

/// A whole range, in memory, checked for length.
async fn fetch_range(
    ctx: &FetchContext,
    image: &ImageRef,
    creds: &Credentials,
    blob: &BlobSpec,
    range: Range<u64>,
    interest: &Arc<Interest>,
) -> Result<(Bytes, &'static str), BlobError> {
    let want = (range.end - range.start) as usize;
    let (stream, source) = open(ctx, image, creds, blob, range.clone()).await?;
    let mut buf = bytes::BytesMut::with_capacity(want);
    let mut body = metered(ctx, blob, range.start, stream, interest);
    while let Some(b) = body.next().await {
        buf.extend_from_slice(&b?);
        if buf.len() > want {
            return Err(BlobError::Corrupt {
                digest: blob.digest.clone(),
                cause: format!("range {range:?} answered with more than {want} bytes"),
            });
        }
    }
    if buf.len() < want {
        return Err(BlobError::Transport {
            digest: blob.digest.clone(),
            cause: format!("range {range:?} ended after {} bytes", buf.len()),
        });
    }
    Ok((buf.freeze(), source))
}

/// Opens the ingest; containerd may still hold the lock of an attempt that just ended.
async fn open_writer(
    ctx: &FetchContext,
    blob: &BlobSpec,
    lease: &str,
) -> Result<Option<ContentWriter>, Status> {
    let mut waited = false;
    loop {
        match claim(&ctx.store, blob, lease).await? {
            Some(w) => return Ok(Some(w)),
            None if ctx.store.info(&blob.digest).await?.is_some() => return Ok(None),
            None => {
                // Another writer holds the ingest (containerd, or an earlier attempt whose stream
                // containerd has not closed yet): wait for it to commit or give up.
                if !waited {
                    debug!(digest = %blob.digest, "ingest locked by another writer; waiting");
                    waited = true;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

fn registry_error(digest: &str, e: RegistryError) -> BlobError {
    if e.is_fallback() {
        return BlobError::Fallback(e.to_string());
    }
    match e {
        RegistryError::DigestMismatch { .. } => BlobError::Corrupt {
            digest: digest.to_string(),
            cause: e.to_string(),
        },
        other => BlobError::Transport {
            digest: digest.to_string(),
            cause: other.to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::ingest_ref;

    #[test]
    fn ingest_refs_are_containerds() {
        let d = "sha256:ab";
        for (mt, want) in [
            ("application/vnd.oci.image.index.v1+json", "index-sha256:ab"),
            (
                "application/vnd.docker.distribution.manifest.list.v2+json",
                "index-sha256:ab",
            ),
            (
                "application/vnd.oci.image.manifest.v1+json",
                "manifest-sha256:ab",
            ),
            (
                "application/vnd.docker.distribution.manifest.v2+json",
                "manifest-sha256:ab",
            ),
            (
                "application/vnd.oci.image.layer.v1.tar+gzip",
                "layer-sha256:ab",
            ),
            (
                "application/vnd.docker.image.rootfs.diff.tar.gzip",
                "layer-sha256:ab",
            ),
            (
                "application/vnd.oci.image.config.v1+json",
                "config-sha256:ab",
            ),
            (
                "application/vnd.docker.container.image.v1+json",
                "config-sha256:ab",
            ),
            ("application/vnd.example.other", "unknown-sha256:ab"),
        ] {
            assert_eq!(ingest_ref(mt, d), want, "{mt}");
        }
    }
}
