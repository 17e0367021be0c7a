//! Image references, normalised the way containerd does (`docker.io/library/...`, default tag
//! `latest`), parsed by the distribution grammar (`distribution/reference`'s `regexp.go`).
//!
//! Parsed by hand rather than with `oci_spec::distribution::Reference`: that one builds a
//! Unicode regex on first use, measured at 29 ms and 13 MiB of resident memory for the life of
//! the process, a fifth of the daemon's memory budget and a pod's first pull's time.

use std::fmt;

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

/// The longest name (`registry/repository`) the grammar allows.
const NAME_MAX: usize = 255;

impl ImageRef {
    /// Parses and normalises `s` (`busybox` → `docker.io/library/busybox:latest`).
    pub fn parse(s: &str) -> Result<ImageRef, RegistryError> {
        let trimmed = s.trim();
        if trimmed.is_empty() {
            return Err(RegistryError::InvalidReference(
                "empty image reference".to_string(),
            ));
        }
        parse_reference(trimmed)
            .map_err(|why| RegistryError::InvalidReference(format!("{trimmed:?}: {why}")))
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

/// `name[:tag][@digest]`, normalised; the reason when it is not a reference.
pub(crate) fn parse_reference(s: &str) -> Result<ImageRef, String> {
    let (rest, digest) = match s.split_once('@') {
        Some((rest, d)) => (rest, Some(check_digest(d)?)),
        None => (s, None),
    };
    // A tag is after the last ':' that follows the last '/' (a port's ':' comes before it).
    let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
    let (name, tag) = match rest[last_slash..].rfind(':') {
        Some(i) => {
            let at = last_slash + i;
            (&rest[..at], Some(check_tag(&rest[at + 1..])?))
        }
        None => (rest, None),
    };
    let (registry, repository) = split_registry(name)?;
    if repository.chars().any(|c| c.is_ascii_uppercase()) {
        return Err("repository name must be lowercase".into());
    }
    for component in repository.split('/') {
        check_path_component(component)?;
    }
    let repository = if registry == "docker.io" && !repository.contains('/') {
        format!("library/{repository}")
    } else {
        repository.to_string()
    };
    // Checked on the normalised name, as docker's `ParseNormalizedNamed` does.
    if registry.len() + 1 + repository.len() > NAME_MAX {
        return Err(format!("name longer than {NAME_MAX} characters"));
    }
    let tag = match (tag, &digest) {
        (None, None) => Some("latest".to_string()),
        (tag, _) => tag.map(str::to_string),
    };
    Ok(ImageRef {
        registry,
        repository,
        tag,
        digest,
    })
}

/// The registry (`docker.io` when the name has none) and the repository of `name`. The first
/// component is a registry when it has a `.` or a `:`, or is `localhost`, as docker's
/// `splitDockerDomain` decides.
fn split_registry(name: &str) -> Result<(String, &str), String> {
    let Some((first, rest)) = name.split_once('/') else {
        return Ok(("docker.io".into(), name));
    };
    if !(first.contains(['.', ':']) || first == "localhost") {
        return Ok(("docker.io".into(), name));
    }
    check_domain(first)?;
    let registry = if first == "index.docker.io" {
        "docker.io".to_string()
    } else {
        first.to_string()
    };
    Ok((registry, rest))
}

/// `host[:port]`: dot-separated labels of letters, digits and inner hyphens, or `[ipv6]`.
fn check_domain(domain: &str) -> Result<(), String> {
    let bad = || Err(format!("invalid registry host {domain:?}"));
    let (host, port) = if let Some(v6) = domain.strip_prefix('[') {
        let Some((addr, after)) = v6.split_once(']') else {
            return bad();
        };
        if addr.is_empty() || !addr.chars().all(|c| c.is_ascii_hexdigit() || c == ':') {
            return bad();
        }
        match after {
            "" => (None, None),
            p => match p.strip_prefix(':') {
                Some(port) => (None, Some(port)),
                None => return bad(),
            },
        }
    } else {
        match domain.split_once(':') {
            Some((h, p)) => (Some(h), Some(p)),
            None => (Some(domain), None),
        }
    };
    if let Some(host) = host {
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        };
        if !host.split('.').all(label_ok) {
            return bad();
        }
    }
    if let Some(port) = port {
        if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
            return bad();
        }
    }
    Ok(())
}

