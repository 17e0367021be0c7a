//! The CRI and API unix sockets: handed over by systemd, or bound here (parent directory, stale
//! sockets, permissions).

use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;

use tokio::net::UnixListener;

/// A listening socket, and whether pullgate made its file (and removes it at exit). A socket
/// systemd handed over stays: systemd owns it, and kubelet's calls queue on it while pullgate
/// restarts.
pub struct Bound {
    pub listener: UnixListener,
    pub owned: bool,
}

/// The socket systemd handed over for `path` (socket activation), else binds `path`.
pub async fn listen(path: &Path, mode: u32) -> io::Result<Bound> {
    if let Some(l) = super::activation::take(path) {
        l.set_nonblocking(true)?;
        return Ok(Bound {
            listener: UnixListener::from_std(l)?,
            owned: false,
        });
    }
    Ok(Bound {
        listener: bind(path, mode).await?,
        owned: true,
    })
}

/// Binds `path`, replacing a stale socket left by a crash; refuses to take over a socket another
/// process still serves, or to delete anything that is not a socket.
pub async fn bind(path: &Path, mode: u32) -> io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| {
            io::Error::new(e.kind(), format!("cannot create {}: {e}", dir.display()))
        })?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if tokio::net::UnixStream::connect(path).await.is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!(
                        "{} is in use by a running process (another pullgate?)",
                        path.display()
                    ),
                ));
            }
            std::fs::remove_file(path)?;
        }
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!(
                    "{} exists and is not a socket; not replacing it",
                    path.display()
                ),
            ))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(path)
        .map_err(|e| io::Error::new(e.kind(), format!("cannot bind {}: {e}", path.display())))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn creates_dir_sets_mode_and_replaces_stale_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/pullgate/pg.sock");
        let l = bind(&path, 0o660).await.unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o660);
        // Live socket: refused.
        let err = bind(&path, 0o660).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
        drop(l);
        // Stale socket file (listener gone): replaced.
        bind(&path, 0o600).await.unwrap();
    }

    #[tokio::test]
    async fn never_deletes_a_regular_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("not-a-socket");
        std::fs::write(&path, b"keep me").unwrap();
        assert!(bind(&path, 0o660).await.is_err());
        assert_eq!(std::fs::read(&path).unwrap(), b"keep me");
    }
}
