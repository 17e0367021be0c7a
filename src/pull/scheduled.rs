//! The scheduled pull: resolve the image to learn its blobs, put them in the mirror's demand
//! table, wait for admission, then forward the original request for containerd to pull through
//! the mirror.
//!
//! ```text
//! prewarm: enter ─▶ P2P gate ─▶ resolve (requester's credentials) ─▶ register demand
//!                ─▶ admit (prewarm cap, large-image lane) ─▶ containerd PullImage
//!                   (a lane job hands the lane on once its last blob has reached containerd)
//! urgent:  enter ─▶ admit ─┬▶ containerd PullImage
//!                          └▶ resolve ─▶ register demand (the mirror holds early requests)
//! ```
//! containerd fetches, verifies, stores and unpacks as it always does; the mirror serves it the
//! manifest resolved here (one resolution per pull) and paces the blobs. A pull pullgate cannot
//! resolve (registry down, unknown auth scheme, not found) still takes its turn and is forwarded:
//! containerd then fetches from its other hosts and answers with its own error if it fails too.
//! Each forwarded pull runs under a lease pullgate creates ([`crate::upstream::leases`]), so a
//! pull cut short keeps what containerd downloaded for the next attempt, while the disk has room
//! ([`super::partials`]).

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::FutureExt;
use tracing::{debug, info, warn};

use super::partials::{Partials, PullLease};
use super::slots::{crowded, SlotBook};
use super::stage::{blobs_of, Blob, Stager};
use super::{ContainerdPuller, PullJob, Puller};
use crate::config::Preempt;
use crate::grpc::CapturedReply;
use crate::jobs::JobRecord;
use crate::metrics::{Metrics, ReasonLabels};
use crate::mirror::hosts_dir::HostsKeeper;
use crate::mirror::{Demand, Registration};
use crate::registry::{Credentials, ImageRef, Platform, RegistryClient, RegistryError};
use crate::schedule::{Scheduler, Ticket};
use crate::upstream::content::{abort_ingest, failed_commit_ref};
use crate::upstream::leases::LEASE_HEADER;
use crate::upstream::Containerd;
use crate::vocab::JobState;

/// The longest a failed pull's reply waits for its kept downloads to be settled (deleted with
/// containerd's GC run, on a full disk): containerd freed 300 MB in well under a second here.
const SETTLE_WAIT: Duration = Duration::from_secs(10);

/// Below this shared limit a 4-layer prewarm crowds a pod out (config and layers, plus the
/// pod's 3): pullgate says so at the first pull.
const ROOMY_SLOTS: usize = 8;

/// A [`Puller`] that admits each job before containerd pulls it through the mirror.
pub struct ScheduledPuller {
    scheduler: Arc<Scheduler>,
    demand: Arc<Demand>,
    registry: RegistryClient,
    finish: ContainerdPuller,
    metrics: Arc<Metrics>,
    platform: Platform,
    /// Re-checks pullgate's hosts.toml entry for the image's registry before each pull.
    hosts: Option<HostsKeeper>,
    /// The leases that keep a failed pull's downloads for its next attempt.
    resume: Option<Arc<Partials>>,
    /// Hand prewarm pulls back from containerd while a pod's pull runs.
    preempt: Preempt,
    /// For `Preempt::Auto`: containerd's version and its config file decide, read once.
    containerd: Containerd,
    containerd_config: PathBuf,
    shared_slots: tokio::sync::OnceCell<Option<usize>>,
    /// containerd's shared download slots that forwarded prewarm pulls may hold.
    slots: SlotBook,
    /// Writes prewarm blobs into containerd's store before the pull is forwarded, and when.
    stager: Option<Stager>,
    stage: Preempt,
}

