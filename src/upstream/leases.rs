//! The lease a forwarded pull runs under, so that what containerd downloaded survives a failed or
//! interrupted pull and the next attempt resumes it with `Range`.
//!
//! containerd's CRI pull uses a lease named in the request's `containerd-lease` header instead of
//! creating (and, when the pull ends, deleting) its own: its client reuses a lease found in the
//! context, and reads the gRPC header for that. Without it, a pull cut short (pullgate killed, the
//! registry gone mid-blob) loses its partial downloads to containerd's GC as soon as its own lease
//! goes. The lease expires by itself (`containerd.io/gc.expire`), so nothing is kept for ever when
//! nobody retries; after a successful pull pullgate deletes it (the image then holds its content).

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::proto::containerd::leases::v1 as leases;
use leases::leases_client::LeasesClient;

/// Label that makes containerd's GC drop a lease after the given RFC 3339 time.
const EXPIRE_LABEL: &str = "containerd.io/gc.expire";
/// Marks pullgate's leases, so operators can tell them apart (`ctr -n k8s.io leases ls`).
pub const OWNER_LABEL: &str = "pullgate.io/job";
/// RFC 3339 ends at year 9999; config bounds keep expiries far below this.
const MAX_EXPIRY: Duration = Duration::from_secs(10 * 365 * 86400);

/// The gRPC header that names the lease of a request.
pub const LEASE_HEADER: &str = "containerd-lease";

#[derive(Clone, Debug)]
pub struct Leases {
    channel: Channel,
    namespace: String,
}

impl Leases {
    /// containerd's channel and the namespace of the leases.
    pub fn channel(&self) -> (&Channel, &str) {
        (&self.channel, &self.namespace)
    }

    pub fn new(channel: Channel, namespace: impl Into<String>) -> Self {
        Leases {
            channel,
            namespace: namespace.into(),
        }
    }

    /// Creates a lease containerd drops by itself after `expire`.
    pub async fn create(&self, id: &str, job: u64, expire: Duration) -> Result<(), Status> {
        let now = SystemTime::now();
        let until = now.checked_add(expire.min(MAX_EXPIRY)).unwrap_or(now);
        let labels = HashMap::from([
            (
                EXPIRE_LABEL.to_string(),
                humantime::format_rfc3339_seconds(until).to_string(),
            ),
            (OWNER_LABEL.to_string(), job.to_string()),
        ]);
        let req = super::namespaced(
            leases::CreateRequest {
                id: id.to_string(),
                labels,
            },
            &self.namespace,
        );
        LeasesClient::new(self.channel.clone())
            .create(req)
            .await
            .map(|_| ())
    }

    /// Deletes a lease; what it alone protected becomes garbage.
    pub async fn delete(&self, id: &str) -> Result<(), Status> {
        let req = super::namespaced(
            leases::DeleteRequest {
                id: id.to_string(),
                sync: false,
            },
            &self.namespace,
        );
        match LeasesClient::new(self.channel.clone()).delete(req).await {
            Ok(_) => Ok(()),
            Err(s) if s.code() == Code::NotFound => Ok(()),
            Err(s) => Err(s),
        }
    }
}
