//! A Spegel-like peer network for the P2P peers model: every simulated node serves the blobs it
//! has finished (committed to its containerd's content store) to the others, over its own
//! uplink (one shaped port per node). A router per node, listed before the origin in that node's
//! `hosts.toml`, streams a blob from a peer that has it complete (peers asked in a rotation that
//! starts after the node, so load spreads), else answers 404 and the node goes to the origin.
//! Manifests always come from the origin. As Spegel, a blob still being fetched is not shared.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use futures_util::TryStreamExt;
use http_body_util::{combinators::BoxBody, BodyExt, Empty, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::net::TcpListener;
use tokio_util::io::ReaderStream;

type Body = BoxBody<Bytes, std::io::Error>;

pub struct Peers {
    routers: Vec<SocketAddr>,
    uplinks: Vec<u16>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Peers {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Where containerd under `node_dir` (a bench `Site`'s directory) keeps committed blobs.
pub fn content_dir(node_dir: &Path) -> PathBuf {
    node_dir.join("ctd/root/io.containerd.content.v1.content/blobs/sha256")
}

impl Peers {
    /// One uplink server and one router per node; `stores[n]` is node n's committed blobs.
    pub async fn start(stores: Vec<PathBuf>) -> Peers {
        let stores = Arc::new(stores);
        let mut tasks = Vec::new();
        let mut uplinks = Vec::new();
        for store in stores.iter() {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            uplinks.push(l.local_addr().unwrap().port());
            let store = store.clone();
            tasks.push(tokio::spawn(serve(l, move |req| {
                let store = store.clone();
                async move { uplink(&store, req).await }
            })));
        }
        let uplinks_shared = Arc::new(uplinks.clone());
        let http = reqwest::Client::builder().no_proxy().build().unwrap();
        let mut routers = Vec::new();
        for node in 0..stores.len() {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            routers.push(l.local_addr().unwrap());
            let (stores, uplinks, http) = (stores.clone(), uplinks_shared.clone(), http.clone());
            tasks.push(tokio::spawn(serve(l, move |req| {
                let (stores, uplinks, http) = (stores.clone(), uplinks.clone(), http.clone());
                async move { route(node, &stores, &uplinks, &http, req).await }
            })));
        }
        Peers {
            routers,
            uplinks,
            tasks,
        }
    }

    /// Node `n`'s router, "127.0.0.1:PORT", as a hosts.toml mirror.
    pub fn router(&self, n: usize) -> String {
        self.routers[n].to_string()
    }

    /// The port node `n` serves its peers from (its uplink, to shape).
    pub fn uplink_port(&self, n: usize) -> u16 {
        self.uplinks[n]
    }
}

async fn serve<F, Fut>(listener: TcpListener, handle: F)
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Response<Body>> + Send + 'static,
{
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let handle = handle.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let handle = handle.clone();
                async move { Ok::<_, Infallible>(handle(req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn empty() -> Body {
    Empty::new().map_err(|e| match e {}).boxed()
}

fn status(code: StatusCode) -> Response<Body> {
    Response::builder().status(code).body(empty()).unwrap()
}

/// `/v2/<name>/blobs/sha256:<hex>` → the hex digest.
fn blob_hex(path: &str) -> Option<&str> {
    let (_, digest) = path.rsplit_once("/blobs/")?;
    let hex = digest.strip_prefix("sha256:")?;
    (hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit())).then_some(hex)
}

/// `bytes=a-` or `bytes=a-b` of a blob of `size` bytes, as a half-open range.
fn parse_range(h: Option<&str>, size: u64) -> Option<std::ops::Range<u64>> {
    let spec = h?.strip_prefix("bytes=")?;
    let (a, b) = spec.split_once('-')?;
    let start: u64 = a.parse().ok()?;
    let end = match b {
        "" => size,
        b => b.parse::<u64>().ok()?.saturating_add(1).min(size),
    };
    (start < end).then_some(start..end)
}

/// A peer's uplink: `GET /<hex>` with `Range`, from its committed blobs only.
async fn uplink(store: &Path, req: Request<Incoming>) -> Response<Body> {
    let hex = req.uri().path().trim_start_matches('/');
    let Ok(mut file) = tokio::fs::File::open(store.join(hex)).await else {
        return status(StatusCode::NOT_FOUND);
    };
    let size = file.metadata().await.map(|m| m.len()).unwrap_or(0);
    let range_header = req
        .headers()
        .get(http::header::RANGE)
        .and_then(|v| v.to_str().ok());
    let (code, range) = match parse_range(range_header, size) {
        Some(r) => (StatusCode::PARTIAL_CONTENT, r),
        None if range_header.is_some() => return status(StatusCode::RANGE_NOT_SATISFIABLE),
        None => (StatusCode::OK, 0..size),
    };
    if file
        .seek(std::io::SeekFrom::Start(range.start))
        .await
        .is_err()
    {
        return status(StatusCode::INTERNAL_SERVER_ERROR);
    }
    let body = ReaderStream::with_capacity(file.take(range.end - range.start), 64 * 1024)
        .map_ok(Frame::data);
    let mut resp = Response::builder()
        .status(code)
        .header(http::header::CONTENT_LENGTH, range.end - range.start)
        .header(http::header::CONTENT_TYPE, "application/octet-stream");
    if code == StatusCode::PARTIAL_CONTENT {
        resp = resp.header(
            http::header::CONTENT_RANGE,
            format!("bytes {}-{}/{size}", range.start, range.end - 1),
        );
    }
    resp.body(StreamBody::new(body).boxed()).unwrap()
}

/// Node `node`'s router: a blob a peer has complete is streamed from that peer's uplink;
/// anything else is a 404 (containerd, or pullgate, then asks the next host: the origin).
async fn route(
    node: usize,
    stores: &[PathBuf],
    uplinks: &[u16],
    http: &reqwest::Client,
    req: Request<Incoming>,
) -> Response<Body> {
    if req.uri().path() == "/v2/" || req.uri().path() == "/v2" {
        return status(StatusCode::OK);
    }
    let Some(hex) = blob_hex(req.uri().path()) else {
        return status(StatusCode::NOT_FOUND);
    };
    let n = stores.len();
    // A finished blob is a file in the peer's store (containerd renames it there on commit).
    let Some((peer, size)) = (1..n).map(|i| (node + i) % n).find_map(|p| {
        let meta = std::fs::metadata(stores[p].join(hex)).ok()?;
        meta.is_file().then_some((p, meta.len()))
    }) else {
        return status(StatusCode::NOT_FOUND);
    };
    if req.method() == http::Method::HEAD {
        return Response::builder()
            .header(http::header::CONTENT_LENGTH, size)
            .body(empty())
            .unwrap();
    }
    let mut up = http.get(format!("http://127.0.0.1:{}/{hex}", uplinks[peer]));
    if let Some(r) = req.headers().get(http::header::RANGE) {
        up = up.header(http::header::RANGE, r.clone());
    }
    let Ok(answer) = up.send().await else {
        return status(StatusCode::BAD_GATEWAY);
    };
    let mut resp = Response::builder().status(answer.status().as_u16());
    for h in [
        http::header::CONTENT_LENGTH,
        http::header::CONTENT_RANGE,
        http::header::CONTENT_TYPE,
    ] {
        if let Some(v) = answer.headers().get(h.as_str()) {
            resp = resp.header(h.as_str(), v.as_bytes());
        }
    }
    let body = answer
        .bytes_stream()
        .map_ok(Frame::data)
        .map_err(std::io::Error::other);
    resp.body(StreamBody::new(body).boxed()).unwrap()
}
