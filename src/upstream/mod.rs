//! Clients of the services pullgate sits in front of.

pub mod containerd;
pub mod content;
pub mod snapshots;

pub use containerd::Containerd;
pub use content::ContentStore;
