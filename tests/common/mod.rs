//! Integration-test harness: starts REAL components (distribution registry, containerd) on
//! loopback only, each in its own temp dir with its own free port, and offers gRPC helpers that
//! talk over unix sockets.
//!
//! Every process is killed when its owning struct is dropped. Keep the `TempDir` declared BEFORE
//! the component in a test so that the component (and its process) is dropped first:
//!
//! ```ignore
//! let dir = common::tempdir();
//! let registry = Registry::start(&dir.path().join("registry"), None).await;
//! let containerd = Containerd::start(&dir.path().join("containerd"), &[&registry]).await;
//! ```

#![allow(dead_code, unused_imports)]

pub mod clients;
pub mod containerd;
pub mod daemon;
pub mod fakeserver;
pub mod faultproxy;
pub mod grpc;
pub mod nginx;
pub mod node;
pub mod registry;
pub mod slowproxy;
pub mod store;
pub mod tokenauth;
pub mod varnish;

use parking_lot::Mutex;
use std::collections::HashSet;
use std::future::Future;
use std::net::TcpListener;
use std::path::Path;
use std::time::{Duration, Instant};

pub use containerd::Containerd;
pub use grpc::{
    auth_config, image_client, prewarm_request, pull_request, raw_unary, runtime_client,
    uds_channel, uds_channel_now, RawCodec,
};
pub use registry::{push_image, AccessLogEntry, Registry, TestImage};

/// Ports already handed out by `free_port` in this process, so parallel tests never get the same
/// port twice (the kernel may hand an ephemeral port out again once its listener is closed).
static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// A TCP port on 127.0.0.1 that was free a moment ago (bind 127.0.0.1:0) and that no other caller
/// in this process has been given.
pub fn free_port() -> u16 {
    for _ in 0..100 {
        let listener = TcpListener::bind("127.0.0.1:0")
            .unwrap_or_else(|e| panic!("free_port: cannot bind 127.0.0.1:0: {e}"));
        let port = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("free_port: local_addr: {e}"))
            .port();
        drop(listener);
        let mut guard = HANDED_OUT.lock();
        if guard.get_or_insert_with(HashSet::new).insert(port) {
            return port;
        }
    }
    panic!("free_port: could not find an unused port in 100 tries");
}

/// A fresh temp dir (under /tmp, so unix socket paths inside stay well below the 108-byte limit).
/// With `PULLGATE_TEST_KEEP=1` in the environment it is kept after the test (for reading logs).
pub fn tempdir() -> tempfile::TempDir {
    let keep = std::env::var_os("PULLGATE_TEST_KEEP").is_some_and(|v| v == "1");
    tempfile::Builder::new()
        .prefix("pg-")
        .disable_cleanup(keep)
        .tempdir_in("/tmp")
        .unwrap_or_else(|e| panic!("cannot create temp dir in /tmp: {e}"))
}

/// Polls `f` every 50 ms until it returns true; panics with `what` if `timeout` passes first.
pub async fn wait_for<F, Fut>(what: &str, timeout: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if f().await {
            return;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The last `n` lines of `text` (for panic messages).
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(n);
    lines[start..].join("\n")
}

/// Reads a log file lossily; an empty string if it does not exist yet.
pub fn read_log(path: &Path) -> String {
    match std::fs::read(path) {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(_) => String::new(),
    }
}

/// Lower-case hex of a byte slice.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        write!(s, "{b:02x}").unwrap();
    }
    s
}

/// "sha256:<hex>" of `data`.
pub fn sha256_digest(data: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    format!("sha256:{}", hex(&Sha256::digest(data)))
}

/// Makes the child get SIGKILL when the thread that spawned it exits, so components do not
/// outlive a test binary that is killed or aborts (Drop does not run then). Spawn components from
/// the test's own task (not from `spawn_blocking` threads, which exit when idle).
pub(crate) fn kill_with_parent(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl(2) is async-signal-safe; nothing else runs between fork and exec here.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Sends `sig` to `pid` (no-op for pid 0).
pub(crate) fn send_signal(pid: u32, sig: libc::c_int) {
    if pid == 0 {
        return;
    }
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}

/// Waits (polling, without blocking the async runtime) for `child` to exit, up to `timeout`.
/// Returns true if it exited.
pub(crate) async fn wait_child(child: &mut std::process::Child, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => return true,
            Ok(None) => {}
            Err(_) => return true,
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Blocking variant of `wait_child` for use in `Drop`.
pub(crate) fn wait_child_blocking(child: &mut std::process::Child, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => return true,
            Ok(None) => {}
            Err(_) => return true,
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// SIGTERM, wait up to `grace`, then SIGKILL and reap. Blocking; for `Drop`.
pub(crate) fn terminate_blocking(child: &mut std::process::Child, grace: Duration) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    send_signal(child.id(), libc::SIGTERM);
    if !wait_child_blocking(child, grace) {
        let _ = child.kill();
        let _ = child.wait();
    }
}
