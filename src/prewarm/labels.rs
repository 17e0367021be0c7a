//! Node labels for the `[[prewarm]]` images a node holds: a node-feature-discovery local
//! feature file (`features.d/pullgate`), one `NAME=true` line per image present in containerd,
//! which NFD's worker turns into the node label `feature.node.kubernetes.io/NAME`. Pods then ask
//! for nodes that already hold their image with a `nodeAffinity` on that label.
//!
//! Presence is what containerd's CRI says (`ImageStatus`), checked every `node_labels.interval`,
//! so an image kubelet's garbage collection removed loses its label. The file is rewritten
//! only when its content changes, atomically (a temp file renamed over it), so NFD never reads
//! half of it.

use std::path::Path;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::Prewarmer;
use crate::config::labels::MAX_LABEL_NAME;
use crate::config::{NodeLabelsConfig, PrewarmEntry};
use crate::proto::runtime::v1::image_service_client::ImageServiceClient;
use crate::proto::runtime::v1::{ImageSpec, ImageStatusRequest};
use crate::upstream::Containerd;

/// NFD prefixes names without a namespace with this.
pub const LABEL_PREFIX: &str = "feature.node.kubernetes.io/";
/// The label name of an entry: its `label`, else `pullgate-` with the reference's last path
/// segment and tag made label-safe, and 8 hex digits of the reference's SHA-256 (two
/// references never share a name, and the name stays within 63 characters).
pub fn name_of(entry: &PrewarmEntry) -> String {
    if let Some(l) = &entry.label {
        return l.clone();
    }
    let reference = entry.image.trim();
    let hash = hex8(reference);
    let last = reference.rsplit('/').next().unwrap_or(reference);
    let mut safe: String = last
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    // "pullgate-" + safe + "-" + 8 hex.
    safe.truncate(MAX_LABEL_NAME - "pullgate-".len() - 9);
    let safe = safe.trim_matches('-');
    if safe.is_empty() {
        format!("pullgate-{hash}")
    } else {
        format!("pullgate-{safe}-{hash}")
    }
}

fn hex8(text: &str) -> String {
    Sha256::digest(text.as_bytes())
        .iter()
        .take(4)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The first line of every file pullgate writes (NFD skips `#` lines): a file without it is
/// someone else's and is never replaced.
const MARKER: &str = "# Written by pullgate";

/// Why `file` must not be written: it exists and pullgate did not write it (or it is no regular
/// file). `None`: absent or pullgate's own.
pub fn foreign(file: &Path) -> Option<String> {
    match std::fs::symlink_metadata(file) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => return Some(format!("cannot inspect it: {e}")),
        Ok(m) if !m.file_type().is_file() => {
            return Some("it is not a regular file (a symlink, device or directory)".into())
        }
        Ok(_) => {}
    }
    match crate::small_file::read_to_string(file) {
        Ok(text) if text.starts_with(MARKER) => None,
        Ok(_) => Some(format!(
            "it exists and pullgate did not write it (its first line is not {MARKER:?})"
        )),
        Err(e) => Some(format!("cannot read it: {e}")),
    }
}

/// The file's text for these label names.
pub fn render(names: &[String]) -> String {
    let mut names = names.to_vec();
    names.sort();
    names.dedup();
    let mut out = String::from(MARKER);
    out.push_str(": the [[prewarm]] images this node holds (node_labels).\n");
    for n in names {
        out.push_str(&n);
        out.push_str("=true\n");
    }
    out
}

