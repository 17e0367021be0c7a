//! pullgate's own gRPC API on its API socket: submit prewarm pulls, list, watch and cancel jobs,
//! and report configured prewarm images (`pullgate wait --prewarmed`).
//!
//! May import `vocab`, `jobs`, `pull`, `prewarm`, `frontdoor` (its socket), `proto` and `errors`.

pub mod client;
pub mod codec;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use tokio::net::UnixListener;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};
use tracing::info;

use crate::jobs::{JobBoard, JobRecord};
use crate::prewarm::{EntryStatus, Prewarm, Prewarmer};
use crate::proto::pullgate::v1 as pb;
use crate::proto::pullgate::v1::pullgate_server::{Pullgate, PullgateServer};
use crate::pull::{CancelError, PullCoordinator};
use crate::vocab::Origin;

/// Serves the API until `shutdown` resolves.
pub async fn serve(
    listener: UnixListener,
    api: Api,
    shutdown: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    tonic::transport::Server::builder()
        .add_service(PullgateServer::new(api))
        .serve_with_incoming_shutdown(crate::frontdoor::authority::incoming(listener), shutdown)
        .await
}

#[derive(Clone)]
pub struct Api {
    pub coordinator: Arc<PullCoordinator>,
    pub board: Arc<JobBoard>,
    pub prewarmer: Arc<Prewarmer>,
}

/// One job as the API shows it.
pub fn job_message(r: &JobRecord) -> pb::Job {
    let p = r.priority();
    let layers: Vec<pb::Layer> = r
        .progress
        .blobs
        .lock()
        .iter()
        .map(|b| pb::Layer {
            digest: b.digest.clone(),
            size: b.total,
            done: b.done(),
        })
        .collect();
    let (done, total) = r.progress.totals();
    pb::Job {
        id: r.id,
        image: r.image.clone(),
        class: p.class().as_str().to_string(),
        priority: p.level,
        state: r.state().as_str().to_string(),
        origin: r.origin.as_str().to_string(),
        bytes_total: total.max(r.size()),
        bytes_done: done,
        layers,
        queue_wait_ms: r.queue_wait().as_millis() as u64,
        elapsed_ms: r.elapsed().as_millis() as u64,
        message: r.message(),
        created_unix: r
            .created_at
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or_default(),
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::ListResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Pullgate for Api {
    async fn submit(
        &self,
        req: Request<pb::SubmitRequest>,
    ) -> Result<Response<pb::SubmitResponse>, Status> {
        let req = req.into_inner();
        let prewarm = Prewarm {
            image: req.image.trim().to_string(),
            level: req.priority,
            origin: Origin::Api,
            docker_config: None,
        };
        let joined = prewarm
            .submit(&self.coordinator)
            .map_err(Status::invalid_argument)?;
        let resp = pb::SubmitResponse {
            job_id: joined.id,
            image: joined.record.image.clone(),
            joined: joined.joined,
        };
        info!(job = joined.id, image = %joined.record.image, priority = req.priority,
              "prewarm submitted through the API");
        // The daemon is the requester: the job outlives the client's connection.
        tokio::spawn(joined.reply());
        Ok(Response::new(resp))
    }

    async fn list(
        &self,
        req: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListResponse>, Status> {
        let jobs = if req.into_inner().all {
            self.board.all()
        } else {
            self.board.live()
        };
        Ok(Response::new(pb::ListResponse {
            jobs: jobs.iter().map(|r| job_message(r)).collect(),
        }))
    }

    async fn cancel(
        &self,
        req: Request<pb::CancelRequest>,
    ) -> Result<Response<pb::CancelResponse>, Status> {
        let id = req.into_inner().job_id;
        match self.coordinator.cancel(id) {
            Ok(()) => {
                info!(job = id, "job cancelled through the API");
                Ok(Response::new(pb::CancelResponse {}))
            }
            Err(e @ CancelError::NotFound(_)) => Err(Status::not_found(e.to_string())),
            Err(e @ CancelError::Urgent(_)) => Err(Status::failed_precondition(e.to_string())),
        }
    }

    type WatchStream = WatchStream;

    async fn watch(&self, req: Request<pb::WatchRequest>) -> Result<Response<WatchStream>, Status> {
        let req = req.into_inner();
        let every = Duration::from_millis(u64::from(req.interval_ms.clamp(50, 60_000)));
        let every = if req.interval_ms == 0 {
            Duration::from_millis(500)
        } else {
            every
        };
        let board = self.board.clone();
        if req.job_id != 0 && board.get(req.job_id).is_none() {
            return Err(Status::not_found(format!("no job {}", req.job_id)));
        }
        let stream = futures_util::stream::unfold(
            (board, req.job_id, false, true),
            move |(board, id, ended, first)| async move {
                if ended {
                    return None;
                }
                if !first {
                    tokio::time::sleep(every).await;
                }
                let jobs: Vec<_> = if id == 0 {
                    board.live()
                } else {
                    board.get(id).into_iter().collect()
                };
                // A watched job's last snapshot shows how it ended, then the stream ends.
                let done = id != 0 && jobs.iter().all(|r| r.state().is_terminal());
                let msg = pb::ListResponse {
                    jobs: jobs.iter().map(|r| job_message(r)).collect(),
                };
                Some((Ok(msg), (board, id, done, false)))
            },
        );
        Ok(Response::new(Box::pin(stream)))
    }

    async fn prewarm_status(
        &self,
        _req: Request<pb::PrewarmStatusRequest>,
    ) -> Result<Response<pb::PrewarmStatusResponse>, Status> {
        let entries = self
            .prewarmer
            .status()
            .into_iter()
            .map(|(image, s)| {
                let (state, message) = match s {
                    EntryStatus::Pending => ("pending", String::new()),
                    EntryStatus::Present => ("present", String::new()),
                    EntryStatus::Failed(m) => ("failed", m),
                };
                pb::PrewarmEntryStatus {
                    image,
                    state: state.into(),
                    message,
                }
            })
            .collect();
        Ok(Response::new(pb::PrewarmStatusResponse { entries }))
    }
}
