//! What `check-config` and `serve` check beyond the config's own values: what the settings
//! expose (a socket others may write, metrics off loopback) and the files they name
//! (a hosts_dir that is no certs.d tree, a node-labels file pullgate did not write).
//!
//! May import `config`, `mirror` (its tree checks) and `prewarm` (the node-labels file).

use crate::config::Config;

/// Errors stop `serve` (exit 2) and fail `check-config`; warnings are printed and logged.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Findings {
    pub errors: Vec<String>,
    pub warnings: Vec<String>,
}

pub fn check(cfg: &Config) -> Findings {
    let mut f = Findings::default();
    if cfg.server.socket_mode_bits() & 0o002 != 0 {
        f.warnings.push(format!(
            "server.socket_mode {:?} lets every local user write the CRI socket: any process \
             can pull images and call containerd's image service through it; \"0660\" is the default",
            cfg.server.socket_mode
        ));
    }
    if cfg.metrics.enabled && !cfg.metrics.addr.ip().is_loopback() {
        f.warnings.push(format!(
            "metrics.addr {} is reachable off this node: /metrics shows image names and pull \
             activity to whoever can reach it (fine for a pod-network scrape; firewall it otherwise)",
            cfg.metrics.addr
        ));
    }
    if cfg.mirror.enabled && cfg.mirror.manage_hosts {
        if let Err(e) = crate::mirror::hosts_dir::check_tree(&cfg.mirror.hosts_dir) {
            f.errors.push(format!("mirror.hosts_dir: {e}"));
        }
    }
    if cfg.node_labels.enabled {
        if let Some(why) = crate::prewarm::labels::foreign(&cfg.node_labels.file) {
            f.warnings.push(format!(
                "node_labels.file {}: {why}; pullgate will not write it",
                cfg.node_labels.file.display()
            ));
        }
    }
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_the_settings_expose_and_the_files_they_name() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = Config::default();
        cfg.mirror.hosts_dir = dir.path().join("certs.d");
        cfg.node_labels.file = dir.path().join("features.d/pullgate");
        assert_eq!(check(&cfg), Findings::default());

        cfg.server.socket_mode = "0777".into();
        cfg.metrics.addr = "0.0.0.0:9782".parse().unwrap();
        cfg.mirror.hosts_dir = "/".into();
        cfg.node_labels.file = "/etc/passwd".into();
        let f = check(&cfg);
        assert_eq!(f.errors.len(), 1, "{f:?}");
        assert!(f.errors[0].contains("mirror.hosts_dir"));
        assert_eq!(f.warnings.len(), 3, "{f:?}");
        assert!(f.warnings[0].contains("server.socket_mode"));
        assert!(f.warnings[1].contains("metrics.addr"));
        assert!(f.warnings[2].contains("/etc/passwd"));
    }
}
