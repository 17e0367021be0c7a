//! Manifests and indexes: media types, parsing, checks, and platform selection the way
//! containerd's default platform matcher does it.

use std::fmt;

use oci_spec::image::{Descriptor, ImageIndex, ImageManifest};

use super::RegistryError;

pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_SCHEMA1: &str = "application/vnd.docker.distribution.manifest.v1+json";
pub const DOCKER_SCHEMA1_SIGNED: &str = "application/vnd.docker.distribution.manifest.v1+prettyjws";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";

/// Layer media types this client fetches.
pub const LAYER_MEDIA_TYPES: &[&str] = &[
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.diff.tar",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.diff.tar.zstd",
];

/// The `Accept` header for manifest requests (schema1 deliberately left out).
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json, \
application/vnd.docker.distribution.manifest.v2+json";

/// The largest manifest or index accepted (containerd: 4 MiB).
pub const MAX_MANIFEST_SIZE: usize = 4 << 20;

/// True for an index or manifest list.
pub fn is_index(media_type: &str) -> bool {
    media_type == OCI_INDEX || media_type == DOCKER_MANIFEST_LIST
}

/// True for an image manifest (OCI or Docker schema2).
pub fn is_manifest(media_type: &str) -> bool {
    media_type == OCI_MANIFEST || media_type == DOCKER_MANIFEST
}

/// A parsed manifest document.
#[derive(Debug, Clone)]
pub enum Parsed {
    Index(Box<ImageIndex>),
    Manifest(Box<ImageManifest>),
}

/// Parses manifest bytes. The media type comes from the document's `mediaType`, else from the
/// `Content-Type` the registry sent, else from the shape (`manifests` → OCI index, `layers` → OCI
/// manifest). Returns the media type and the document. Schema1 → `Unsupported`.
pub fn parse(
    bytes: &[u8],
    content_type: Option<&str>,
    what: &str,
) -> Result<(String, Parsed), RegistryError> {
    let value: serde_json::Value = serde_json::from_slice(bytes)
        .map_err(|e| RegistryError::Protocol(format!("{what} is not valid JSON: {e}")))?;
    let declared = value.get("mediaType").and_then(|v| v.as_str());
    let content_type = content_type
        .map(|c| c.split(';').next().unwrap_or(c).trim())
        .filter(|c| !c.is_empty());
    let schema_version = value.get("schemaVersion").and_then(|v| v.as_u64());
    let is_schema1 = |t: &str| t == DOCKER_SCHEMA1 || t == DOCKER_SCHEMA1_SIGNED;
    if schema_version == Some(1)
        || declared.is_some_and(is_schema1)
        || content_type.is_some_and(is_schema1)
    {
        return Err(RegistryError::Unsupported(format!(
            "{what} is a Docker schema1 manifest"
        )));
    }
    let media_type = match declared {
        Some(t) => t.to_string(),
        None => match content_type {
            Some(t) if is_index(t) || is_manifest(t) => t.to_string(),
            _ if value.get("manifests").is_some() => OCI_INDEX.to_string(),
            _ if value.get("layers").is_some() => OCI_MANIFEST.to_string(),
            _ => {
                return Err(RegistryError::Unsupported(format!(
                    "{what} has unknown media type {:?}",
                    content_type.unwrap_or("")
                )))
            }
        },
    };
    if is_index(&media_type) {
        let index: ImageIndex = serde_json::from_value(value).map_err(|e| {
            RegistryError::Protocol(format!("{what} is not a valid image index: {e}"))
        })?;
        Ok((media_type, Parsed::Index(Box::new(index))))
    } else if is_manifest(&media_type) {
        let manifest: ImageManifest = serde_json::from_value(value).map_err(|e| {
            RegistryError::Protocol(format!("{what} is not a valid image manifest: {e}"))
        })?;
        Ok((media_type, Parsed::Manifest(Box::new(manifest))))
    } else {
        Err(RegistryError::Unsupported(format!(
            "{what} has media type {media_type:?}, not an image manifest or index"
        )))
    }
}

