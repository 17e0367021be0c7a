//! The HTTP endpoint: `/metrics`, `/healthz` (containerd reachable), `/readyz` (serving, and
//! containerd's hosts.toml files sending registries through pullgate's mirror).
//!
//! Nothing a client does keeps server resources forever: a connection has
//! `metrics.header_read_timeout` to send each request's headers (also while it idles between
//! keep-alive requests), and at most `metrics.max_connections` are served at once. A connection
//! over the cap is closed as soon as it is accepted rather than queued: a queue would itself hold
//! sockets, and a scraper retries on its next interval anyway.

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::Metrics;
use crate::config::MetricsConfig;
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

/// Binds `cfg.addr` and serves until `stop` is cancelled.
pub async fn serve(
    cfg: &MetricsConfig,
    health: Arc<Health>,
    stop: CancellationToken,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let listener = TcpListener::bind(cfg.addr).await?;
    let slots = Arc::new(Semaphore::new(cfg.max_connections));
    let header_read_timeout = cfg.header_read_timeout;
    Ok(tokio::spawn(async move {
        loop {
            let (stream, peer) = tokio::select! {
                _ = stop.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        warn!(error = %e, "metrics endpoint: accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                debug!(%peer, "metrics endpoint: connection cap reached, closing");
                drop(stream);
                continue;
            };
            let health = health.clone();
            tokio::spawn(async move {
                let _slot = slot;
                let svc = service_fn(move |req| route(req, health.clone()));
                if let Err(e) = http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(header_read_timeout)
                    .serve_connection(TokioIo::new(stream), svc)
                    .await
                {
                    debug!(%peer, error = %e, "metrics connection ended with an error");
                }
            });
        }
    }))
}

async fn route(
    req: Request<Incoming>,
    health: Arc<Health>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return Ok(text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n".into()));
    }
    Ok(match req.uri().path() {
        "/metrics" => {
            // Refresh the upstream gauge so a scrape never reports a stale "up".
            let _ = health.probe().await;
            let mut resp = text(StatusCode::OK, health.metrics.encode());
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            resp
        }
        "/healthz" => match health.probe().await {
            Ok(v) => text(StatusCode::OK, format!("ok: containerd {v}\n")),
            Err(s) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("containerd not reachable: {}\n", s.message()),
            ),
        },
        "/readyz" => {
            if !health.serving.load(Ordering::SeqCst) {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "not serving the CRI socket\n".into(),
                )
            } else {
                // The same check start-up logs: the two never disagree.
                let problem = health.mirror_problem();
                match health.probe().await {
                    Ok(_) if problem.is_some() => text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!(
                            "containerd does not fetch through pullgate's mirror: {}\n",
                            problem.unwrap_or_default()
                        ),
                    ),
                    Ok(_) => text(StatusCode::OK, "ready\n".into()),
                    Err(s) => text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("containerd not reachable: {}\n", s.message()),
                    ),
                }
            }
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "try /metrics, /healthz or /readyz\n".into(),
        ),
    })
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}
