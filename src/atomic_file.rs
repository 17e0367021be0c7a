//! Replacing a file whole, for files other programs read while pullgate writes them
//! (containerd's hosts.toml, node-feature-discovery's feature file): a reader sees the old text
//! or the new one, never half of it, and a crash leaves one of the two, never an empty file.
//!
//! May import only `small_file`.

use std::io::Write as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::Path;

/// What [`replace`] found just before its rename.
#[derive(Debug, PartialEq, Eq)]
pub enum Replaced {
    Written,
    /// The file no longer holds the text the new one was made from: someone edited it meanwhile,
    /// and their edit stays.
    Raced,
}

/// Writes `text` over `file` (see [`replace`]), whatever the file holds now.
pub fn write(file: &Path, text: &str) -> std::io::Result<()> {
    replace(file, None, text).map(|_| ())
}

/// Writes `text` to a hidden, uniquely named temporary file beside `file` (same filesystem, so
/// the rename is atomic; hidden, so a directory watcher such as node-feature-discovery skips
/// it; unique, so two writers never share one), with `file`'s mode and owner if it exists,
/// flushed to disk, then renames it over `file` and flushes the directory.
///
/// With `expected` (the text the new one was made from; `""` for a file that did not exist),
/// the file is read again just before the rename and left alone if it changed.
pub fn replace(file: &Path, expected: Option<&str>, text: &str) -> std::io::Result<Replaced> {
    let dir = match file.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = file.file_name().unwrap_or_default().to_string_lossy();
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".pullgate-tmp")
        .tempfile_in(dir)?;
    tmp.write_all(text.as_bytes())?;
    if let Ok(meta) = std::fs::metadata(file) {
        let f = tmp.as_file();
        f.set_permissions(meta.permissions())?;
        // Best effort: as root the owner is kept; otherwise the file is ours anyway.
        let _ = std::os::unix::fs::fchown(f, Some(meta.uid()), Some(meta.gid()));
    }
    tmp.as_file().sync_all()?;
    if let Some(expected) = expected {
        let now = match crate::small_file::read_to_string(file) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(e),
        };
        if now != expected {
            return Ok(Replaced::Raced);
        }
    }
    tmp.persist(file).map_err(|e| e.error)?;
    std::fs::File::open(dir)?.sync_all()?;
    Ok(Replaced::Written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn names(dir: &Path) -> Vec<std::ffi::OsString> {
        let mut n: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        n.sort();
        n
    }

    #[test]
    fn replaces_the_file_keeping_its_mode_and_leaves_nothing_beside_it() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("hosts.toml");
        write(&file, "one").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o640)).unwrap();
        write(&file, "two").unwrap();
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "two");
        let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o640);
        assert_eq!(names(dir.path()), ["hosts.toml"]);
    }

    #[test]
    fn an_edit_made_meanwhile_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("hosts.toml");
        std::fs::write(&file, "half of the admin's").unwrap();
        let read = std::fs::read_to_string(&file).unwrap();
        // The administrator finishes the file after pullgate read it.
        std::fs::write(&file, "half of the admin's edit, complete").unwrap();
        assert_eq!(
            replace(&file, Some(&read), "pullgate's + half").unwrap(),
            Replaced::Raced
        );
        assert_eq!(
            std::fs::read_to_string(&file).unwrap(),
            "half of the admin's edit, complete"
        );
        assert_eq!(names(dir.path()), ["hosts.toml"]);
        let now = std::fs::read_to_string(&file).unwrap();
        assert_eq!(
            replace(&file, Some(&now), "pullgate's + all").unwrap(),
            Replaced::Written
        );
        // A file created meanwhile counts as an edit too.
        let new = dir.path().join("new.toml");
        std::fs::write(&new, "admin").unwrap();
        assert_eq!(replace(&new, Some(""), "x").unwrap(), Replaced::Raced);
    }

    #[test]
    fn concurrent_writers_never_collide() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        let handles: Vec<_> = (0..8)
            .map(|i| {
                let file = file.clone();
                std::thread::spawn(move || {
                    for _ in 0..50 {
                        write(&file, &format!("writer {i}\n").repeat(100)).unwrap();
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        let text = std::fs::read_to_string(&file).unwrap();
        let first = text.lines().next().unwrap().to_string();
        assert!(text.lines().all(|l| l == first), "one writer's text, whole");
        assert_eq!(names(dir.path()), ["f"]);
    }

    #[test]
    fn a_failed_write_leaves_the_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("no-such-dir").join("file");
        assert!(write(&missing, "x").is_err());
        let file = dir.path().join("pullgate");
        write(&file, "old").unwrap();
        // A directory in the way of the rename: the old text stays, the temporary file goes.
        std::fs::create_dir(dir.path().join("dir")).unwrap();
        std::fs::write(dir.path().join("dir").join("x"), "").unwrap();
        assert!(write(&dir.path().join("dir"), "new").is_err());
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "old");
        assert_eq!(names(dir.path()), ["dir", "pullgate"]);
    }
}
