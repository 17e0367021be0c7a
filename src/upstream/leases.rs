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
/// Marks pullgate's leases, so operators can tell them apart (`ctr -n k8s.io leases ls`); the
/// value is `<process start, unix ms>-<job>`, unique across restarts.
pub const OWNER_LABEL: &str = "pullgate.io/job";
/// The image a lease holds partial downloads of, so that a restarted pullgate keeps one per image.
pub const IMAGE_LABEL: &str = "pullgate.io/image";
/// containerd refuses a label whose key and value exceed 4096 bytes.
const MAX_LABEL: usize = 4000;
/// RFC 3339 ends at year 9999; config bounds keep expiries far below this.
const MAX_EXPIRY: Duration = Duration::from_secs(10 * 365 * 86400);

/// A lease made ahead of need (see `pull::partials`): a pod's pull takes it without waiting on
/// containerd's metadata store.
pub const SPARE_LABEL: &str = "pullgate.io/spare";
/// On the image's lease made beside a spare a pod's pull runs under: that spare's id. The spare
/// is moved into this lease when the pull fails, or when a restarted pullgate adopts it.
pub const PAIR_LABEL: &str = "pullgate.io/spare-of-pull";

/// What a lease is for, in its labels.
#[derive(Clone, Copy, Debug)]
pub enum Mark<'a> {
    /// One pull's lease for `image`; `pair`: the spare that pull runs under.
    Image {
        image: &'a str,
        pair: Option<&'a str>,
    },
    /// Made ahead of need, for no image yet.
    Spare,
}

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

    /// Creates a lease containerd drops by itself after `expire`, labelled with its job and image.
    pub async fn create(
        &self,
        id: &str,
        job: &str,
        image: &str,
        expire: Duration,
    ) -> Result<(), Status> {
        self.create_labelled(id, job, Mark::Image { image, pair: None }, expire)
            .await
    }

    /// Like [`Leases::create`], with `mark` saying what the lease is for.
    pub async fn create_labelled(
        &self,
        id: &str,
        job: &str,
        mark: Mark<'_>,
        expire: Duration,
    ) -> Result<(), Status> {
        let now = SystemTime::now();
        let until = now.checked_add(expire.min(MAX_EXPIRY)).unwrap_or(now);
        let labels = HashMap::from([
            (
                EXPIRE_LABEL.to_string(),
                humantime::format_rfc3339_seconds(until).to_string(),
            ),
            (OWNER_LABEL.to_string(), job.to_string()),
        ]);
        let mut labels = labels;
        match mark {
            Mark::Image { image, pair } => {
                if image.len() <= MAX_LABEL {
                    labels.insert(IMAGE_LABEL.to_string(), image.to_string());
                }
                if let Some(spare) = pair {
                    labels.insert(PAIR_LABEL.to_string(), spare.to_string());
                }
            }
            Mark::Spare => {
                labels.insert(SPARE_LABEL.to_string(), "true".to_string());
            }
        }
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

    /// Deletes a lease; what it alone protected becomes garbage. `sync`: containerd's GC has
    /// run (the space is free) when this returns.
    pub async fn delete(&self, id: &str, sync: bool) -> Result<(), Status> {
        let req = super::namespaced(
            leases::DeleteRequest {
                id: id.to_string(),
                sync,
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

/// One of pullgate's leases as containerd lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ours {
    pub id: String,
    /// `None`: made by a pullgate that did not label the image, or a spare.
    pub image: Option<String>,
    /// The spare lease the pull of `image` ran under (see [`PAIR_LABEL`]).
    pub pair: Option<String>,
    /// Made ahead of need ([`SPARE_LABEL`]).
    pub spare: bool,
    /// Unix seconds.
    pub created: i64,
}

impl Leases {
    /// pullgate's leases (labelled [`OWNER_LABEL`]), of every process that ran.
    pub async fn list_ours(&self) -> Result<Vec<Ours>, Status> {
        let req = super::namespaced(
            leases::ListRequest {
                filters: vec![format!("labels.\"{OWNER_LABEL}\"")],
            },
            &self.namespace,
        );
        let listed = LeasesClient::new(self.channel.clone()).list(req).await?;
        Ok(listed
            .into_inner()
            .leases
            .into_iter()
            .filter(|l| l.labels.contains_key(OWNER_LABEL))
            .map(|l| Ours {
                image: l.labels.get(IMAGE_LABEL).cloned(),
                pair: l.labels.get(PAIR_LABEL).cloned(),
                spare: l.labels.contains_key(SPARE_LABEL),
                created: l.created_at.map(|t| t.seconds).unwrap_or_default(),
                id: l.id,
            })
            .collect())
    }

    /// How many resources (ingests, content, snapshots) lease `id` holds.
    pub async fn resource_count(&self, id: &str) -> Result<usize, Status> {
        Ok(self.resources(id).await?.len())
    }

    async fn resources(&self, id: &str) -> Result<Vec<leases::Resource>, Status> {
        let req = super::namespaced(
            leases::ListResourcesRequest { id: id.to_string() },
            &self.namespace,
        );
        let listed = LeasesClient::new(self.channel.clone())
            .list_resources(req)
            .await?;
        Ok(listed.into_inner().resources)
    }

    /// Adds everything lease `from` holds (ingests, content, snapshots) to lease `into`, so that
    /// `from` can go without freeing any of it.
    pub async fn absorb(&self, into: &str, from: &str) -> Result<usize, Status> {
        let mut client = LeasesClient::new(self.channel.clone());
        let resources = self.resources(from).await?;
        let n = resources.len();
        for r in resources {
            let req = super::namespaced(
                leases::AddResourceRequest {
                    id: into.to_string(),
                    resource: Some(r),
                },
                &self.namespace,
            );
            client.add_resource(req).await?;
        }
        Ok(n)
    }
}
