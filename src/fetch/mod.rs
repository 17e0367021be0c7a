//! pullgate's layer fetcher: for each pull, resolve the image, stream every blob into
//! containerd's content store under a lease, then let containerd finish (unpack and record) with
//! everything present.
//!
//! Never worse than containerd: whatever the fetcher cannot handle (unknown media types or auth
//! schemes, schema 1, foreign layers, the registry refusing the credentials, the content API
//! unreachable) is logged, counted in `pullgate_fetch_fallbacks_total`, and left to containerd's
//! own fetch. Only failures containerd would hit as well (corrupt or stalled blobs) end the pull
//! with pullgate's error, which names the image, the blob and the cause.

mod blob;
pub mod progress;
mod shared;
mod unpack;

use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use futures_util::future::BoxFuture;
use futures_util::{FutureExt, StreamExt, TryStreamExt};
use tokio::sync::oneshot;
use tracing::{debug, info, warn};

pub use blob::{ingest_ref, BlobError, BlobOutcome, BlobSpec};
use progress::{BlobProgress, JobProgress};
use shared::{Interest, SharedDownloads};

use crate::config::FetchConfig;
use crate::grpc::CapturedReply;
use crate::jobs::JobState;
use crate::metrics::{Metrics, OutcomeLabels, ReasonLabels};
use crate::pull::{ContainerdPuller, PullJob, Puller};
use crate::registry::{Credentials, ImageRef, Platform, RegistryClient, RegistryError};
use crate::schedule::{Scheduler, Ticket};
use crate::upstream::snapshots::SnapshotStore;
use crate::upstream::ContentStore;

/// What every download needs.
pub struct FetchContext {
    pub cfg: FetchConfig,
    pub scheduler: Arc<Scheduler>,
    pub store: ContentStore,
    pub snapshots: SnapshotStore,
    pub registry: RegistryClient,
    pub metrics: Arc<Metrics>,
    pub platform: Platform,
    /// The snapshotter layers are unpacked ahead into, once known.
    snapshotter: tokio::sync::OnceCell<String>,
}

impl FetchContext {
    pub fn new(
        cfg: FetchConfig,
        scheduler: Arc<Scheduler>,
        store: ContentStore,
        snapshots: SnapshotStore,
        registry: RegistryClient,
        metrics: Arc<Metrics>,
        platform: Platform,
    ) -> Self {
        FetchContext {
            cfg,
            scheduler,
            store,
            snapshots,
            registry,
            metrics,
            platform,
            snapshotter: Default::default(),
        }
    }

    /// The snapshotter to unpack ahead into: configured, or asked of containerd's CRI plugin
    /// (once). `None`: unpacking ahead is off or containerd did not say.
    async fn snapshotter(&self) -> Option<String> {
        if !self.cfg.unpack_ahead {
            return None;
        }
        if !self.cfg.snapshotter.is_empty() {
            return Some(self.cfg.snapshotter.clone());
        }
        let found = self
            .snapshotter
            .get_or_try_init(|| async {
                let name = self.snapshots.cri_snapshotter().await?;
                info!(
                    snapshotter = name,
                    "unpacking ahead into containerd's CRI snapshotter"
                );
                Ok::<_, tonic::Status>(name)
            })
            .await;
        match found {
            Ok(name) => Some(name.clone()),
            Err(s) => {
                warn!(
                    error = s.message(),
                    "cannot ask containerd's CRI plugin for its snapshotter; containerd unpacks \
                     this pull itself (set fetch.snapshotter to unpack ahead)"
                );
                None
            }
        }
    }
}

/// A [`Puller`] that fetches blobs itself, then lets containerd finish.
pub struct LayerFetcher {
    ctx: Arc<FetchContext>,
    finish: ContainerdPuller,
    shared: Arc<SharedDownloads>,
    /// Leases left by an earlier pullgate process (crash, kill). They still protect unfinished
    /// ingests that a new pull resumes; they go once a pull has completed.
    stale_leases: Arc<Mutex<Vec<String>>>,
}

