//! The registry client's error type.

/// Why a registry operation failed.
///
/// Messages name the host, repository and digest involved, never credentials or tokens.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    /// The image reference cannot be parsed.
    #[error("invalid image reference: {0}")]
    InvalidReference(String),
    /// Something this client does not handle (schema1 manifests, foreign layers, an unknown
    /// auth scheme, ...). containerd may still manage: see [`RegistryError::is_fallback`].
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// The registry refused the credentials (or their absence).
    #[error("unauthorized: {0}")]
    Unauthorized(String),
    /// The registry has no such manifest or blob.
    #[error("not found: {0}")]
    NotFound(String),
    /// Content did not hash to the digest it was asked for (or announced).
    #[error("digest mismatch for {location}: expected {expected}, got {actual}")]
    DigestMismatch {
        expected: String,
        actual: String,
        /// What was fetched from where, e.g. "manifest of 127.0.0.1:5000/foo from 127.0.0.1:5000".
        location: String,
    },
    /// Connecting or waiting for response headers (or for the next body chunk) took too long.
    #[error("timeout: {0}")]
    Timeout(String),
    /// Connection-level failures and server errors (5xx, 429).
    #[error("transport error: {0}")]
    Transport(String),
    /// The registry answered something that does not follow the distribution protocol.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// containerd's registry host configuration (`hosts.toml`, CA files) or a docker config file
    /// cannot be read or parsed.
    #[error("registry configuration error: {0}")]
    Config(String),
}

impl RegistryError {
    /// True when pullgate should stop fetching by itself and let containerd pull the image on its
    /// own (it may know better: other auth, other formats).
    pub fn is_fallback(&self) -> bool {
        matches!(
            self,
            RegistryError::Unsupported(_) | RegistryError::Unauthorized(_)
        )
    }
}

pub(crate) use crate::errors::chain;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fallback_only_for_unsupported_and_unauthorized() {
        assert!(RegistryError::Unsupported("x".into()).is_fallback());
        assert!(RegistryError::Unauthorized("x".into()).is_fallback());
        assert!(!RegistryError::NotFound("x".into()).is_fallback());
        assert!(!RegistryError::Timeout("x".into()).is_fallback());
        assert!(!RegistryError::Transport("x".into()).is_fallback());
        assert!(!RegistryError::Protocol("x".into()).is_fallback());
        assert!(!RegistryError::Config("x".into()).is_fallback());
        assert!(!RegistryError::InvalidReference("x".into()).is_fallback());
        let e = RegistryError::DigestMismatch {
            expected: "sha256:aa".into(),
            actual: "sha256:bb".into(),
            location: "manifest of h/r from h".into(),
        };
        assert!(!e.is_fallback());
        assert_eq!(
            e.to_string(),
            "digest mismatch for manifest of h/r from h: expected sha256:aa, got sha256:bb"
        );
    }
}
