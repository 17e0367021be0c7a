//! A TCP proxy on loopback that paces the bytes it carries towards the client, so a pull takes
//! long enough to be cancelled, drained or stopped in the middle. It counts the bytes it passed.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub struct SlowProxy {
    pub addr: String,
    /// Bytes sent from the upstream to clients so far.
    pub bytes: Arc<AtomicU64>,
    /// Connections currently open.
    pub open: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl SlowProxy {
    /// Proxies to `upstream` ("127.0.0.1:PORT"), sending at most `bytes_per_sec` per connection.
    pub async fn start(upstream: &str, bytes_per_sec: u64) -> SlowProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let bytes = Arc::new(AtomicU64::new(0));
        let open = Arc::new(AtomicUsize::new(0));
        let upstream = upstream.to_string();
        let task = tokio::spawn({
            let bytes = bytes.clone();
            let open = open.clone();
            async move {
                loop {
                    let Ok((client, _)) = listener.accept().await else {
                        return;
                    };
                    let upstream = upstream.clone();
                    let bytes = bytes.clone();
                    let open = open.clone();
                    tokio::spawn(async move {
                        let Ok(server) = TcpStream::connect(&upstream).await else {
                            return;
                        };
                        open.fetch_add(1, Ordering::SeqCst);
                        let (mut cr, mut cw) = client.into_split();
                        let (mut sr, mut sw) = server.into_split();
                        let up = tokio::spawn(async move {
                            let _ = tokio::io::copy(&mut cr, &mut sw).await;
                            let _ = sw.shutdown().await;
                        });
                        // Downstream, paced: 10 slices a second.
                        let slice = (bytes_per_sec / 10).max(1) as usize;
                        let mut buf = vec![0u8; slice];
                        loop {
                            let n = match sr.read(&mut buf).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            if cw.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                            bytes.fetch_add(n as u64, Ordering::SeqCst);
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                        up.abort();
                        open.fetch_sub(1, Ordering::SeqCst);
                    });
                }
            }
        });
        SlowProxy {
            addr,
            bytes,
            open,
            task,
        }
    }

    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::SeqCst)
    }

    pub fn open_connections(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }
}

impl Drop for SlowProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}
