//! The P2P gate: prewarm pulls start only once the node's P2P distribution component (Dragonfly,
//! Spegel) is ready.
//!
//! A prewarm that starts before the P2P agent is up goes straight to the registry, which is what
//! P2P is there to avoid when a whole pool prewarms at once. Urgent pulls never consult the gate:
//! a pod waiting for its image must not wait for an optional accelerator.
//!
//! Readiness is decided by a periodic probe (HTTP status, TCP connect, or a running container
//! listed by containerd's CRI). The result is published on a `watch` channel, so the scheduler
//! re-dispatches as soon as the gate opens instead of polling it.

use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tracing::{info, warn};

use crate::config::{GateConfig, ProbeKind};
use crate::errors::chain;
use crate::proto::runtime::v1::{
    runtime_service_client::RuntimeServiceClient, Container, ContainerFilter, ContainerState,
    ContainerStateValue, ListContainersRequest,
};
use crate::upstream::Containerd;

/// ListContainers answers can be large on a busy node (tonic's default limit is 4 MiB).
const MAX_MESSAGE_SIZE: usize = 16 * 1024 * 1024;

/// Whether prewarm pulls may start; cheap to clone.
#[derive(Clone, Debug)]
pub struct P2pGate {
    rx: watch::Receiver<bool>,
}

impl P2pGate {
    /// A gate that never closes (`probe = "none"`, and tests).
    pub fn always_open() -> P2pGate {
        P2pGate {
            rx: watch::channel(true).1,
        }
    }

    /// Spawns the probe loop (stops when `stop` is cancelled). Starts closed unless probe = none:
    /// until the first probe succeeds nothing says the P2P component is up. Must be called
    /// inside a tokio runtime.
    pub fn spawn(cfg: GateConfig, containerd: Containerd, stop: CancellationToken) -> P2pGate {
        if cfg.probe == ProbeKind::None {
            return P2pGate::always_open();
        }
        let (tx, rx) = watch::channel(false);
        let probe = Probe::new(&cfg, &containerd);
        tokio::spawn(run(probe, cfg, tx, stop));
        P2pGate { rx }
    }

    pub fn is_open(&self) -> bool {
        *self.rx.borrow()
    }

    /// Returns when the gate is open (at once if it is). If the probe loop has stopped
    /// (shutdown) while the gate was closed, it never returns: callers race it against their own
    /// cancellation, and a prewarm must not start during shutdown.
    pub async fn wait_open(&self) {
        let mut rx = self.rx.clone();
        if rx.wait_for(|open| *open).await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// The raw state, for code that selects on gate changes along with other events.
    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.rx.clone()
    }
}

/// One probe, prepared once (HTTP client and gRPC client are reused across probes).
enum Probe {
    Http {
        /// A client that could not be built makes every probe fail with the reason.
        client: Result<reqwest::Client, String>,
        url: String,
    },
    Tcp {
        addr: String,
    },
    Container {
        client: RuntimeServiceClient<Channel>,
        prefix: String,
    },
}

impl Probe {
    fn new(cfg: &GateConfig, containerd: &Containerd) -> Probe {
        let target = cfg.target.trim().to_string();
        match cfg.probe {
            // `None` never gets here (`spawn` returns an always-open gate first).
            ProbeKind::Http | ProbeKind::None => Probe::Http {
                // No proxy: the P2P agent is local, and a node-wide HTTP_PROXY must not answer
                // for it.
                client: reqwest::Client::builder()
                    .no_proxy()
                    .timeout(cfg.timeout)
                    .build()
                    .map_err(|e| format!("cannot build HTTP client: {}", chain(&e))),
                url: target,
            },
            ProbeKind::Tcp => Probe::Tcp { addr: target },
            ProbeKind::Container => Probe::Container {
                client: RuntimeServiceClient::new(containerd.channel())
                    .max_decoding_message_size(MAX_MESSAGE_SIZE),
                prefix: target,
            },
        }
    }

