//! The front door: a tonic server on the CRI unix socket that kubelet's `imageServiceEndpoint`
//! points at.
//!
//! Owns the socket, the byte-for-byte passthrough and the `PullImage` interception. May import
//! `vocab`, `pull`, `upstream`, `metrics` and `grpc`.

pub mod activation;
pub mod authority;
mod proxy;
pub mod socket;
mod thread;

use std::future::Future;

use tokio::net::UnixListener;

pub use proxy::CriProxy;
pub use thread::{FrontDoorThread, Priority};

/// Serves `proxy` on `listener` until `shutdown` resolves, then drains: no new calls are accepted
/// and the future completes once the calls in flight have finished.
pub async fn serve(
    listener: UnixListener,
    proxy: CriProxy,
    shutdown: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    tonic::transport::Server::builder()
        // kubelet keeps one connection and multiplexes on it; keep it alive across idle hours.
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(60)))
        .serve_with_incoming_shutdown(proxy, authority::incoming(listener), shutdown)
        .await
}
