//! The scheduled pull: resolve the image to learn its blobs, put them in the mirror's demand
//! table, wait for admission, then forward the original request for containerd to pull through
//! the mirror.
//!
//! ```text
//! enter ─▶ P2P gate (prewarm) ─▶ resolve (requester's credentials) ─▶ register demand
//!       ─▶ admit (prewarm cap, large-image lane; urgent at once) ─▶ containerd PullImage
//! ```
//! containerd fetches, verifies, stores and unpacks as it always does; the mirror serves it the
//! manifest resolved here (one resolution per pull) and paces the blobs. A pull pullgate cannot
//! resolve (registry down, unknown auth scheme, not found) still takes its turn and is forwarded:
//! containerd then fetches from its other hosts and answers with its own error if it fails too.

use std::sync::Arc;

use futures_util::future::BoxFuture;
use futures_util::FutureExt;
use tracing::{debug, info, warn};

use super::{ContainerdPuller, PullJob, Puller};
use crate::grpc::CapturedReply;
use crate::metrics::{Metrics, ReasonLabels};
use crate::mirror::hosts_dir::HostsKeeper;
use crate::mirror::Demand;
use crate::registry::{Credentials, ImageRef, Platform, RegistryClient, RegistryError};
use crate::schedule::Scheduler;

/// A [`Puller`] that admits each job before containerd pulls it through the mirror.
pub struct ScheduledPuller {
    pub scheduler: Arc<Scheduler>,
    pub demand: Arc<Demand>,
    pub registry: RegistryClient,
    pub finish: ContainerdPuller,
    pub metrics: Arc<Metrics>,
    pub platform: Platform,
    /// Re-checks pullgate's hosts.toml entry for the image's registry before each pull.
    pub hosts: Option<HostsKeeper>,
}

impl Puller for Arc<ScheduledPuller> {
    fn pull(&self, job: PullJob) -> BoxFuture<'static, CapturedReply> {
        let me = self.clone();
        async move {
            // Leaves the scheduler (prewarm slot, lane, urgent share of the link) however the
            // pull ends, dropped or not.
            let ticket = me.scheduler.enter(job.record.clone());
            ticket.wait_gate().await;
            let creds = job
                .info
                .auth
                .as_ref()
                .map(Credentials::from_auth_config)
                .unwrap_or(Credentials::Anonymous);
            let registration = match ImageRef::parse(&job.info.image) {
                Ok(image) => {
                    if let Some(h) = &me.hosts {
                        h.ensure(&image.registry);
                    }
                    match me.registry.resolve(&image, &creds, &me.platform).await {
                        Ok(resolved) => {
                            let size = std::iter::once(&resolved.config)
                                .chain(&resolved.layers)
                                .map(|d| d.size())
                                .sum::<u64>();
                            debug!(manifest = %resolved.manifest.descriptor.digest(),
                                   layers = resolved.layers.len(), bytes = size, "resolved");
                            let reg = me.demand.register(&job.record, &image, &creds, &resolved);
                            Some((reg, size))
                        }
                        Err(e) => {
                            me.unresolved(reason(&e), &e.to_string());
                            None
                        }
                    }
                }
                Err(e) => {
                    me.unresolved("reference", &e.to_string());
                    None
                }
            };
            let size = registration.as_ref().map(|(_, s)| *s);
            // containerd's own fetch of an unresolved image cannot be paced, but it still takes
            // its turn.
            ticket.admit(size).await;
            info!(
                bytes = size,
                lane = ticket.in_lane(),
                "admitted: containerd pulls through the mirror"
            );
            let reply = me.finish.pull(job).await;
            drop(ticket);
            drop(registration);
            reply
        }
        .boxed()
    }
}

impl ScheduledPuller {
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

fn reason(e: &RegistryError) -> &'static str {
    match e {
        RegistryError::Unsupported(_) => "unsupported",
        RegistryError::Unauthorized(_) => "unauthorized",
        RegistryError::NotFound(_) => "not_found",
        _ => "registry",
    }
}