impl ScheduledPuller {
    /// Pulls for this node's platform through `containerd`, with no hosts.toml keeper, no kept
    /// partial downloads and `Preempt::Auto`; the `with_` methods set those.
    pub fn new(
        scheduler: Arc<Scheduler>,
        demand: Arc<Demand>,
        registry: RegistryClient,
        containerd: Containerd,
        metrics: Arc<Metrics>,
    ) -> ScheduledPuller {
        ScheduledPuller {
            scheduler,
            demand,
            registry,
            finish: ContainerdPuller::new(containerd.clone()),
            metrics,
            platform: Platform::node(),
            hosts: None,
            resume: None,
            preempt: Preempt::Auto,
            containerd,
            containerd_config: PathBuf::new(),
            shared_slots: Default::default(),
            slots: SlotBook::default(),
            stager: None,
            stage: Preempt::Auto,
        }
    }

    /// Stages prewarm blobs into containerd's store (`when`: see `containerd.stage_prewarm`).
    pub fn with_stager(mut self, stager: Option<Stager>, when: Preempt) -> Self {
        self.stager = stager;
        self.stage = when;
        self
    }

    /// Re-checks pullgate's hosts.toml entry for each pull's registry.
    pub fn with_hosts(mut self, hosts: Option<HostsKeeper>) -> Self {
        self.hosts = hosts;
        self
    }

    /// Keeps a failed pull's downloads under a lease for its next attempt.
    pub fn with_partials(mut self, partials: Option<Arc<Partials>>) -> Self {
        self.resume = partials;
        self
    }

    /// When prewarm pulls are handed back from containerd for a pod's pull; `auto` reads
    /// containerd's download limit from `containerd_config`.
    pub fn with_preempt(mut self, preempt: Preempt, containerd_config: &Path) -> Self {
        self.preempt = preempt;
        self.containerd_config = containerd_config.to_path_buf();
        self
    }
}

impl Puller for Arc<ScheduledPuller> {
    fn pull(&self, job: PullJob) -> BoxFuture<'static, CapturedReply> {
        let me = self.clone();
        async move {
            // Leaves the scheduler (prewarm slot, lane, urgent share of the link) however the
            // pull ends, dropped or not.
            let ticket = me.scheduler.enter(job.record.clone());
            ticket.wait_gate().await;
            let image = me.image(&job);
            let creds = job
                .info
                .auth
                .as_ref()
                .map(Credentials::from_auth_config)
                .unwrap_or(Credentials::Anonymous);
            let record = job.record.clone();
            let mut job = job;
            let (registration, (reply, lease)) = if record.priority().is_urgent() {
                // A pod waits: containerd starts at once, its own resolution of the tag beside
                // pullgate's, and the mirror holds requests for the repository until pullgate's
                // lands (one registry round trip less than resolving first).
                let resolving = image.as_ref().map(|i| me.demand.resolving(i));
                ticket.admit(None).await;
                info!("urgent: forwarded at once, containerd pulls through the mirror");
                let forward = async {
                    let lease = me.resume_lease(&mut job).await;
                    (me.forward(job, None).await, lease)
                };
                let resolve = async {
                    let r = me.resolve(&record, &creds, image).await;
                    if let Some((_, size, _)) = &r {
                        record.set_size(*size);
                    }
                    drop(resolving);
                    r
                };
                tokio::join!(resolve, forward)
            } else {
                let registration = me.resolve(&record, &creds, image).await;
                let size = registration.as_ref().map(|(_, s, _)| *s);
                let blobs = registration.as_ref().map(|(_, _, l)| l.len());
                let staged = registration
                    .as_ref()
                    .map(|(_, _, l)| l.clone())
                    .unwrap_or_default();
                // containerd's own fetch of an unresolved image cannot be paced, but it still
                // takes its turn.
                ticket.admit(size).await;
                info!(
                    bytes = size,
                    lane = ticket.in_lane(),
                    "admitted: containerd pulls through the mirror"
                );
                let lease = me.resume_lease(&mut job).await;
                let work = me.stage_then_forward(job, blobs, staged);
                let reply = if ticket.in_lane() {
                    forward_in_lane(&ticket, &record, work).await
                } else {
                    work.await
                };
                (registration, (reply, lease))
            };
            drop(ticket);
            drop(registration);
            if reply.status().code() == tonic::Code::Ok {
                // Off the requester's path: the reply does not wait on containerd's metadata
                // write.
                if let (Some(p), Some(l)) = (me.resume.clone(), lease) {
                    tokio::spawn(async move { p.succeeded(l).await });
                }
            } else {
                me.drop_corrupt_ingest(reply.status().message()).await;
                // Before the reply, so a full disk is freed by the time the requester retries;
                // bounded, so a slow containerd GC never holds the reply (the work goes on).
                if let Some(p) = me.resume.clone() {
                    let message = reply.status().message().to_string();
                    let settle = tokio::spawn(async move { p.failed(lease, &message).await });
                    if tokio::time::timeout(SETTLE_WAIT, settle).await.is_err() {
                        warn!(wait = ?SETTLE_WAIT, "freeing the failed pull's downloads takes \
                              longer than usual: answering now, containerd's GC goes on");
                    }
                }
            }
            reply
        }
        .boxed()
    }
}

