//! The node-facing health state: whether the CRI socket serves, whether containerd answers, and
//! whether containerd's config and hosts.toml files send registries through pullgate's mirror.
//! Owns that state and its checks; imports `metrics` (which serves it on `/healthz` and `/readyz`
//! through [`Readiness`]), `mirror` and `upstream`.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::FutureExt;

use crate::metrics::{Metrics, Readiness};
use crate::mirror::hosts_dir::HostsKeeper;
use crate::upstream::Containerd;

/// What the health endpoints report on.
pub struct Health {
    pub metrics: Arc<Metrics>,
    pub containerd: Containerd,
    /// True while the CRI socket accepts calls (false before bind and while draining).
    pub serving: AtomicBool,
    /// pullgate's hosts.toml entries, when it keeps them (`mirror.manage_hosts`).
    pub hosts: Option<HostsKeeper>,
    /// containerd's config file and the directory its `config_path` must name (mirror on).
    pub containerd_config: Option<(PathBuf, PathBuf)>,
}

impl Health {
    /// Why containerd does not fetch through pullgate's mirror, if it does not.
    pub fn mirror_problem(&self) -> Option<String> {
        if let Some((file, dir)) = &self.containerd_config {
            if let Err(e) = crate::mirror::containerd_config::check(file, dir) {
                return Some(e);
            }
        }
        let missing = self.hosts.as_ref().map(|h| h.missing()).unwrap_or_default();
        if missing.is_empty() {
            return None;
        }
        Some(format!(
            "these hosts.toml files do not list pullgate's mirror first (see the log): {}",
            missing
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ))
    }

    /// Probes containerd and records the result in `pullgate_upstream_up`.
    pub async fn probe(&self) -> Result<String, tonic::Status> {
        let res = self.containerd.version(Duration::from_secs(2)).await;
        self.metrics.upstream_up.set(i64::from(res.is_ok()));
        res
    }
}

impl Readiness for Health {
    fn probe(&self) -> BoxFuture<'_, Result<String, String>> {
        Health::probe(self)
            .map(|r| r.map_err(|s| s.message().to_string()))
            .boxed()
    }

    fn serving(&self) -> bool {
        self.serving.load(Ordering::SeqCst)
    }

    fn mirror_problem(&self) -> Option<String> {
        Health::mirror_problem(self)
    }
}
