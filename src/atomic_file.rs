//! Replacing a file whole, for files other programs read while pullgate writes them
//! (containerd's hosts.toml, node-feature-discovery's feature file): a reader sees the old text
//! or the new one, never half of it.

use std::path::{Path, PathBuf};

/// Writes `text` to a hidden temporary file beside `file` (same filesystem, so the rename is
/// atomic; hidden, so a directory watcher such as node-feature-discovery skips it), with
/// `file`'s permissions if it exists, then renames it over `file`.
pub fn write(file: &Path, text: &str) -> std::io::Result<()> {
    let tmp = temporary(file);
    std::fs::write(&tmp, text)?;
    if let Ok(meta) = std::fs::metadata(file) {
        let _ = std::fs::set_permissions(&tmp, meta.permissions());
    }
    std::fs::rename(&tmp, file).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

fn temporary(file: &Path) -> PathBuf {
    let mut name = std::ffi::OsString::from(".");
    name.push(file.file_name().unwrap_or_default());
    name.push(".pullgate-tmp");
    file.with_file_name(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

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
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["hosts.toml"]);
        assert_eq!(
            temporary(&file).file_name().unwrap(),
            ".hosts.toml.pullgate-tmp"
        );
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
        assert!(!temporary(&dir.path().join("dir")).exists());
    }
}
