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
use crate::proto::runtime::v1::image_service_client::ImageServiceClient;
use crate::proto::runtime::v1::runtime_service_client::RuntimeServiceClient;
use crate::proto::runtime::v1::{ImageFsInfoRequest, StatusRequest};
use diff::diff_client::DiffClient;
use snapshots::snapshots_client::SnapshotsClient;

/// Directory names of snapshotters under containerd's root: the plugin type, a dot, the name.
const SNAPSHOTTER_DIR_PREFIX: &str = "io.containerd.snapshotter.v1.";

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

    /// The snapshotter containerd's CRI plugin unpacks images with. containerd 1.6 and 1.7
    /// report it in their verbose runtime status (`containerd.snapshotter` in the config JSON);
    /// 2.x keeps it in the separate CRI images plugin, whose config the status leaves out, and
    /// names it only in `ImageFsInfo`: the image filesystem is the snapshotter's directory,
    /// `<root>/io.containerd.snapshotter.v1.<name>` (every version derives that path from the
    /// name).
    pub async fn cri_snapshotter(&self) -> Result<String, Status> {
        let resp = RuntimeServiceClient::new(self.channel.clone())
            .status(StatusRequest { verbose: true })
            .await?
            .into_inner();
        if let Some(name) = resp
            .info
            .get("config")
            .and_then(|c| snapshotter_from_cri_config(c))
        {
            return Ok(name);
        }
        let fs = ImageServiceClient::new(self.channel.clone())
            .image_fs_info(ImageFsInfoRequest {})
            .await?
            .into_inner();
        let mountpoints: Vec<&str> = fs
            .image_filesystems
            .iter()
            .filter_map(|f| f.fs_id.as_ref().map(|id| id.mountpoint.as_str()))
            .collect();
        snapshotter_from_image_fs(&mountpoints).ok_or_else(|| {
            Status::unavailable(format!(
                "containerd's CRI status names no snapshotter and its image filesystems \
                 ({mountpoints:?}) name no single one"
            ))
        })
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

/// `containerd.snapshotter` from the CRI plugin's config JSON (containerd 1.x; 2.x has no
/// `snapshotter` there, only per runtime handler, where empty means the images plugin's).
fn snapshotter_from_cri_config(json: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(json).ok()?;
    let s = v.get("containerd")?.get("snapshotter")?.as_str()?;
    (!s.is_empty()).then(|| s.to_string())
}

/// The snapshotter whose directory is the CRI image filesystem; `None` unless exactly one is
/// named (containerd 2.1 lists only the images plugin's, even when a runtime handler has its own).
fn snapshotter_from_image_fs(mountpoints: &[&str]) -> Option<String> {
    let mut names = mountpoints.iter().filter_map(|m| {
        let dir = std::path::Path::new(m).file_name()?.to_str()?;
        let name = dir.strip_prefix(SNAPSHOTTER_DIR_PREFIX)?;
        (!name.is_empty()).then(|| name.to_string())
    });
    let first = names.next()?;
    names.all(|n| n == first).then_some(first)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Each the `config` entry of a real containerd's verbose CRI status (`Status{verbose:
    // true}`), with the harness's config (`native`); temp paths shortened.
    const CONFIG_1_6: &str = include_str!("testdata/cri-status-config-1.6.json");
    const CONFIG_1_7: &str = include_str!("testdata/cri-status-config-1.7.json");
    const CONFIG_2_1: &str = include_str!("testdata/cri-status-config-2.1.json");
    /// 2.1 with `overlayfs` for images and a runtime handler `kata` on `native`.
    const CONFIG_2_1_RUNTIME: &str =
        include_str!("testdata/cri-status-config-2.1-runtime-snapshotter.json");

    #[test]
    fn reads_the_snapshotter_from_cri_config() {
        let cfg = r#"{"containerd":{"snapshotter":"native","defaultRuntimeName":"runc"}}"#;
        assert_eq!(snapshotter_from_cri_config(cfg).as_deref(), Some("native"));
        assert_eq!(snapshotter_from_cri_config(r#"{"containerd":{}}"#), None);
        assert_eq!(snapshotter_from_cri_config("not json"), None);
    }

    #[test]
    fn containerd_1_x_reports_the_snapshotter_in_its_status() {
        assert_eq!(
            snapshotter_from_cri_config(CONFIG_1_6).as_deref(),
            Some("native")
        );
        assert_eq!(
            snapshotter_from_cri_config(CONFIG_1_7).as_deref(),
            Some("native")
        );
    }

    #[test]
    fn containerd_2_x_status_has_only_per_runtime_snapshotters() {
        // Not the runtime handler's "native": that is not what images unpack into.
        assert_eq!(snapshotter_from_cri_config(CONFIG_2_1), None);
        assert_eq!(snapshotter_from_cri_config(CONFIG_2_1_RUNTIME), None);
    }

    #[test]
    fn reads_the_snapshotter_from_the_image_filesystem() {
        // As containerd 1.6, 1.7 and 2.1 answer ImageFsInfo.
        let native = "/var/lib/containerd/io.containerd.snapshotter.v1.native";
        let overlay = "/var/lib/containerd/io.containerd.snapshotter.v1.overlayfs";
        assert_eq!(
            snapshotter_from_image_fs(&[overlay]).as_deref(),
            Some("overlayfs")
        );
        assert_eq!(
            snapshotter_from_image_fs(&[native, native]).as_deref(),
            Some("native")
        );
        assert_eq!(snapshotter_from_image_fs(&[native, overlay]), None);
        assert_eq!(snapshotter_from_image_fs(&[]), None);
        assert_eq!(snapshotter_from_image_fs(&["/var/lib/other"]), None);
        assert_eq!(
            snapshotter_from_image_fs(&["/x/io.containerd.snapshotter.v1."]),
            None
        );
    }
}
