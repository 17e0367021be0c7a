//! pullgate: a CRI image-service shim between kubelet and containerd that intercepts `PullImage`
//! and forwards every other call byte for byte.
//!
//! The modules, in layers: each imports only from the layers below it (`tests/layers.rs` holds
//! the rule against the code).
//!
//! ```text
//! 11  cli                                 the command line
//! 10  daemon                              wiring
//!  9  status, preflight, fuzzing          reports and checks over the layers below
//!  8  api                                 pullgate's own API
//!  7  health, frontdoor, watchdog,        readiness of the pull path; the CRI socket;
//!     prewarm                             systemd's watchdog; prewarm sources
//!  6  pull                                intercepted pulls: merge, admit, forward
//!  5  mirror                              the registry mirror containerd fetches through
//!  4  schedule, upstream                  admission, the lane, byte budgets; containerd
//!  3  metrics, logging, jobs              Prometheus and its endpoint; tracing; the job board
//!  2  config                              the TOML file (no domain code)
//!  1  registry, atomic_file               the upstream OCI client; whole-file replacement
//!  0  vocab, grpc, errors, proto,         shared vocabulary and helpers; the HTTP accept loop
//!     small_file, http_server
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
pub mod http_server;
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
