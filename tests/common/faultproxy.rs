//! An HTTP proxy in front of a registry that breaks one blob's download on purpose: it cuts the
//! body short, flips a byte, or stalls; it can also answer manifest GETs late. Requests are
//! recorded, with their Range headers and arrival times, so tests can see resumption and order.

use parking_lot::Mutex;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::{combinators::BoxBody, BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Pass everything through.
    None,
    /// Send the first half of the body, then close the connection.
    Truncate,
    /// Change one byte in the middle of the body.
    Flip,
    /// Send the bytes before the blob's midpoint, then nothing more (connection kept open). A
    /// resumed request that starts at or past the midpoint gets no byte at all, the way a
    /// registry that hangs on one spot of the blob behaves (resumes make no progress).
    Stall,
}

#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub range: Option<String>,
    pub user_agent: String,
    pub authorization: Option<String>,
    pub at: std::time::Instant,
}

pub struct FaultProxy {
    pub addr: String,
    state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
}

struct State {
    upstream: String,
    /// Digest whose blob GETs get the fault, and how many of them still get it.
    target: Mutex<Option<(String, Fault, usize)>>,
    requests: Mutex<Vec<Recorded>>,
    /// How long a manifest GET waits before it is passed on.
    manifest_delay: Mutex<Duration>,
}

impl FaultProxy {
    pub async fn start(upstream: &str) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let state = Arc::new(State {
            upstream: upstream.to_string(),
            target: Mutex::new(None),
            requests: Mutex::new(Vec::new()),
            manifest_delay: Mutex::new(Duration::ZERO),
        });
        let task = tokio::spawn({
            let state = state.clone();
            async move {
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        return;
                    };
                    let state = state.clone();
                    tokio::spawn(async move {
                        let svc = service_fn(move |req| handle(req, state.clone()));
                        let _ = http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), svc)
                            .await;
                    });
                }
            }
        });
        FaultProxy { addr, state, task }
    }

    /// The next `times` GETs of blob `digest` get `fault`.
    pub fn inject(&self, digest: &str, fault: Fault, times: usize) {
        *self.state.target.lock() = Some((digest.to_string(), fault, times));
    }

    /// Every later manifest GET (not HEAD) is passed on `delay` late.
    pub fn delay_manifest_gets(&self, delay: Duration) {
        *self.state.manifest_delay.lock() = delay;
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.state.requests.lock().clone()
    }

    /// GETs of blob `digest`, with their Range headers.
    pub fn blob_gets(&self, digest: &str) -> Vec<Recorded> {
        self.requests()
            .into_iter()
            .filter(|r| r.method == "GET" && is_blob(&r.path, digest))
            .collect()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type Body = BoxBody<Bytes, std::io::Error>;

async fn handle(req: Request<Incoming>, state: Arc<State>) -> Result<Response<Body>, Infallible> {
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_default();
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    state.requests.lock().push(Recorded {
        method: req.method().to_string(),
        path: path.clone(),
        range: header("range"),
        user_agent: header("user-agent").unwrap_or_default(),
        authorization: header("authorization"),
        at: std::time::Instant::now(),
    });
    let delay = *state.manifest_delay.lock();
    if req.method() == "GET" && path.contains("/manifests/") && !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let fault = {
        let mut target = state.target.lock();
        match target.as_mut() {
            Some((digest, fault, times))
                if *times > 0 && req.method() == "GET" && is_blob(&path, digest) =>
            {
                *times -= 1;
                *fault
            }
            _ => Fault::None,
        }
    };

    let client = super::registry::http_client();
    let mut upstream = client.request(
        req.method().clone(),
        format!("http://{}{}", state.upstream, path),
    );
    for (name, value) in req.headers() {
        if name != "host" {
            upstream = upstream.header(name, value);
        }
    }
    let body = req
        .into_body()
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let resp = match upstream.body(body).send().await {
        Ok(r) => r,
        Err(e) => {
            let mut r = Response::new(full(Bytes::from(format!("proxy: {e}"))));
            *r.status_mut() = hyper::StatusCode::BAD_GATEWAY;
            return Ok(r);
        }
    };
    let mut builder = Response::builder().status(resp.status().as_u16());
    for (name, value) in resp.headers() {
        builder = builder.header(name.as_str(), value.as_bytes());
    }
    if fault == Fault::None {
        let stream = resp
            .bytes_stream()
            .map(|r| r.map(Frame::data).map_err(std::io::Error::other));
        return Ok(builder
            .body(BodyExt::boxed(StreamBody::new(stream)))
            .unwrap());
    }
    // Where a ranged answer starts within the blob, and the blob's size: "bytes FROM-TO/SIZE".
    let (from, size) = resp
        .headers()
        .get("content-range")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (range, size) = v.strip_prefix("bytes ")?.split_once('/')?;
            Some((range.split_once('-')?.0.parse().ok()?, size.parse().ok()?))
        })
        .unwrap_or((0usize, 0usize));
    let data = resp.bytes().await.unwrap_or_default();
    let half = data.len() / 2;
    let size = if size == 0 { data.len() } else { size };
    let stall_at = (size / 2).saturating_sub(from);
    let body: Body = match fault {
        Fault::Flip => {
            let mut v = data.to_vec();
            v[half] ^= 0xff;
            full(Bytes::from(v))
        }
        Fault::Truncate => {
            let first = Bytes::copy_from_slice(&data[..half]);
            let stream = futures_util::stream::iter(vec![
                Ok(Frame::data(first)),
                Err(std::io::Error::other("cut on purpose")),
            ]);
            BodyExt::boxed(StreamBody::new(stream))
        }
        Fault::Stall => {
            let first = Bytes::copy_from_slice(&data[..stall_at.min(data.len())]);
            let stream = futures_util::stream::once(async move { Ok(Frame::data(first)) }).chain(
                futures_util::stream::once(async {
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                    Err(std::io::Error::other("stalled"))
                }),
            );
            BodyExt::boxed(StreamBody::new(stream))
        }
        Fault::None => unreachable!(),
    };
    Ok(builder.body(body).unwrap())
}

fn full(b: Bytes) -> Body {
    BodyExt::boxed(http_body_util::Full::new(b).map_err(|never| match never {}))
}

/// Whether a request target (path and query: containerd adds `?ns=` at mirrors) is blob
/// `digest`.
fn is_blob(target: &str, digest: &str) -> bool {
    let path = target.split_once('?').map_or(target, |(p, _)| p);
    path.ends_with(&format!("/blobs/{digest}"))
}
