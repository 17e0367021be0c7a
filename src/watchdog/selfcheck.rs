//! The self-check behind each watchdog ping: pullgate's own doors answer, and nothing else.
//!
//! * The CRI front door: a `PullImage` with an empty image, dialled on a fresh connection to the
//!   CRI socket. The front door's thread rejects it (`INVALID_ARGUMENT`) before anything else
//!   runs, so the probe goes through accept, HTTP/2 and the handler on that thread and never
//!   reaches containerd or the registry: a slow or stopped containerd cannot fail it.
//! * The mirror (when enabled): `GET /v2/` on a fresh connection, which the mirror answers
//!   itself (200).
//!
//! The check runs on the main runtime, so a wedged main runtime (every worker stuck) runs no
//! check and sends no ping.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::Endpoint;
use tonic::Code;

use crate::proto::runtime::v1::image_service_client::ImageServiceClient;
use crate::proto::runtime::v1::PullImageRequest;

/// What one check probes, and how long each probe may take.
pub struct SelfCheck {
    cri_socket: PathBuf,
    mirror: Option<(SocketAddr, reqwest::Client)>,
    timeout: Duration,
}

impl SelfCheck {
    pub fn new(
        cri_socket: PathBuf,
        mirror: Option<SocketAddr>,
        timeout: Duration,
    ) -> anyhow::Result<SelfCheck> {
        let mirror = match mirror {
            Some(addr) => {
                // No pooled connection: each probe goes through the mirror's accept loop.
                let client = reqwest::Client::builder()
                    .no_proxy()
                    .pool_max_idle_per_host(0)
                    .timeout(timeout)
                    .build()?;
                Some((addr, client))
            }
            None => None,
        };
        Ok(SelfCheck {
            cri_socket,
            mirror,
            timeout,
        })
    }

    /// Both probes at once; the error names the door that failed and how.
    pub async fn run(&self) -> Result<(), String> {
        let (cri, mirror) = tokio::join!(self.front_door(), self.mirror());
        match (cri, mirror) {
            (Ok(()), Ok(())) => Ok(()),
            (Err(e), Ok(())) | (Ok(()), Err(e)) => Err(e),
            (Err(a), Err(b)) => Err(format!("{a}; {b}")),
        }
    }

    async fn front_door(&self) -> Result<(), String> {
        let path = self.cri_socket.clone();
        let call = async move {
            // The URI is never resolved: the connector dials the socket.
            let channel = Endpoint::from_static("http://localhost")
                .connect_with_connector(tower::service_fn(move |_| {
                    let path = path.clone();
                    async move {
                        Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?))
                    }
                }))
                .await
                .map_err(|e| format!("cannot connect: {}", crate::errors::chain(&e)))?;
            match ImageServiceClient::new(channel)
                .pull_image(PullImageRequest::default())
                .await
            {
                Err(s) if s.code() == Code::InvalidArgument => Ok(()),
                Err(s) => Err(format!("answered {:?}: {}", s.code(), s.message())),
                Ok(_) => Err("accepted a PullImage without an image".to_string()),
            }
        };
        let shown = self.cri_socket.display();
        match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!("CRI socket {shown}: {e}")),
            Err(_) => Err(format!(
                "CRI socket {shown}: no answer within {:?}",
                self.timeout
            )),
        }
    }

    async fn mirror(&self) -> Result<(), String> {
        let Some((addr, client)) = &self.mirror else {
            return Ok(());
        };
        match client.get(format!("http://{addr}/v2/")).send().await {
            Ok(r) if r.status() == reqwest::StatusCode::OK => Ok(()),
            Ok(r) => Err(format!("mirror {addr}: GET /v2/ answered {}", r.status())),
            Err(e) if e.is_timeout() => Err(format!(
                "mirror {addr}: no answer to GET /v2/ within {:?}",
                self.timeout
            )),
            Err(e) if e.is_connect() => Err(format!(
                "mirror {addr}: cannot connect: {}",
                crate::errors::chain(&e)
            )),
            // Closed without an answer: the mirror is at mirror.max_connections and its accept
            // loop turned the probe away, which it could only do while it runs.
            Err(_) => Ok(()),
        }
    }
}
