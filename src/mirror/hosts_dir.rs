//! pullgate's entries across containerd's registry host directory (`config_path`): the
//! `_default` directory (every registry without its own) and each registry's own directory.
//!
//! Written at start and checked again before each pull forwarded to containerd (an
//! administrator's tool may rewrite a file at any time; containerd re-reads them per pull).
//! Files are replaced atomically (write beside, rename), and only when the content changes.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tracing::{debug, info, warn};

use super::hosts_file;
use crate::atomic_file::Replaced;

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

/// System directories that are never a certs.d tree, whatever they hold.
const SYSTEM_DIRS: &[&str] = &[
    "/",
    "/bin",
    "/boot",
    "/dev",
    "/etc",
    "/home",
    "/lib",
    "/lib64",
    "/opt",
    "/proc",
    "/root",
    "/run",
    "/sbin",
    "/srv",
    "/sys",
    "/tmp",
    "/usr",
    "/var",
    "/var/lib",
    "/etc/containerd",
];

/// `Err` says why `hosts_dir` is not a containerd certs.d-style tree, the only kind pullgate
/// writes into: each entry a directory named `_default` or a registry `host[:port]`, holding
/// files only (hosts.toml, certificates and keys). Absent is fine (it is created).
pub fn check_tree(hosts_dir: &Path) -> Result<(), String> {
    let shown = hosts_dir.display();
    let normal: PathBuf = hosts_dir.components().collect();
    if SYSTEM_DIRS.iter().any(|d| normal == Path::new(d)) {
        return Err(format!(
            "{shown} is a system directory, not containerd's registry host directory \
             (usually /etc/containerd/certs.d)"
        ));
    }
    let entries = match std::fs::read_dir(hosts_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(format!("cannot read {shown}: {e}")),
    };
    for entry in entries.filter_map(|e| e.ok()) {
        let path = entry.path();
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        if !kind.is_dir() {
            continue;
        }
        let name = entry.file_name().to_string_lossy().into_owned();
        let host_like = name == "_default"
            || (!name.is_empty()
                && !name.starts_with('.')
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-.:[]_".contains(&b)));
        if !host_like {
            return Err(format!(
                "{shown} holds {}, which is not a registry host directory: not a containerd \
                 certs.d tree",
                path.display()
            ));
        }
        let nested = std::fs::read_dir(&path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?
            .filter_map(|e| e.ok())
            .find(|e| e.file_type().is_ok_and(|t| t.is_dir()));
        if let Some(n) = nested {
            return Err(format!(
                "{shown} holds {}: a registry host directory holds files only \
                 (hosts.toml, certificates), so this is not a containerd certs.d tree",
                n.path().display()
            ));
        }
    }
    Ok(())
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
    /// Left as it is for now (someone else is editing it): why.
    Deferred(String),
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
                let text = crate::small_file::read_to_string(f).unwrap_or_default();
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
        let Ok(text) = crate::small_file::read_to_string(&file) else {
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
    let text = match crate::small_file::read_to_string(file) {
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
    // A file changed in the last moments may be mid-edit (an editor or `cat >` writing it in
    // pieces): adding to half a file and renaming over it would lose the rest of the edit.
    if !settled(file) {
        return Outcome::Deferred(
            "still being modified (an edit in progress?); checked again before the next pull"
                .into(),
        );
    }
    match crate::atomic_file::replace(file, Some(&text), &new) {
        Ok(Replaced::Written) => Outcome::Written,
        Ok(Replaced::Raced) => Outcome::Deferred(
            "changed while pullgate wrote its entry; the other edit is kept, checked again before \
             the next pull"
                .into(),
        ),
        Err(e) => Outcome::Refused(format!("cannot write it: {e}")),
    }
}

/// How long a file must have been left alone before pullgate edits it, and the longest pullgate
/// waits for that (a blocking wait, only while someone is writing the file).
const SETTLE: Duration = Duration::from_secs(1);
const SETTLE_WAIT: Duration = Duration::from_secs(2);

/// Whether `file` has been left alone for [`SETTLE`], waiting up to [`SETTLE_WAIT`] for it.
fn settled(file: &Path) -> bool {
    let start = std::time::Instant::now();
    loop {
        let age = std::fs::metadata(file)
            .and_then(|m| m.modified())
            .ok()
            .map(|t| t.elapsed().unwrap_or_default());
        match age {
            None => return true,
            Some(age) if age >= SETTLE => return true,
            Some(age) if start.elapsed() + (SETTLE - age) > SETTLE_WAIT => return false,
            Some(age) => std::thread::sleep(SETTLE - age + Duration::from_millis(10)),
        }
    }
}

fn log(file: &Path, outcome: &Outcome) {
    match outcome {
        Outcome::Unchanged => debug!(file = %file.display(), "hosts.toml lists pullgate first"),
        Outcome::Written => {
            info!(file = %file.display(), "pullgate's mirror entry written first in hosts.toml")
        }
        Outcome::Deferred(why) => info!(file = %file.display(), why = why.as_str(),
            "hosts.toml not edited yet"),
        Outcome::Refused(why) => warn!(file = %file.display(), why = why.as_str(),
            "hosts.toml left as it is: containerd will not fetch this registry through pullgate"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_being_written_is_left_until_it_settles_and_a_racing_edit_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let keeper = HostsKeeper::new(dir.path().to_path_buf(), "http://127.0.0.1:9783".into());
        let reg = dir.path().join("r.test");
        std::fs::create_dir_all(&reg).unwrap();
        let file = reg.join("hosts.toml");
        // An administrator writes the file in pieces, 300 ms apart, for 3 s.
        let writer = {
            let file = file.clone();
            std::thread::spawn(move || {
                use std::io::Write;
                let mut f = std::fs::File::create(&file).unwrap();
                writeln!(f, "server = \"https://r.test\"").unwrap();
                for i in 0..10 {
                    std::thread::sleep(Duration::from_millis(300));
                    writeln!(
                        f,
                        "[host.\"https://m{i}.test\"]\n  capabilities = [\"pull\"]"
                    )
                    .unwrap();
                }
            })
        };
        std::thread::sleep(Duration::from_millis(100));
        assert!(matches!(keeper.ensure("r.test"), Outcome::Deferred(_)));
        writer.join().unwrap();
        let admin = std::fs::read_to_string(&file).unwrap();
        assert_eq!(
            keeper.ensure("r.test"),
            Outcome::Written,
            "settles within a second"
        );
        let now = std::fs::read_to_string(&file).unwrap();
        assert_eq!(
            hosts_file::without_mirror(&now),
            admin,
            "every line of the edit kept"
        );
    }

    #[test]
    fn only_a_certs_d_tree_is_written_into() {
        for bad in ["/", "/etc", "/etc/", "/usr", "/var/lib"] {
            assert!(check_tree(Path::new(bad)).is_err(), "{bad}");
        }
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("certs.d");
        assert!(check_tree(&root).is_ok(), "absent: created later");
        std::fs::create_dir_all(root.join("_default")).unwrap();
        std::fs::create_dir_all(root.join("docker.io")).unwrap();
        std::fs::create_dir_all(root.join("127.0.0.1:5000")).unwrap();
        std::fs::write(root.join("docker.io/hosts.toml"), "").unwrap();
        std::fs::write(root.join("docker.io/ca.crt"), "").unwrap();
        assert_eq!(check_tree(&root), Ok(()));
        std::fs::create_dir_all(root.join("docker.io/sub")).unwrap();
        assert!(check_tree(&root).unwrap_err().contains("docker.io/sub"));
        std::fs::remove_dir(root.join("docker.io/sub")).unwrap();
        std::fs::create_dir_all(root.join("not a host")).unwrap();
        assert!(check_tree(&root).unwrap_err().contains("not a host"));
    }

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