/// `[a-z0-9]+` joined by `.`, `_`, `__` or runs of `-`.
fn check_path_component(c: &str) -> Result<(), String> {
    let bad = || Err(format!("invalid repository path component {c:?}"));
    let b = c.as_bytes();
    if b.is_empty() || !b[0].is_ascii_alphanumeric() || !b[b.len() - 1].is_ascii_alphanumeric() {
        return bad();
    }
    let mut i = 0;
    while i < b.len() {
        if b[i].is_ascii_lowercase() || b[i].is_ascii_digit() {
            i += 1;
            continue;
        }
        // A separator, then alphanumerics again (the last byte is one, checked above).
        let run = b[i..]
            .iter()
            .take_while(|x| !x.is_ascii_alphanumeric())
            .count();
        let sep = &c[i..i + run];
        let ok = run > 0 && (matches!(sep, "." | "_" | "__") || sep.bytes().all(|x| x == b'-'));
        if !ok {
            return bad();
        }
        i += run;
    }
    Ok(())
}

/// `[\w][\w.-]{0,127}`.
fn check_tag(tag: &str) -> Result<&str, String> {
    let word = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let mut chars = tag.chars();
    let ok = chars.next().is_some_and(word)
        && chars.all(|c| word(c) || c == '.' || c == '-')
        && tag.len() <= 128;
    if ok {
        Ok(tag)
    } else {
        Err(format!("invalid tag {tag:?}"))
    }
}

/// `algorithm:encoded`, with sha256 and sha512 held to their hex length.
fn check_digest(d: &str) -> Result<String, String> {
    let bad = || Err(format!("invalid digest {d:?}"));
    let Some((alg, hex)) = d.split_once(':') else {
        return bad();
    };
    let alg_ok = alg.split(['+', '.', '_', '-']).all(|part| {
        part.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
            && part.chars().all(|c| c.is_ascii_alphanumeric())
    });
    let hex_ok = hex.len() >= 32 && hex.bytes().all(|b| b.is_ascii_hexdigit());
    let len_ok = match alg {
        "sha256" => hex.len() == 64,
        "sha512" => hex.len() == 128,
        _ => true,
    };
    if alg_ok && hex_ok && len_ok {
        Ok(d.to_string())
    } else {
        bad()
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
    fn the_distribution_grammar_is_accepted() {
        let d = format!("sha256:{}", "0".repeat(64));
        for (input, registry, repository, tag) in [
            (
                "a/b__c.d-e--f_g/h0",
                "docker.io",
                "a/b__c.d-e--f_g/h0",
                Some("latest"),
            ),
            (
                "Reg-1.Example.com:5000/app:V1.0_x-y",
                "Reg-1.Example.com:5000",
                "app",
                Some("V1.0_x-y"),
            ),
            ("[::1]:5000/app", "[::1]:5000", "app", Some("latest")),
            ("[fe80::1]/app:t", "[fe80::1]", "app", Some("t")),
            ("localhost/app", "localhost", "app", Some("latest")),
            (
                "docker.io/busybox",
                "docker.io",
                "library/busybox",
                Some("latest"),
            ),
            ("10.0.0.1/a/b/c:_x", "10.0.0.1", "a/b/c", Some("_x")),
        ] {
            let r = ImageRef::parse(input).unwrap();
            assert_eq!(
                (r.registry.as_str(), r.repository.as_str(), r.tag.as_deref()),
                (registry, repository, tag),
                "{input}"
            );
        }
        let r = ImageRef::parse(&format!("quay.io/a@{d}")).unwrap();
        assert_eq!((r.tag, r.digest), (None, Some(d)));
        // Another algorithm: any name, at least 32 hex digits.
        let other = format!("multihash+base58:{}", "ab".repeat(16));
        assert_eq!(
            ImageRef::parse(&format!("a@{other}")).unwrap().digest,
            Some(other)
        );
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
            "a/-b",
            "a/b_",
            "a/b---c_.d",
            "a/b...c",
            "bad_host.example/app",
            "host.example:port/app",
            "[::1/app",
            "busybox:.tag",
            &format!("busybox:{}", "t".repeat(129)),
            &format!("example.com/{}", "a".repeat(250)),
            // 240 characters, 258 once normalised.
            &"a".repeat(240),
            &format!("busybox@sha256:{}", "a".repeat(63)),
            "busybox@sha256",
            "busybox@1sha:0123456789abcdef0123456789abcdef",
        ] {
            let e = ImageRef::parse(bad).unwrap_err();
            assert!(
                matches!(e, RegistryError::InvalidReference(_)),
                "{bad:?}: {e:?}"
            );
        }
    }
}
