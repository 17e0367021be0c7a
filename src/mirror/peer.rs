//! Who is on the other end of a mirror connection: the uid owning the peer's loopback TCP socket.
//!
//! The mirror reads through what running jobs may read, so only containerd's uid (root by
//! default, `mirror.allow_uids`) may use it. The kernel is asked for the peer socket by its exact
//! 4-tuple over `NETLINK_SOCK_DIAG` (one request, one answer: no dump of the socket table); if
//! netlink is unavailable, `/proc/net/tcp{,6}` is scanned instead. A peer whose uid cannot be
//! found is refused: containerd then fetches from its next host, so a pull still works.
//!
//! Only loopback peers can be looked up this way (their socket lives in this network namespace);
//! the mirror listens on loopback only.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};

/// The uid owning the socket at `peer` connected to `local`. Over netlink this is one round
/// trip into the kernel (~10 µs, measured below), done inline; the `/proc` scan reads every TCP
/// socket on the host (3–20 ms measured with a few thousand), so it runs on a blocking thread,
/// [`SCANS`] at most at once: beyond that a peer is not looked up (refused), so a flood of
/// connections cannot pile up scans.
pub async fn uid_of(local: SocketAddr, peer: SocketAddr) -> io::Result<u32> {
    match netlink::lookup(local, peer) {
        Ok(sock) => Ok(sock.uid),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(e),
        // No sock_diag (an old kernel, a seccomp filter): the slow way.
        Err(_) => {
            static RUNNING: AtomicUsize = AtomicUsize::new(0);
            if RUNNING.fetch_add(1, Ordering::AcqRel) >= SCANS {
                RUNNING.fetch_sub(1, Ordering::AcqRel);
                return Err(io::Error::new(
                    io::ErrorKind::WouldBlock,
                    "too many /proc/net/tcp scans at once",
                ));
            }
            let r = tokio::task::spawn_blocking(move || procfs::uid_of(local, peer))
                .await
                .unwrap_or_else(|e| Err(io::Error::other(e)));
            RUNNING.fetch_sub(1, Ordering::AcqRel);
            r
        }
    }
}

/// Bytes the socket at `peer` connected to `local` has received and its owner not read yet
/// (its receive queue). Netlink only: called on a stream's path, where a scan would cost too
/// much; an error means "unknown".
pub fn unread(local: SocketAddr, peer: SocketAddr) -> io::Result<u32> {
    netlink::lookup(local, peer).map(|s| s.rqueue)
}

/// `/proc/net/tcp` scans at once (when netlink fails).
const SCANS: usize = 2;

/// `addr` as the kernel's four big-endian words (IPv4 in the first).
fn words(addr: IpAddr) -> [u32; 4] {
    match addr {
        IpAddr::V4(a) => [u32::from_ne_bytes(a.octets()), 0, 0, 0],
        IpAddr::V6(a) => {
            let o = a.octets();
            let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            [w(0), w(4), w(8), w(12)]
        }
    }
}

/// A v4-mapped v6 address as the v4 one (the kernel files such sockets under AF_INET when the
/// listener is v4, and a v6 listener sees v4 peers mapped).
fn unmapped(a: SocketAddr) -> SocketAddr {
    match a.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), a.port()),
            None => a,
        },
        IpAddr::V4(_) => a,
    }
}

mod netlink {
    use super::*;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    const SOCK_DIAG_BY_FAMILY: u16 = 20;
    const NLMSG_ERROR: u16 = 2;
    const INET_DIAG_NOCOOKIE: u32 = !0;

    #[repr(C)]
    #[derive(Clone, Copy)]
    struct SockId {
        sport: u16,
        dport: u16,
        src: [u32; 4],
        dst: [u32; 4],
        ifindex: u32,
        cookie: [u32; 2],
    }

    #[repr(C)]
    struct Request {
        hdr: libc::nlmsghdr,
        family: u8,
        protocol: u8,
        ext: u8,
        pad: u8,
        states: u32,
        id: SockId,
    }

    #[repr(C)]
    #[derive(Clone, Copy)]
    struct DiagMsg {
        family: u8,
        state: u8,
        timer: u8,
        retrans: u8,
        id: SockId,
        expires: u32,
        rqueue: u32,
        wqueue: u32,
        uid: u32,
        inode: u32,
    }

