//! Reading an intercepted `PullImage` request: decode, validate, classify, fingerprint.
//!
//! Only what pullgate needs is decoded; the original bytes are what gets forwarded.

use std::collections::BTreeMap;
use std::fmt;

use prost::Message;
use sha2::{Digest, Sha256};

use crate::proto::runtime::v1::{AuthConfig, PullImageRequest};
use crate::vocab::Origin;
use crate::vocab::{Class, Priority};

/// Sandbox annotation OpenKruise's kruise-daemon puts on the pulls it makes for ImagePullJobs.
pub const KRUISE_PULL_ANNOTATION: &str = "apps.kruise.io/pulling-image-by";

/// Sandbox (pod) annotation that moves a pull within its class: an integer, higher first
/// (default 0). kruise-daemon's requests carry it for prewarm priority.
pub const PRIORITY_ANNOTATION: &str = "pullgate.io/priority";

/// A request that cannot be served, with the reason for an `INVALID_ARGUMENT` status.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BadRequest {
    #[error("PullImageRequest is not a valid protobuf message: {0}")]
    Undecodable(String),
    #[error("PullImageRequest has no image reference")]
    EmptyReference,
    #[error("invalid image reference {reference:?}: {reason}")]
    InvalidReference { reference: String, reason: String },
}

/// What pullgate knows about one `PullImage` call.
#[derive(Clone, PartialEq, Eq)]
pub struct PullRequestInfo {
    /// The reference as the requester wrote it.
    pub image: String,
    /// The reference normalized as containerd does (`docker.io/library/x:latest`).
    pub reference: String,
    pub class: Class,
    /// `namespace/name` of the waiting pod, for logs.
    pub pod: Option<String>,
    /// Fingerprint of the credentials; `None` for an anonymous pull. Never logged.
    pub credentials: Option<[u8; 32]>,
    /// The credentials themselves, for pullgate's own registry requests. Never logged.
    pub auth: Option<AuthConfig>,
    /// `ImageSpec.runtime_handler`: containerd may pick a platform or snapshotter by it.
    pub runtime_handler: String,
    /// Sandbox annotations (pod annotations), for priority hints.
    pub annotations: BTreeMap<String, String>,
    /// Level within the class, from [`PRIORITY_ANNOTATION`] or the prewarm source.
    pub level: i32,
    /// Where the request came from.
    pub origin: Origin,
}

impl fmt::Debug for PullRequestInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PullRequestInfo")
            .field("reference", &self.reference)
            .field("class", &self.class)
            .field("pod", &self.pod)
            .field("authenticated", &self.credentials.is_some())
            .field("level", &self.level)
            .finish()
    }
}

impl PullRequestInfo {
    /// This requester's priority.
    pub fn priority(&self) -> Priority {
        Priority::new(self.class, self.level)
    }

    /// Decodes and validates the protobuf message of a `PullImage` call.
    pub fn decode(message: &[u8]) -> Result<PullRequestInfo, BadRequest> {
        let req = PullImageRequest::decode(message)
            .map_err(|e| BadRequest::Undecodable(e.to_string()))?;
        let spec = req.image.unwrap_or_default();
        let image = spec.image.trim().to_string();
        if image.is_empty() {
            return Err(BadRequest::EmptyReference);
        }
        let reference = normalize_reference(&image)?;
        let (class, pod, annotations) = match req.sandbox_config {
            Some(sandbox) => {
                let annotations: BTreeMap<_, _> = sandbox.annotations.into_iter().collect();
                let class = if annotations.contains_key(KRUISE_PULL_ANNOTATION) {
                    Class::Prewarm
                } else {
                    Class::Urgent
                };
                let pod = sandbox
                    .metadata
                    .filter(|m| !m.name.is_empty())
                    .map(|m| format!("{}/{}", m.namespace, m.name));
                (class, pod, annotations)
            }
            None => (Class::Prewarm, None, BTreeMap::new()),
        };
        let credentials = req.auth.as_ref().and_then(fingerprint);
        // A hint that is not an integer is ignored, not an error: the pod must still start.
        let level = annotations
            .get(PRIORITY_ANNOTATION)
            .and_then(|v| v.trim().parse::<i32>().ok())
            .unwrap_or(0);
        Ok(PullRequestInfo {
            image,
            reference,
            class,
            pod,
            credentials,
            auth: req.auth.filter(|_| credentials.is_some()),
            runtime_handler: spec.runtime_handler,
            annotations,
            level,
            origin: Origin::Cri,
        })
    }
}

/// Normalizes a reference the way containerd's CRI plugin does (docker.io, library/, :latest).
pub fn normalize_reference(image: &str) -> Result<String, BadRequest> {
    crate::registry::reference::parse_reference(image)
        .map(|r| r.whole())
        .map_err(|reason| BadRequest::InvalidReference {
            reference: image.to_string(),
            reason,
        })
}

