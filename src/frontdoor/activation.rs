//! systemd socket activation: listening sockets handed over in `LISTEN_FDS` (from fd 3 on, for
//! the process `LISTEN_PID`), as `pullgate.socket` or `systemd-socket-activate` pass them. Each
//! is matched to the socket pullgate would bind by the path it is bound to, so the unit's order
//! of `ListenStream=` lines does not matter. While pullgate restarts, systemd keeps the socket
//! and kubelet's calls wait in its backlog instead of failing.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use tracing::{info, warn};

/// The first fd systemd passes.
const FIRST_FD: RawFd = 3;

/// Listeners handed over and not taken yet, by path.
static HANDED: Mutex<Option<HashMap<PathBuf, UnixListener>>> = Mutex::new(None);

/// Reads the handed-over sockets once, at start, before any other fd is opened (so fds 3..
/// are what systemd passed), and clears the variables so children do not see them.
pub fn receive() {
    let mut handed = HANDED.lock();
    if handed.is_some() {
        return;
    }
    let mut found = HashMap::new();
    let for_us = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
        == Some(std::process::id());
    let count = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|n| n.parse::<RawFd>().ok())
        .unwrap_or(0);
    // At start, before the runtime's threads exist: changing the environment is not thread-safe.
    for var in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        std::env::remove_var(var);
    }
    if for_us {
        for fd in FIRST_FD..FIRST_FD + count.clamp(0, 64) {
            // SAFETY: systemd's protocol gives this process fds 3..3+LISTEN_FDS, open and owned by
            // it; each is taken here once.
            let listener = unsafe { UnixListener::from_raw_fd(fd) };
            match listener
                .local_addr()
                .ok()
                .and_then(|a| a.as_pathname().map(Path::to_path_buf))
            {
                Some(path) => {
                    set_cloexec(fd);
                    found.insert(path, listener);
                }
                None => {
                    warn!(
                        fd,
                        "a socket handed over by systemd is not a unix socket with a path; ignored"
                    );
                    std::mem::forget(listener);
                }
            }
        }
    }
    *handed = Some(found);
}

/// The listener systemd handed over for `path`, if it did.
pub fn take(path: &Path) -> Option<UnixListener> {
    let mut handed = HANDED.lock();
    let l = handed.as_mut()?.remove(path)?;
    info!(socket = %path.display(), "socket handed over by systemd (socket activation)");
    Some(l)
}

/// Paths handed over that nothing took (a unit listing a socket pullgate does not serve).
pub fn untaken() -> Vec<PathBuf> {
    HANDED
        .lock()
        .as_ref()
        .map(|h| h.keys().cloned().collect())
        .unwrap_or_default()
}

fn set_cloexec(fd: RawFd) {
    // SAFETY: fcntl on an fd this process owns.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFD);
        if flags >= 0 {
            libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC);
        }
    }
}
