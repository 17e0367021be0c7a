//! Image references, normalised the way containerd does (`docker.io/library/...`, default tag
//! `latest`).

use std::fmt;

use oci_spec::distribution::Reference;

use super::RegistryError;

/// A parsed, normalised image reference.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ImageRef {
    /// `host[:port]`; `docker.io` for Docker Hub (also when written `index.docker.io` or omitted).
    pub registry: String,
    /// Repository path, e.g. `library/busybox`.
    pub repository: String,
    /// The tag; `latest` when neither tag nor digest was given.
    pub tag: Option<String>,
    /// `algorithm:hex`, when the reference pins a digest.
    pub digest: Option<String>,
}

impl ImageRef {
    /// Parses and normalises `s` (`busybox` → `docker.io/library/busybox:latest`).
    pub fn parse(s: &str) -> Result<ImageRef, RegistryError> {
        let trimmed = s.trim();
        if trimmed.is_empty() {
            return Err(RegistryError::InvalidReference(
                "empty image reference".to_string(),
            ));
        }
        let r: Reference = trimmed
            .parse()
            .map_err(|e| RegistryError::InvalidReference(format!("{trimmed:?}: {e}")))?;
        if r.repository().chars().any(|c| c.is_ascii_uppercase()) {
            return Err(RegistryError::InvalidReference(format!(
                "{trimmed:?}: repository name must be lowercase"
            )));
        }
        if r.repository().is_empty() {
            return Err(RegistryError::InvalidReference(format!(
                "{trimmed:?}: empty repository"
            )));
        }
        Ok(ImageRef {
            registry: r.registry().to_string(),
            repository: r.repository().to_string(),
            tag: r.tag().map(str::to_string),
            digest: r.digest().map(str::to_string),
        })
    }

    /// The whole normalised reference: `registry/repository[:tag][@digest]`.
    pub fn whole(&self) -> String {
        let mut s = format!("{}/{}", self.registry, self.repository);
        if let Some(tag) = &self.tag {
            s.push(':');
            s.push_str(tag);
        }
        if let Some(digest) = &self.digest {
            s.push('@');
            s.push_str(digest);
        }
        s
    }

    /// `registry/repository` (for messages).
    pub fn name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }

    /// What to ask `/manifests/` for: the digest when pinned (it wins over a tag, as in
    /// containerd), else the tag.
    pub fn manifest_reference(&self) -> &str {
        self.digest
            .as_deref()
            .or(self.tag.as_deref())
            .unwrap_or("latest")
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.whole())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_hub_normalisation() {
        let r = ImageRef::parse("busybox").unwrap();
        assert_eq!(r.registry, "docker.io");
        assert_eq!(r.repository, "library/busybox");
        assert_eq!(r.tag.as_deref(), Some("latest"));
        assert_eq!(r.digest, None);
        assert_eq!(r.whole(), "docker.io/library/busybox:latest");

        let r = ImageRef::parse("index.docker.io/foo/bar:1.0").unwrap();
        assert_eq!(r.registry, "docker.io");
        assert_eq!(r.repository, "foo/bar");
        assert_eq!(r.whole(), "docker.io/foo/bar:1.0");
    }

    #[test]
    fn host_port_and_digest() {
        let d = format!("sha256:{}", "a".repeat(64));
        let r = ImageRef::parse(&format!("127.0.0.1:5000/team/app@{d}")).unwrap();
        assert_eq!(r.registry, "127.0.0.1:5000");
        assert_eq!(r.repository, "team/app");
        assert_eq!(r.tag, None);
        assert_eq!(r.digest.as_deref(), Some(d.as_str()));
        assert_eq!(r.manifest_reference(), d);

        let r = ImageRef::parse(&format!("localhost/app:v1@{d}")).unwrap();
        assert_eq!(r.registry, "localhost");
        assert_eq!(r.tag.as_deref(), Some("v1"));
        assert_eq!(r.manifest_reference(), d, "digest wins over tag");
        assert_eq!(r.whole(), format!("localhost/app:v1@{d}"));
    }

    #[test]
    fn invalid_references() {
        for bad in [
            "",
            "  ",
            "UPPER/case",
            "foo@sha256:abc",
            "foo:bad tag",
            "a//b",
        ] {
            let e = ImageRef::parse(bad).unwrap_err();
            assert!(
                matches!(e, RegistryError::InvalidReference(_)),
                "{bad:?}: {e:?}"
            );
        }
    }
}
