//! Where kubelet sends its image calls: the flags of a running kubelet win over its config file,
//! as in kubelet itself.

use std::path::{Path, PathBuf};

/// kubelet's image service endpoint, and where it was read.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Endpoint {
    /// `flags of kubelet (pid N)` or the config file's path.
    pub source: String,
    /// `None`: not set there (kubelet then uses its runtime endpoint, containerd).
    pub image_endpoint: Option<String>,
}

/// The endpoint kubelet uses: a running kubelet's `--image-service-endpoint`, else the
/// `imageServiceEndpoint` of its `--config` file or of `default_config`. `None` when neither a
/// kubelet process nor the file exists (a node without kubelet, or not yet joined).
pub fn endpoint(default_config: &Path) -> Option<Endpoint> {
    let mut config = default_config.to_path_buf();
    if let Some((pid, args)) = running_kubelet() {
        if let Some(v) = flag(&args, "--image-service-endpoint") {
            return Some(Endpoint {
                source: format!("flags of kubelet (pid {pid})"),
                image_endpoint: Some(v),
            });
        }
        if let Some(c) = flag(&args, "--config") {
            config = PathBuf::from(c);
        }
    }
    let text = crate::small_file::read_to_string(&config).ok()?;
    Some(Endpoint {
        source: config.display().to_string(),
        image_endpoint: yaml_key(&text, "imageServiceEndpoint"),
    })
}

/// Whether `endpoint` (`unix:///path` or a bare path) names `socket`.
pub fn names_socket(endpoint: &str, socket: &Path) -> bool {
    let path = endpoint
        .strip_prefix("unix://")
        .unwrap_or(endpoint)
        .trim_end_matches('/');
    Path::new(path) == socket
}

/// The first process named `kubelet`, with its arguments.
fn running_kubelet() -> Option<(u32, Vec<String>)> {
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        if comm.trim() != "kubelet" {
            continue;
        }
        let raw = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let args = raw
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        return Some((pid, args));
    }
    None
}

/// `--name=value` or `--name value`.
fn flag(args: &[String], name: &str) -> Option<String> {
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if let Some(v) = a.strip_prefix(name) {
            if let Some(v) = v.strip_prefix('=') {
                return Some(v.to_string());
            }
            if v.is_empty() {
                return it.next().cloned();
            }
        }
    }
    None
}

/// A top-level `key: value` of a YAML document (kubelet's config is flat at that level);
/// quotes and a trailing comment are dropped.
fn yaml_key(text: &str, key: &str) -> Option<String> {
    text.lines().find_map(|l| {
        let v = l.strip_prefix(key)?.trim_start().strip_prefix(':')?;
        let v = v.split(" #").next().unwrap_or("").trim();
        let v = v.trim_matches(|c| c == '"' || c == '\'');
        (!v.is_empty()).then(|| v.to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_image_endpoint_is_read_from_kubelets_config_and_flags() {
        let yaml = "apiVersion: kubelet.config.k8s.io/v1beta1\nkind: KubeletConfiguration\n\
                    containerRuntimeEndpoint: unix:///run/containerd/containerd.sock\n\
                    imageServiceEndpoint: \"unix:///run/pullgate/pullgate.sock\" # pullgate\n";
        assert_eq!(
            yaml_key(yaml, "imageServiceEndpoint").as_deref(),
            Some("unix:///run/pullgate/pullgate.sock")
        );
        assert_eq!(
            yaml_key("imageServiceEndpoint:\n", "imageServiceEndpoint"),
            None
        );
        assert_eq!(
            yaml_key("  imageServiceEndpoint: x\n", "imageServiceEndpoint"),
            None
        );

        let args: Vec<String> = [
            "/usr/bin/kubelet",
            "--config",
            "/etc/k.yaml",
            "--image-service-endpoint=unix:///run/p.sock",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(flag(&args, "--config").as_deref(), Some("/etc/k.yaml"));
        assert_eq!(
            flag(&args, "--image-service-endpoint").as_deref(),
            Some("unix:///run/p.sock")
        );
        assert_eq!(flag(&args, "--v"), None);

        let sock = Path::new("/run/pullgate/pullgate.sock");
        assert!(names_socket("unix:///run/pullgate/pullgate.sock", sock));
        assert!(names_socket("/run/pullgate/pullgate.sock", sock));
        assert!(!names_socket(
            "unix:///run/containerd/containerd.sock",
            sock
        ));
    }
}
