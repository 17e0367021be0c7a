//! Clients of the services pullgate sits in front of.
//!
//! Owns the connections to containerd (CRI, content, leases) and the disk sampler of its root. May
//! import `config`, `metrics`, `errors` and `proto`.

pub mod containerd;
pub mod content;
pub mod disk;
pub mod ingest;
pub mod leases;

pub use containerd::Containerd;
pub use leases::Leases;

/// A request to one of containerd's services, in `namespace`.
pub(crate) fn namespaced<T>(msg: T, namespace: &str) -> tonic::Request<T> {
    use tonic::metadata::MetadataValue;
    let mut req = tonic::Request::new(msg);
    if let Ok(v) = MetadataValue::try_from(namespace) {
        req.metadata_mut().insert("containerd-namespace", v);
    }
    req
}
