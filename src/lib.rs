//! pullgate: a CRI image-service shim between kubelet and containerd that intercepts `PullImage`
//! and forwards every other call byte for byte.
//!
//! Layout: [`frontdoor`] (the CRI socket), [`pull`] (reading, merging, admitting and forwarding
//! pulls), [`schedule`] (priorities, caps, the large-image lane, bandwidth), [`mirror`] (the
//! registry mirror containerd fetches through), [`registry`] (the upstream OCI client),
//! [`upstream`] (containerd), [`prewarm`] (prewarm sources), [`metrics`] (Prometheus and
//! health), [`config`], [`cli`].

pub mod api;
pub mod atomic_file;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod errors;
pub mod frontdoor;
#[doc(hidden)]
pub mod fuzzing;
pub mod grpc;
pub mod health;
pub mod jobs;
pub mod logging;
pub mod metrics;
pub mod mirror;
pub mod preflight;
pub mod prewarm;
pub mod proto;
pub mod pull;
pub mod registry;
pub mod schedule;
pub mod small_file;
pub mod status;
pub mod upstream;
pub mod vocab;
pub mod watchdog;