/// Runs a lane job's forwarded pull, and hands the lane to the next image as soon as every blob
/// has reached containerd: unpacking needs neither the link nor the P2P caches, and a lane held
/// through it leaves both idle. If containerd already had a blob (it then never asks the mirror
/// for it), the lane is held until the pull ends, as before.
async fn forward_in_lane(
    ticket: &Ticket,
    record: &JobRecord,
    forward: impl Future<Output = CapturedReply>,
) -> CapturedReply {
    tokio::pin!(forward);
    tokio::select! {
        biased;
        () = record.progress.completed() => {
            // Logged first: the next image's admission is logged as soon as the lane is free.
            // Only this job's ticket can take the lane from it once admitted.
            if ticket.in_lane() {
                info!("bytes in: the lane moves on while containerd unpacks");
                ticket.leave_lane();
            }
            forward.await
        }
        reply = &mut forward => reply,
    }
}

impl ScheduledPuller {
    /// The job's image, its registry's hosts.toml entry checked (containerd reads it when the
    /// pull is forwarded). `None`: containerd pulls it unscheduled.
    fn image(&self, job: &PullJob) -> Option<ImageRef> {
        match ImageRef::parse(&job.info.image) {
            Ok(image) => {
                if let Some(h) = &self.hosts {
                    h.ensure(&image.registry);
                }
                Some(image)
            }
            Err(e) => {
                self.unresolved("reference", &e.to_string());
                None
            }
        }
    }

    /// Resolves `image` with the requester's credentials and registers its manifests and blobs
    /// with the mirror; with the image's size and its blobs (config and layers).
    /// `None`: containerd pulls it unscheduled.
    async fn resolve(
        &self,
        record: &Arc<JobRecord>,
        creds: &Credentials,
        image: Option<ImageRef>,
    ) -> Option<(Registration, u64, Vec<Blob>)> {
        let image = image?;
        match self.registry.resolve(&image, creds, &self.platform).await {
            Ok(resolved) => {
                let size = std::iter::once(&resolved.config)
                    .chain(&resolved.layers)
                    .map(|d| d.size())
                    .sum::<u64>();
                debug!(manifest = %resolved.manifest.descriptor.digest(),
                       layers = resolved.layers.len(), bytes = size, "resolved");
                let reg = self.demand.register(record, &image, creds, &resolved);
                let blobs = blobs_of(&image, &resolved);
                Some((reg, size, blobs))
            }
            Err(e) => {
                self.unresolved(reason(&e), &e.to_string());
                None
            }
        }
    }

    /// A blob that failed containerd's verification must not stay as a complete ingest (kept by
    /// the lease, the next attempt would fail its commit again): it is aborted.
    async fn drop_corrupt_ingest(&self, message: &str) {
        let (Some(reference), Some(partials)) = (failed_commit_ref(message), &self.resume) else {
            return;
        };
        let (channel, namespace) = partials.leases().channel();
        match abort_ingest(channel.clone(), namespace, reference).await {
            Ok(()) => info!(
                ingest = reference,
                "corrupt download dropped: the next attempt fetches it again"
            ),
            Err(e) => warn!(
                ingest = reference,
                error = e.message(),
                "cannot drop the corrupt download"
            ),
        }
    }

