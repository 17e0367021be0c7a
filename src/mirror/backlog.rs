//! Prewarm bytes sent no faster than containerd reads them.
//!
//! On a fast link containerd, not the link, is a prewarm stream's bottleneck (it hashes and
//! writes every byte), and the kernel buffers what it has not read yet: on loopback its socket's
//! receive queue grows to megabytes per stream (13 MB over three prewarm streams measured on
//! containerd 1.6, `tests/bench.sh fast` prints it). When a pod's pull comes, pausing prewarm
//! stops what pullgate sends, not that queue: containerd still reads and writes it on the CPUs
//! and disk the pod's pull needs. So before sending more of a prewarm stream, the mirror asks
//! the kernel how much containerd's socket holds unread ([`super::peer::unread`], one netlink
//! round trip of ~10 µs, every [`CHECK_EVERY`] bytes) and waits while it is over [`LIMIT`]:
//! containerd then reads as fast as before, and a pause leaves it little to finish.

use std::net::SocketAddr;
use std::time::Duration;

use tracing::debug;

/// The connection a blob stream goes out on: the mirror's end and containerd's.
#[derive(Clone, Copy, Debug)]
pub struct Conn {
    pub local: SocketAddr,
    pub peer: SocketAddr,
}

/// Unread bytes containerd's socket may hold before a prewarm stream waits: about 10 ms of
/// containerd's reading at the 100 MB/s a stream reaches on loopback, so its reads never find
/// the queue empty.
pub const LIMIT: u32 = 1 << 20;

/// Bytes sent between two looks at the queue.
pub const CHECK_EVERY: u64 = 256 << 10;

/// How long to wait before looking again while the queue is over the limit.
const POLL: Duration = Duration::from_millis(2);

/// One stream's view of containerd's receive queue.
pub struct Backlog {
    conn: Conn,
    /// Bytes sent since the last look.
    since: u64,
    /// The kernel could not say (no sock_diag, the socket gone): not asked again.
    unknown: bool,
}

impl Backlog {
    pub fn new(conn: Conn) -> Backlog {
        Backlog {
            conn,
            since: CHECK_EVERY,
            unknown: false,
        }
    }

    /// Before `n` more prewarm bytes go out: waits while containerd has over [`LIMIT`] unread,
    /// as long as `holds()` (the stream is still prewarm and containerd still reading). Returns
    /// how long it waited (zero when it did not).
    pub async fn settle(&mut self, n: u64, holds: impl Fn() -> bool) -> Duration {
        self.since += n;
        if self.unknown || self.since < CHECK_EVERY {
            return Duration::ZERO;
        }
        self.since = n;
        let started = tokio::time::Instant::now();
        let mut waited = false;
        loop {
            match super::peer::unread(self.conn.local, self.conn.peer) {
                Ok(queued) if queued <= LIMIT => break,
                Ok(_) => {}
                Err(e) => {
                    debug!(peer = %self.conn.peer, error = %e,
                           "containerd's unread bytes unknown: prewarm sent as the link allows");
                    self.unknown = true;
                    break;
                }
            }
            if !holds() {
                break;
            }
            tokio::time::sleep(POLL).await;
            waited = true;
        }
        if waited {
            started.elapsed()
        } else {
            Duration::ZERO
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};

    /// A loopback pair whose reader's receive buffer holds megabytes (as containerd's grows to
    /// once it has read fast for a while; the kernel caps it at `net.core.rmem_max`), and the
    /// writer on its own thread, so a full window blocks only that thread.
    async fn pair() -> (TcpStream, std::sync::mpsc::Sender<usize>, Conn) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(8 << 20).unwrap();
        let reader = socket.connect(l.local_addr().unwrap()).await.unwrap();
        let reader = reader.into_std().unwrap();
        reader.set_nonblocking(false).unwrap();
        let (mut writer, _) = l.accept().unwrap();
        let conn = Conn {
            local: writer.local_addr().unwrap(),
            peer: reader.local_addr().unwrap(),
        };
        let (tx, rx) = std::sync::mpsc::channel::<usize>();
        std::thread::spawn(move || {
            while let Ok(n) = rx.recv() {
                if writer.write_all(&vec![1; n]).is_err() {
                    return;
                }
            }
        });
        (reader, tx, conn)
    }

    /// Waits until the reader's socket holds more than `n` bytes unread; false if the kernel
    /// never lets it (a receive buffer capped below it).
    fn queued_over(conn: Conn, n: u32) -> bool {
        for _ in 0..200 {
            if super::super::peer::unread(conn.local, conn.peer).unwrap() > n {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }

    #[tokio::test]
    async fn waits_while_the_reader_is_behind_and_goes_on_when_it_reads() {
        let (mut reader, writer, conn) = pair().await;
        let mut backlog = Backlog::new(conn);
        // Under the limit: no wait.
        writer.send(64 << 10).unwrap();
        assert!(queued_over(conn, (64 << 10) - 1));
        assert_eq!(backlog.settle(1, || true).await, Duration::ZERO);
        writer.send(2 << 20).unwrap();
        if !queued_over(conn, LIMIT) {
            eprintln!("skipped: net.core.rmem_max keeps the receive buffer under {LIMIT} bytes");
            return;
        }
        // Over it: waits until the reader drains the queue.
        let drain = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            let mut buf = vec![0; (2 << 20) + (64 << 10)];
            reader.read_exact(&mut buf).unwrap();
            reader
        });
        let waited = backlog.settle(CHECK_EVERY, || true).await;
        assert!(waited >= Duration::from_millis(90), "{waited:?}");
        let _reader = drain.join().unwrap();
        // A stream that stops holding (promoted, or containerd gone) stops waiting.
        writer.send(2 << 20).unwrap();
        assert!(queued_over(conn, LIMIT));
        let waited = backlog.settle(CHECK_EVERY, || false).await;
        assert!(waited < Duration::from_millis(50), "{waited:?}");
        assert!(!backlog.unknown);
    }

    #[tokio::test]
    async fn a_socket_the_kernel_does_not_know_is_not_waited_for() {
        let nobody = Conn {
            local: "127.0.0.1:1".parse().unwrap(),
            peer: "127.0.0.1:2".parse().unwrap(),
        };
        let mut backlog = Backlog::new(nobody);
        assert_eq!(backlog.settle(CHECK_EVERY, || true).await, Duration::ZERO);
        assert!(backlog.unknown);
    }
}
