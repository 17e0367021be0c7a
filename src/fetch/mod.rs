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

use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use futures_util::future::BoxFuture;
use futures_util::{FutureExt, StreamExt, TryStreamExt};
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
use crate::upstream::ContentStore;

/// What every download needs.
pub struct FetchContext {
    pub cfg: FetchConfig,
    pub scheduler: Arc<Scheduler>,
    pub store: ContentStore,
    pub registry: RegistryClient,
    pub metrics: Arc<Metrics>,
    pub platform: Platform,
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
    /// Every missing blob is claimed; the future completes when all are in the store.
    Ready(BoxFuture<'static, Result<(), BlobError>>),
    Fallback(Fallback),
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
                    finish_while_fetching(&ctx, downloads, &finish, job, &ticket).await
                }
                Prepared::Fallback(f) => {
                    count_fallback(&ctx, f);
                    // containerd's own fetch cannot be paced, but it still takes its turn.
                    ticket.admit(None).await;
                    unpack(&ctx, &finish, job).await
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

/// containerd's finish step, once an unpack slot is free.
fn unpack(
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
    // Claim every missing blob now: containerd, asked to finish while the bytes are still
    // coming, then waits on each ingest instead of fetching the blob itself, and unpacks each
    // layer as soon as it is committed (as its own pull overlaps fetch and unpack).
    let mut claimed = Vec::with_capacity(blobs.len());
    for spec in &blobs {
        match blob::claim(&ctx.store, spec, lease).await {
            Ok(w) => claimed.push(w),
            Err(s) => return fallback("content_api", s.message().to_string()),
        }
    }
    // Built eagerly: each future owns what it needs and outlives this function.
    let downloads: Vec<_> = blobs
        .into_iter()
        .zip(claimed)
        .map(|(spec, writer)| {
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
                    .map_err(|status| BlobError::Store { digest, status })
            }
        })
        .collect();
    let parallel = ctx.cfg.parallel_blobs;
    Prepared::Ready(
        futures_util::stream::iter(downloads)
            .buffered(parallel)
            .try_collect::<Vec<()>>()
            .map(|r| r.map(|_| ()))
            .boxed(),
    )
}

/// Runs the downloads and containerd's finish side by side. A download failure containerd would
/// hit too ends the pull with pullgate's error (containerd's call is cancelled first); one that
/// containerd may get past (fallback) lets containerd fetch what is missing.
async fn finish_while_fetching(
    ctx: &Arc<FetchContext>,
    mut downloads: BoxFuture<'static, Result<(), BlobError>>,
    finish: &ContainerdPuller,
    job: PullJob,
    ticket: &Ticket,
) -> CapturedReply {
    let image = job.info.image.clone();
    let record = job.record.clone();
    let started = std::time::Instant::now();
    // containerd is asked to finish once the blobs are in. containerd waiting on an ingest lock
    // pullgate holds polls with random backoff (up to 2 s) and a metadata write and fsync per
    // try: on containerd 1.6, which unpacks only after fetching anyway, overlapping made small
    // pulls 2-5x slower, and paused prewarm jobs slowed every other pull on the node.
    // `fetch.overlap_unpack` overlaps urgent jobs (and prewarm ones once promoted).
    let overlap = ctx.cfg.overlap_unpack;
    let mut priority = record.watch_priority();
    let mut early = None;
    if !overlap || !priority.borrow().is_urgent() {
        tokio::select! {
            r = &mut downloads => early = Some(r),
            _ = priority.wait_for(|p| p.is_urgent()), if overlap => {}
        }
    }
    let mut forward = unpack(ctx, finish, job);
    let fetched = match early {
        Some(r) => r,
        None => tokio::select! {
            r = &mut downloads => r,
            // containerd answered before the downloads ended: it failed on its own.
            reply = &mut forward => return reply,
        },
    };
    match fetched {
        Ok(()) => {
            debug!(elapsed = ?started.elapsed(), "all blobs in the content store");
            ticket.fetched();
            record.set_state(JobState::Finishing);
            forward.await
        }
        Err(BlobError::Fallback(detail)) => {
            count_fallback(
                ctx,
                Fallback {
                    reason: "registry",
                    detail,
                },
            );
            forward.await
        }
        Err(e) => {
            drop(forward);
            CapturedReply::from_status(e.status(&image))
        }
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
