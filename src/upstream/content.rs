//! containerd's content store: dropping an ingest whose commit failed verification (writing
//! one is [`super::ingest`]).
//!
//! A blob that arrived complete but corrupt stays in containerd as a full-size ingest, and under
//! the pull's lease (kept after a failure so the next attempt resumes) the next attempt would find
//! it complete and fail its commit again, as containerd 2.x does even without a lease. Aborting
//! it lets the retry fetch the blob afresh.

use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::proto::containerd::content::v1 as content;
use content::content_client::ContentClient;

/// The ingest named in containerd's "failed commit on ref "<ref>": unexpected commit digest"
/// error, if that is the error.
pub fn failed_commit_ref(message: &str) -> Option<&str> {
    let (_, rest) = message.split_once("failed commit on ref \"")?;
    let (reference, after) = rest.split_once('"')?;
    after
        .contains("unexpected commit digest")
        .then_some(reference)
        .filter(|r| !r.is_empty() && r.len() < 256)
}

/// Drops the ingest `reference` (gone already: fine).
pub async fn abort_ingest(
    channel: Channel,
    namespace: &str,
    reference: &str,
) -> Result<(), Status> {
    let req = super::namespaced(
        content::AbortRequest {
            r#ref: reference.to_string(),
        },
        namespace,
    );
    match ContentClient::new(channel).abort(req).await {
        Ok(_) => Ok(()),
        Err(s) if s.code() == Code::NotFound => Ok(()),
        Err(s) => Err(s),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ref_of_a_failed_commit_is_found() {
        let m = "failed to pull and unpack image \"r/x:v1\": failed commit on ref \"layer-sha256:ab\": unexpected commit digest sha256:cd, expected sha256:ab: failed precondition";
        assert_eq!(failed_commit_ref(m), Some("layer-sha256:ab"));
        assert_eq!(
            failed_commit_ref("failed commit on ref \"x\": short write"),
            None
        );
        assert_eq!(failed_commit_ref("not found"), None);
    }
}
