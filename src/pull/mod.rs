//! Intercepted `PullImage` calls: what they ask for, how concurrent ones merge, and the seam where
//! an upstream pull happens.
//!
//! ```text
//! front door ──PullRequestInfo──▶ PullCoordinator (merge, detach, cancel) ──PullJob──▶ dyn Puller
//! ```
//! [`ContainerdPuller`] forwards the original request for containerd to pull by itself. Later
//! layers wrap it: a fetcher that streams layers into containerd's content store first, and a
//! scheduler deciding when each job may run.

mod coordinator;
mod finish;
pub mod request;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use http::{HeaderMap, Uri};

pub use coordinator::{CancelError, Joined, PullCoordinator};
pub use finish::ContainerdPuller;
pub use request::{normalize_reference, BadRequest, Class, PullRequestInfo, PRIORITY_ANNOTATION};

use std::sync::Arc;

use crate::grpc::CapturedReply;
use crate::jobs::JobRecord;

/// The gRPC path pullgate intercepts.
pub const PULL_IMAGE_PATH: &str = "/runtime.v1.ImageService/PullImage";

/// The original `PullImage` call, kept as bytes so containerd receives exactly what was sent.
#[derive(Clone, Debug)]
pub struct ForwardRequest {
    pub uri: Uri,
    pub headers: HeaderMap,
    /// The whole gRPC request body (frame header and message).
    pub body: Bytes,
}

/// One upstream pull, shared by every requester merged into it.
#[derive(Debug)]
pub struct PullJob {
    /// Job number, for logs.
    pub id: u64,
    pub info: PullRequestInfo,
    pub request: ForwardRequest,
    /// The job's shared record: priority (raised by merges), state, progress.
    pub record: Arc<JobRecord>,
}

/// Performs a pull and answers with containerd's complete reply. The returned future is dropped
/// when every requester has gone: implementations must stop their work on drop.
pub trait Puller: Send + Sync + 'static {
    fn pull(&self, job: PullJob) -> BoxFuture<'static, CapturedReply>;
}
