//! pullgate: a CRI image-service shim between kubelet and containerd that intercepts `PullImage`
//! and forwards every other call byte for byte.
//!
//! The modules, in layers: each imports only from the layers below it (`tests/layers.rs` holds
//! the rule against the code).
//!
//! ```text
//! cli, daemon                     wiring and the command line
//! status, preflight, fuzzing      reports and checks over the layers below
//! api, health                     pullgate's own API; readiness of the node's pull path
//! frontdoor, watchdog, prewarm    the CRI socket; systemd's watchdog; prewarm sources
//! pull                            intercepted pulls: merge, admit, forward
//! mirror                          the registry mirror containerd fetches through
//! upstream                        containerd's services
//! schedule                        admission, the lane, byte budgets
//! jobs                            the job board
//! metrics, logging                Prometheus and health endpoint; tracing
//! config                          the TOML file (no domain code)
//! registry                        the upstream OCI client (a leaf)
//! vocab, grpc, errors, proto,     shared vocabulary and helpers
//! small_file, atomic_file
//! ```

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
