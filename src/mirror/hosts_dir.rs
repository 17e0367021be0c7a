//! pullgate's entries across containerd's registry host directory (`config_path`): the
//! `_default` directory (every registry without its own) and each registry's own directory.
//!
//! Written at start and checked again before each pull forwarded to containerd (an
//! administrator's tool may rewrite a file at any time; containerd re-reads them per pull).
//! Files are replaced atomically (write beside, rename), and only when the content changes.

use std::path::{Path, PathBuf};

use tracing::{debug, info, warn};

use super::hosts_file;

/// The directory whose hosts.toml applies to `registry` (containerd: its own, else `_default`).
fn dir_for(hosts_dir: &Path, registry: &str) -> PathBuf {
    let own = hosts_dir.join(registry);
    if own.is_dir() {
        own
    } else {
        hosts_dir.join("_default")
    }
}

/// Every directory pullgate keeps an entry in: `_default` and each registry directory.
fn all_dirs(hosts_dir: &Path) -> Vec<PathBuf> {
    let mut dirs = vec![hosts_dir.join("_default")];
    if let Ok(entries) = std::fs::read_dir(hosts_dir) {
        let mut found: Vec<PathBuf> = entries
            .filter_map(|e| e.ok())
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| e.path())
            .filter(|p| p.file_name().is_some_and(|n| n != "_default"))
            .collect();
        found.sort();
        dirs.extend(found);
    }
    dirs
}

/// Keeps pullgate's `[host]` first in the files under `hosts_dir`.
#[derive(Debug, Clone)]
pub struct HostsKeeper {
    hosts_dir: PathBuf,
    url: String,
}

/// What happened to one file.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    Unchanged,
    Written,
    /// Left as it is: why.
    Refused(String),
}

impl HostsKeeper {
    pub fn new(hosts_dir: PathBuf, url: String) -> Self {
        HostsKeeper { hosts_dir, url }
    }

    /// Adds or refreshes the entry in `_default` and every registry directory.
    pub fn ensure_all(&self) -> Vec<(PathBuf, Outcome)> {
        let out: Vec<_> = all_dirs(&self.hosts_dir)
            .into_iter()
            .map(|d| {
                let file = d.join("hosts.toml");
                let outcome = ensure_file(&file, &self.url);
                log(&file, &outcome);
                (file, outcome)
            })
            .collect();
        out
    }

    /// Makes sure the file containerd will read for `registry` lists pullgate first.
    pub fn ensure(&self, registry: &str) -> Outcome {
        if registry.is_empty() || registry.contains('/') || registry.starts_with('.') {
            return Outcome::Refused(format!("invalid registry host {registry:?}"));
        }
        let file = dir_for(&self.hosts_dir, registry).join("hosts.toml");
        let outcome = ensure_file(&file, &self.url);
        log(&file, &outcome);
        outcome
    }

    /// Files that do not list pullgate first (for `/readyz` and status).
    pub fn missing(&self) -> Vec<PathBuf> {
        all_dirs(&self.hosts_dir)
            .into_iter()
            .map(|d| d.join("hosts.toml"))
            .filter(|f| {
                let text = std::fs::read_to_string(f).unwrap_or_default();
                !hosts_file::mirror_is_first(&text, &self.url)
            })
            .collect()
    }
}

/// Takes pullgate's entries out of every file under `hosts_dir`; a `_default/hosts.toml` that
/// pullgate created and that holds nothing else goes with its directory. Returns the files
/// changed.
pub fn remove_all(hosts_dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut changed = Vec::new();
    for d in all_dirs(hosts_dir) {
        let file = d.join("hosts.toml");
        let Ok(text) = std::fs::read_to_string(&file) else {
            continue;
        };
        let rest = hosts_file::without_mirror(&text);
        if rest == text {
            continue;
        }
        if rest.trim().is_empty() && d.ends_with("_default") {
            std::fs::remove_file(&file)?;
            let _ = std::fs::remove_dir(&d);
        } else {
            crate::atomic_file::write(&file, &rest)?;
        }
        changed.push(file);
    }
    Ok(changed)
}

fn ensure_file(file: &Path, url: &str) -> Outcome {
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Outcome::Refused(format!("cannot read it: {e}")),
    };
    let new = match hosts_file::with_mirror(&text, url) {
        Ok(n) => n,
        Err(why) => return Outcome::Refused(why),
    };
    if new == text {
        return Outcome::Unchanged;
    }
    if let Some(dir) = file.parent() {
        if let Err(e) = std::fs::create_dir_all(dir) {
            return Outcome::Refused(format!("cannot create {}: {e}", dir.display()));
        }
    }
    match crate::atomic_file::write(file, &new) {
        Ok(()) => Outcome::Written,
        Err(e) => Outcome::Refused(format!("cannot write it: {e}")),
    }
}

fn log(file: &Path, outcome: &Outcome) {
    match outcome {
        Outcome::Unchanged => debug!(file = %file.display(), "hosts.toml lists pullgate first"),
        Outcome::Written => {
            info!(file = %file.display(), "pullgate's mirror entry written first in hosts.toml")
        }
        Outcome::Refused(why) => warn!(file = %file.display(), why = why.as_str(),
            "hosts.toml left as it is: containerd will not fetch this registry through pullgate"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const URL: &str = "http://127.0.0.1:9783";

    #[test]
    fn entries_go_into_default_and_every_registry_and_come_out_again() {
        let dir = tempfile::tempdir().unwrap();
        let reg = dir.path().join("registry.test");
        std::fs::create_dir_all(&reg).unwrap();
        let admin = "server = \"https://registry.test\"\n\n[host.\"http://p2p:65001\"]\n  capabilities = [\"pull\"]\n";
        std::fs::write(reg.join("hosts.toml"), admin).unwrap();
        let keeper = HostsKeeper::new(dir.path().to_path_buf(), URL.into());
        assert_eq!(keeper.missing().len(), 2);

        let done = keeper.ensure_all();
        assert!(done.iter().all(|(_, o)| *o == Outcome::Written), "{done:?}");
        assert!(keeper.missing().is_empty());
        assert!(keeper
            .ensure_all()
            .iter()
            .all(|(_, o)| *o == Outcome::Unchanged));
        assert_eq!(keeper.ensure("registry.test"), Outcome::Unchanged);
        assert_eq!(
            keeper.ensure("other.test"),
            Outcome::Unchanged,
            "_default covers it"
        );

        // An administrator's tool rewrites the file: the next pull puts the entry back.
        std::fs::write(reg.join("hosts.toml"), admin).unwrap();
        assert_eq!(keeper.ensure("registry.test"), Outcome::Written);

        let changed = remove_all(dir.path()).unwrap();
        assert_eq!(changed.len(), 2);
        assert_eq!(
            std::fs::read_to_string(reg.join("hosts.toml")).unwrap(),
            admin
        );
        assert!(!dir.path().join("_default").exists());
    }

    #[test]
    fn a_file_it_cannot_edit_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let reg = dir.path().join("r.test");
        std::fs::create_dir_all(&reg).unwrap();
        std::fs::write(reg.join("hosts.toml"), "this is not toml [").unwrap();
        let keeper = HostsKeeper::new(dir.path().to_path_buf(), URL.into());
        assert!(matches!(keeper.ensure("r.test"), Outcome::Refused(_)));
        assert_eq!(
            std::fs::read_to_string(reg.join("hosts.toml")).unwrap(),
            "this is not toml ["
        );
        assert!(matches!(keeper.ensure("../etc"), Outcome::Refused(_)));
    }
}