/// Checks that every blob of `manifest` is something this client fetches: a container image
/// config and distributable tar layers (plain, gzip, zstd) without `urls`.
pub fn check_manifest(manifest: &ImageManifest, what: &str) -> Result<(), RegistryError> {
    let config_type = manifest.config().media_type().to_string();
    if config_type != OCI_CONFIG && config_type != DOCKER_CONFIG {
        return Err(RegistryError::Unsupported(format!(
            "{what} is not a container image (config media type {config_type:?})"
        )));
    }
    for layer in manifest.layers() {
        check_layer(layer, what)?;
    }
    Ok(())
}

/// One layer descriptor: foreign / non-distributable / unknown types are `Unsupported`.
pub fn check_layer(layer: &Descriptor, what: &str) -> Result<(), RegistryError> {
    let media_type = layer.media_type().to_string();
    let digest = layer.digest().to_string();
    if media_type.contains("foreign") || media_type.contains("nondistributable") {
        return Err(RegistryError::Unsupported(format!(
            "{what}: layer {digest} is foreign / non-distributable ({media_type})"
        )));
    }
    if layer.urls().as_ref().is_some_and(|u| !u.is_empty()) {
        return Err(RegistryError::Unsupported(format!(
            "{what}: layer {digest} has external URLs (foreign layer)"
        )));
    }
    if !LAYER_MEDIA_TYPES.contains(&media_type.as_str()) {
        return Err(RegistryError::Unsupported(format!(
            "{what}: layer {digest} has unsupported media type {media_type:?}"
        )));
    }
    if layer.as_digest_sha256().is_none() {
        return Err(RegistryError::Unsupported(format!(
            "{what}: layer {digest} is not a sha256 digest"
        )));
    }
    Ok(())
}

/// A platform to select from an index: OS, architecture and optional variant, in OCI / Go
/// terms (`linux`, `amd64`, `arm64` + `v8`, `arm` + `v7`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
}

impl Platform {
    /// A platform from its parts (`variant` "" = none).
    pub fn new(os: &str, architecture: &str, variant: &str) -> Platform {
        Platform {
            os: os.to_string(),
            architecture: architecture.to_string(),
            variant: (!variant.is_empty()).then(|| variant.to_string()),
        }
    }

    /// The node's platform as containerd sees it by default: linux and the build target's
    /// architecture (x86_64 → amd64, aarch64 → arm64 v8, arm → arm v7).
    pub fn node() -> Platform {
        match std::env::consts::ARCH {
            "x86_64" => Platform::new("linux", "amd64", ""),
            "aarch64" => Platform::new("linux", "arm64", "v8"),
            "arm" => Platform::new("linux", "arm", "v7"),
            "x86" => Platform::new("linux", "386", ""),
            "powerpc64" if cfg!(target_endian = "little") => Platform::new("linux", "ppc64le", ""),
            "powerpc64" => Platform::new("linux", "ppc64", ""),
            other => Platform::new("linux", other, ""),
        }
    }
}

impl From<&oci_spec::image::Platform> for Platform {
    fn from(p: &oci_spec::image::Platform) -> Platform {
        Platform::new(
            &p.os().to_string(),
            &p.architecture().to_string(),
            p.variant().as_deref().unwrap_or(""),
        )
    }
}

/// `os/arch[/variant]`, normalised (`linux/arm64`, `linux/arm/v7`).
impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = Norm::of(self);
        if n.variant.is_empty() {
            write!(f, "{}/{}", n.os, n.arch)
        } else {
            write!(f, "{}/{}/{}", n.os, n.arch, n.variant)
        }
    }
}

/// A normalised platform (containerd's `platforms.Normalize`).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Norm {
    os: String,
    arch: String,
    variant: String,
}

impl Norm {
    fn of(p: &Platform) -> Norm {
        Norm::new(&p.os, &p.architecture, p.variant.as_deref().unwrap_or(""))
    }

