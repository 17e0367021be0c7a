//! A TCP proxy on loopback that paces the bytes it carries towards the client, so a pull takes
//! long enough to be cancelled, drained or stopped in the middle. It counts the bytes it passed,
//! and can go down (its port closed, every connection reset) and come back on the same address,
//! as a registry that dies and restarts.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub struct SlowProxy {
    pub addr: String,
    /// Bytes sent from the upstream to clients so far.
    pub bytes: Arc<AtomicU64>,
    /// Connections currently open.
    pub open: Arc<AtomicUsize>,
    upstream: String,
    bytes_per_sec: u64,
    /// Set to `true` to close the port and cut every connection.
    down: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl SlowProxy {
    /// Proxies to `upstream` ("127.0.0.1:PORT"), sending at most `bytes_per_sec` per connection.
    pub async fn start(upstream: &str, bytes_per_sec: u64) -> SlowProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (down, _) = watch::channel(false);
        let mut proxy = SlowProxy {
            addr,
            bytes: Arc::new(AtomicU64::new(0)),
            open: Arc::new(AtomicUsize::new(0)),
            upstream: upstream.to_string(),
            bytes_per_sec,
            down,
            task: tokio::spawn(async {}),
        };
        proxy.task = proxy.serve(listener);
        proxy
    }

    fn serve(&self, listener: TcpListener) -> tokio::task::JoinHandle<()> {
        let upstream = self.upstream.clone();
        let bytes = self.bytes.clone();
        let open = self.open.clone();
        let bytes_per_sec = self.bytes_per_sec;
        let mut down = self.down.subscribe();
        tokio::spawn(async move {
            loop {
                let client = tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok((client, _)) => client,
                        Err(_) => return,
                    },
                    _ = down.wait_for(|d| *d) => return,
                };
                let conn = relay(client, upstream.clone(), bytes.clone(), bytes_per_sec);
                let open = open.clone();
                let mut down = down.clone();
                tokio::spawn(async move {
                    open.fetch_add(1, Ordering::SeqCst);
                    tokio::select! {
                        _ = conn => {}
                        // Dropping the sockets mid-transfer: the peer sees the stream end early.
                        _ = down.wait_for(|d| *d) => {}
                    }
                    open.fetch_sub(1, Ordering::SeqCst);
                });
            }
        })
    }

    /// Closes the port and cuts every open connection.
    pub async fn kill(&self) {
        self.down.send_replace(true);
        while self.open_connections() > 0 || !self.task.is_finished() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Listens on the same address again.
    pub async fn revive(&mut self) {
        self.down.send_replace(false);
        let listener = TcpListener::bind(&self.addr)
            .await
            .expect("rebind the proxy");
        self.task = self.serve(listener);
    }

    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::SeqCst)
    }

    pub fn open_connections(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }
}

async fn relay(client: TcpStream, upstream: String, bytes: Arc<AtomicU64>, bytes_per_sec: u64) {
    let Ok(server) = TcpStream::connect(&upstream).await else {
        return;
    };
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    // Aborted however this ends, so a cut closes both sockets.
    let _up = AbortOnDrop(tokio::spawn(async move {
        let _ = tokio::io::copy(&mut cr, &mut sw).await;
        let _ = sw.shutdown().await;
    }));
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
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Drop for SlowProxy {
    fn drop(&mut self) {
        self.down.send_replace(true);
        self.task.abort();
    }
}
