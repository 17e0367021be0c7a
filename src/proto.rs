//! Generated protobuf types and clients (see `proto/`).

#![allow(clippy::all, missing_docs)]

/// CRI v1 (`runtime.v1`).
pub mod runtime {
    pub mod v1 {
        tonic::include_proto!("runtime.v1");
    }
}

/// containerd services.
pub mod containerd {
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
