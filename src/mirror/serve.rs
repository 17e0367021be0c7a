//! The mirror's HTTP server: plain HTTP/1.1 on loopback, the OCI distribution pull routes only.
//!
//! Manifests come from the demand table (the bytes pullgate resolved for a running job, so one
//! resolution serves both); anything pullgate does not know is a 404, and containerd resolves it
//! at its next host. Only containerd's uid may connect, connections must send headers in time,
//! and a full table closes the connection idle the longest rather than the newcomer
//! ([`super::access`], [`super::conns`]).

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{header, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::access::{Refusal, HOP_HEADER};
use super::blob::{self, status, Body};
use super::conns::{Admit, Busy, Slot, Table};
use super::demand::{Access, Key, Presented};
use super::route::{self, Route};
use super::Mirror;
use crate::http_server::Listener;
use crate::metrics::MirrorLabels;

/// Serves `listener` until `stop` is cancelled.
pub fn spawn(
    mirror: Arc<Mirror>,
    listener: TcpListener,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let conns = Table::new(mirror.cfg.max_connections);
    let listener = Listener {
        name: "mirror",
        listener,
        stop: stop.clone(),
    };
    // Each connection is checked (peer uid), given a place in the table, then served.
    tokio::spawn(
        listener.run(move |stream, peer| {
            admit(mirror.clone(), conns.clone(), stream, peer, stop.clone())
        }),
    )
}

/// Checks the peer, gives it a place in the table, and serves it; a refused connection is
/// dropped (closed) before anything is read from it.
async fn admit(
    mirror: Arc<Mirror>,
    conns: Arc<Table>,
    stream: TcpStream,
    peer: std::net::SocketAddr,
    stop: CancellationToken,
) {
    let Ok(local) = stream.local_addr() else {
        return;
    };
    if let Err(why) = mirror.gate.admits(local, peer).await {
        mirror.gate.refused(&mirror.metrics, peer, why);
        return;
    }
    let slot = match conns.admit() {
        Admit::Admitted(slot) => slot,
        Admit::Evicted(slot) => {
            mirror
                .gate
                .refused(&mirror.metrics, peer, Refusal::IdleEvicted);
            slot
        }
        Admit::Full => {
            mirror.gate.refused(&mirror.metrics, peer, Refusal::Cap);
            return;
        }
    };
    debug!(%peer, "mirror: connection accepted");
    let _ = stream.set_nodelay(true);
    let conn = super::backlog::Conn { local, peer };
    serve_connection(mirror, stream, conn, slot, stop).await
}

async fn serve_connection(
    mirror: Arc<Mirror>,
    stream: TcpStream,
    conn: super::backlog::Conn,
    slot: Slot,
    stop: CancellationToken,
) {
    let peer = conn.peer;
    let slot = Arc::new(slot);
    let timeout = mirror.cfg.header_read_timeout;
    let close = slot.close.clone();
    let svc = service_fn(move |req| {
        // The head is in: this connection is not closed to make room until its body is done.
        let busy = slot.busy();
        let mirror = mirror.clone();
        async move {
            let resp = handle(mirror, req, conn).await?;
            Ok::<_, Infallible>(resp.map(|inner| Tracked { inner, _busy: busy }))
        }
    });
    let conn = crate::http_server::http1(stream, svc, timeout);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => if let Err(e) = r {
            debug!(%peer, error = %e, "mirror connection ended with an error");
        },
        _ = close.cancelled() => debug!(%peer, "mirror connection closed to make room"),
        _ = stop.cancelled() => {}
    }
}

/// A response body that keeps its connection marked busy until it is done.
struct Tracked {
    inner: Body,
    _busy: Busy,
}

impl http_body::Body for Tracked {
    type Data = bytes::Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Answers `req`, which came in on `conn` (a prewarm blob stream follows containerd's reading
/// on it, see [`super::backlog`]).
async fn handle(
    mirror: Arc<Mirror>,
    req: Request<Incoming>,
    conn: super::backlog::Conn,
) -> Result<Response<Body>, Infallible> {
    let head = req.method() == Method::HEAD;
    if req.method() != Method::GET && !head {
        return Ok(status(
            StatusCode::METHOD_NOT_ALLOWED,
            "the mirror serves pulls only",
        ));
    }
    let route = route::parse(req.uri().path(), req.uri().query());
    let ns = match &route {
        Route::Manifest(k) | Route::Blob(k) => Some(k.registry.as_str()),
        _ => None,
    };
    if let Some(why) = mirror.refuses_loop(req.headers().contains_key(HOP_HEADER), ns) {
        debug!(path = req.uri().path(), why, "mirror: loop refused");
        let kind = match &route {
            Route::Manifest(_) => "manifest",
            Route::Blob(_) => "blob",
            _ => "other",
        };
        let resp = status(StatusCode::LOOP_DETECTED, why);
        count(&mirror, kind, &resp);
        return Ok(resp);
    }
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
                blob::serve(&mirror, key, presented, range, head, Some(conn)).await,
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
    count(&mirror, kind, &resp);
    Ok(resp)
}

fn count(mirror: &Mirror, kind: &'static str, resp: &Response<Body>) {
    mirror
        .metrics
        .mirror_requests
        .get_or_create(&MirrorLabels {
            kind,
            status: status_class(resp.status()),
        })
        .inc();
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