    fn new(os: &str, arch: &str, variant: &str) -> Norm {
        let os = os.to_ascii_lowercase();
        let (arch, variant) = match (arch.to_ascii_lowercase().as_str(), variant) {
            ("i386", _) => ("386".to_string(), String::new()),
            ("x86_64" | "x86-64" | "amd64", v) => (
                "amd64".to_string(),
                if v == "v1" {
                    String::new()
                } else {
                    v.to_string()
                },
            ),
            ("aarch64" | "arm64", v) => (
                "arm64".to_string(),
                if v == "8" || v == "v8" {
                    String::new()
                } else {
                    v.to_string()
                },
            ),
            ("armhf", _) => ("arm".to_string(), "v7".to_string()),
            ("armel", _) => ("arm".to_string(), "v6".to_string()),
            ("arm", v) => (
                "arm".to_string(),
                match v {
                    "" | "7" => "v7".to_string(),
                    "5" | "6" | "8" => format!("v{v}"),
                    v => v.to_string(),
                },
            ),
            (a, v) => (a.to_string(), v.to_string()),
        };
        Norm { os, arch, variant }
    }

    /// containerd's `platformVector`: the platform and what it can also run, best first
    /// (amd64 → 386; arm64 → arm v8..v5; arm vN → arm vN-1..v5).
    fn vector(&self) -> Vec<Norm> {
        let mut v = vec![self.clone()];
        match self.arch.as_str() {
            "amd64" => v.push(Norm::new(&self.os, "386", "")),
            "arm64" => {
                let arm = Norm::new(&self.os, "arm", "v8");
                v.extend(arm.vector());
            }
            "arm" => {
                if let Ok(n) = self.variant.trim_start_matches('v').parse::<u32>() {
                    for lower in (5..n).rev() {
                        v.push(Norm::new(&self.os, "arm", &format!("v{lower}")));
                    }
                }
            }
            _ => {}
        }
        v
    }
}