/// A stable fingerprint of every credential field, so that requests are merged only when they
/// would authenticate identically. Length-prefixed so that field boundaries cannot collide.
fn fingerprint(auth: &AuthConfig) -> Option<[u8; 32]> {
    let fields = [
        &auth.username,
        &auth.password,
        &auth.auth,
        &auth.server_address,
        &auth.identity_token,
        &auth.registry_token,
    ];
    if fields.iter().all(|f| f.is_empty()) {
        return None;
    }
    let mut h = Sha256::new();
    for f in fields {
        h.update((f.len() as u64).to_be_bytes());
        h.update(f.as_bytes());
    }
    Some(h.finalize().into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::runtime::v1::{ImageSpec, PodSandboxConfig, PodSandboxMetadata};

    fn encode(req: &PullImageRequest) -> Vec<u8> {
        req.encode_to_vec()
    }

    fn req(image: &str, sandbox: Option<PodSandboxConfig>, auth: Option<AuthConfig>) -> Vec<u8> {
        encode(&PullImageRequest {
            image: Some(ImageSpec {
                image: image.into(),
                ..Default::default()
            }),
            auth,
            sandbox_config: sandbox,
        })
    }

    fn pod() -> PodSandboxConfig {
        PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: "web-0".into(),
                namespace: "shop".into(),
                uid: "u1".into(),
                attempt: 0,
            }),
            ..Default::default()
        }
    }

    #[test]
    fn normalizes_like_containerd() {
        for (input, want) in [
            ("busybox", "docker.io/library/busybox:latest"),
            ("library/busybox:1.36", "docker.io/library/busybox:1.36"),
            ("quay.io/a/b", "quay.io/a/b:latest"),
            ("localhost:5000/app:v1", "localhost:5000/app:v1"),
            ("127.0.0.1:5000/team/app:v1", "127.0.0.1:5000/team/app:v1"),
            (
                "reg.example:443/app@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
                "reg.example:443/app@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            ),
        ] {
            assert_eq!(normalize_reference(input).unwrap(), want, "{input}");
        }
    }

    #[test]
    fn rejects_malformed_references() {
        for bad in [
            "UPPER/case",
            "a b",
            "busybox:",
            "foo@sha256:abc",
            ":tag",
            "//x",
        ] {
            assert!(
                matches!(
                    normalize_reference(bad),
                    Err(BadRequest::InvalidReference { .. })
                ),
                "{bad} accepted"
            );
        }
    }

    #[test]
    fn kubelet_pull_with_pod_is_urgent() {
        let info = PullRequestInfo::decode(&req("busybox", Some(pod()), None)).unwrap();
        assert_eq!(info.class, Class::Urgent);
        assert_eq!(info.pod.as_deref(), Some("shop/web-0"));
        assert_eq!(info.reference, "docker.io/library/busybox:latest");
        assert_eq!(info.credentials, None);
    }

    #[test]
    fn pull_without_pod_or_by_kruise_is_prewarm() {
        let info = PullRequestInfo::decode(&req("busybox", None, None)).unwrap();
        assert_eq!(info.class, Class::Prewarm);
        let mut kruise = pod();
        kruise
            .annotations
            .insert(KRUISE_PULL_ANNOTATION.into(), "kruise-daemon".into());
        let info = PullRequestInfo::decode(&req("busybox", Some(kruise), None)).unwrap();
        assert_eq!(info.class, Class::Prewarm);
    }

    #[test]
    fn priority_annotation_moves_a_pull_within_its_class() {
        let mut p = pod();
        p.annotations
            .insert(PRIORITY_ANNOTATION.into(), " -3 ".into());
        let info = PullRequestInfo::decode(&req("busybox", Some(p.clone()), None)).unwrap();
        assert_eq!(info.priority(), Priority::urgent(-3));
        p.annotations
            .insert(KRUISE_PULL_ANNOTATION.into(), "kruise-daemon".into());
        p.annotations.insert(PRIORITY_ANNOTATION.into(), "9".into());
        let info = PullRequestInfo::decode(&req("busybox", Some(p.clone()), None)).unwrap();
        assert_eq!(info.priority(), Priority::prewarm(9));
        p.annotations
            .insert(PRIORITY_ANNOTATION.into(), "high".into());
        let info = PullRequestInfo::decode(&req("busybox", Some(p), None)).unwrap();
        assert_eq!(info.level, 0, "a bad hint is ignored");
    }

    #[test]
    fn credentials_are_fingerprinted_and_distinguished() {
        let a = AuthConfig {
            username: "u".into(),
            password: "s3cret-pw".into(),
            ..Default::default()
        };
        let b = AuthConfig {
            username: "u".into(),
            password: "q".into(),
            ..Default::default()
        };
        // Same concatenation, different split: must differ.
        let c = AuthConfig {
            username: "up".into(),
            password: "".into(),
            ..Default::default()
        };
        let fa = PullRequestInfo::decode(&req("x", None, Some(a.clone()))).unwrap();
        let fa2 = PullRequestInfo::decode(&req("x", None, Some(a))).unwrap();
        let fb = PullRequestInfo::decode(&req("x", None, Some(b))).unwrap();
        let fc = PullRequestInfo::decode(&req("x", None, Some(c))).unwrap();
        let empty = PullRequestInfo::decode(&req("x", None, Some(AuthConfig::default()))).unwrap();
        assert!(fa.credentials.is_some());
        assert_eq!(fa.credentials, fa2.credentials);
        assert_ne!(fa.credentials, fb.credentials);
        assert_ne!(fa.credentials, fc.credentials);
        assert_eq!(empty.credentials, None);
        assert!(!format!("{fa:?}").contains("s3cret"));
    }

    #[test]
    fn garbage_and_empty_are_bad_requests() {
        assert!(matches!(
            PullRequestInfo::decode(&[0xff, 0xff, 0xff, 0xff, 0x0f]),
            Err(BadRequest::Undecodable(_))
        ));
        assert_eq!(
            PullRequestInfo::decode(&req("  ", Some(pod()), None)),
            Err(BadRequest::EmptyReference)
        );
        assert_eq!(
            PullRequestInfo::decode(&[]),
            Err(BadRequest::EmptyReference)
        );
    }
}