    /// What the kernel says of one socket.
    pub struct Sock {
        pub uid: u32,
        /// Its receive queue: bytes received, not read by its owner.
        pub rqueue: u32,
    }

    pub fn lookup(local: SocketAddr, peer: SocketAddr) -> io::Result<Sock> {
        let (local, peer) = (unmapped(local), unmapped(peer));
        let family = match peer.ip() {
            IpAddr::V4(_) => libc::AF_INET,
            IpAddr::V6(_) => libc::AF_INET6,
        };
        // SAFETY: a plain socket(2) call; the fd is owned at once.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
                libc::NETLINK_SOCK_DIAG,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // The peer's socket, seen from its side: its own address is the source.
        let req = Request {
            hdr: libc::nlmsghdr {
                nlmsg_len: std::mem::size_of::<Request>() as u32,
                nlmsg_type: SOCK_DIAG_BY_FAMILY,
                nlmsg_flags: libc::NLM_F_REQUEST as u16,
                nlmsg_seq: 1,
                nlmsg_pid: 0,
            },
            family: family as u8,
            protocol: libc::IPPROTO_TCP as u8,
            ext: 0,
            pad: 0,
            states: !0,
            id: SockId {
                sport: peer.port().to_be(),
                dport: local.port().to_be(),
                src: words(peer.ip()),
                dst: words(local.ip()),
                ifindex: 0,
                cookie: [INET_DIAG_NOCOOKIE; 2],
            },
        };
        // SAFETY: req is a live, fully initialised repr(C) value of the length passed.
        let sent = unsafe {
            libc::send(
                fd.as_raw_fd(),
                &req as *const Request as *const libc::c_void,
                std::mem::size_of::<Request>(),
                0,
            )
        };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        // One answer: the socket, or an error message. Aligned for the headers read from it.
        #[repr(C, align(8))]
        struct Buf([u8; 512]);
        let mut buf = Buf([0; 512]);
        // SAFETY: buf is writable for its whole length.
        let n = unsafe {
            libc::recv(
                fd.as_raw_fd(),
                buf.0.as_mut_ptr() as *mut libc::c_void,
                buf.0.len(),
                0,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        parse(&buf.0[..n as usize])
    }

    fn parse(msg: &[u8]) -> io::Result<Sock> {
        let hlen = std::mem::size_of::<libc::nlmsghdr>();
        let short = || io::Error::new(io::ErrorKind::InvalidData, "short sock_diag answer");
        if msg.len() < hlen {
            return Err(short());
        }
        // SAFETY: at least hlen bytes; read_unaligned has no alignment requirement.
        let hdr: libc::nlmsghdr = unsafe { std::ptr::read_unaligned(msg.as_ptr() as *const _) };
        let body = &msg[hlen..];
        if hdr.nlmsg_type == NLMSG_ERROR {
            if body.len() < 4 {
                return Err(short());
            }
            let errno = -i32::from_ne_bytes([body[0], body[1], body[2], body[3]]);
            return Err(io::Error::from_raw_os_error(errno));
        }
        if hdr.nlmsg_type != SOCK_DIAG_BY_FAMILY || body.len() < std::mem::size_of::<DiagMsg>() {
            return Err(short());
        }
        // SAFETY: length checked above.
        let diag: DiagMsg = unsafe { std::ptr::read_unaligned(body.as_ptr() as *const _) };
        Ok(Sock {
            uid: diag.uid,
            rqueue: diag.rqueue,
        })
    }
}

mod procfs {
    use super::*;

    /// Scans `/proc/net/tcp` (or `tcp6`) for the line whose local address is `peer` and remote
    /// address `local`; its `uid` column.
    pub fn uid_of(local: SocketAddr, peer: SocketAddr) -> io::Result<u32> {
        let (local, peer) = (unmapped(local), unmapped(peer));
        let file = match peer.ip() {
            IpAddr::V4(_) => "/proc/net/tcp",
            IpAddr::V6(_) => "/proc/net/tcp6",
        };
        let text = std::fs::read_to_string(file)?;
        find(&text, &hex(peer), &hex(local))
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("{peer} not in {file}")))
    }

    /// An address as the kernel prints it: each 32-bit word in host order, then the port.
    fn hex(a: SocketAddr) -> String {
        let mut s = String::with_capacity(37);
        let n = if a.is_ipv4() { 1 } else { 4 };
        for w in &words(a.ip())[..n] {
            s.push_str(&format!("{w:08X}"));
        }
        s.push_str(&format!(":{:04X}", a.port()));
        s
    }

