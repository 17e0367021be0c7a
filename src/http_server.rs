//! The accept loop and connection setup shared by pullgate's two HTTP listeners (the registry
//! mirror and the metrics endpoint), as mini-redis's `Listener`: accept until stopped, back off
//! on an accept error (EMFILE) rather than spin, hand each connection to its listener's own
//! admission on a task of its own, and serve HTTP/1.1 with a deadline for every request's
//! headers. Who may connect and what happens at the cap stay with each listener: the mirror
//! checks uids and closes its longest-idle connection, the metrics endpoint closes the newcomer.
//!
//! May import nothing of pullgate's (layer 0).

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::HttpService;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::warn;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How long the loop waits after a failed accept (out of file descriptors, say): connections
/// must end before another accept can succeed.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

pub struct Listener {
    /// For the log: `mirror`, `metrics endpoint`.
    pub name: &'static str,
    pub listener: TcpListener,
    pub stop: CancellationToken,
}

impl Listener {
    /// Accepts until `stop` is cancelled; `admit` runs on a task of its own per connection.
    pub async fn run<F, Fut>(self, admit: F)
    where
        F: Fn(TcpStream, SocketAddr) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        loop {
            let (stream, peer) = tokio::select! {
                _ = self.stop.cancelled() => return,
                accepted = self.listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        warn!(listener = self.name, error = %e, "accept failed");
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                        continue;
                    }
                },
            };
            tokio::spawn(admit(stream, peer));
        }
    }
}

/// Serves `stream`'s requests with `svc`; each request's headers must arrive within
/// `header_read_timeout`, also while the connection idles between keep-alive requests.
pub fn http1<S>(
    stream: TcpStream,
    svc: S,
    header_read_timeout: Duration,
) -> http1::Connection<TokioIo<TcpStream>, S>
where
    S: HttpService<Incoming>,
    S::Error: Into<BoxError>,
    S::ResBody: 'static,
    <S::ResBody as http_body::Body>::Error: Into<BoxError>,
{
    http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout)
        .serve_connection(TokioIo::new(stream), svc)
}
