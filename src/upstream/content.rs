//! containerd's content store and leases, as pullgate's layer fetcher uses them.
//!
//! Every call carries the namespace (`containerd-namespace`) and, for writes, the job's lease
//! (`containerd-lease`), so what pullgate writes is protected from containerd's GC until the pull
//! has finished, and collected automatically if pullgate dies (the lease expires by itself).

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Code, Request, Status, Streaming};

use crate::proto::containerd::content::v1 as content;
use crate::proto::containerd::leases::v1 as leases;
use content::content_client::ContentClient;
use leases::leases_client::LeasesClient;

/// Label that makes containerd's GC drop a lease after the given RFC 3339 time.
const LEASE_EXPIRE_LABEL: &str = "containerd.io/gc.expire";
/// The longest lease asked for: RFC 3339 ends at year 9999 (formatting a later time panics) and
/// `SystemTime + Duration` overflows long before `u64::MAX` seconds.
const MAX_LEASE_EXPIRY: Duration = Duration::from_secs(10 * 365 * 86400);
/// Marks pullgate's leases, so operators (and tests) can tell them apart.
pub const LEASE_OWNER_LABEL: &str = "pullgate.io/job";

/// The `gc.expire` label value for a lease of `expire` from `now` (capped at [`MAX_LEASE_EXPIRY`]).
fn lease_until(now: SystemTime, expire: Duration) -> String {
    let until = now.checked_add(expire.min(MAX_LEASE_EXPIRY)).unwrap_or(now);
    humantime::format_rfc3339_seconds(until).to_string()
}

#[derive(Clone, Debug)]
pub struct ContentStore {
    channel: Channel,
    namespace: String,
}

/// The state of an unfinished ingest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IngestStatus {
    pub reference: String,
    pub offset: u64,
    pub total: u64,
    pub expected: String,
}

impl ContentStore {
    pub fn new(channel: Channel, namespace: impl Into<String>) -> Self {
        ContentStore {
            channel,
            namespace: namespace.into(),
        }
    }

    fn request<T>(&self, msg: T, lease: Option<&str>) -> Request<T> {
        super::namespaced(msg, &self.namespace, lease)
    }

    fn content(&self) -> ContentClient<Channel> {
        ContentClient::new(self.channel.clone())
    }

    fn leases(&self) -> LeasesClient<Channel> {
        LeasesClient::new(self.channel.clone())
    }

    /// The size of committed content, or `None` when it is not in the store.
    pub async fn info(&self, digest: &str) -> Result<Option<u64>, Status> {
        let req = self.request(
            content::InfoRequest {
                digest: digest.to_string(),
            },
            None,
        );
        match self.content().info(req).await {
            Ok(r) => Ok(r.into_inner().info.map(|i| i.size.max(0) as u64)),
            Err(s) if s.code() == Code::NotFound => Ok(None),
            Err(s) => Err(s),
        }
    }

    /// A small committed blob (an image config), read whole; refuses one over `limit` bytes.
    pub async fn read_small(&self, digest: &str, limit: u64) -> Result<Vec<u8>, Status> {
        let req = self.request(
            content::ReadContentRequest {
                digest: digest.to_string(),
                offset: 0,
                size: 0,
            },
            None,
        );
        let mut stream = self.content().read(req).await?.into_inner();
        let mut out = Vec::new();
        while let Some(m) = stream.message().await? {
            out.extend_from_slice(&m.data);
            if out.len() as u64 > limit {
                return Err(Status::out_of_range(format!(
                    "{digest} is over {limit} bytes"
                )));
            }
        }
        Ok(out)
    }

    /// Sets one label on committed content (as containerd's unpacker does).
    pub async fn set_label(&self, digest: &str, key: &str, value: &str) -> Result<(), Status> {
        let req = self.request(
            content::UpdateRequest {
                info: Some(content::Info {
                    digest: digest.to_string(),
                    labels: HashMap::from([(key.to_string(), value.to_string())]),
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec![format!("labels.{key}")],
                }),
            },
            None,
        );
        self.content().update(req).await.map(|_| ())
    }

