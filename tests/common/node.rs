//! One simulated node: a registry, containerd, and pullgate in front of containerd.

use super::daemon::Pullgate;
use super::slowproxy::SlowProxy;
use super::{image_client, tempdir, Containerd, Registry};
use pullgate::proto::runtime::v1::image_service_client::ImageServiceClient;
use tonic::transport::Channel;

/// Fields drop in order: processes stop before the temp dir goes.
pub struct Node {
    pub pullgate: Pullgate,
    pub containerd: Containerd,
    pub registry: Registry,
    pub dir: tempfile::TempDir,
}

impl Node {
    pub async fn start(auth: Option<(&str, &str)>) -> Node {
        Node::start_with(auth, "").await
    }

    /// With extra lines for pullgate's `[mirror]` config table.
    pub async fn start_with(auth: Option<(&str, &str)>, mirror_toml: &str) -> Node {
        Node::start_on(auth, mirror_toml, "native").await
    }

    /// With containerd's CRI unpacking into `snapshotter` ("native" or "overlayfs").
    pub async fn start_on(
        auth: Option<(&str, &str)>,
        mirror_toml: &str,
        snapshotter: &str,
    ) -> Node {
        Node::start_tuned(auth, mirror_toml, snapshotter, "").await
    }

    /// With `cri_images` lines in containerd's CRI image settings.
    pub async fn start_tuned(
        auth: Option<(&str, &str)>,
        mirror_toml: &str,
        snapshotter: &str,
        cri_images: &str,
    ) -> Node {
        let dir = tempdir();
        let registry = Registry::start(&dir.path().join("registry"), auth).await;
        let containerd = Containerd::start_tuned(
            &dir.path().join("ctd"),
            &[registry.addr()],
            "",
            snapshotter,
            cri_images,
        )
        .await;
        let pullgate = Pullgate::start(&dir.path().join("pg"), &containerd, mirror_toml).await;
        Node {
            pullgate,
            containerd,
            registry,
            dir,
        }
    }

    /// containerd's CRI image service, directly.
    pub fn direct(&self) -> ImageServiceClient<Channel> {
        image_client(&self.containerd.socket())
    }

    /// The CRI image service through pullgate.
    pub fn via(&self) -> ImageServiceClient<Channel> {
        image_client(&self.pullgate.socket())
    }

    /// containerd's content store (CRI namespace), for assertions.
    pub fn store(&self) -> super::store::Store {
        super::store::Store::new(&self.containerd.socket())
    }

    /// An HTTP proxy to the registry that breaks blob downloads on demand.
    pub async fn fault_proxy(&self) -> super::faultproxy::FaultProxy {
        let proxy = super::faultproxy::FaultProxy::start(&self.registry.addr()).await;
        self.containerd.add_host(&proxy.addr);
        proxy
    }

    /// A slow path to the registry for pulls that must last a while.
    pub async fn slow_proxy(&self, bytes_per_sec: u64) -> SlowProxy {
        let proxy = SlowProxy::start(&self.registry.addr(), bytes_per_sec).await;
        self.containerd.add_host(&proxy.addr);
        proxy
    }
}