/// Keeps the file up to date until `stop`.
pub async fn run(
    cfg: NodeLabelsConfig,
    prewarmer: std::sync::Arc<Prewarmer>,
    containerd: Containerd,
    stop: CancellationToken,
) {
    let mut warned_dir = false;
    let mut warned_foreign = false;
    let mut written: Option<String> = None;
    loop {
        let dir_exists = cfg.file.parent().is_some_and(Path::is_dir);
        if !dir_exists {
            if !warned_dir {
                info!(file = %cfg.file.display(),
                      "node labels not written: the directory does not exist (node-feature-discovery not installed?)");
                warned_dir = true;
            }
        } else {
            warned_dir = false;
            let mut present = Vec::new();
            let mut known = true;
            for entry in prewarmer.entries() {
                match is_present(&containerd, &entry.image).await {
                    Ok(true) => present.push(name_of(&entry)),
                    Ok(false) => {}
                    Err(e) => {
                        // Unknown presence keeps the file as it is rather than dropping labels.
                        debug!(image = %entry.image, error = %e, "node labels: presence unknown");
                        known = false;
                    }
                }
            }
            let text = render(&present);
            if known && written.as_deref() != Some(text.as_str()) {
                let on_disk = crate::small_file::read_to_string(&cfg.file).ok();
                if let Some(why) = foreign(&cfg.file) {
                    if !warned_foreign {
                        warn!(file = %cfg.file.display(), why,
                              "node labels not written: pullgate replaces only a file it wrote (set node_labels.file to a path of its own)");
                        warned_foreign = true;
                    }
                } else if on_disk.as_deref() != Some(text.as_str()) {
                    match crate::atomic_file::write(&cfg.file, &text) {
                        Ok(()) => info!(file = %cfg.file.display(), images = present.len(),
                                        "node labels rewritten"),
                        Err(e) => warn!(file = %cfg.file.display(), error = %e,
                                        "cannot write the node labels file"),
                    }
                }
                written = Some(text);
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(cfg.interval) => {}
        }
    }
}

async fn is_present(containerd: &Containerd, image: &str) -> Result<bool, tonic::Status> {
    let mut client = ImageServiceClient::new(containerd.channel());
    let req = ImageStatusRequest {
        image: Some(ImageSpec {
            image: image.to_string(),
            ..Default::default()
        }),
        verbose: false,
    };
    let call = client.image_status(req);
    match tokio::time::timeout(Duration::from_secs(5), call).await {
        Ok(r) => Ok(r?.into_inner().image.is_some()),
        Err(_) => Err(tonic::Status::deadline_exceeded(
            "ImageStatus took over 5 s",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::check_label_name;

    fn entry(image: &str, label: Option<&str>) -> PrewarmEntry {
        let mut e: PrewarmEntry = toml::from_str(&format!("image = {image:?}")).unwrap();
        e.label = label.map(String::from);
        e
    }

    #[test]
    fn names_are_label_safe_unique_and_bounded() {
        let a = name_of(&entry("registry.example/ml/model:v3", None));
        assert!(a.starts_with("pullgate-model-v3-"), "{a}");
        check_label_name(&a).unwrap();
        let b = name_of(&entry("other.example/ml/model:v3", None));
        assert_ne!(a, b, "same last segment, other registry");
        let long = format!("r.example/{}:{}", "x".repeat(80), "y".repeat(40));
        let n = name_of(&entry(&long, None));
        assert!(n.len() <= MAX_LABEL_NAME, "{n}");
        check_label_name(&n).unwrap();
        let d = name_of(&entry("r.example/app@sha256:0123abcd", None));
        check_label_name(&d).unwrap();
        assert_eq!(
            name_of(&entry("r.example/app:1", Some("llm-weights"))),
            "llm-weights"
        );

        assert!(check_label_name("ok.name_1").is_ok());
        for bad in ["", "-x", "x-", "a/b", "with space", &"z".repeat(64)] {
            assert!(check_label_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn only_a_file_pullgate_wrote_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pullgate");
        assert_eq!(foreign(&file), None, "absent");
        std::fs::write(&file, render(&["a".into()])).unwrap();
        assert_eq!(foreign(&file), None, "ours");
        std::fs::write(&file, "root:x:0:0:root:/root:/bin/bash\n").unwrap();
        assert!(foreign(&file).unwrap().contains("did not write it"));
        std::fs::write(&file, "").unwrap();
        assert!(foreign(&file).is_some(), "an empty file is not ours either");
        std::fs::remove_file(&file).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", &file).unwrap();
        assert!(foreign(&file).unwrap().contains("not a regular file"));
        assert!(foreign(Path::new("/etc/passwd")).is_some());
    }

    #[test]
    fn the_file_lists_each_name_once_in_order() {
        let text = render(&["b".into(), "a".into(), "b".into()]);
        assert_eq!(
            text.lines()
                .filter(|l| !l.starts_with('#'))
                .collect::<Vec<_>>(),
            ["a=true", "b=true"]
        );
        assert!(render(&[]).lines().all(|l| l.starts_with('#')));
    }
}
