//! Clients of the services pullgate sits in front of.

pub mod containerd;

pub use containerd::Containerd;
