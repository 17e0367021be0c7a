//! pullgate's own prewarm requests: built as the `PullImage` call a CRI client would send, so
//! they merge with kubelet's and kruise-daemon's pulls of the same image and containerd finishes
//! them the same way.

use std::path::Path;
use std::sync::Arc;

use bytes::{BufMut, BytesMut};
use http::{HeaderMap, HeaderValue, Uri};
use prost::Message;

use crate::proto::runtime::v1::{AuthConfig, ImageSpec, PullImageRequest};
use crate::pull::{ForwardRequest, Joined, PullCoordinator, PullRequestInfo, PULL_IMAGE_PATH};
use crate::registry::{Credentials, ImageRef};
use crate::vocab::Origin;

/// A prewarm request of pullgate's own.
#[derive(Clone, Debug)]
pub struct Prewarm {
    pub image: String,
    pub level: i32,
    pub origin: Origin,
    /// Docker `config.json` to take the registry's credentials from.
    pub docker_config: Option<std::path::PathBuf>,
}

impl Prewarm {
    /// Joins (or starts) the pull of this image; the error is a message for the operator.
    pub fn submit(&self, coordinator: &Arc<PullCoordinator>) -> Result<Joined, String> {
        let (info, request) = self.request()?;
        Ok(coordinator.join(info, request))
    }

    fn request(&self) -> Result<(PullRequestInfo, ForwardRequest), String> {
        let auth = match &self.docker_config {
            Some(path) => auth_from_docker_config(path, &self.image)?,
            None => None,
        };
        let message = PullImageRequest {
            image: Some(ImageSpec {
                image: self.image.clone(),
                ..Default::default()
            }),
            auth,
            sandbox_config: None,
        }
        .encode_to_vec();
        let mut info = PullRequestInfo::decode(&message).map_err(|e| e.to_string())?;
        info.level = self.level;
        info.origin = self.origin;
        Ok((info, forward_request(&message)))
    }
}

/// Credentials for `image`'s registry from a docker `config.json`, as a CRI `AuthConfig`.
fn auth_from_docker_config(path: &Path, image: &str) -> Result<Option<AuthConfig>, String> {
    let r = ImageRef::parse(image).map_err(|e| e.to_string())?;
    let creds = Credentials::from_docker_config(path, &r.registry).map_err(|e| e.to_string())?;
    Ok(match creds {
        Credentials::Anonymous => None,
        Credentials::Basic { username, password } => Some(AuthConfig {
            username,
            password,
            ..Default::default()
        }),
        Credentials::IdentityToken { token, .. } => Some(AuthConfig {
            identity_token: token,
            ..Default::default()
        }),
        Credentials::RegistryToken(t) => Some(AuthConfig {
            registry_token: t,
            ..Default::default()
        }),
    })
}

/// A unary gRPC call to containerd's CRI `PullImage` carrying `message`.
fn forward_request(message: &[u8]) -> ForwardRequest {
    let mut body = BytesMut::with_capacity(5 + message.len());
    body.put_u8(0);
    body.put_u32(message.len() as u32);
    body.put_slice(message);
    let mut headers = HeaderMap::new();
    headers.insert("content-type", HeaderValue::from_static("application/grpc"));
    headers.insert("te", HeaderValue::from_static("trailers"));
    ForwardRequest {
        uri: Uri::from_static(PULL_IMAGE_PATH),
        headers,
        body: body.freeze(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vocab::Class;

    #[test]
    fn builds_a_prewarm_pull_image_call() {
        let p = Prewarm {
            image: "busybox".into(),
            level: 4,
            origin: Origin::Config(2),
            docker_config: None,
        };
        let (info, fwd) = p.request().unwrap();
        assert_eq!(info.reference, "docker.io/library/busybox:latest");
        assert_eq!(info.class, Class::Prewarm);
        assert_eq!(info.level, 4);
        assert_eq!(fwd.body[0], 0);
        let len = u32::from_be_bytes(fwd.body[1..5].try_into().unwrap()) as usize;
        let msg = PullImageRequest::decode(&fwd.body[5..]).unwrap();
        assert_eq!(len, fwd.body.len() - 5);
        assert_eq!(msg.image.unwrap().image, "busybox");
        assert!(Prewarm {
            image: "Bad Ref".into(),
            ..p
        }
        .request()
        .is_err());
    }

    #[test]
    fn credentials_come_from_docker_config() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        // "user:pw"
        std::fs::write(
            &path,
            r#"{"auths":{"127.0.0.1:5000":{"auth":"dXNlcjpwdw=="}}}"#,
        )
        .unwrap();
        let p = Prewarm {
            image: "127.0.0.1:5000/app:1".into(),
            level: 0,
            origin: Origin::Api,
            docker_config: Some(path),
        };
        let (info, _) = p.request().unwrap();
        let auth = info.auth.unwrap();
        assert_eq!(
            (auth.username.as_str(), auth.password.as_str()),
            ("user", "pw")
        );
        assert!(info.credentials.is_some());
    }
}
