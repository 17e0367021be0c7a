//! The CRI front door's request handling: every call goes to containerd as it is, except
//! `PullImage`, which is read and handed to the pull coordinator.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use http::{Request, Response};
use http_body::{Frame, SizeHint};
use http_body_util::{BodyExt, Limited};
use tokio::runtime::Handle;
use tokio_util::task::AbortOnDropHandle;
use tonic::body::Body;
use tonic::{Code, Status};
use tracing::{debug, warn};

use crate::grpc::{self, status_response, CapturedReply, UnaryMessage, MAX_MESSAGE_SIZE};
use crate::metrics::{code_label, ClassLabels, ClassResultLabels, Metrics};
use crate::pull::{ForwardRequest, PullCoordinator, PullRequestInfo, PULL_IMAGE_PATH};
use crate::upstream::Containerd;

/// The tower service behind the CRI socket.
#[derive(Clone)]
pub struct CriProxy {
    inner: Arc<Inner>,
}

struct Inner {
    containerd: Containerd,
    pulls: Arc<PullCoordinator>,
    /// Where pulls run: the front door's thread only reads and relays.
    pull_runtime: Handle,
    metrics: Arc<Metrics>,
}

impl CriProxy {
    /// `containerd` carries the passthrough calls (build it on the runtime that serves the
    /// socket); pulls are run on `pull_runtime`.
    pub fn new(
        containerd: Containerd,
        pulls: Arc<PullCoordinator>,
        pull_runtime: Handle,
        metrics: Arc<Metrics>,
    ) -> Self {
        CriProxy {
            inner: Arc::new(Inner {
                containerd,
                pulls,
                pull_runtime,
                metrics,
            }),
        }
    }
}

impl tower::Service<Request<Body>> for CriProxy {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response<Body>, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let inner = self.inner.clone();
        Box::pin(async move {
            let method = req.uri().path().to_owned();
            let resp = if method == PULL_IMAGE_PATH {
                inner.pull_image(req).await
            } else {
                inner.forward(req).await
            };
            Ok(observe(resp, method, inner.metrics.clone()))
        })
    }
}

impl Inner {
    async fn forward(&self, req: Request<Body>) -> Response<Body> {
        match self.containerd.forward(req).await {
            Ok(resp) => resp,
            Err(status) => {
                warn!(error = status.message(), "call not forwarded");
                status_response(status)
            }
        }
    }

    async fn pull_image(&self, req: Request<Body>) -> Response<Body> {
        let started = Instant::now();
        let (parts, body) = req.into_parts();
        let body = match Limited::new(body, MAX_MESSAGE_SIZE + 5).collect().await {
            Ok(c) => c.to_bytes(),
            Err(e) => {
                return status_response(Status::invalid_argument(format!(
                    "cannot read PullImage request (limit {MAX_MESSAGE_SIZE} bytes): {e}"
                )))
            }
        };
        let message = match grpc::unary_message(body.clone()) {
            Ok(UnaryMessage::Plain(m)) => m,
            Ok(UnaryMessage::Compressed) => {
                // Never worse than containerd: what pullgate cannot read goes through untouched.
                debug!("compressed PullImage request: forwarded without merging");
                let req = Request::from_parts(parts, Body::new(http_body_util::Full::new(body)));
                return self.forward(req).await;
            }
            Err(status) => return status_response(status),
        };
        let info = match PullRequestInfo::decode(&message) {
            Ok(info) => info,
            Err(e) => {
                debug!(error = %e, "PullImage rejected");
                return status_response(Status::invalid_argument(e.to_string()));
            }
        };
        let class = info.class;
        let request = ForwardRequest {
            uri: parts.uri,
            headers: parts.headers,
            body,
        };
        let pulls = self.pulls.clone();
        // Cancelled with this call, as before: kubelet giving up drops the pull's waiter.
        let pull = AbortOnDropHandle::new(
            self.pull_runtime
                .spawn(async move { pulls.pull(info, request).await }),
        );
        let reply = match pull.await {
            Ok(reply) => reply,
            Err(e) => {
                warn!(error = %e, "pull task failed");
                return status_response(Status::internal(format!("pull failed in pullgate: {e}")));
            }
        };
        self.record_pull(class, &reply, started);
        reply.to_response()
    }

    fn record_pull(&self, class: crate::vocab::Class, reply: &CapturedReply, started: Instant) {
        let code = reply.status().code();
        self.metrics
            .pull_requests
            .get_or_create(&ClassResultLabels {
                class: class.as_str(),
                result: code_label(code),
            })
            .inc();
        self.metrics
            .pull_duration
            .get_or_create(&ClassLabels::new(class))
            .observe(started.elapsed().as_secs_f64());
    }
}

/// Counts the call by method and final gRPC code. The code of a streamed reply is only known
/// from its trailers, so the body is wrapped and the count happens when they pass (or, if the
/// caller goes away first, as `cancelled`).
fn observe(resp: Response<Body>, method: String, metrics: Arc<Metrics>) -> Response<Body> {
    if let Some(status) = Status::from_header_map(resp.headers()) {
        // Trailers-only reply: the code is already known.
        metrics.record_call(&method, status.code());
        return resp;
    }
    resp.map(|inner| {
        Body::new(ObservedBody {
            inner,
            pending: Some((method, metrics)),
        })
    })
}

struct ObservedBody {
    inner: Body,
    pending: Option<(String, Arc<Metrics>)>,
}

impl ObservedBody {
    fn finish(&mut self, code: Code) {
        if let Some((method, metrics)) = self.pending.take() {
            metrics.record_call(&method, code);
        }
    }
}

impl http_body::Body for ObservedBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(trailers) = frame.trailers_ref() {
                    let code = grpc::status_of(&http::HeaderMap::new(), Some(trailers)).code();
                    self.finish(code);
                }
            }
            Poll::Ready(Some(Err(_))) => self.finish(Code::Unavailable),
            Poll::Ready(None) => self.finish(Code::Unknown),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for ObservedBody {
    fn drop(&mut self) {
        self.finish(Code::Cancelled);
    }
}
