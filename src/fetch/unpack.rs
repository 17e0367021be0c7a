//! Unpack ahead: each layer is extracted into containerd's snapshotter as soon as it is
//! committed and its parent is extracted, while later layers still download; containerd's own
//! pull overlaps fetch and unpack the same way. When pullgate then asks containerd to finish,
//! containerd's unpacker finds every layer's chain ID present and only records the image.
//!
//! The calls are the ones containerd's unpacker makes (prepare on the parent chain, diff apply,
//! commit under the chain ID, `containerd.io/uncompressed` label), all under the job's lease.
//! Anything that goes wrong here is logged and left to containerd, which unpacks what is
//! missing itself: unpacking ahead only ever saves time.

use std::collections::HashMap;
use std::sync::Arc;

use sha2::{Digest, Sha256};
use tokio::sync::{oneshot, watch};
use tracing::{debug, info, warn};

use super::FetchContext;
use crate::metrics::ReasonLabels;
use crate::proto::containerd::types;
use crate::registry::digest::hex;
use crate::registry::Descriptor;
use crate::schedule::Priority;

/// Largest image config read (containerd's own limit for configs is far above real ones).
const CONFIG_LIMIT: u64 = 16 << 20;
/// Snapshot label containerd's unpacker sets (remote snapshotters look it up).
const SNAPSHOT_REF_LABEL: &str = "containerd.io/snapshot.ref";
/// Layer annotations with this prefix become snapshot labels, as in containerd.
const INHERITED_PREFIX: &str = "containerd.io/snapshot/";

/// One layer to extract, with the signal that its blob is committed.
pub struct PendingLayer {
    pub descriptor: Descriptor,
    pub committed: oneshot::Receiver<()>,
}

/// What an unpack-ahead run works on.
pub struct UnpackJob {
    pub config_digest: String,
    pub config_committed: oneshot::Receiver<()>,
    pub layers: Vec<PendingLayer>,
    pub lease: String,
    pub priority: watch::Receiver<Priority>,
}

/// Extracts the layers in order as they arrive. Never fails the pull: a problem is logged and
/// counted, and containerd unpacks the rest.
pub async fn run(ctx: Arc<FetchContext>, job: UnpackJob) {
    let Some(snapshotter) = ctx.snapshotter().await else {
        return;
    };
    let started = std::time::Instant::now();
    match unpack(&ctx, &snapshotter, job).await {
        Ok(Some(count)) => {
            info!(snapshotter, layers = count, elapsed = ?started.elapsed(), "layers unpacked ahead")
        }
        // A blob did not arrive: the download's own error ends the pull.
        Ok(None) => {}
        Err(e) => {
            warn!(snapshotter, error = %e, "unpacking ahead stopped; containerd unpacks the rest");
            ctx.metrics
                .fetch_fallbacks
                .get_or_create(&ReasonLabels {
                    reason: "unpack_ahead",
                })
                .inc();
        }
    }
}

/// `Ok(None)` when a blob never arrived; otherwise the number of layers extracted here.
async fn unpack(
    ctx: &FetchContext,
    snapshotter: &str,
    job: UnpackJob,
) -> Result<Option<usize>, String> {
    if job.config_committed.await.is_err() {
        return Ok(None);
    }
    let config = ctx
        .store
        .read_small(&job.config_digest, CONFIG_LIMIT)
        .await
        .map_err(|s| format!("cannot read image config: {}", s.message()))?;
    let diff_ids = diff_ids(&config)?;
    if diff_ids.len() != job.layers.len() {
        return Err(format!(
            "image config lists {} diff IDs for {} layers",
            diff_ids.len(),
            job.layers.len()
        ));
    }
    let snaps = &ctx.snapshots;
    let mut parent = String::new();
    let mut extracted = 0;
    for (layer, diff_id) in job.layers.into_iter().zip(diff_ids) {
        let chain_id = chain_id(&parent, &diff_id);
        let present = snaps
            .exists(snapshotter, &chain_id)
            .await
            .map_err(|s| format!("stat {chain_id}: {}", s.message()))?;
        if !present {
            if layer.committed.await.is_err() {
                return Ok(None);
            }
            // A prewarm extraction waits while a pod's pull is fetching: the node's CPU and
            // disk go to the pod first, as its bandwidth does.
            ctx.scheduler
                .bandwidth
                .yield_to_urgent(|| job.priority.borrow().is_urgent())
                .await;
            let _slot = ctx.scheduler.unpacks.acquire(job.priority.clone()).await;
            extract(
                ctx,
                snapshotter,
                &layer.descriptor,
                &parent,
                &chain_id,
                &diff_id,
                &job.lease,
            )
            .await?;
            extracted += 1;
        }
        parent = chain_id;
    }
    Ok(Some(extracted))
}

