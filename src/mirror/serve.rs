//! The mirror's HTTP server: plain HTTP/1.1 on loopback, the OCI distribution pull routes only.
//!
//! Manifests come from the demand table (the bytes pullgate resolved for a running job, so one
//! resolution serves both); anything pullgate does not know is a 404, and containerd resolves it
//! at its next host. Connections are capped and must send headers in time, as on the metrics
//! endpoint.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http::{header, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::blob::{self, status, Body};
use super::demand::{Access, Key, Presented};
use super::route::{self, Route};
use super::Mirror;
use crate::metrics::MirrorLabels;

/// Serves `listener` until `stop` is cancelled.
pub fn spawn(
    mirror: Arc<Mirror>,
    listener: TcpListener,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let slots = Arc::new(Semaphore::new(mirror.cfg.max_connections));
    tokio::spawn(async move {
        loop {
            let (stream, peer) = tokio::select! {
                _ = stop.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        warn!(error = %e, "mirror: accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                debug!(%peer, "mirror: connection cap reached, closing (containerd tries its next host)");
                continue;
            };
            let _ = stream.set_nodelay(true);
            let mirror = mirror.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                let _slot = slot;
                let timeout = mirror.cfg.header_read_timeout;
                let svc = service_fn(move |req| handle(mirror.clone(), req));
                let conn = http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(timeout)
                    .serve_connection(TokioIo::new(stream), svc);
                tokio::pin!(conn);
                tokio::select! {
                    r = conn.as_mut() => if let Err(e) = r {
                        debug!(%peer, error = %e, "mirror connection ended with an error");
                    },
                    _ = stop.cancelled() => {}
                }
            });
        }
    })
}

async fn handle(mirror: Arc<Mirror>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let head = req.method() == Method::HEAD;
    if req.method() != Method::GET && !head {
        return Ok(status(
            StatusCode::METHOD_NOT_ALLOWED,
            "the mirror serves pulls only",
        ));
    }
    let route = route::parse(req.uri().path(), req.uri().query());
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(Presented::from_header);
    let presented = presented.as_ref();
    let (kind, resp) = match route {
        Route::Base => ("base", base()),
        Route::Manifest(key) => ("manifest", manifest(&mirror, &key, presented, head).await),
        Route::Blob(key) => {
            let range = req
                .headers()
                .get(header::RANGE)
                .and_then(|v| v.to_str().ok());
            (
                "blob",
                blob::serve(&mirror, key, presented, range, head).await,
            )
        }
        Route::Unknown(why) => {
            debug!(
                path = req.uri().path(),
                why, "mirror: not a request it serves"
            );
            ("other", status(StatusCode::NOT_FOUND, why))
        }
    };
    mirror
        .metrics
        .mirror_requests
        .get_or_create(&MirrorLabels {
            kind,
            status: status_class(resp.status()),
        })
        .inc();
    Ok(resp)
}

fn base() -> Response<Body> {
    Response::builder()
        .header(header::CONTENT_TYPE, "application/json")
        .header("docker-distribution-api-version", "registry/2.0")
        .body(blob::full(bytes::Bytes::from_static(b"{}")))
        .expect("valid response")
}

/// A manifest a running job resolved, exactly as pullgate received it.
async fn manifest(
    mirror: &Mirror,
    key: &Key,
    presented: Option<&Presented>,
    head: bool,
) -> Response<Body> {
    let access = mirror
        .demand
        .after_resolution(key, || mirror.demand.manifest(key, presented))
        .await;
    let m = match access {
        Access::Granted(m) => m,
        Access::Challenge => return blob::challenge(),
        Access::Unknown => {
            return status(StatusCode::NOT_FOUND, "manifest not resolved by pullgate")
        }
    };
    let builder = Response::builder()
        .header(header::CONTENT_TYPE, m.descriptor.media_type().to_string())
        .header(header::CONTENT_LENGTH, m.bytes.len())
        .header("docker-content-digest", m.descriptor.digest().to_string());
    let body = if head {
        blob::empty()
    } else {
        blob::full(m.bytes)
    };
    builder.body(body).expect("valid response")
}

fn status_class(s: StatusCode) -> &'static str {
    match s.as_u16() {
        200..=299 => "2xx",
        401 => "401",
        404 => "404",
        400..=499 => "4xx",
        _ => "5xx",
    }
}
