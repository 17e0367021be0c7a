//! Reading the files pullgate is pointed at (its config, containerd's config and drop-ins,
//! hosts.toml, docker config.json, certificates): regular files only, of bounded size, so a path
//! such as `/dev/zero` or a FIFO is an error instead of an unbounded read or a hang.
//!
//! A leaf: imports nothing of the crate.

use std::io::Read;
use std::path::Path;

/// The largest config-like file pullgate reads: far above any real one (the shipped config is
/// 10 KiB), far below memory that matters.
pub const LIMIT: u64 = 4 * 1024 * 1024;

/// Reads `path` as UTF-8 text, refusing anything but a regular file and more than [`LIMIT`] bytes.
pub fn read_to_string(path: &Path) -> std::io::Result<String> {
    let bytes = read(path)?;
    String::from_utf8(bytes).map_err(|_| invalid(path, "is not UTF-8 text"))
}

/// As [`read_to_string`], for bytes.
pub fn read(path: &Path) -> std::io::Result<Vec<u8>> {
    // O_NONBLOCK: opening a FIFO must not wait for a writer; the check below refuses it.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(invalid(path, "is not a regular file"));
    }
    let mut out = Vec::with_capacity(meta.len().min(LIMIT) as usize);
    file.take(LIMIT + 1).read_to_end(&mut out)?;
    if out.len() as u64 > LIMIT {
        return Err(invalid(
            path,
            &format!("is larger than {} MiB", LIMIT / (1024 * 1024)),
        ));
    }
    Ok(out)
}

fn invalid(path: &Path, why: &str) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        format!("{} {why}", path.display()),
    )
}

use std::os::unix::fs::OpenOptionsExt as _;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_fifos_directories_and_huge_files_are_refused_quickly() {
        let start = std::time::Instant::now();
        for p in ["/dev/zero", "/dev/urandom", "/"] {
            let e = read_to_string(Path::new(p)).unwrap_err();
            assert!(e.to_string().contains("not a regular file"), "{p}: {e}");
        }
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        assert!(read(&fifo).is_err());
        let big = dir.path().join("big");
        std::fs::File::create(&big)
            .unwrap()
            .set_len(LIMIT + 1)
            .unwrap();
        assert!(read(&big).unwrap_err().to_string().contains("larger than"));
        assert!(start.elapsed() < std::time::Duration::from_secs(2));
        let ok = dir.path().join("ok");
        std::fs::write(&ok, "a = 1\n").unwrap();
        assert_eq!(read_to_string(&ok).unwrap(), "a = 1\n");
        assert!(read(&dir.path().join("missing")).is_err());
    }
}