    /// `Ok(what was seen)` when ready, `Err(reason)` otherwise. Never panics.
    async fn check(&mut self) -> Result<String, String> {
        match self {
            Probe::Http { client, url } => {
                let client = client.as_ref().map_err(Clone::clone)?;
                let resp = client
                    .get(url.as_str())
                    .send()
                    .await
                    .map_err(|e| chain(&e))?;
                let status = resp.status();
                if status.is_success() {
                    Ok(format!("HTTP {status}"))
                } else {
                    Err(format!("HTTP {status}"))
                }
            }
            Probe::Tcp { addr } => {
                let stream = tokio::net::TcpStream::connect(addr.as_str())
                    .await
                    .map_err(|e| format!("connect: {e}"))?;
                Ok(match stream.peer_addr() {
                    Ok(peer) => format!("connected to {peer}"),
                    Err(_) => "connected".to_string(),
                })
            }
            Probe::Container { client, prefix } => {
                // containerd filters by state; the name prefix is matched here (CRI has no
                // name filter).
                let req = ListContainersRequest {
                    filter: Some(ContainerFilter {
                        state: Some(ContainerStateValue {
                            state: ContainerState::ContainerRunning as i32,
                        }),
                        ..Default::default()
                    }),
                };
                let resp = client.list_containers(req).await.map_err(|s| {
                    format!("containerd ListContainers: {:?}: {}", s.code(), s.message())
                })?;
                let containers = resp.into_inner().containers;
                if matches(&containers, prefix) {
                    Ok(format!("a container named {prefix}* is running"))
                } else {
                    Err(format!("no running container named {prefix}*"))
                }
            }
        }
    }
}

/// Whether a running container's name starts with `prefix` (the container probe's decision).
fn matches(containers: &[Container], prefix: &str) -> bool {
    containers.iter().any(|c| {
        c.state == ContainerState::ContainerRunning as i32
            && c.metadata
                .as_ref()
                .is_some_and(|m| m.name.starts_with(prefix))
    })
}

/// The longest period a probe loop ticks at (a year): configured periods are capped to it.
pub(crate) const MAX_TICK: Duration = Duration::from_secs(365 * 86400);