    /// Stages the prewarm pull's blobs into containerd's store where that applies, then
    /// forwards it; the staged blobs are no longer counted as slots it may hold.
    async fn stage_then_forward(
        &self,
        job: PullJob,
        blobs: Option<usize>,
        list: Vec<Blob>,
    ) -> CapturedReply {
        let staged = self.stage_first(&job, blobs, &list).await.unwrap_or(0);
        self.forward(job, blobs.map(|b| b.saturating_sub(staged)))
            .await
    }

    /// Writes `list` into containerd's store first, when `containerd.stage_prewarm` says so;
    /// `None`: not staged. Stops as soon as a pod's pull joins the job (promoted, it is forwarded
    /// at once; containerd resumes what was written).
    async fn stage_first(
        &self,
        job: &PullJob,
        blobs: Option<usize>,
        list: &[Blob],
    ) -> Option<usize> {
        let stager = self.stager.as_ref()?;
        // Without the pull's lease, containerd's GC could drop a staged blob before the image
        // holds it.
        let lease = job.request.headers.get(LEASE_HEADER)?.to_str().ok()?;
        if list.is_empty() || job.record.priority().is_urgent() {
            return None;
        }
        let wanted = match self.stage {
            Preempt::Never => false,
            Preempt::Always => true,
            // Where the pull would be handed back for a pod's.
            Preempt::Auto => match self.hand_back_limit().await {
                Some(limit) => crowded(limit, blobs.unwrap_or(limit)),
                None => false,
            },
        };
        if !wanted {
            return None;
        }
        let mut prio = job.record.watch_priority();
        let promoted = async {
            if prio.wait_for(|p| p.is_urgent()).await.is_err() {
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            n = stager.stage(job.record.id, lease, list) => Some(n),
            () = promoted => {
                info!("a pod's pull joined the prewarm while its blobs were staged: forwarded at once");
                None
            }
        }
    }

    /// containerd's download limit a prewarm pull may be handed back for (`None`: never).
    async fn hand_back_limit(&self) -> Option<usize> {
        match self.preempt {
            Preempt::Never => None,
            Preempt::Always => Some(0),
            Preempt::Auto => self.shared_download_slots().await,
        }
    }

    /// Forwards the pull to containerd. A prewarm pull is handed back (the call dropped, which
    /// cancels containerd's pull; its downloads stay under the lease) while a pod's pull runs,
    /// and forwarded again once none does, when containerd shares one download limit between
    /// all pulls and the prewarm pulls forwarded could crowd a pod out of it ([`super::slots`]).
    /// `blobs`: the prewarm image's config and layers (`None`: unknown, taken as the whole
    /// limit).
    async fn forward(&self, job: PullJob, blobs: Option<usize>) -> CapturedReply {
        // A pod's pull is never handed back (and does not wait on reading containerd's limit).
        if job.record.priority().is_urgent() {
            return self.finish.pull(job).await;
        }
        let Some(limit) = self.hand_back_limit().await else {
            return self.finish.pull(job).await;
        };
        let holds = blobs.unwrap_or(limit);
        let mut urgent = self.scheduler.urgent_jobs();
        let mut prio = job.record.watch_priority();
        let mut held = self.slots.watch();
        loop {
            let slots = self.slots.hold(holds);
            let fwd = self.finish.pull(job.clone());
            let yield_now = until(&mut urgent, &mut prio, &mut held, |u, p, h| {
                u > 0 && !p.is_urgent() && crowded(limit, h)
            });
            tokio::select! {
                reply = fwd => return reply,
                () = yield_now => {}
            }
            drop(slots);
            info!(
                limit,
                "a pod's pull is waiting and containerd's shared download slots are crowded: \
                 prewarm pull handed back by containerd until it is done (its downloads are kept)"
            );
            self.metrics.preemptions.inc();
            job.record.set_state(JobState::Queued);
            until(&mut urgent, &mut prio, &mut held, |u, p, _| {
                u == 0 || p.is_urgent()
            })
            .await;
            job.record.set_state(JobState::Fetching);
            info!("forwarding the prewarm pull again");
        }
    }

    /// containerd 2.x: its transfer service limits the downloads of every pull with one
    /// semaphore, of the size its config file sets. `None`: each pull has its own (containerd
    /// 1.x, or 2.x pulling without the transfer service). containerd down at the first pull:
    /// 2.x and its default limit are assumed, the safe side.
    async fn shared_download_slots(&self) -> Option<usize> {
        *self
            .shared_slots
            .get_or_init(|| async {
                let v = self.containerd.version(Duration::from_secs(5)).await;
                let major = v.as_deref().ok().and_then(|v| {
                    v.trim_start_matches('v')
                        .split('.')
                        .next()?
                        .parse::<u32>()
                        .ok()
                });
                let slots = if major.is_none_or(|m| m >= 2) {
                    crate::mirror::containerd_config::shared_download_slots(&self.containerd_config)
                } else {
                    None
                };
                info!(
                    version = v.as_deref().unwrap_or("unknown"),
                    shared_slots = slots,
                    "containerd's download limit: prewarm pulls are handed back for a pod's \
                       pull when they could hold all but 3 of the shared slots (2.x), else paused \
                       at the mirror"
                );
                if slots.is_some_and(|n| n < ROOMY_SLOTS) {
                    warn!(shared_slots = slots, config = %self.containerd_config.display(),
                          "containerd 2.x shares few download slots between all pulls: prewarm \
                           pulls are staged into its store first (containerd.stage_prewarm) or, if \
                           staging is off, handed back while a pod's pull runs, which costs the pod \
                           containerd's cleanup; raising [plugins.\"io.containerd.transfer.v1.local\"] \
                           max_concurrent_downloads speeds prewarm up at some cost to pods (see \
                           packaging/containerd/config.toml.snippet)");
                }
                slots
            })
            .await
    }

    /// The pull's lease (see [`Partials::begin`]); `None`: containerd uses its own.
    async fn resume_lease(&self, job: &mut PullJob) -> Option<PullLease> {
        let urgent = job.record.priority().is_urgent();
        self.resume.as_ref()?.begin(job, urgent).await
    }

    fn unresolved(&self, reason: &'static str, detail: &str) {
        warn!(
            reason,
            detail, "cannot resolve the image: containerd pulls it unscheduled"
        );
        self.metrics
            .fetch_fallbacks
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }
}

/// Waits until `cond(urgent jobs, the job's priority, prewarm's held slots)` holds.
async fn until(
    urgent: &mut tokio::sync::watch::Receiver<usize>,
    prio: &mut tokio::sync::watch::Receiver<crate::vocab::Priority>,
    held: &mut tokio::sync::watch::Receiver<usize>,
    cond: impl Fn(usize, crate::vocab::Priority, usize) -> bool,
) {
    loop {
        let now = (
            *urgent.borrow_and_update(),
            *prio.borrow_and_update(),
            *held.borrow_and_update(),
        );
        if cond(now.0, now.1, now.2) {
            return;
        }
        tokio::select! {
            r = urgent.changed() => if r.is_err() { std::future::pending::<()>().await },
            r = prio.changed() => if r.is_err() { std::future::pending::<()>().await },
            r = held.changed() => if r.is_err() { std::future::pending::<()>().await },
        }
    }
}

fn reason(e: &RegistryError) -> &'static str {
    match e {
        RegistryError::Unsupported(_) => "unsupported",
        RegistryError::Unauthorized(_) => "unauthorized",
        RegistryError::NotFound(_) => "not_found",
        _ => "registry",
    }
}
