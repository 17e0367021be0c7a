//! containerd's snapshotter and diff services, as pullgate's unpack-ahead uses them: the same
//! calls containerd's own unpacker makes (prepare an extraction snapshot on the parent chain,
//! apply the layer onto its mounts, commit it under the layer's chain ID).
//!
//! Calls carry the namespace and the job's lease, so an extraction left by a crash is collected
//! with the lease.

use std::collections::HashMap;

use tonic::transport::Channel;
use tonic::{Code, Request, Status};

use crate::proto::containerd::diff::v1 as diff;
use crate::proto::containerd::snapshots::v1 as snapshots;
use crate::proto::containerd::types::{Descriptor, Mount};
use crate::proto::runtime::v1::runtime_service_client::RuntimeServiceClient;
use crate::proto::runtime::v1::StatusRequest;
use diff::diff_client::DiffClient;
use snapshots::snapshots_client::SnapshotsClient;

/// Snapshotter a CRI containerd uses when its config does not say.
pub const DEFAULT_SNAPSHOTTER: &str = "overlayfs";

#[derive(Clone, Debug)]
pub struct SnapshotStore {
    channel: Channel,
    namespace: String,
}

impl SnapshotStore {
    pub fn new(channel: Channel, namespace: impl Into<String>) -> Self {
        SnapshotStore {
            channel,
            namespace: namespace.into(),
        }
    }

    fn request<T>(&self, msg: T, lease: Option<&str>) -> Request<T> {
        super::namespaced(msg, &self.namespace, lease)
    }

    fn snapshots(&self) -> SnapshotsClient<Channel> {
        SnapshotsClient::new(self.channel.clone())
    }

    /// The snapshotter containerd's CRI plugin unpacks images with, from its verbose runtime
    /// status (`containerd.snapshotter` in the config it reports).
    pub async fn cri_snapshotter(&self) -> Result<String, Status> {
        let resp = RuntimeServiceClient::new(self.channel.clone())
            .status(StatusRequest { verbose: true })
            .await?
            .into_inner();
        let config = resp
            .info
            .get("config")
            .ok_or_else(|| Status::unavailable("containerd's CRI status has no config"))?;
        Ok(snapshotter_from_cri_config(config).unwrap_or_else(|| DEFAULT_SNAPSHOTTER.into()))
    }

    /// Whether a snapshot (committed under a chain ID, or active under a key) exists.
    pub async fn exists(&self, snapshotter: &str, key: &str) -> Result<bool, Status> {
        let req = self.request(
            snapshots::StatSnapshotRequest {
                snapshotter: snapshotter.to_string(),
                key: key.to_string(),
            },
            None,
        );
        match self.snapshots().stat(req).await {
            Ok(_) => Ok(true),
            Err(s) if s.code() == Code::NotFound => Ok(false),
            Err(s) => Err(s),
        }
    }

    /// An active snapshot on top of `parent` (empty: none) to extract a layer into.
    pub async fn prepare(
        &self,
        snapshotter: &str,
        key: &str,
        parent: &str,
        labels: HashMap<String, String>,
        lease: &str,
    ) -> Result<Vec<Mount>, Status> {
        let req = self.request(
            snapshots::PrepareSnapshotRequest {
                snapshotter: snapshotter.to_string(),
                key: key.to_string(),
                parent: parent.to_string(),
                labels,
            },
            Some(lease),
        );
        Ok(self.snapshots().prepare(req).await?.into_inner().mounts)
    }

    /// Commits the active snapshot `key` as `name`. `Ok(false)`: `name` exists already (another
    /// unpack got there first), and `key` should be removed.
    pub async fn commit(
        &self,
        snapshotter: &str,
        name: &str,
        key: &str,
        labels: HashMap<String, String>,
        lease: &str,
    ) -> Result<bool, Status> {
        let req = self.request(
            snapshots::CommitSnapshotRequest {
                snapshotter: snapshotter.to_string(),
                name: name.to_string(),
                key: key.to_string(),
                labels,
            },
            Some(lease),
        );
        match self.snapshots().commit(req).await {
            Ok(_) => Ok(true),
            Err(s) if s.code() == Code::AlreadyExists => Ok(false),
            Err(s) => Err(s),
        }
    }

    pub async fn remove(&self, snapshotter: &str, key: &str) -> Result<(), Status> {
        let req = self.request(
            snapshots::RemoveSnapshotRequest {
                snapshotter: snapshotter.to_string(),
                key: key.to_string(),
            },
            None,
        );
        match self.snapshots().remove(req).await {
            Ok(_) => Ok(()),
            Err(s) if s.code() == Code::NotFound => Ok(()),
            Err(s) => Err(s),
        }
    }

    /// Extracts the layer `layer` (from the content store; containerd decompresses it) onto
    /// `mounts`; returns the digest of the uncompressed layer (its diff ID).
    pub async fn apply(
        &self,
        layer: Descriptor,
        mounts: Vec<Mount>,
        lease: &str,
    ) -> Result<String, Status> {
        let req = self.request(
            diff::ApplyRequest {
                diff: Some(layer),
                mounts,
            },
            Some(lease),
        );
        let resp = DiffClient::new(self.channel.clone()).apply(req).await?;
        resp.into_inner()
            .applied
            .map(|d| d.digest)
            .ok_or_else(|| Status::internal("containerd's diff service returned no descriptor"))
    }
}

/// `containerd.snapshotter` from the CRI plugin's config JSON.
fn snapshotter_from_cri_config(json: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(json).ok()?;
    let s = v.get("containerd")?.get("snapshotter")?.as_str()?;
    (!s.is_empty()).then(|| s.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_snapshotter_from_cri_config() {
        let cfg = r#"{"containerd":{"snapshotter":"native","defaultRuntimeName":"runc"}}"#;
        assert_eq!(snapshotter_from_cri_config(cfg).as_deref(), Some("native"));
        assert_eq!(snapshotter_from_cri_config(r#"{"containerd":{}}"#), None);
        assert_eq!(snapshotter_from_cri_config("not json"), None);
    }
}