/// Why the fetcher handed a pull to containerd.
struct Fallback {
    reason: &'static str,
    detail: String,
}

enum Prepared {
    Ready(Downloads),
    Fallback(Fallback),
}

/// Every missing blob is claimed: `blobs` completes when all are in the store; `unpack`, when
/// given, extracts layers as they arrive and must be polled alongside.
struct Downloads {
    blobs: BoxFuture<'static, Result<(), BlobError>>,
    unpack: Option<BoxFuture<'static, ()>>,
}

impl LayerFetcher {
    pub fn new(ctx: FetchContext, finish: ContainerdPuller) -> Self {
        LayerFetcher {
            ctx: Arc::new(ctx),
            finish,
            shared: Arc::new(SharedDownloads::default()),
            stale_leases: Default::default(),
        }
    }

    /// Takes note of the leases an earlier pullgate process left behind. Call before serving.
    pub async fn adopt_stale_leases(&self) {
        match self.ctx.store.pullgate_leases().await {
            Ok(ids) if !ids.is_empty() => {
                info!(
                    count = ids.len(),
                    "found leases of an earlier pullgate run; \
                      their unfinished downloads will be resumed"
                );
                *self.stale_leases.lock().unwrap() = ids;
            }
            Ok(_) => {}
            Err(e) => debug!(error = e.message(), "cannot list leases"),
        }
    }
}

impl Puller for LayerFetcher {
    fn pull(&self, job: PullJob) -> BoxFuture<'static, CapturedReply> {
        let ctx = self.ctx.clone();
        let finish = self.finish.clone();
        let shared = self.shared.clone();
        let stale_leases = self.stale_leases.clone();
        async move {
            let progress = job.record.progress.clone();
            // Leaves the scheduler (freeing its slots) however the pull ends.
            let ticket = ctx.scheduler.enter(job.record.clone());
            ticket.wait_gate().await;
            let lease = format!("pullgate-{}-{}", job.id, unique());
            let guard = LeaseGuard {
                store: ctx.store.clone(),
                id: Some(lease.clone()),
            };
            let outcome = prepare(&ctx, &shared, &job, &lease, &progress, &ticket).await;
            let reply = match outcome {
                Prepared::Ready(downloads) => {
                    fetch_then_finish(&ctx, downloads, &finish, job, &ticket).await
                }
                Prepared::Fallback(f) => {
                    count_fallback(&ctx, f);
                    // containerd's own fetch cannot be paced, but it still takes its turn.
                    ticket.admit(None).await;
                    finish_in_containerd(&ctx, &finish, job).await
                }
            };
            drop(ticket);
            // The image record now references the content; the lease has done its job.
            guard.release().await;
            if reply.status().code() == tonic::Code::Ok {
                let stale = std::mem::take(&mut *stale_leases.lock().unwrap());
                for id in stale {
                    delete_lease(&ctx.store, &id).await;
                }
            }
            reply
        }
        .boxed()
    }
}

/// Deletes the job's lease when the pull ends, and also when it is cancelled (dropped).
struct LeaseGuard {
    store: ContentStore,
    id: Option<String>,
}

impl LeaseGuard {
    async fn release(mut self) {
        if let Some(id) = self.id.take() {
            delete_lease(&self.store, &id).await;
        }
    }
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        if let Some(id) = self.id.take() {
            let store = self.store.clone();
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move { delete_lease(&store, &id).await });
            }
        }
    }
}

async fn delete_lease(store: &ContentStore, id: &str) {
    if let Err(e) = store.delete_lease(id).await {
        debug!(
            lease = id,
            error = e.message(),
            "lease not deleted; it expires by itself"
        );
    }
}

/// containerd's finish step (unpack what is left, record the image), once an unpack slot is free.
fn finish_in_containerd(
    ctx: &Arc<FetchContext>,
    finish: &ContainerdPuller,
    job: PullJob,
) -> BoxFuture<'static, CapturedReply> {
    let unpacks = ctx.scheduler.unpacks.clone();
    let finish = finish.clone();
    async move {
        let _slot = unpacks.acquire(job.record.watch_priority()).await;
        finish.pull(job).await
    }
    .boxed()
}

