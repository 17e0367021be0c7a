//! systemd's service watchdog: `READY=1` once pullgate serves, `STOPPING=1` when it drains,
//! and `WATCHDOG=1` every third of `WATCHDOG_USEC` while a self-check of its own doors passes
//! ([`selfcheck`]). When the pings stop, systemd kills and restarts pullgate
//! (`packaging/systemd/pullgate.service`): a pullgate that hangs is ended without a person.
//!
//! containerd's health is no part of the check: restarting pullgate cannot help a slow or
//! stopped containerd, and pullgate already answers `UNAVAILABLE` for it.
//!
//! May import `config`, `metrics`, `errors` and `proto`.

pub mod fault;
mod notify;
mod selfcheck;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::Config;
use crate::metrics::{Metrics, ResultLabels};
pub use notify::Notifier;
use selfcheck::SelfCheck;

/// Longest a probe may take, however long the watchdog period: a door slower than this is
/// as bad as a closed one for kubelet.
const MAX_PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// pullgate's link to the service manager; does nothing when there is none.
pub struct Watchdog {
    notifier: Option<Notifier>,
    period: Option<Duration>,
}

impl Watchdog {
    /// Reads `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID`.
    pub fn from_env() -> Watchdog {
        let notifier = match Notifier::from_env() {
            Ok(n) => n,
            Err(e) => {
                warn!(error = %e, "NOTIFY_SOCKET cannot be used: systemd is not told when pullgate is ready, and its watchdog gets no ping");
                None
            }
        };
        let period = notifier.as_ref().and(notify::watchdog_period());
        Watchdog { notifier, period }
    }

    /// Tells the service manager `state`; a failure is logged, never fatal.
    pub fn notify(&self, state: &str) {
        if let Some(n) = &self.notifier {
            if let Err(e) = n.send(state) {
                warn!(socket = n.target(), state, error = %e, "cannot notify systemd");
            }
        }
    }

    /// Starts the self-check loop on the current (main) runtime when systemd asked for a
    /// watchdog; call once pullgate serves. The loop ends with `stop` (the drain: the doors
    /// close then, and systemd stops watching once told `STOPPING=1`).
    pub fn start(
        self: &Arc<Self>,
        cfg: &Config,
        metrics: Arc<Metrics>,
        stop: CancellationToken,
    ) -> anyhow::Result<()> {
        let Some(period) = self.period else {
            if self.notifier.is_some() {
                info!("systemd watchdog off (no WATCHDOG_USEC): a hung pullgate is not restarted by itself; set WatchdogSec= in the unit");
            }
            return Ok(());
        };
        // systemd's own advice (sd_watchdog_enabled(3)): ping at half the period or more
        // often; a third leaves room for one failed or late check.
        let every = (period / 3).max(Duration::from_millis(10));
        let timeout = (every / 2).min(MAX_PROBE_TIMEOUT);
        let mirror = cfg.mirror.enabled.then(|| dialable(cfg.mirror.addr));
        let check = SelfCheck::new(cfg.server.socket.clone(), mirror, timeout)?;
        for result in ["ok", "failed"] {
            let _ = metrics
                .watchdog_checks
                .get_or_create(&ResultLabels { result });
        }
        info!(period = ?period, every = ?every, probe_timeout = ?timeout,
              "systemd watchdog on: pinging while the CRI socket and the mirror answer");
        tokio::spawn(ping_loop(self.clone(), check, every, metrics, stop));
        Ok(())
    }
}

async fn ping_loop(
    dog: Arc<Watchdog>,
    check: SelfCheck,
    every: Duration,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    // A late tick (a busy runtime) is not made up with a burst of checks.
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let result = check.run().await;
        let label = if result.is_ok() { "ok" } else { "failed" };
        metrics
            .watchdog_checks
            .get_or_create(&ResultLabels { result: label })
            .inc();
        match result {
            Ok(()) => {
                if failing {
                    info!("watchdog self-check passes again: pinging systemd");
                    failing = false;
                }
                dog.notify("WATCHDOG=1");
            }
            Err(e) if !failing => {
                warn!(problem = e, "watchdog self-check failed: no ping; systemd restarts pullgate if this lasts WatchdogSec");
                failing = true;
            }
            Err(e) => debug!(problem = e, "watchdog self-check still failing"),
        }
    }
}

/// The address to probe the mirror at: a wildcard bind is reached on loopback.
fn dialable(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => (Ipv4Addr::LOCALHOST, addr.port()).into(),
        IpAddr::V6(ip) if ip.is_unspecified() => (Ipv6Addr::LOCALHOST, addr.port()).into(),
        _ => addr,
    }
}