    pub(super) fn find(text: &str, local: &str, remote: &str) -> Option<u32> {
        text.lines().skip(1).find_map(|line| {
            let mut f = line.split_whitespace();
            let (_, l, r) = (f.next()?, f.next()?, f.next()?);
            if !(l.eq_ignore_ascii_case(local) && r.eq_ignore_ascii_case(remote)) {
                return None;
            }
            // st tx_queue:rx_queue tr:tm->when retrnsmt uid
            f.nth(4)?.parse().ok()
        })
    }

    #[cfg(test)]
    pub(super) fn hex_for_test(a: SocketAddr) -> String {
        hex(a)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};
    use std::time::Instant;

    fn pair(ip: &str) -> (TcpListener, TcpStream, SocketAddr, SocketAddr) {
        let l = TcpListener::bind((ip, 0)).unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (local, peer) = (l.local_addr().unwrap(), c.local_addr().unwrap());
        (l, c, local, peer)
    }

    fn me() -> u32 {
        // SAFETY: geteuid cannot fail.
        unsafe { libc::geteuid() }
    }

    #[tokio::test]
    async fn finds_the_peers_uid_over_netlink_and_in_proc() {
        for ip in ["127.0.0.1", "::1"] {
            let (_l, _c, local, peer) = pair(ip);
            assert_eq!(netlink::lookup(local, peer).unwrap().uid, me(), "{ip}");
            assert_eq!(procfs::uid_of(local, peer).unwrap(), me(), "{ip}");
            assert_eq!(uid_of(local, peer).await.unwrap(), me(), "{ip}");
        }
    }

    #[tokio::test]
    async fn a_peer_that_is_gone_is_not_found() {
        let (l, c, local, peer) = pair("127.0.0.1");
        drop(c);
        drop(l);
        assert!(uid_of(local, peer).await.is_err());
        // A port nobody uses.
        let nobody = SocketAddr::new(peer.ip(), 1);
        assert!(netlink::lookup(local, nobody).is_err());
        assert!(procfs::uid_of(local, nobody).is_err());
    }

    #[test]
    fn a_peers_unread_bytes_are_its_receive_queue() {
        use std::io::Write;
        let (l, c, local, peer) = pair("127.0.0.1");
        let (mut s, _) = l.accept().unwrap();
        assert_eq!(unread(local, peer).unwrap(), 0);
        s.write_all(&[7; 65536]).unwrap();
        // Loopback delivers at once; allow the kernel a moment all the same.
        let mut seen = 0;
        for _ in 0..100 {
            seen = unread(local, peer).unwrap();
            if seen == 65536 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(seen, 65536);
        drop(c);
    }

    #[test]
    fn proc_lines_parse() {
        let a: SocketAddr = "127.0.0.1:9783".parse().unwrap();
        assert_eq!(procfs::hex_for_test(a), "0100007F:2637");
        let text = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 0100007F:D431 0100007F:2637 01 00000000:00000000 00:00000000 00000000 65534        0 1234 1 0 20 4 30 10 -1\n";
        assert_eq!(
            procfs::find(text, "0100007F:D431", "0100007F:2637"),
            Some(65534)
        );
        assert_eq!(procfs::find(text, "0100007F:2637", "0100007F:D431"), None);
        assert_eq!(procfs::find("garbage\n1 2\n", "a", "b"), None);
    }

    /// What one check costs (printed; `cargo test --lib peer -- --nocapture`).
    #[test]
    fn one_lookup_costs_microseconds() {
        let (_l, _c, local, peer) = pair("127.0.0.1");
        let n = 2000;
        let t = Instant::now();
        for _ in 0..n {
            netlink::lookup(local, peer).unwrap();
        }
        let per = t.elapsed() / n;
        let t = Instant::now();
        for _ in 0..200 {
            procfs::uid_of(local, peer).unwrap();
        }
        let proc_per = t.elapsed() / 200;
        println!("peer uid lookup: netlink {per:?} each, /proc/net/tcp {proc_per:?} each");
        // Generous: a debug build on a loaded 2-core machine.
        assert!(per < std::time::Duration::from_millis(2), "{per:?}");
    }
}