/// Picks the manifest for `wanted` from an index, as containerd's default matcher does: entries
/// whose platform matches the platform (or one it can also run: amd64 → 386, arm64 → arm) are
/// ranked by that order, ties in index order; entries without a platform come last; entries that
/// are not manifests or indexes, and `unknown/unknown` ones (attestations) are skipped.
pub fn select_manifest<'a>(
    index: &'a ImageIndex,
    wanted: &Platform,
    what: &str,
) -> Result<&'a Descriptor, RegistryError> {
    let vector = Norm::of(wanted).vector();
    let mut best: Option<(usize, &Descriptor)> = None;
    for desc in index.manifests() {
        let media_type = desc.media_type().to_string();
        if !is_manifest(&media_type) && !is_index(&media_type) {
            continue;
        }
        let rank = match desc.platform() {
            None => vector.len(),
            Some(p) => {
                let n = Norm::of(&Platform::from(p));
                if n.os == "unknown" || n.arch == "unknown" {
                    continue;
                }
                match vector.iter().position(|c| *c == n) {
                    Some(r) => r,
                    None => continue,
                }
            }
        };
        if best.is_none_or(|(b, _)| rank < b) {
            best = Some((rank, desc));
        }
    }
    best.map(|(_, d)| d).ok_or_else(|| {
        RegistryError::NotFound(format!("{what} has no manifest for platform {wanted}"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(c: char) -> String {
        format!("sha256:{}", c.to_string().repeat(64))
    }

    fn sample_index() -> ImageIndex {
        let json = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                { "mediaType": OCI_MANIFEST, "digest": d('1'), "size": 10,
                  "platform": { "architecture": "unknown", "os": "unknown" } },
                { "mediaType": OCI_MANIFEST, "digest": d('2'), "size": 10,
                  "platform": { "architecture": "arm", "os": "linux", "variant": "v7" } },
                { "mediaType": OCI_MANIFEST, "digest": d('3'), "size": 10,
                  "platform": { "architecture": "amd64", "os": "linux" } },
                { "mediaType": OCI_MANIFEST, "digest": d('4'), "size": 10,
                  "platform": { "architecture": "arm64", "os": "linux", "variant": "v8" } },
                { "mediaType": OCI_MANIFEST, "digest": d('5'), "size": 10,
                  "platform": { "architecture": "amd64", "os": "linux" } },
                { "mediaType": OCI_MANIFEST, "digest": d('6'), "size": 10,
                  "platform": { "architecture": "amd64", "os": "windows" } },
                { "mediaType": OCI_MANIFEST, "digest": d('7'), "size": 10,
                  "platform": { "architecture": "s390x", "os": "linux" } },
            ]
        });
        serde_json::from_value(json).unwrap()
    }

    fn pick(index: &ImageIndex, p: Platform) -> Result<String, RegistryError> {
        select_manifest(index, &p, "index").map(|d| d.digest().to_string())
    }

    #[test]
    fn selects_platform_like_containerd() {
        let index = sample_index();
        assert_eq!(
            pick(&index, Platform::new("linux", "amd64", "")).unwrap(),
            d('3'),
            "first amd64 wins"
        );
        assert_eq!(
            pick(&index, Platform::new("linux", "arm64", "")).unwrap(),
            d('4'),
            "arm64 = arm64/v8"
        );
        assert_eq!(
            pick(&index, Platform::new("linux", "arm64", "v8")).unwrap(),
            d('4')
        );
        assert_eq!(
            pick(&index, Platform::new("linux", "arm", "v7")).unwrap(),
            d('2')
        );
        assert_eq!(
            pick(&index, Platform::new("linux", "arm", "")).unwrap(),
            d('2'),
            "arm = arm/v7"
        );
        assert_eq!(
            pick(&index, Platform::new("windows", "amd64", "")).unwrap(),
            d('6')
        );
        let e = pick(&index, Platform::new("linux", "riscv64", "")).unwrap_err();
        assert!(matches!(e, RegistryError::NotFound(_)));
        assert!(e.to_string().contains("linux/riscv64"), "{e}");
        // The attestation (unknown/unknown) is never chosen.
        assert_eq!(
            pick(&index, Platform::new("unknown", "unknown", "")).map_err(|_| ()),
            Err(())
        );
        // The node's default platform finds something in this index on amd64 and arm64 builds.
        if matches!(std::env::consts::ARCH, "x86_64" | "aarch64") {
            assert!(pick(&index, Platform::node()).is_ok());
        }
    }

    #[test]
    fn fallbacks_rank_after_exact_matches() {
        // arm64 node, index with arm/v7 first and arm64 later: arm64 wins despite index order.
        let json = serde_json::json!({
            "schemaVersion": 2,
            "manifests": [
                { "mediaType": DOCKER_MANIFEST, "digest": d('a'), "size": 1,
                  "platform": { "architecture": "arm", "os": "linux", "variant": "v7" } },
                { "mediaType": DOCKER_MANIFEST, "digest": d('b'), "size": 1 },
                { "mediaType": DOCKER_MANIFEST, "digest": d('c'), "size": 1,
                  "platform": { "architecture": "arm64", "os": "linux" } },
            ]
        });
        let index: ImageIndex = serde_json::from_value(json).unwrap();
        assert_eq!(
            pick(&index, Platform::new("linux", "arm64", "v8")).unwrap(),
            d('c')
        );
        // arm/v6 node: only the platform-less entry fits (it always does, last).
        assert_eq!(
            pick(&index, Platform::new("linux", "arm", "v6")).unwrap(),
            d('b')
        );
        // 386 is amd64's fallback.
        let json = serde_json::json!({
            "schemaVersion": 2,
            "manifests": [
                { "mediaType": OCI_MANIFEST, "digest": d('e'), "size": 1,
                  "platform": { "architecture": "386", "os": "linux" } },
            ]
        });
        let index: ImageIndex = serde_json::from_value(json).unwrap();
        assert_eq!(
            pick(&index, Platform::new("linux", "amd64", "")).unwrap(),
            d('e')
        );
    }

    fn manifest_json(layer_type: &str, urls: bool) -> Vec<u8> {
        let mut layer = serde_json::json!({ "mediaType": layer_type, "digest": d('f'), "size": 5 });
        if urls {
            layer["urls"] = serde_json::json!(["https://example.com/layer"]);
        }
        serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": DOCKER_MANIFEST,
            "config": { "mediaType": DOCKER_CONFIG, "digest": d('0'), "size": 2 },
            "layers": [ layer ],
        }))
        .unwrap()
    }

    fn parse_and_check(bytes: &[u8]) -> Result<(), RegistryError> {
        match parse(bytes, None, "manifest")? {
            (_, Parsed::Manifest(m)) => check_manifest(&m, "manifest"),
            (_, Parsed::Index(_)) => panic!("expected a manifest"),
        }
    }

    #[test]
    fn layer_types() {
        for ok in LAYER_MEDIA_TYPES {
            parse_and_check(&manifest_json(ok, false)).unwrap();
        }
        for bad in [
            "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
            "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
            "application/vnd.oci.image.layer.v1.tar+gzip+encrypted",
            "application/vnd.cncf.helm.chart.content.v1.tar+gzip",
        ] {
            let e = parse_and_check(&manifest_json(bad, false)).unwrap_err();
            assert!(matches!(e, RegistryError::Unsupported(_)), "{bad}: {e}");
            assert!(e.is_fallback());
        }
        let e = parse_and_check(&manifest_json(LAYER_MEDIA_TYPES[1], true)).unwrap_err();
        assert!(matches!(e, RegistryError::Unsupported(_)), "{e}");
        assert!(e.to_string().contains(&d('f')), "{e}");
    }

    #[test]
    fn schema1_is_unsupported() {
        let s1 = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 1, "name": "x", "tag": "y", "fsLayers": [], "history": []
        }))
        .unwrap();
        let e = parse(&s1, Some(DOCKER_SCHEMA1_SIGNED), "m").unwrap_err();
        assert!(matches!(e, RegistryError::Unsupported(_)), "{e}");
        assert!(parse(&s1, None, "m").unwrap_err().is_fallback());
        let e = parse(b"{}", Some(DOCKER_SCHEMA1), "m").unwrap_err();
        assert!(matches!(e, RegistryError::Unsupported(_)), "{e}");
    }

    #[test]
    fn media_type_detection() {
        let idx = serde_json::to_vec(&serde_json::json!({ "schemaVersion": 2, "manifests": [] }))
            .unwrap();
        let (t, p) = parse(&idx, Some("application/json"), "m").unwrap();
        assert_eq!(t, OCI_INDEX);
        assert!(matches!(p, Parsed::Index(_)));
        let (t, _) = parse(
            &idx,
            Some(&format!("{DOCKER_MANIFEST_LIST}; charset=utf-8")),
            "m",
        )
        .unwrap();
        assert_eq!(t, DOCKER_MANIFEST_LIST);
        let m = manifest_json(LAYER_MEDIA_TYPES[0], false);
        let (t, _) = parse(&m, Some(OCI_MANIFEST), "m").unwrap();
        assert_eq!(t, DOCKER_MANIFEST, "the document's own mediaType wins");
        assert!(matches!(
            parse(b"not json", None, "m"),
            Err(RegistryError::Protocol(_))
        ));
        let art = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2, "mediaType": "application/vnd.oci.artifact.manifest.v1+json"
        }))
        .unwrap();
        assert!(matches!(
            parse(&art, None, "m"),
            Err(RegistryError::Unsupported(_))
        ));
        // A non-image config is refused.
        let helm = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": { "mediaType": "application/vnd.cncf.helm.config.v1+json", "digest": d('0'), "size": 2 },
            "layers": [],
        }))
        .unwrap();
        let e = parse_and_check(&helm).unwrap_err();
        assert!(matches!(e, RegistryError::Unsupported(_)), "{e}");
    }

    #[test]
    fn platform_strings() {
        assert_eq!(
            Platform::new("linux", "arm64", "v8").to_string(),
            "linux/arm64"
        );
        assert_eq!(
            Platform::new("linux", "arm", "").to_string(),
            "linux/arm/v7"
        );
        assert_eq!(
            Platform::new("Linux", "x86_64", "").to_string(),
            "linux/amd64"
        );
        let p = Platform::node();
        assert_eq!(p.os, "linux");
        #[cfg(target_arch = "x86_64")]
        assert_eq!(p, Platform::new("linux", "amd64", ""));
        #[cfg(target_arch = "aarch64")]
        assert_eq!(p, Platform::new("linux", "arm64", "v8"));
    }
}
