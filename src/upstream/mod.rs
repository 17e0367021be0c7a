//! Clients of the services pullgate sits in front of.

pub mod containerd;
pub mod content;
pub mod snapshots;

pub use containerd::Containerd;
pub use content::ContentStore;

/// A request to one of containerd's services, in `namespace`, under `lease` when given (what is
/// created under a lease is protected from containerd's GC until the lease goes).
pub(crate) fn namespaced<T>(msg: T, namespace: &str, lease: Option<&str>) -> tonic::Request<T> {
    use tonic::metadata::MetadataValue;
    let mut req = tonic::Request::new(msg);
    if let Ok(v) = MetadataValue::try_from(namespace) {
        req.metadata_mut().insert("containerd-namespace", v);
    }
    if let Some(Ok(v)) = lease.map(MetadataValue::try_from) {
        req.metadata_mut().insert("containerd-lease", v);
    }
    req
}
