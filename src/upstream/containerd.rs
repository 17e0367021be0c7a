//! The connection to containerd's gRPC socket.
//!
//! One lazily connected HTTP/2 channel carries both the byte-for-byte CRI forwarding and
//! pullgate's own containerd API calls. tonic's channel reconnects by itself: when containerd
//! restarts, the next call dials again, so pullgate never needs a restart.

use std::path::{Path, PathBuf};
use std::time::Duration;

use http::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::body::Body;
use tonic::transport::{Channel, Endpoint};
use tonic::Status;
use tower::{Service, ServiceExt};

use crate::config::ContainerdConfig;
use crate::proto::containerd::version::v1::version_client::VersionClient;

/// A handle on containerd; cheap to clone.
#[derive(Clone, Debug)]
pub struct Containerd {
    channel: Channel,
    socket: PathBuf,
}

impl Containerd {
    /// Prepares the connection; nothing is dialled until the first call.
    pub fn new(cfg: &ContainerdConfig) -> Containerd {
        let socket = cfg.socket.clone();
        let dial_path = socket.clone();
        // The URI is required by the builder but never resolved: the connector dials the socket.
        let channel =
            Endpoint::from_static("http://containerd.sock")
                .connect_timeout(cfg.connect_timeout)
                .http2_keep_alive_interval(Duration::from_secs(30))
                .keep_alive_while_idle(true)
                .connect_with_connector_lazy(tower::service_fn(move |_| {
                    let path = dial_path.clone();
                    async move {
                        Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?))
                    }
                }));
        Containerd { channel, socket }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The raw channel, for generated clients.
    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    /// Forwards one HTTP/2 gRPC request as it is and returns containerd's response as it is.
    /// Only a failure to reach containerd becomes a status (`UNAVAILABLE`).
    pub async fn forward(&self, req: Request<Body>) -> Result<Response<Body>, Status> {
        let mut channel = self.channel.clone();
        let call = async {
            channel.ready().await?;
            channel.call(req).await
        };
        call.await.map_err(|e| self.unavailable(&e))
    }

    /// Asks containerd for its version: the liveness probe.
    pub async fn version(&self, timeout: Duration) -> Result<String, Status> {
        let mut client = VersionClient::new(self.channel.clone());
        let call = client.version(());
        match tokio::time::timeout(timeout, call).await {
            Ok(Ok(resp)) => Ok(resp.into_inner().version),
            Ok(Err(status)) => Err(status),
            Err(_) => Err(Status::deadline_exceeded(format!(
                "containerd at {} did not answer within {timeout:?}",
                self.socket.display()
            ))),
        }
    }

    fn unavailable(&self, err: &(dyn std::error::Error + 'static)) -> Status {
        Status::unavailable(format!(
            "containerd is unreachable at {}: {}",
            self.socket.display(),
            crate::errors::chain(err)
        ))
    }
}