fn unique() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default()
}

async fn prepare(
    ctx: &Arc<FetchContext>,
    shared: &Arc<SharedDownloads>,
    job: &PullJob,
    lease: &str,
    progress: &JobProgress,
    ticket: &Ticket,
) -> Prepared {
    let fallback = |reason, detail: String| Prepared::Fallback(Fallback { reason, detail });
    let image = match ImageRef::parse(&job.info.image) {
        Ok(i) => i,
        Err(e) => return fallback("reference", e.to_string()),
    };
    let creds = job
        .info
        .auth
        .as_ref()
        .map(Credentials::from_auth_config)
        .unwrap_or(Credentials::Anonymous);
    if let Err(s) = ctx
        .store
        .create_lease(lease, job.id, ctx.cfg.lease_expiry)
        .await
    {
        return fallback("content_api", s.message().to_string());
    }
    let resolved = match ctx.registry.resolve(&image, &creds, &ctx.platform).await {
        Ok(r) => r,
        Err(e) => return fallback(fallback_reason(&e), e.to_string()),
    };
    debug!(manifest = %resolved.manifest.descriptor.digest(), layers = resolved.layers.len(),
           "resolved");

    // Index and manifest are small and already in hand.
    for m in resolved
        .index
        .iter()
        .chain(std::iter::once(&resolved.manifest))
    {
        let digest = m.descriptor.digest().to_string();
        let media_type = m.descriptor.media_type().to_string();
        if let Err(e) =
            blob::write_small(&ctx.store, &media_type, &digest, m.bytes.clone(), lease).await
        {
            return fallback("content_api", e.message().to_string());
        }
    }

    let blobs: Vec<BlobSpec> = std::iter::once(&resolved.config)
        .chain(resolved.layers.iter())
        .map(BlobSpec::from_descriptor)
        .collect();
    let total: u64 = blobs.iter().map(|b| b.size).sum();
    ticket.admit(Some(total)).await;
    info!(
        blobs = blobs.len(),
        bytes = total,
        lane = ticket.in_lane(),
        "fetching into containerd's content store"
    );
    // Claim every missing blob now, so that nothing else (containerd included) starts a second
    // download of it.
    let mut claimed = Vec::with_capacity(blobs.len());
    for spec in &blobs {
        match blob::claim(&ctx.store, spec, lease).await {
            Ok(w) => claimed.push(w),
            Err(s) => return fallback("content_api", s.message().to_string()),
        }
    }
    // One signal per blob (config first, then layers) for unpacking ahead.
    let (committed_tx, mut committed_rx): (Vec<_>, Vec<_>) =
        blobs.iter().map(|_| oneshot::channel::<()>()).unzip();
    let unpack = ctx.cfg.unpack_ahead && !resolved.layers.is_empty();
    let unpack = unpack.then(|| {
        let layers = resolved
            .layers
            .iter()
            .zip(committed_rx.drain(1..))
            .map(|(d, committed)| unpack::PendingLayer {
                descriptor: d.clone(),
                committed,
            })
            .collect();
        let job = unpack::UnpackJob {
            config_digest: resolved.config.digest().to_string(),
            config_committed: committed_rx.remove(0),
            layers,
            lease: lease.to_string(),
            priority: job.record.watch_priority(),
        };
        unpack::run(ctx.clone(), job).boxed()
    });
    // Built eagerly: each future owns what it needs and outlives this function.
    let downloads: Vec<_> = blobs
        .into_iter()
        .zip(claimed)
        .zip(committed_tx)
        .map(|((spec, writer), committed)| {
            let p = BlobProgress::new(spec.digest.clone(), spec.size);
            progress.add(p.clone());
            let (ctx, shared) = (ctx.clone(), shared.clone());
            let (image, creds, lease) = (image.clone(), creds.clone(), lease.to_string());
            let priority = job.record.watch_priority();
            async move {
                let digest = spec.digest.clone();
                let (res, joined) = shared
                    .run(&digest, priority.clone(), {
                        let (ctx, lease) = (ctx.clone(), lease.clone());
                        move |interest: Arc<Interest>| {
                            async move {
                                // Present blobs need no stream.
                                let _slot = match writer.is_some() {
                                    true => Some(ctx.scheduler.streams.acquire(priority).await),
                                    false => None,
                                };
                                let src = blob::BlobSource {
                                    image,
                                    creds,
                                    lease,
                                };
                                blob::download(ctx, src, spec, p, writer, interest).await
                            }
                            .boxed()
                        }
                    })
                    .await;
                res?;
                if joined {
                    ctx.metrics
                        .blobs
                        .get_or_create(&OutcomeLabels { outcome: "shared" })
                        .inc();
                }
                // Present or written by another job: this job's lease must hold it too.
                ctx.store
                    .lease_content(&lease, &digest)
                    .await
                    .map_err(|status| BlobError::Store { digest, status })?;
                let _ = committed.send(());
                Ok(())
            }
        })
        .collect();
    let parallel = ctx.cfg.parallel_blobs;
    Prepared::Ready(Downloads {
        blobs: futures_util::stream::iter(downloads)
            .buffered(parallel)
            .try_collect::<Vec<()>>()
            .map(|r| r.map(|_| ()))
            .boxed(),
        unpack,
    })
}

