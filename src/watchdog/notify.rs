//! systemd's notification protocol (sd_notify(3)): one datagram of `KEY=VALUE` lines to the
//! unix socket named in `NOTIFY_SOCKET`.
//!
//! A few lines over std rather than the `sd-notify` crate: its 0.5 release connects to the
//! variable as a file path, so an abstract socket (`@name`, which systemd in a container and
//! `systemd-run --user` hand out) would be missed.

use std::ffi::OsString;
use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

/// Where the service manager listens; `None` when pullgate does not run under one.
pub struct Notifier {
    socket: UnixDatagram,
    addr: SocketAddr,
    shown: String,
}

impl Notifier {
    /// From `NOTIFY_SOCKET`: `Ok(None)` when unset or empty, an error when it cannot be used.
    pub fn from_env() -> io::Result<Option<Notifier>> {
        match std::env::var_os("NOTIFY_SOCKET") {
            Some(v) if !v.is_empty() => Notifier::to(&v).map(Some),
            _ => Ok(None),
        }
    }

    fn to(target: &OsString) -> io::Result<Notifier> {
        let bytes = target.as_bytes();
        let addr = match bytes.strip_prefix(b"@") {
            Some(name) => SocketAddr::from_abstract_name(name)?,
            None => SocketAddr::from_pathname(std::path::Path::new(target))?,
        };
        let socket = UnixDatagram::unbound()?;
        // A service manager that does not read its socket must not stall a runtime worker.
        socket.set_nonblocking(true)?;
        Ok(Notifier {
            socket,
            addr,
            shown: target.to_string_lossy().into_owned(),
        })
    }

    /// Sends `state` (e.g. `"READY=1"`).
    pub fn send(&self, state: &str) -> io::Result<()> {
        let sent = self.socket.send_to_addr(state.as_bytes(), &self.addr)?;
        if sent != state.len() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "short write to NOTIFY_SOCKET",
            ));
        }
        Ok(())
    }

    /// The socket as named in the environment, for logs.
    pub fn target(&self) -> &str {
        &self.shown
    }
}

/// The watchdog period systemd asks for (`WATCHDOG_USEC`), if it asks this process
/// (`WATCHDOG_PID`, when set, names the process meant; a child of ours must not ping for us).
pub fn watchdog_period() -> Option<Duration> {
    period_from(
        std::env::var("WATCHDOG_USEC").ok().as_deref(),
        std::env::var("WATCHDOG_PID").ok().as_deref(),
        std::process::id(),
    )
}

fn period_from(usec: Option<&str>, pid: Option<&str>, own: u32) -> Option<Duration> {
    let usec: u64 = usec?.trim().parse().ok().filter(|&u| u > 0)?;
    match pid.map(|p| p.trim().parse::<u32>()) {
        None => {}
        Some(Ok(p)) if p == own => {}
        Some(_) => return None,
    }
    Some(Duration::from_micros(usec))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watchdog_period_honours_the_pid_it_names() {
        let s = Some(Duration::from_secs(10));
        assert_eq!(period_from(Some("10000000"), None, 7), s);
        assert_eq!(period_from(Some("10000000"), Some("7"), 7), s);
        assert_eq!(period_from(Some("10000000"), Some("8"), 7), None);
        assert_eq!(period_from(Some("10000000"), Some("x"), 7), None);
        assert_eq!(period_from(Some("0"), None, 7), None);
        assert_eq!(period_from(Some("ten"), None, 7), None);
        assert_eq!(period_from(None, Some("7"), 7), None);
    }

    #[test]
    fn notifies_a_path_socket_and_an_abstract_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let rx = UnixDatagram::bind(&path).unwrap();
        let n = Notifier::to(&path.clone().into_os_string()).unwrap();
        n.send("READY=1").unwrap();
        let mut buf = [0u8; 64];
        let len = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"READY=1");

        let name = format!("pullgate-notify-test-{}", std::process::id());
        let rx = UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(&name).unwrap()).unwrap();
        let n = Notifier::to(&format!("@{name}").into()).unwrap();
        n.send("WATCHDOG=1").unwrap();
        let len = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"WATCHDOG=1");
        assert_eq!(n.target(), format!("@{name}"));
    }

    #[test]
    fn a_missing_listener_is_an_error_not_a_panic() {
        let n = Notifier::to(&"/nonexistent/pullgate-notify".into()).unwrap();
        assert!(n.send("READY=1").is_err());
    }
}
