//! Where the mirror's blob bytes come from: the administrator's hosts, then the registry, as an
//! interface the pump and its ranged parts share (the daemon gives it the [`RegistryClient`];
//! unit tests a stand-in), and the counters of the bytes fetched.

use std::ops::Range;

use futures_util::future::BoxFuture;
use futures_util::FutureExt;

use super::demand::BlobSource;
use crate::metrics::{ClassLabels, Metrics, SourceLabels};
use crate::registry::{BlobBody, Credentials, ImageRef, RegistryClient, RegistryError, Source};
use crate::vocab::Class;

pub trait Fetch: Send + Sync {
    /// Opens bytes `range` of the blob `source` names, with its credentials.
    fn fetch<'a>(
        &'a self,
        source: &'a BlobSource,
        range: Range<u64>,
    ) -> BoxFuture<'a, Result<BlobBody, RegistryError>>;
    /// Whether `host` (`host[:port]`) honours `Range`; `None` until seen.
    fn ranges_work(&self, host: &str) -> Option<bool>;
    /// The size of blob `digest` of `image`.
    fn blob_size<'a>(
        &'a self,
        image: &'a ImageRef,
        creds: &'a Credentials,
        digest: &'a str,
    ) -> BoxFuture<'a, Result<u64, RegistryError>>;
}

impl Fetch for RegistryClient {
    fn fetch<'a>(
        &'a self,
        source: &'a BlobSource,
        range: Range<u64>,
    ) -> BoxFuture<'a, Result<BlobBody, RegistryError>> {
        self.fetch_blob(&source.image, &source.creds, &source.descriptor, range)
            .boxed()
    }

    fn ranges_work(&self, host: &str) -> Option<bool> {
        RegistryClient::ranges_work(self, host)
    }

    fn blob_size<'a>(
        &'a self,
        image: &'a ImageRef,
        creds: &'a Credentials,
        digest: &'a str,
    ) -> BoxFuture<'a, Result<u64, RegistryError>> {
        RegistryClient::blob_size(self, image, creds, digest).boxed()
    }
}

/// Counts `n` bytes fetched from `source` for a stream of `class`.
pub fn count(metrics: &Metrics, source: &Source, class: Class, n: u64) {
    let source = match source {
        Source::Registry => "registry",
        Source::Mirror(_) => "mirror",
    };
    metrics
        .fetched_bytes
        .get_or_create(&SourceLabels { source })
        .inc_by(n);
    metrics
        .class_bytes
        .get_or_create(&ClassLabels::new(class))
        .inc_by(n);
}
