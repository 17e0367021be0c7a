//! Staging: a prewarm image's blobs written into containerd's content store by pullgate, before
//! its pull is forwarded.
//!
//! containerd 2.x limits the downloads of every pull on the node with one semaphore, and a
//! prewarm stream paused at the mirror keeps its slot; handing the pull back frees the slots but
//! makes containerd clean up the cancelled pull (the layer it was unpacking) while the pod's pull
//! waits on the disk. Staged, the bytes reach containerd's store through its content service
//! instead: under containerd's own ingest ref for the blob (so its fetcher would resume a staged
//! prefix), under the pull's lease, committed against the digest, so containerd still verifies
//! and stores every byte. The bytes come from the mirror's blob path, paced and paused by class
//! like any stream containerd opens. The forwarded pull then finds every blob present and only
//! unpacks, holding no download slot a pod's pull could wait for.

use std::sync::Arc;

use futures_util::future::BoxFuture;
use futures_util::{FutureExt, StreamExt};
use http_body_util::BodyExt;
use tonic::transport::Channel;
use tracing::{debug, info, warn};

use crate::metrics::Metrics;
use crate::mirror::{Key, Mirror};
use crate::registry::{Descriptor, ImageRef, Resolved};
use crate::upstream::ingest::{ref_key, Ingest, Opened};

/// Blobs written at once: containerd's own per-pull default.
const AT_ONCE: usize = 3;

/// One blob to stage.
#[derive(Clone, Debug)]
pub struct Blob {
    key: Key,
    /// containerd's ingest ref (`remotes.MakeRefKey`).
    reference: String,
    size: u64,
}

/// The config and layers of `resolved`, pulled as `image`.
pub fn blobs_of(image: &ImageRef, resolved: &Resolved) -> Vec<Blob> {
    let blob = |d: &Descriptor, kind: &str| {
        let digest = d.digest().to_string();
        Blob {
            key: Key {
                registry: image.registry.clone(),
                repository: image.repository.clone(),
                name: digest.clone(),
            },
            reference: ref_key(kind, &digest),
            size: d.size(),
        }
    };
    std::iter::once(blob(&resolved.config, "config"))
        .chain(resolved.layers.iter().map(|d| {
            let kind = if is_layer(d.media_type().as_ref()) {
                "layer"
            } else {
                "unknown"
            };
            blob(d, kind)
        }))
        .collect()
}

/// containerd's `images.IsLayerType`: its fetcher names such ingests `layer-<digest>`.
fn is_layer(media_type: &str) -> bool {
    media_type.starts_with("application/vnd.oci.image.layer.")
        || media_type.starts_with("application/vnd.docker.image.rootfs.")
}

/// Writes blobs into containerd's content store.
pub struct Stager {
    mirror: Arc<Mirror>,
    channel: Channel,
    namespace: String,
    metrics: Arc<Metrics>,
}

impl Stager {
    pub fn new(mirror: Arc<Mirror>, channel: Channel, namespace: String) -> Stager {
        Stager {
            metrics: mirror.metrics.clone(),
            mirror,
            channel,
            namespace,
        }
    }

    /// Writes job `job`'s `blobs` under `lease`; returns how many are in containerd's store
    /// now (written, or there already). A blob that fails is left for containerd to fetch (its
    /// written prefix stays as the ingest containerd resumes).
    pub async fn stage(&self, job: u64, lease: &str, blobs: &[Blob]) -> usize {
        let started = std::time::Instant::now();
        // Boxed first: a stream of borrowing closures' futures is not provably `Send`.
        let writes: Vec<BoxFuture<'_, bool>> = blobs
            .iter()
            .map(|b| self.one(job, lease, b).boxed())
            .collect();
        let done = futures_util::stream::iter(writes)
            .buffer_unordered(AT_ONCE)
            .filter(|r| std::future::ready(*r))
            .count()
            .await;
        info!(staged = done, blobs = blobs.len(), took = ?started.elapsed(),
              "prewarm blobs in containerd's store: forwarding the pull to unpack");
        done
    }

    async fn one(&self, job: u64, lease: &str, blob: &Blob) -> bool {
        match self.write(job, lease, blob).await {
            Ok(()) => {
                self.metrics.staged_blobs.inc();
                true
            }
            Err(why) => {
                self.metrics.staged_fallbacks.inc();
                warn!(
                    blob = blob.key.name,
                    why, "cannot stage the blob: containerd fetches it"
                );
                false
            }
        }
    }

    async fn write(&self, job: u64, lease: &str, blob: &Blob) -> Result<(), String> {
        let opened = Ingest::open(
            self.channel.clone(),
            &self.namespace,
            lease,
            &blob.reference,
            &blob.key.name,
            blob.size,
        )
        .await
        .map_err(|s| format!("containerd: {}", s.message()))?;
        let mut ingest = match opened {
            Opened::Exists => {
                debug!(blob = blob.key.name, "already in containerd's store");
                // Counted as arrived, so a lane job hands the lane on.
                self.mirror.demand.progress(&blob.key, blob.size);
                return Ok(());
            }
            Opened::Writing(i) => i,
        };
        let from = ingest.offset();
        let mut body = self
            .mirror
            .blob_body(blob.key.clone(), job, from)
            .await
            .map_err(|why| format!("mirror: {why}"))?;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| format!("upstream: {e}"))?;
            if let Ok(data) = frame.into_data() {
                ingest
                    .write(data)
                    .await
                    .map_err(|s| format!("containerd: {}", s.message()))?;
            }
        }
        ingest
            .commit()
            .await
            .map_err(|s| format!("containerd's commit: {}", s.message()))?;
        debug!(blob = blob.key.name, from, "staged");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ingest_refs_are_containerds() {
        assert!(is_layer("application/vnd.oci.image.layer.v1.tar+gzip"));
        assert!(is_layer(
            "application/vnd.docker.image.rootfs.diff.tar.gzip"
        ));
        assert!(!is_layer("application/vnd.oci.image.config.v1+json"));
    }
}
