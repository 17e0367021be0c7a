//! pullgate as containerd's registry mirror: the byte path.
//!
//! ```text
//! containerd ──GET /v2/<repo>/{manifests,blobs}/<ref>?ns=<registry>──▶ serve ──▶ route
//!                                                                         │
//!                     demand (manifests resolved, blobs → jobs) ◀─────────┤
//!                                                                         ▼
//!                          blob: scheduler (stream slots, bandwidth by class) ──▶ registry client
//!                                                                                (admin's hosts, registry)
//! ```
//! containerd tries the `[host]` entries of `<config_path>/<registry>/hosts.toml` in file order,
//! then the registry itself. Observed on containerd 1.6.20, 1.7.24 and 2.1.9
//! (`tests/containerd_mirror.rs`): every manifest and blob request to a mirror carries
//! `ns=<registry>`, and a mirror that answers 404, 500 or 503, or whose port is closed, makes
//! containerd fetch from the next host, so the pull still succeeds. The mirror relies on both:
//! `ns` tells it where to go upstream, and the fallback keeps pulls working when pullgate is
//! down or does not know a blob. [`hosts_file`] and [`hosts_dir`] keep pullgate's entry first.
//!
//! May import `vocab`, `config`, `jobs`, `metrics`, `schedule`, `upstream`, `registry`, `http_server`,
//! `small_file` and `atomic_file`; never `pull`, `prewarm` or `frontdoor` (they call it).

mod access;
mod backlog;
mod blob;
mod conns;
pub mod containerd_config;
pub mod demand;
mod fetch;
pub mod hosts_dir;
pub mod hosts_file;
mod pacing;
mod parts;
mod peer;
pub mod route;
mod serve;
mod verify;

#[cfg(test)]
mod blob_tests;

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use blob::Body;
pub use demand::{Demand, Key, Registration};
pub use fetch::Fetch;
pub use pacing::Pacing;

use crate::config::MirrorConfig;
use crate::metrics::Metrics;

/// What serving needs; shared by every connection.
pub struct Mirror {
    pub cfg: MirrorConfig,
    pub demand: Arc<Demand>,
    /// Where blob bytes come from ([`fetch`]).
    upstream: Arc<dyn Fetch>,
    /// The scheduler's side of each stream ([`pacing`]).
    pacing: Arc<dyn Pacing>,
    pub metrics: Arc<Metrics>,
    /// How often a paused prewarm stream sends containerd a few bytes
    /// ([`containerd_config::keepalive`]).
    pub keepalive: std::time::Duration,
    /// Which upstream hosts cap each connection (measured; see [`parts`]).
    pace: parts::HostPace,
    /// The node-wide budget for blob bytes fetched ahead of containerd's reads.
    buffers: parts::Buffers,
    /// pullgate's other listen address (metrics): an `ns` naming it or `cfg.addr` is a loop
    /// ([`access`]).
    also_own: std::sync::OnceLock<std::net::SocketAddr>,
    /// Which peers may connect ([`access::Gate`]).
    gate: access::Gate,
    /// Hash states of partly served blobs, for containerd's resumed requests.
    checkpoints: verify::Checkpoints,
    /// containerd's content store (channel, namespace), where a download cut for a digest
    /// mismatch is dropped; `None`: left to expire.
    ingests: Option<(tonic::transport::Channel, String)>,
}

impl Mirror {
    pub fn new(
        cfg: MirrorConfig,
        demand: Arc<Demand>,
        upstream: Arc<dyn Fetch>,
        pacing: Arc<dyn Pacing>,
        metrics: Arc<Metrics>,
        keepalive: std::time::Duration,
    ) -> Mirror {
        Mirror {
            buffers: parts::Buffers::new(cfg.buffer_budget.0),
            pace: Default::default(),
            also_own: Default::default(),
            gate: access::Gate::new(cfg.allow_uids.clone()),
            checkpoints: Default::default(),
            ingests: None,
            cfg,
            demand,
            upstream,
            pacing,
            metrics,
            keepalive,
        }
    }

    /// Also refuses an `ns` naming `addr` (pullgate's other listener, metrics); set once.
    pub fn also_own(&self, addr: std::net::SocketAddr) {
        let _ = self.also_own.set(addr);
    }

    /// Every address pullgate listens on.
    fn own_addrs(&self) -> [std::net::SocketAddr; 2] {
        [
            self.cfg.addr,
            *self.also_own.get().unwrap_or(&self.cfg.addr),
        ]
    }

    /// Drops, in containerd's content store, the download of a blob the mirror cut for a digest
    /// mismatch: containerd keeps a cut ingest and would resume it, corrupt prefix included.
    pub fn with_ingests(mut self, channel: tonic::transport::Channel, namespace: String) -> Mirror {
        self.ingests = Some((channel, namespace));
        self
    }

    /// Blob `key`'s bytes from `from` on, for job `job` (see [`blob::body_for_job`]).
    pub async fn blob_body(
        self: &Arc<Self>,
        key: demand::Key,
        job: u64,
        from: u64,
    ) -> Result<Body, String> {
        blob::body_for_job(self, key, job, from).await
    }

    /// Binds `cfg.addr` and serves until `stop` is cancelled.
    pub async fn serve(
        self: Arc<Self>,
        stop: CancellationToken,
    ) -> std::io::Result<tokio::task::JoinHandle<()>> {
        let listener = TcpListener::bind(self.cfg.addr).await?;
        Ok(serve::spawn(self, listener, stop))
    }
}

/// Aborts containerd's ingest of blob `digest`, under each ref its fetcher may have given it
/// (`remotes.MakeRefKey`: layers, configs, anything else); absent ones are fine.
async fn drop_download(channel: tonic::transport::Channel, namespace: &str, digest: &str) {
    for kind in crate::upstream::ingest::REF_KINDS {
        let reference = crate::upstream::ingest::ref_key(kind, digest);
        match crate::upstream::content::abort_ingest(channel.clone(), namespace, &reference).await {
            Ok(()) => tracing::debug!(
                ingest = reference,
                "download cut for a digest mismatch dropped"
            ),
            Err(e) => tracing::warn!(
                ingest = reference,
                error = e.message(),
                "cannot drop the download cut for a digest mismatch"
            ),
        }
    }
}