    /// The unfinished ingest under `reference`, if any.
    pub async fn status(&self, reference: &str) -> Result<Option<IngestStatus>, Status> {
        let req = self.request(
            content::StatusRequest {
                r#ref: reference.to_string(),
            },
            None,
        );
        match self.content().status(req).await {
            Ok(r) => Ok(r.into_inner().status.map(ingest_status)),
            Err(s) if s.code() == Code::NotFound => Ok(None),
            Err(s) => Err(s),
        }
    }

    /// Unfinished ingests matching a containerd filter (e.g. `ref~="pullgate"`); all when empty.
    pub async fn list_ingests(&self, filter: &str) -> Result<Vec<IngestStatus>, Status> {
        let filters = if filter.is_empty() {
            vec![]
        } else {
            vec![filter.to_string()]
        };
        let req = self.request(content::ListStatusesRequest { filters }, None);
        let resp = self.content().list_statuses(req).await?;
        Ok(resp
            .into_inner()
            .statuses
            .into_iter()
            .map(ingest_status)
            .collect())
    }

    /// Drops an unfinished ingest (a corrupt one must not be resumed).
    pub async fn abort(&self, reference: &str) -> Result<(), Status> {
        let req = self.request(
            content::AbortRequest {
                r#ref: reference.to_string(),
            },
            None,
        );
        match self.content().abort(req).await {
            Ok(_) => Ok(()),
            Err(s) if s.code() == Code::NotFound => Ok(()),
            Err(s) => Err(s),
        }
    }

    /// Opens (or resumes) the ingest `reference` for a blob of `total` bytes and digest
    /// `expected`. `Ok(None)`: the blob is already committed.
    pub async fn writer(
        &self,
        reference: &str,
        total: u64,
        expected: &str,
        lease: &str,
    ) -> Result<Option<ContentWriter>, Status> {
        let (tx, rx) = mpsc::channel(WRITE_WINDOW);
        tx.send(content::WriteContentRequest {
            action: content::WriteAction::Stat as i32,
            r#ref: reference.to_string(),
            total: total as i64,
            expected: expected.to_string(),
            ..Default::default()
        })
        .await
        .map_err(|_| Status::internal("write stream closed"))?;
        let req = self.request(ReceiverStream::new(rx), Some(lease));
        let mut responses = match self.content().write(req).await {
            Ok(r) => r.into_inner(),
            Err(s) if s.code() == Code::AlreadyExists => return Ok(None),
            Err(s) => return Err(s),
        };
        let first = match responses.message().await {
            Ok(Some(m)) => m,
            Ok(None) => return Err(Status::internal("containerd closed the write stream")),
            Err(s) if s.code() == Code::AlreadyExists => return Ok(None),
            Err(s) => return Err(s),
        };
        Ok(Some(ContentWriter {
            tx,
            responses,
            offset: first.offset.max(0) as u64,
            pending: 0,
            total,
            expected: expected.to_string(),
        }))
    }

    /// Creates a lease that containerd drops by itself after `expire`.
    pub async fn create_lease(&self, id: &str, job: u64, expire: Duration) -> Result<(), Status> {
        let until = lease_until(SystemTime::now(), expire);
        let labels = HashMap::from([
            (LEASE_EXPIRE_LABEL.to_string(), until),
            (LEASE_OWNER_LABEL.to_string(), job.to_string()),
        ]);
        let req = self.request(
            leases::CreateRequest {
                id: id.to_string(),
                labels,
            },
            None,
        );
        self.leases().create(req).await.map(|_| ())
    }

    /// Deletes a lease; what it alone protected becomes garbage.
    pub async fn delete_lease(&self, id: &str) -> Result<(), Status> {
        let req = self.request(
            leases::DeleteRequest {
                id: id.to_string(),
                sync: false,
            },
            None,
        );
        match self.leases().delete(req).await {
            Ok(_) => Ok(()),
            Err(s) if s.code() == Code::NotFound => Ok(()),
            Err(s) => Err(s),
        }
    }

    /// Protects committed content with a lease (content found present, or written by another job).
    pub async fn lease_content(&self, lease: &str, digest: &str) -> Result<(), Status> {
        let req = self.request(
            leases::AddResourceRequest {
                id: lease.to_string(),
                resource: Some(leases::Resource {
                    id: digest.to_string(),
                    r#type: "content".to_string(),
                }),
            },
            None,
        );
        self.leases().add_resource(req).await.map(|_| ())
    }

