//! The passthrough scenario's instruments: a bare byte relay, the floor any shim's extra hop
//! costs, and a caller that measures `ImageStatus` from a thread of its own.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pullgate::frontdoor::FrontDoorThread;
use pullgate::proto::runtime::v1::ImageStatusRequest;
use tokio_util::task::AbortOnDropHandle;

use crate::common::image_client;

/// A byte relay between two unix sockets, on a thread like pullgate's front door (its own
/// [`FrontDoorThread`] at nice -10) but without HTTP/2: it copies bytes both ways. What it adds
/// over containerd direct is what the extra hop alone costs on this machine; what pullgate adds
/// over it is pullgate's own work.
pub struct Relay {
    path: PathBuf,
    // Dropped first: the accept loop ends, then the thread.
    _accept: AbortOnDropHandle<()>,
    _thread: FrontDoorThread,
}

impl Relay {
    /// Listens on `at` and relays every connection to `to`.
    pub fn start(at: &Path, to: &Path) -> Relay {
        let _ = std::fs::remove_file(at);
        let listener = std::os::unix::net::UnixListener::bind(at)
            .unwrap_or_else(|e| panic!("relay cannot listen on {}: {e}", at.display()));
        listener.set_nonblocking(true).unwrap();
        let (thread, _) = FrontDoorThread::start(-10).expect("the relay's thread");
        let to = to.to_path_buf();
        let accept = thread.spawn(async move {
            let listener = tokio::net::UnixListener::from_std(listener).unwrap();
            while let Ok((mut client, _)) = listener.accept().await {
                let to = to.clone();
                tokio::spawn(async move {
                    if let Ok(mut up) = tokio::net::UnixStream::connect(&to).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut up).await;
                    }
                });
            }
        });
        Relay {
            path: at.to_path_buf(),
            _accept: accept,
            _thread: thread,
        }
    }

    pub fn path(&self) -> PathBuf {
        self.path.clone()
    }
}

/// `ImageStatus` calls to every socket in turn (the arm that goes first rotates), from a thread
/// of its own with a current-thread runtime (a [`FrontDoorThread`] at the process's priority),
/// so one thread wakes per call on the client side. A call from the bench's multi-thread
/// runtime crosses threads twice, and under load those wake-ups alone put milliseconds into
/// the p99 of every arm.
pub struct Caller {
    stop: Arc<AtomicBool>,
    // Dropped first: the calls end, then the thread.
    calls: AbortOnDropHandle<Vec<Vec<Duration>>>,
    _thread: FrontDoorThread,
}

impl Caller {
    /// Starts calling after `warmup` unmeasured rounds; at most `calls` measured rounds.
    pub fn start(
        sockets: Vec<PathBuf>,
        req: ImageStatusRequest,
        warmup: usize,
        calls: usize,
    ) -> Caller {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let (thread, _) = FrontDoorThread::start(0).expect("the caller's thread");
        let calls = thread.spawn(async move {
            let mut clients: Vec<_> = sockets.iter().map(|s| image_client(s)).collect();
            let n = clients.len();
            let mut lat = vec![Vec::new(); n];
            for i in 0..warmup + calls {
                if i >= warmup && stopped.load(Ordering::Relaxed) {
                    break;
                }
                for k in 0..n {
                    let arm = (i + k) % n;
                    let t = Instant::now();
                    clients[arm].image_status(req.clone()).await.unwrap();
                    if i >= warmup {
                        lat[arm].push(t.elapsed());
                    }
                }
            }
            lat.iter_mut().for_each(|v| v.sort());
            lat
        });
        Caller {
            stop,
            calls,
            _thread: thread,
        }
    }

    /// Stops at the end of the current round; each arm's latencies, sorted.
    pub async fn stop(self) -> Vec<Vec<Duration>> {
        self.stop.store(true, Ordering::Relaxed);
        self.finish().await
    }

    /// Waits until every call is made; each arm's latencies, sorted.
    pub async fn finish(mut self) -> Vec<Vec<Duration>> {
        (&mut self.calls).await.expect("the caller panicked")
    }
}
