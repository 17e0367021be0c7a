//! The pull side of an OCI distribution client.
//!
//! - [`reference`] — image references, normalised like containerd ([`ImageRef`]);
//! - [`hosts`] — containerd's `hosts.toml` registry host configuration (mirrors first, then the
//!   server);
//! - [`auth`] — credentials (CRI `AuthConfig`, docker `config.json`), `WWW-Authenticate`
//!   challenges, bearer tokens and their cache;
//! - [`manifest`] — media types, manifest / index parsing and checks, platform selection;
//! - [`client`] — [`RegistryClient`], which resolves an image for a platform and fetches blobs
//!   (whole or ranged, streamed), mirrors tried in order with fallback to the registry;
//! - [`error`] — [`RegistryError`];
//! - [`digest`] — `sha256:<hex>` helpers;
//! - [`egress`] — where requests may go: bounded redirects, no link-local/metadata addresses,
//!   never pullgate's own listeners.
//!
//! Credentials go only to the image's own registry (the hosts.toml `server`), never to mirrors
//! unless [`RegistryConfig::mirror_credentials`] is set, and never into a message or a log.
//!
//! A leaf of the domain: may import only `errors`, `proto` and `small_file`.

pub mod auth;
mod body;
pub mod client;
pub mod digest;
pub mod egress;
pub mod error;
pub mod hosts;
mod http_client;
pub mod manifest;
pub mod reference;
mod session;

pub use auth::{Challenge, Credentials};
pub use client::{BlobBody, FetchedManifest, RegistryClient, RegistryConfig, Resolved, Source};
pub use error::RegistryError;
pub use hosts::{load_hosts, RegistryHost, DEFAULT_CONFIG_PATH};
pub use manifest::Platform;
pub use oci_spec::image::Descriptor;
pub use reference::ImageRef;

/// Sent on every upstream request pullgate makes: pullgate's mirror refuses requests carrying
/// it, so a registry or hosts.toml entry pointing back at pullgate cannot make it recurse.
pub const HOP_HEADER: &str = "x-pullgate-hop";
