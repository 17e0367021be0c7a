//! Intercepted `PullImage` calls: what they ask for, how concurrent ones merge, and the seam where
//! an upstream pull happens.
//!
//! ```text
//! front door ──PullRequestInfo──▶ PullCoordinator (merge, detach, cancel) ──PullJob──▶ dyn Puller
//! ```
//! [`ScheduledPuller`] resolves the image, registers its blobs with the mirror and waits for the
//! scheduler's admission; [`ContainerdPuller`] then forwards the original request, and
//! containerd pulls through pullgate's mirror.
//!
//! May import `vocab`, `config`, `jobs`, `schedule`, `mirror`, `registry`, `upstream`, `metrics`,
//! `grpc`, `proto` and `errors`; the front door, prewarm and the API call it.

mod coordinator;
mod finish;
pub mod partials;
pub mod request;
mod scheduled;
mod slots;
mod stage;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use http::{HeaderMap, Uri};

pub use coordinator::{CancelError, Joined, PullCoordinator};
pub use finish::ContainerdPuller;
pub use request::{normalize_reference, BadRequest, PullRequestInfo, PRIORITY_ANNOTATION};
pub use scheduled::ScheduledPuller;
pub use stage::Stager;

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
#[derive(Debug, Clone)]
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
