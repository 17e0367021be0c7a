//! Writing one blob into containerd's content store through its content service, the way its
//! own fetcher does: an ingest under containerd's ref for the blob, resumed at its offset, and
//! committed against the expected digest and size, so containerd verifies what it stores.
//!
//! pullgate writes a prewarm image's blobs this way where containerd 2.x shares few download
//! slots between all pulls (see `pull::stage`): a write takes none of them, so a pod's pull
//! never waits behind it inside containerd.

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use tonic::{Code, Status, Streaming};

use crate::proto::containerd::content::v1 as content;
use content::content_client::ContentClient;
use content::{WriteAction, WriteContentRequest, WriteContentResponse};

/// The kinds of ingest ref containerd's fetcher gives a blob (`remotes.MakeRefKey`): layers,
/// configs, anything else.
pub const REF_KINDS: [&str; 3] = ["layer", "config", "unknown"];

/// containerd's ingest ref for blob `digest` of `kind` (one of [`REF_KINDS`]).
pub fn ref_key(kind: &str, digest: &str) -> String {
    format!("{kind}-{digest}")
}

/// containerd's gRPC server takes messages up to 16 MiB; small ones keep memory flat and bound
/// what containerd still has to write when a write pauses.
const MAX_MESSAGE: usize = 256 << 10;
/// Writes sent before their answers are read: enough to keep containerd busy across the round
/// trip, few enough that a pause for a pod leaves containerd at most 1 MiB of this blob to
/// write (8 MiB in flight per blob made a pod's pull on containerd 1.6 1.11× its lone time
/// beside a staged prewarm, where the mirror's streams, kept to 1 MiB, made it 1.03×).
const IN_FLIGHT: usize = 4;

/// What containerd holds of a blob when its ingest is opened.
pub enum Opened {
    /// Committed already: nothing to write.
    Exists,
    /// An ingest to write from `offset()`.
    Writing(Box<Ingest>),
}

/// An open ingest. Dropped unfinished, containerd keeps what it wrote (under the lease) for the
/// next attempt.
pub struct Ingest {
    tx: mpsc::Sender<WriteContentRequest>,
    answers: Streaming<WriteContentResponse>,
    in_flight: usize,
    offset: u64,
    size: u64,
    digest: String,
}

impl Ingest {
    /// Opens (or resumes) containerd's ingest `reference` of blob `digest` of `size` bytes in
    /// `namespace`, under `lease` (without one, containerd's GC may drop the blob before an
    /// image holds it).
    pub async fn open(
        channel: Channel,
        namespace: &str,
        lease: &str,
        reference: &str,
        digest: &str,
        size: u64,
    ) -> Result<Opened, Status> {
        let (tx, rx) = mpsc::channel(IN_FLIGHT + 1);
        let first = WriteContentRequest {
            action: WriteAction::Stat as i32,
            r#ref: reference.to_string(),
            total: size as i64,
            expected: digest.to_string(),
            ..Default::default()
        };
        tx.send(first).await.expect("receiver held below");
        let mut req = super::namespaced(ReceiverStream::new(rx), namespace);
        let lease = MetadataValue::try_from(lease)
            .map_err(|_| Status::invalid_argument("lease id is not a header value"))?;
        req.metadata_mut()
            .insert(super::leases::LEASE_HEADER, lease);
        let mut answers = match ContentClient::new(channel).write(req).await {
            Ok(r) => r.into_inner(),
            Err(s) if s.code() == Code::AlreadyExists => return Ok(Opened::Exists),
            Err(s) => return Err(s),
        };
        let stat = match answers.message().await {
            Ok(Some(m)) => m,
            Ok(None) => {
                return Err(Status::internal(
                    "containerd ended the write without a word",
                ))
            }
            Err(s) if s.code() == Code::AlreadyExists => return Ok(Opened::Exists),
            Err(s) => return Err(s),
        };
        let offset = u64::try_from(stat.offset).unwrap_or(0);
        let mut ingest = Ingest {
            tx,
            answers,
            in_flight: 0,
            offset,
            size,
            digest: digest.to_string(),
        };
        if offset > size {
            // Longer than the blob: not this blob's bytes. Written again from the start.
            ingest.send(WriteAction::Write, 0, Bytes::new()).await?;
            ingest.offset = 0;
        }
        Ok(Opened::Writing(Box::new(ingest)))
    }

    /// Where the next byte goes.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Appends `data`.
    pub async fn write(&mut self, mut data: Bytes) -> Result<(), Status> {
        if self.offset + data.len() as u64 > self.size {
            return Err(Status::out_of_range(format!(
                "more than the blob's {} bytes",
                self.size
            )));
        }
        while !data.is_empty() {
            let piece = data.split_to(data.len().min(MAX_MESSAGE));
            let at = self.offset;
            self.offset += piece.len() as u64;
            self.send(WriteAction::Write, at, piece).await?;
        }
        Ok(())
    }

    /// Commits the blob: containerd checks its size and digest and moves it into the store.
    pub async fn commit(mut self) -> Result<(), Status> {
        if self.offset != self.size {
            return Err(Status::failed_precondition(format!(
                "{} of {} bytes written",
                self.offset, self.size
            )));
        }
        let commit = WriteContentRequest {
            action: WriteAction::Commit as i32,
            total: self.size as i64,
            expected: self.digest.clone(),
            offset: self.offset as i64,
            ..Default::default()
        };
        self.push(commit).await?;
        while self.in_flight > 0 {
            self.answer().await?;
        }
        Ok(())
    }

    async fn send(&mut self, action: WriteAction, at: u64, data: Bytes) -> Result<(), Status> {
        self.push(WriteContentRequest {
            action: action as i32,
            offset: at as i64,
            data,
            ..Default::default()
        })
        .await
    }

    async fn push(&mut self, req: WriteContentRequest) -> Result<(), Status> {
        if self.in_flight >= IN_FLIGHT {
            self.answer().await?;
        }
        if self.tx.send(req).await.is_err() {
            // containerd closed the call: its status says why.
            return Err(self.ended().await);
        }
        self.in_flight += 1;
        Ok(())
    }

    async fn answer(&mut self) -> Result<(), Status> {
        match self.answers.message().await {
            Ok(Some(_)) => {
                self.in_flight -= 1;
                Ok(())
            }
            Ok(None) => Err(Status::internal("containerd ended the write early")),
            Err(s) => Err(s),
        }
    }

    async fn ended(&mut self) -> Status {
        loop {
            match self.answers.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => return Status::internal("containerd ended the write early"),
                Err(s) => return s,
            }
        }
    }
}
