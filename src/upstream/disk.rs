//! The free space of containerd's root, which decides whether a failed pull's downloads are kept
//! for the next attempt (`mirror.keep_partial_min_free`): partials are worth a resume only while
//! they do not stand between the node and its next pull.

use parking_lot::Mutex;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tracing::{info, warn};

use crate::config::{ContainerdConfig, Share};
use crate::metrics::Metrics;

/// containerd's default `root`.
const DEFAULT_ROOT: &str = "/var/lib/containerd";

/// Space on the filesystem holding containerd's root, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Room {
    /// Available to unprivileged writers (`f_bavail`): containerd runs as root, but kubelet's
    /// eviction thresholds count this too.
    pub free: u64,
    pub size: u64,
}

impl Room {
    /// Whether the disk is below `min_free` (a quantity, or a percentage of its size).
    pub fn pressure(&self, min_free: Share) -> bool {
        self.free < min_free.of(self.size)
    }
}

/// statvfs(2) of `path`.
pub fn room(path: &Path) -> std::io::Result<Room> {
    let st = rustix::fs::statvfs(path)?;
    let frsize = st.f_frsize.max(1);
    Ok(Room {
        free: st.f_bavail.saturating_mul(frsize),
        size: st.f_blocks.saturating_mul(frsize),
    })
}

/// containerd's root and its threshold; each sample updates the disk metrics and logs when
/// pressure starts and ends.
pub struct Watch {
    root: PathBuf,
    min_free: Share,
    metrics: Arc<Metrics>,
    /// Last state logged: `None` before the first sample, `Some(None)` unreadable.
    last: Mutex<Option<Option<bool>>>,
}

impl Watch {
    pub fn new(root: PathBuf, min_free: Share, metrics: Arc<Metrics>) -> Watch {
        Watch {
            root,
            min_free,
            metrics,
            last: Mutex::new(None),
        }
    }

    pub fn min_free(&self) -> Share {
        self.min_free
    }

    pub fn pressure(&self, room: &Room) -> bool {
        room.pressure(self.min_free)
    }

    /// The room now; `None` when the root cannot be read (logged once).
    pub fn sample(&self) -> Option<Room> {
        let res = room(&self.root);
        let state = res.as_ref().ok().map(|r| self.pressure(r));
        if let Ok(r) = &res {
            self.metrics.disk_free.set(clamp(r.free));
            self.metrics.disk_size.set(clamp(r.size));
            self.metrics.disk_pressure.set(i64::from(self.pressure(r)));
        }
        let mut last = self.last.lock();
        if *last != Some(state) {
            let min = self.min_free.of(res.as_ref().map(|r| r.size).unwrap_or(0));
            match &res {
                Err(e) => warn!(root = %self.root.display(), error = %e,
                    "cannot read the free space of containerd's root (containerd.root): partial                      downloads are dropped only when containerd reports a full disk"),
                Ok(r) if self.pressure(r) => warn!(root = %self.root.display(),
                    free = %human(r.free), size = %human(r.size), min_free = %human(min),
                    "containerd's disk is low: failed pulls' downloads are no longer kept"),
                Ok(r) => info!(root = %self.root.display(), free = %human(r.free),
                    size = %human(r.size), min_free = %human(min),
                    "containerd's disk has room: failed pulls' downloads are kept for resumption"),
            }
            *last = Some(state);
        }
        res.ok()
    }
}

fn clamp(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// containerd's root: `containerd.root`, else `root` in containerd's config file, else its
/// default.
pub fn root(cfg: &ContainerdConfig) -> PathBuf {
    if !cfg.root.as_os_str().is_empty() {
        return cfg.root.clone();
    }
    std::fs::read_to_string(&cfg.config_file)
        .ok()
        .and_then(|t| t.parse::<toml::Table>().ok())
        .and_then(|t| t.get("root")?.as_str().map(PathBuf::from))
        .filter(|p| p.is_absolute())
        .unwrap_or_else(|| PathBuf::from(DEFAULT_ROOT))
}

/// Whether containerd's error says its disk (or quota) is full: ENOSPC and EDQUOT as Go prints
/// them.
pub fn is_full(message: &str) -> bool {
    message.contains("no space left on device") || message.contains("disk quota exceeded")
}

/// `123.4 MB`, for logs and the status screen.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut v = bytes as f64;
    let mut i = 0;
    while v >= 1000.0 && i < UNITS.len() - 1 {
        v /= 1000.0;
        i += 1;
    }
    if i == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pressure_is_below_the_threshold_in_bytes_or_percent() {
        let r = Room {
            free: 100,
            size: 1000,
        };
        assert!(r.pressure(Share::Percent(15)));
        assert!(!r.pressure(Share::Percent(10)));
        assert!(r.pressure(Share::Bytes(101)));
        assert!(!r.pressure(Share::Bytes(100)));
        // 0: only a full disk (ENOSPC) drops partials.
        assert!(!Room {
            free: 0,
            size: 1000
        }
        .pressure(Share::Bytes(0)));
    }

    #[test]
    fn a_full_disk_is_told_from_containerds_error() {
        assert!(is_full("failed to pull and unpack image \"r/x:v1\": failed to copy: write /var/lib/containerd/io.containerd.content.v1.content/ingest/ab/data: no space left on device"));
        assert!(is_full("write /x: disk quota exceeded"));
        assert!(!is_full("failed to resolve reference: not found"));
    }

    #[test]
    fn the_root_comes_from_the_key_then_containerds_config() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("config.toml");
        std::fs::write(&file, "version = 2\nroot = \"/srv/ctd\"\n").unwrap();
        let mut cfg = ContainerdConfig {
            config_file: file.clone(),
            ..Default::default()
        };
        assert_eq!(root(&cfg), PathBuf::from("/srv/ctd"));
        cfg.root = PathBuf::from("/data/containerd");
        assert_eq!(root(&cfg), PathBuf::from("/data/containerd"));
        cfg.root = PathBuf::new();
        std::fs::write(&file, "version = 2\n").unwrap();
        assert_eq!(root(&cfg), PathBuf::from(DEFAULT_ROOT));
        cfg.config_file = dir.path().join("absent.toml");
        assert_eq!(root(&cfg), PathBuf::from(DEFAULT_ROOT));
    }

    #[test]
    fn room_of_a_real_directory() {
        let r = room(Path::new("/")).unwrap();
        assert!(r.size > 0 && r.free <= r.size, "{r:?}");
        assert!(room(Path::new("/no/such/dir")).is_err());
    }
}