/// One layer onto its parent chain, committed as `chain_id`.
async fn extract(
    ctx: &FetchContext,
    snapshotter: &str,
    layer: &Descriptor,
    parent: &str,
    chain_id: &str,
    diff_id: &str,
    lease: &str,
) -> Result<(), String> {
    let snaps = &ctx.snapshots;
    let mut labels: HashMap<String, String> = layer
        .annotations()
        .iter()
        .flatten()
        .filter(|(k, _)| k.starts_with(INHERITED_PREFIX))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    labels.insert(SNAPSHOT_REF_LABEL.into(), chain_id.into());
    let key = format!("extract-pullgate-{} {chain_id}", super::unique());
    let mounts = match snaps
        .prepare(snapshotter, &key, parent, labels.clone(), lease)
        .await
    {
        Ok(m) => m,
        Err(s) if s.code() == tonic::Code::AlreadyExists => {
            // containerd (or another job) extracted it meanwhile.
            if snaps.exists(snapshotter, chain_id).await.unwrap_or(false) {
                return Ok(());
            }
            return Err(format!("prepare {key}: {}", s.message()));
        }
        Err(s) => return Err(format!("prepare {key}: {}", s.message())),
    };
    let digest = layer.digest().to_string();
    let descriptor = types::Descriptor {
        media_type: layer.media_type().to_string(),
        digest: digest.clone(),
        size: layer.size() as i64,
        annotations: layer.annotations().clone().unwrap_or_default(),
    };
    let abort = |why: String| async {
        if let Err(s) = snaps.remove(snapshotter, &key).await {
            debug!(
                key,
                error = s.message(),
                "extraction snapshot not removed; GC takes it"
            );
        }
        Err(why)
    };
    let applied = match snaps.apply(descriptor, mounts, lease).await {
        Ok(d) => d,
        Err(s) => return abort(format!("extract {digest}: {}", s.message())).await,
    };
    if applied != diff_id {
        return abort(format!(
            "layer {digest} unpacks to {applied}, the image config says {diff_id}"
        ))
        .await;
    }
    match snaps
        .commit(snapshotter, chain_id, &key, labels, lease)
        .await
    {
        Ok(true) => {}
        // Another unpack committed the same chain first: drop ours.
        Ok(false) => {
            let _ = abort(String::new()).await;
            return Ok(());
        }
        Err(s) => return abort(format!("commit {chain_id}: {}", s.message())).await,
    }
    ctx.store
        .set_label(&digest, "containerd.io/uncompressed", diff_id)
        .await
        .map_err(|s| format!("label {digest}: {}", s.message()))?;
    ctx.metrics.layers_unpacked_ahead.inc();
    debug!(layer = digest, chain_id, "layer unpacked");
    Ok(())
}

/// `rootfs.diff_ids` of an image config.
fn diff_ids(config: &[u8]) -> Result<Vec<String>, String> {
    let v: serde_json::Value =
        serde_json::from_slice(config).map_err(|e| format!("image config is not JSON: {e}"))?;
    v.get("rootfs")
        .and_then(|r| r.get("diff_ids"))
        .and_then(|d| d.as_array())
        .ok_or("image config has no rootfs.diff_ids")?
        .iter()
        .map(|d| {
            d.as_str()
                .filter(|s| s.starts_with("sha256:"))
                .map(str::to_string)
                .ok_or_else(|| format!("bad diff ID {d}"))
        })
        .collect()
}

/// The OCI chain ID of a layer on top of the chain `parent` (empty: the first layer).
fn chain_id(parent: &str, diff_id: &str) -> String {
    if parent.is_empty() {
        return diff_id.to_string();
    }
    let h = Sha256::digest(format!("{parent} {diff_id}").as_bytes());
    format!("sha256:{}", hex(&h))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_ids_follow_the_oci_definition() {
        let a = format!("sha256:{}", "a".repeat(64));
        let b = format!("sha256:{}", "b".repeat(64));
        assert_eq!(chain_id("", &a), a);
        let ab = chain_id(&a, &b);
        let expected = Sha256::digest(format!("{a} {b}").as_bytes());
        assert_eq!(ab, format!("sha256:{}", hex(&expected)));
        assert_ne!(chain_id(&b, &a), ab, "order matters");
    }

    #[test]
    fn diff_ids_come_from_the_config_and_bad_ones_are_refused() {
        let d = format!("sha256:{}", "c".repeat(64));
        let cfg = format!(r#"{{"rootfs":{{"type":"layers","diff_ids":["{d}"]}}}}"#);
        assert_eq!(diff_ids(cfg.as_bytes()).unwrap(), vec![d]);
        assert!(diff_ids(b"{}").is_err());
        assert!(diff_ids(br#"{"rootfs":{"diff_ids":[42]}}"#).is_err());
        assert!(diff_ids(b"garbage").is_err());
    }
}