/// Runs the downloads (and the unpacking ahead beside them), then lets containerd finish. A
/// download failure containerd would hit too ends the pull with pullgate's error; one that
/// containerd may get past (fallback) lets containerd fetch what is missing.
///
/// containerd is asked only once the blobs are in: containerd waiting on an ingest lock pullgate
/// holds polls with random backoff (up to 2 s) and a metadata write and fsync per try, which made
/// small pulls 2-5x slower and let paused prewarm jobs slow every other pull on the node.
/// Unpacking ahead gives back the overlap of fetch and unpack without that.
async fn fetch_then_finish(
    ctx: &Arc<FetchContext>,
    downloads: Downloads,
    finish: &ContainerdPuller,
    job: PullJob,
    ticket: &Ticket,
) -> CapturedReply {
    let image = job.info.image.clone();
    let record = job.record.clone();
    let started = std::time::Instant::now();
    let mut blobs = downloads.blobs;
    let mut unpack = downloads.unpack.unwrap_or_else(|| async {}.boxed()).fuse();
    let mut unpacked = false;
    let fetched = loop {
        tokio::select! {
            r = &mut blobs => break r,
            _ = &mut unpack, if !unpacked => unpacked = true,
        }
    };
    match fetched {
        Ok(()) => {
            debug!(elapsed = ?started.elapsed(), "all blobs in the content store");
            ticket.fetched();
            record.set_state(JobState::Finishing);
            if !unpacked {
                unpack.await;
            }
            finish_in_containerd(ctx, finish, job).await
        }
        Err(BlobError::Fallback(detail)) => {
            count_fallback(
                ctx,
                Fallback {
                    reason: "registry",
                    detail,
                },
            );
            finish_in_containerd(ctx, finish, job).await
        }
        Err(e) => CapturedReply::from_status(e.status(&image)),
    }
}

fn count_fallback(ctx: &FetchContext, f: Fallback) {
    warn!(reason = f.reason, detail = %f.detail,
          "fetcher cannot handle this pull; containerd fetches it");
    ctx.metrics
        .fetch_fallbacks
        .get_or_create(&ReasonLabels { reason: f.reason })
        .inc();
}

fn fallback_reason(e: &RegistryError) -> &'static str {
    match e {
        RegistryError::Unsupported(_) => "unsupported",
        RegistryError::Unauthorized(_) => "unauthorized",
        RegistryError::NotFound(_) => "not_found",
        _ => "registry",
    }
}