/// Probes every `interval` and publishes the result; logs only changes (and the first result,
/// so the log says why prewarms are held back at startup).
async fn run(mut probe: Probe, cfg: GateConfig, tx: watch::Sender<bool>, stop: CancellationToken) {
    // tokio's `Delay` ticks compute `now + period`, which overflows for absurd periods.
    let mut tick = tokio::time::interval(cfg.interval.min(MAX_TICK));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last: Option<bool> = None;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tx.closed() => return,
            _ = tick.tick() => {}
        }
        let outcome = tokio::select! {
            _ = stop.cancelled() => return,
            r = tokio::time::timeout(cfg.timeout, probe.check()) => r
                .unwrap_or_else(|_| Err(format!("no answer within {:?}", cfg.timeout))),
        };
        let open = outcome.is_ok();
        if last != Some(open) {
            match &outcome {
                Ok(detail) => {
                    info!(probe = %cfg.probe, target = %cfg.target, detail = %detail, "P2P gate open")
                }
                Err(reason) => {
                    warn!(probe = %cfg.probe, target = %cfg.target, reason = %reason, "P2P gate closed")
                }
            }
            last = Some(open);
        }
        tx.send_if_modified(|v| std::mem::replace(v, open) != open);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ContainerdConfig;
    use crate::proto::runtime::v1::ContainerMetadata;
    use std::sync::atomic::{AtomicU16, Ordering};
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    fn cfg(probe: ProbeKind, target: &str) -> GateConfig {
        GateConfig {
            probe,
            target: target.into(),
            interval: Duration::from_millis(50),
            timeout: Duration::from_millis(300),
        }
    }

    /// A containerd handle on a socket that does not exist (lazy: nothing is dialled).
    fn no_containerd() -> Containerd {
        Containerd::new(&ContainerdConfig {
            socket: "/nonexistent/pullgate-test/containerd.sock".into(),
            connect_timeout: Duration::from_millis(100),
            ..Default::default()
        })
    }

    async fn wait_state(gate: &P2pGate, open: bool) {
        let mut rx = gate.subscribe();
        tokio::time::timeout(Duration::from_secs(2), rx.wait_for(|v| *v == open))
            .await
            .unwrap_or_else(|_| panic!("gate did not become open={open} within 2s"))
            .expect("probe loop ended");
    }

    #[test]
    fn validation() {
        assert_eq!(GateConfig::default().validate(), Ok(()));
        let ok = [
            (ProbeKind::Http, "http://127.0.0.1:4001/healthy"),
            (ProbeKind::Http, "https://localhost/ready"),
            (ProbeKind::Tcp, "127.0.0.1:65001"),
            (ProbeKind::Tcp, "localhost:5000"),
            (ProbeKind::Tcp, "[::1]:5000"),
            (ProbeKind::Container, "dragonfly-dfdaemon"),
        ];
        for (kind, target) in ok {
            assert_eq!(cfg(kind, target).validate(), Ok(()), "{kind} {target}");
        }
        let bad = [
            (ProbeKind::Http, "", "p2p_gate.target: required"),
            (ProbeKind::Tcp, "  ", "p2p_gate.target: required"),
            (ProbeKind::Container, "", "p2p_gate.target: required"),
            (ProbeKind::Http, "127.0.0.1:4001", "p2p_gate.target"),
            (ProbeKind::Http, "ftp://127.0.0.1/x", "http:// or https://"),
            (ProbeKind::Http, "not a url", "is not a URL"),
            (ProbeKind::Tcp, "127.0.0.1", "HOST:PORT"),
            (ProbeKind::Tcp, "127.0.0.1:0", "non-zero port"),
            (ProbeKind::Tcp, "127.0.0.1:http", "port number"),
            (ProbeKind::Tcp, ":80", "HOST:PORT"),
            (ProbeKind::Tcp, "::1:80", "HOST:PORT"),
            (ProbeKind::Tcp, "http://127.0.0.1:80", "HOST:PORT"),
        ];
        for (kind, target, want) in bad {
            let err = cfg(kind, target).validate().unwrap_err();
            assert!(err.starts_with("p2p_gate.target"), "{err}");
            assert!(err.contains(want), "{kind} {target:?}: {err}");
        }
        let mut c = cfg(ProbeKind::Tcp, "127.0.0.1:1");
        c.interval = Duration::ZERO;
        assert!(c.validate().unwrap_err().starts_with("p2p_gate.interval:"));
        let mut c = cfg(ProbeKind::None, "");
        c.timeout = Duration::ZERO;
        assert!(c.validate().unwrap_err().starts_with("p2p_gate.timeout:"));
    }

    #[test]
    fn parses_toml() {
        let c: GateConfig =
            toml::from_str("probe = \"tcp\"\ntarget = \"127.0.0.1:65001\"\ninterval = \"50ms\"\n")
                .unwrap();
        assert_eq!(c.probe, ProbeKind::Tcp);
        assert_eq!(c.interval, Duration::from_millis(50));
        assert_eq!(c.timeout, Duration::from_secs(1));
        assert_eq!(
            toml::from_str::<GateConfig>("").unwrap(),
            GateConfig::default()
        );
        assert!(toml::from_str::<GateConfig>("probe = \"udp\"").is_err());
        assert!(toml::from_str::<GateConfig>("url = \"x\"").is_err());
    }

    #[tokio::test]
    async fn none_is_always_open() {
        let gate = P2pGate::spawn(
            GateConfig::default(),
            no_containerd(),
            CancellationToken::new(),
        );
        assert!(gate.is_open());
        gate.wait_open().await;
        assert!(P2pGate::always_open().is_open());
    }

    #[tokio::test]
    async fn tcp_probe_opens_when_listener_starts_and_closes_when_it_stops() {
        // A free loopback port with nothing listening yet.
        let addr = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        let stop = CancellationToken::new();
        let gate = P2pGate::spawn(
            cfg(ProbeKind::Tcp, &addr.to_string()),
            no_containerd(),
            stop.clone(),
        );
        assert!(!gate.is_open(), "starts closed");
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert!(!gate.is_open(), "nothing listens yet");

        let listener = TcpListener::bind(addr).await.unwrap();
        tokio::time::timeout(Duration::from_secs(2), gate.wait_open())
            .await
            .expect("gate opens once the listener is up");
        assert!(gate.is_open());

        drop(listener);
        wait_state(&gate, false).await;
        stop.cancel();
    }

    /// A tiny HTTP/1.1 server answering every request with the current `status`.
    async fn http_server(status: Arc<AtomicU16>) -> std::net::SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((mut sock, _)) = listener.accept().await else {
                    return;
                };
                let status = status.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 1024];
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        match sock.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let code = status.load(Ordering::SeqCst);
                    let reply = format!(
                        "HTTP/1.1 {code} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    );
                    let _ = sock.write_all(reply.as_bytes()).await;
                    let _ = sock.shutdown().await;
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn http_probe_follows_status() {
        let status = Arc::new(AtomicU16::new(503));
        let addr = http_server(status.clone()).await;
        let stop = CancellationToken::new();
        let gate = P2pGate::spawn(
            cfg(ProbeKind::Http, &format!("http://{addr}/healthy")),
            no_containerd(),
            stop.clone(),
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!gate.is_open(), "503 keeps the gate closed");

        status.store(200, Ordering::SeqCst);
        wait_state(&gate, true).await;

        status.store(503, Ordering::SeqCst);
        wait_state(&gate, false).await;
        stop.cancel();
    }

    #[tokio::test]
    async fn container_probe_without_containerd_stays_closed() {
        let gate = P2pGate::spawn(
            cfg(ProbeKind::Container, "spegel"),
            no_containerd(),
            CancellationToken::new(),
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!gate.is_open());
    }

    #[tokio::test]
    async fn stopped_loop_keeps_a_closed_gate_closed() {
        let stop = CancellationToken::new();
        let gate = P2pGate::spawn(
            cfg(ProbeKind::Tcp, "127.0.0.1:1"),
            no_containerd(),
            stop.clone(),
        );
        stop.cancel();
        let waited = tokio::time::timeout(Duration::from_millis(200), gate.wait_open()).await;
        assert!(waited.is_err(), "a prewarm must not start during shutdown");
    }

    fn container(name: Option<&str>, state: ContainerState) -> Container {
        Container {
            id: "c1".into(),
            pod_sandbox_id: "p1".into(),
            metadata: name.map(|n| ContainerMetadata {
                name: n.into(),
                attempt: 0,
            }),
            state: state as i32,
        }
    }

    #[test]
    fn container_decision() {
        use ContainerState::*;
        let prefix = "dfdaemon";
        assert!(!matches(&[], prefix));
        assert!(matches(
            &[container(Some("dfdaemon"), ContainerRunning)],
            prefix
        ));
        assert!(matches(
            &[
                container(Some("other"), ContainerRunning),
                container(Some("dfdaemon-1"), ContainerRunning),
            ],
            prefix
        ));
        for c in [
            container(Some("dfdaemon"), ContainerCreated),
            container(Some("dfdaemon"), ContainerExited),
            container(Some("dfdaemon"), ContainerUnknown),
            container(Some("my-dfdaemon"), ContainerRunning),
            container(Some("dfd"), ContainerRunning),
            container(None, ContainerRunning),
        ] {
            assert!(!matches(std::slice::from_ref(&c), prefix), "{c:?}");
        }
    }
}