    /// Ids of the leases pullgate holds.
    pub async fn pullgate_leases(&self) -> Result<Vec<String>, Status> {
        let req = self.request(
            leases::ListRequest {
                filters: vec![format!("labels.\"{LEASE_OWNER_LABEL}\"")],
            },
            None,
        );
        let resp = self.leases().list(req).await?;
        Ok(resp.into_inner().leases.into_iter().map(|l| l.id).collect())
    }
}

fn ingest_status(s: content::Status) -> IngestStatus {
    IngestStatus {
        reference: s.r#ref,
        offset: s.offset.max(0) as u64,
        total: s.total.max(0) as u64,
        expected: s.expected,
    }
}

/// Write requests in flight before waiting for containerd's answers: containerd answers each
/// request in order, so writes are pipelined instead of paying a round trip per batch.
const WRITE_WINDOW: usize = 8;

/// One open ingest. containerd answers every request, in order.
pub struct ContentWriter {
    tx: mpsc::Sender<content::WriteContentRequest>,
    responses: Streaming<content::WriteContentResponse>,
    /// Bytes sent (acknowledged or not).
    offset: u64,
    /// Requests whose answer has not been read yet.
    pending: usize,
    total: u64,
    expected: String,
}

impl ContentWriter {
    /// Bytes already in the ingest when it was opened plus those sent since: where a download
    /// continues.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    async fn send(&mut self, req: content::WriteContentRequest) -> Result<(), Status> {
        self.tx
            .send(req)
            .await
            .map_err(|_| Status::unavailable("containerd closed the write stream"))?;
        self.pending += 1;
        Ok(())
    }

    async fn receive(&mut self) -> Result<content::WriteContentResponse, Status> {
        let m = self
            .responses
            .message()
            .await?
            .ok_or_else(|| Status::unavailable("containerd closed the write stream"))?;
        self.pending -= 1;
        Ok(m)
    }

    pub async fn write(&mut self, data: Bytes) -> Result<(), Status> {
        let len = data.len() as u64;
        self.send(content::WriteContentRequest {
            action: content::WriteAction::Write as i32,
            offset: self.offset as i64,
            data,
            ..Default::default()
        })
        .await?;
        self.offset += len;
        while self.pending >= WRITE_WINDOW {
            self.receive().await?;
        }
        Ok(())
    }

    /// Starts the ingest over, keeping its lock: containerd truncates it at the next write (which
    /// is at offset 0). Used when what was written is bad.
    pub fn restart(&mut self) {
        self.offset = 0;
    }

    /// Waits until containerd has stored everything sent so far, so that a download that stops
    /// here (a broken body) resumes after it rather than before.
    pub async fn flush(&mut self) -> Result<(), Status> {
        while self.pending > 0 {
            let m = self.receive().await?;
            if self.pending == 0 && m.offset as u64 != self.offset {
                return Err(Status::internal(format!(
                    "containerd ingest at offset {} after writing up to {}",
                    m.offset, self.offset
                )));
            }
        }
        Ok(())
    }

    /// Commits the ingest; containerd checks size and digest and refuses a mismatch.
    pub async fn commit(mut self) -> Result<(), Status> {
        self.flush().await?;
        let req = content::WriteContentRequest {
            action: content::WriteAction::Commit as i32,
            offset: self.offset as i64,
            total: self.total as i64,
            expected: self.expected.clone(),
            ..Default::default()
        };
        self.send(req).await?;
        match self.receive().await {
            Ok(_) => Ok(()),
            Err(s) if s.code() == Code::AlreadyExists => Ok(()),
            Err(s) => Err(s),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_expiry_is_capped_not_a_panic() {
        let epoch = SystemTime::UNIX_EPOCH;
        assert_eq!(
            lease_until(epoch, Duration::from_secs(3600)),
            "1970-01-01T01:00:00Z"
        );
        // `u64::MAX` seconds used to overflow `SystemTime + Duration` (and past year 9999 the
        // RFC 3339 formatting panics): capped at ten years.
        assert_eq!(
            lease_until(epoch, Duration::from_secs(u64::MAX)),
            "1979-12-30T00:00:00Z"
        );
        assert_eq!(lease_until(SystemTime::now(), Duration::MAX).len(), 20);
    }
}
