//! The HTTP endpoint: `/metrics`, `/healthz` (containerd reachable), `/readyz` (serving, and
//! containerd's hosts.toml files sending registries through pullgate's mirror).
//!
//! Nothing a client does keeps server resources forever: a connection has
//! `metrics.header_read_timeout` to send each request's headers (also while it idles between
//! keep-alive requests), and at most `metrics.max_connections` are served at once. A connection
//! over the cap is closed as soon as it is accepted rather than queued: a queue would itself hold
//! sockets, and a scraper retries on its next interval anyway.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::Metrics;
use crate::config::MetricsConfig;
use crate::http_server::Listener;

/// What the health endpoints ask. The health state (the `health` module, above this one)
/// implements it, so the endpoint knows nothing of containerd or the mirror.
pub trait Readiness: Send + Sync + 'static {
    /// containerd's version, or why it is unreachable (and records the result in
    /// `pullgate_upstream_up`).
    fn probe(&self) -> BoxFuture<'_, Result<String, String>>;
    /// False before the CRI socket is bound and while draining.
    fn serving(&self) -> bool;
    /// Why containerd does not fetch through pullgate's mirror, if it does not.
    fn mirror_problem(&self) -> Option<String>;
}

/// What one endpoint serves: the registry to encode and the readiness to report.
struct Endpoint {
    metrics: Arc<Metrics>,
    health: Arc<dyn Readiness>,
}

/// Binds `cfg.addr` and serves until `stop` is cancelled.
pub async fn serve(
    cfg: &MetricsConfig,
    metrics: Arc<Metrics>,
    health: Arc<dyn Readiness>,
    stop: CancellationToken,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let listener = Listener {
        name: "metrics endpoint",
        listener: TcpListener::bind(cfg.addr).await?,
        stop,
    };
    let slots = Arc::new(Semaphore::new(cfg.max_connections));
    let header_read_timeout = cfg.header_read_timeout;
    let endpoint = Arc::new(Endpoint { metrics, health });
    Ok(tokio::spawn(listener.run(move |stream, peer| {
        let slot = slots.clone().try_acquire_owned();
        let endpoint = endpoint.clone();
        async move {
            let Ok(_slot) = slot else {
                debug!(%peer, "metrics endpoint: connection cap reached, closing");
                return;
            };
            let svc = service_fn(move |req| route(req, endpoint.clone()));
            if let Err(e) = crate::http_server::http1(stream, svc, header_read_timeout).await {
                debug!(%peer, error = %e, "metrics connection ended with an error");
            }
        }
    })))
}

async fn route(
    req: Request<Incoming>,
    endpoint: Arc<Endpoint>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let health = &endpoint.health;
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return Ok(text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n".into()));
    }
    Ok(match req.uri().path() {
        "/metrics" => {
            // Refresh the upstream gauge so a scrape never reports a stale "up".
            let _ = health.probe().await;
            let mut resp = text(StatusCode::OK, endpoint.metrics.encode());
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
                format!("containerd not reachable: {s}\n"),
            ),
        },
        "/readyz" => {
            if !health.serving() {
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
                        format!("containerd not reachable: {s}\n"),
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
