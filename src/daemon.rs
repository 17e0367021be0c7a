//! `pullgate serve`: wires the front door, the pull path, containerd and the metrics endpoint,
//! and runs them until SIGTERM/SIGINT.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use anyhow::Context as _;
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::Config;
use crate::fetch::{FetchContext, LayerFetcher};
use crate::frontdoor::{self, CriProxy};
use crate::metrics::{self, Health, Metrics};
use crate::pull::{ContainerdPuller, PullCoordinator, Puller};
use crate::registry::{Platform, RegistryClient, RegistryConfig};
use crate::upstream::{Containerd, ContentStore};

/// The pull path: pullgate's layer fetcher in front of containerd's finish, or containerd alone.
async fn puller(cfg: &Config, containerd: &Containerd, metrics: &Arc<Metrics>) -> Arc<dyn Puller> {
    let finish = ContainerdPuller::new(containerd.clone());
    if !cfg.fetch.enabled {
        info!("layer fetcher disabled: containerd fetches images itself");
        return Arc::new(finish);
    }
    let registry = RegistryClient::new(RegistryConfig {
        config_path: cfg.fetch.hosts_dir.clone(),
        request_timeout: cfg.fetch.request_timeout,
        user_agent: format!("pullgate/{}", env!("CARGO_PKG_VERSION")),
        mirror_credentials: cfg.fetch.mirror_credentials,
    });
    let ctx = FetchContext {
        cfg: cfg.fetch.clone(),
        store: ContentStore::new(containerd.channel(), cfg.containerd.namespace.clone()),
        registry,
        metrics: metrics.clone(),
        platform: Platform::node(),
    };
    let fetcher = LayerFetcher::new(ctx, finish);
    fetcher.adopt_stale_leases().await;
    Arc::new(fetcher)
}

pub async fn run(cfg: Config) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new());
    let containerd = Containerd::new(&cfg.containerd);
    let pulls = PullCoordinator::new(puller(&cfg, &containerd, &metrics).await, metrics.clone());
    let health = Arc::new(Health {
        metrics: metrics.clone(),
        containerd: containerd.clone(),
        serving: false.into(),
    });
    let stop = CancellationToken::new();

    // Signals first, so that a SIGTERM during start-up is not lost.
    let mut sigterm = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;

    let metrics_task = if cfg.metrics.enabled {
        let task = metrics::serve(cfg.metrics.addr, health.clone(), stop.clone())
            .await
            .with_context(|| format!("cannot serve metrics on {}", cfg.metrics.addr))?;
        info!(addr = %cfg.metrics.addr, "metrics, /healthz and /readyz served over HTTP");
        Some(task)
    } else {
        None
    };

    match health.probe().await {
        Ok(v) => {
            info!(socket = %cfg.containerd.socket.display(), version = v, "containerd reachable")
        }
        Err(s) => warn!(socket = %cfg.containerd.socket.display(), error = s.message(),
                        "containerd not reachable yet; calls fail with UNAVAILABLE until it is"),
    }
    tokio::spawn(probe_loop(
        health.clone(),
        cfg.containerd.health_interval,
        stop.clone(),
    ));

    let listener = frontdoor::socket::bind(&cfg.server.socket, cfg.server.socket_mode_bits())
        .await
        .context("cannot serve the CRI socket")?;
    let proxy = CriProxy::new(containerd, pulls.clone(), metrics);
    let draining = CancellationToken::new();
    let server = frontdoor::serve(listener, proxy, draining.clone().cancelled_owned());
    tokio::pin!(server);
    health.serving.store(true, Ordering::SeqCst);
    info!(socket = %cfg.server.socket.display(), upstream = %cfg.containerd.socket.display(),
          "serving CRI image service");

    let result = tokio::select! {
        r = &mut server => r.context("CRI server failed"),
        name = async {
            tokio::select! {
                _ = sigterm.recv() => "SIGTERM",
                _ = sigint.recv() => "SIGINT",
            }
        } => {
            health.serving.store(false, Ordering::SeqCst);
            info!(signal = name, grace = ?cfg.server.shutdown_grace, pulls_in_flight = pulls.in_flight(),
                  "shutting down: no new calls, waiting for calls in flight");
            draining.cancel();
            match tokio::time::timeout(cfg.server.shutdown_grace, &mut server).await {
                Ok(r) => r.context("CRI server failed while draining"),
                Err(_) => {
                    warn!(pulls_in_flight = pulls.in_flight(),
                          "grace period over: cutting the calls still in flight");
                    Ok(())
                }
            }
        }
    };

    health.serving.store(false, Ordering::SeqCst);
    stop.cancel();
    if let Some(t) = metrics_task {
        let _ = t.await;
    }
    if let Err(e) = std::fs::remove_file(&cfg.server.socket) {
        warn!(socket = %cfg.server.socket.display(), error = %e, "could not remove socket");
    }
    info!("stopped");
    result
}

async fn probe_loop(health: Arc<Health>, every: std::time::Duration, stop: CancellationToken) {
    let mut was_up = None;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let res = health.probe().await;
        let up = res.is_ok();
        if was_up != Some(up) {
            match res {
                Ok(v) => info!(version = v, "containerd is up"),
                Err(s) => warn!(error = s.message(), "containerd is down"),
            }
            was_up = Some(up);
        }
    }
}
