//! Prewarm sources of pullgate's own: the config file's `[[prewarm]]` list and requests from its
//! API, plus the P2P gate that holds prewarm until the node's P2P component is ready, and the
//! node labels that tell the cluster which of those images the node holds.
//!
//! May import `vocab`, `config`, `pull`, `registry`, `upstream`, `grpc`, `proto`, `errors`,
//! `small_file` and `atomic_file`.

pub mod gate;
pub mod labels;
pub mod manager;
pub mod submit;

pub use manager::{EntryStatus, Prewarmer};
pub use submit::Prewarm;
