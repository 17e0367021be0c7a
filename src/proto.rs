//! Generated protobuf types and clients (see `proto/`).
//!
//! A leaf: imports nothing of the crate.

#![allow(clippy::all, missing_docs)]

/// CRI v1 (`runtime.v1`).
pub mod runtime {
    pub mod v1 {
        tonic::include_proto!("runtime.v1");
    }
}

/// containerd services and their shared types.
pub mod containerd {
    pub mod types {
        tonic::include_proto!("containerd.types");
    }
    pub mod version {
        pub mod v1 {
            tonic::include_proto!("containerd.services.version.v1");
        }
    }
    pub mod content {
        pub mod v1 {
            tonic::include_proto!("containerd.services.content.v1");
        }
    }
    pub mod leases {
        pub mod v1 {
            tonic::include_proto!("containerd.services.leases.v1");
        }
    }
    pub mod events {
        pub mod v1 {
            tonic::include_proto!("containerd.services.events.v1");
        }
    }
}

/// pullgate's own API (`pullgate.v1`).
pub mod pullgate {
    pub mod v1 {
        tonic::include_proto!("pullgate.v1");
    }
}

/// Generated code names `containerd.types` relative to `containerd.services.*.v1`, three levels
/// up; this tree leaves out the `services` level, so the path lands here.
pub mod types {
    pub use super::containerd::types::*;
}
