//! The finish step: the original `PullImage` bytes go to containerd's CRI plugin, which pulls
//! (or, once layers are present, only unpacks) and records the image.

use futures_util::future::BoxFuture;
use futures_util::FutureExt;
use http::{Method, Request};
use http_body_util::Full;
use tonic::body::Body;

use super::{PullJob, Puller};
use crate::grpc::CapturedReply;
use crate::upstream::Containerd;

/// Lets containerd pull by itself.
#[derive(Clone, Debug)]
pub struct ContainerdPuller {
    containerd: Containerd,
}

impl ContainerdPuller {
    pub fn new(containerd: Containerd) -> Self {
        ContainerdPuller { containerd }
    }
}

impl Puller for ContainerdPuller {
    fn pull(&self, job: PullJob) -> BoxFuture<'static, CapturedReply> {
        let containerd = self.containerd.clone();
        async move {
            let fwd = job.request;
            let mut req = Request::new(Body::new(Full::new(fwd.body)));
            *req.method_mut() = Method::POST;
            *req.uri_mut() = fwd.uri;
            *req.headers_mut() = fwd.headers;
            // The merged call lives as long as any requester waits; one requester's deadline
            // must not cut it for the others (each requester's own deadline still applies to it).
            req.headers_mut().remove("grpc-timeout");
            match containerd.forward(req).await {
                Ok(resp) => CapturedReply::capture(resp)
                    .await
                    .unwrap_or_else(CapturedReply::from_status),
                Err(status) => CapturedReply::from_status(status),
            }
        }
        .boxed()
    }
}
