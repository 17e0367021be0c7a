//! `[p2p_gate]`: how pullgate learns that the node's P2P component is ready (the probe itself
//! lives in `prewarm::gate`).

use std::fmt;
use std::time::Duration;

use serde::Deserialize;

/// Config key prefix used in validation errors.
const KEY: &str = "p2p_gate";

/// How readiness of the P2P component is probed.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ProbeKind {
    /// No probe: the gate is always open (no P2P component, or nothing to wait for).
    #[default]
    None,
    /// `GET target`; ready on a 2xx status (e.g. a health endpoint of the P2P agent).
    Http,
    /// TCP connect to `target` (`HOST:PORT`); ready when it succeeds (e.g. the agent's proxy port).
    Tcp,
    /// containerd lists a running container whose name starts with `target` (the P2P agent's
    /// DaemonSet pod on this node), for agents that expose no port on the host.
    Container,
}

impl ProbeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ProbeKind::None => "none",
            ProbeKind::Http => "http",
            ProbeKind::Tcp => "tcp",
            ProbeKind::Container => "container",
        }
    }
}

impl fmt::Display for ProbeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The `p2p_gate` configuration.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct GateConfig {
    /// "none" (always open, the default), "http", "tcp" or "container".
    pub probe: ProbeKind,
    /// URL for http, HOST:PORT for tcp, name prefix for container.
    pub target: String,
    /// Time between probes: how late the gate may notice a change.
    #[serde(with = "super::units::duration")]
    pub interval: Duration,
    /// Limit on one probe, so a hung endpoint counts as "not ready" instead of stalling the loop.
    #[serde(with = "super::units::duration")]
    pub timeout: Duration,
}

impl Default for GateConfig {
    fn default() -> Self {
        GateConfig {
            probe: ProbeKind::None,
            target: String::new(),
            interval: Duration::from_secs(2),
            timeout: Duration::from_secs(1),
        }
    }
}

impl GateConfig {
    /// Checks the config at load time, so a typo fails startup instead of keeping prewarms
    /// waiting forever. Errors name the key.
    pub fn validate(&self) -> Result<(), String> {
        if self.interval.is_zero() {
            return Err(format!("{KEY}.interval: must be greater than 0"));
        }
        if self.timeout.is_zero() {
            return Err(format!("{KEY}.timeout: must be greater than 0"));
        }
        if self.probe == ProbeKind::None {
            return Ok(());
        }
        let target = self.target.trim();
        if target.is_empty() {
            return Err(format!(
                "{KEY}.target: required when probe = \"{}\"",
                self.probe
            ));
        }
        let bad = |why: String| format!("{KEY}.target: {:?} {why}", self.target);
        match self.probe {
            ProbeKind::None => Ok(()),
            ProbeKind::Http => {
                let url =
                    reqwest::Url::parse(target).map_err(|e| bad(format!("is not a URL ({e})")))?;
                if !matches!(url.scheme(), "http" | "https") {
                    return Err(bad("must be an http:// or https:// URL".into()));
                }
                if url.host_str().is_none_or(str::is_empty) {
                    return Err(bad("has no host".into()));
                }
                Ok(())
            }
            ProbeKind::Tcp => check_host_port(target).map_err(bad),
            ProbeKind::Container => Ok(()),
        }
    }
}

/// Accepts `HOST:PORT`, `IPv4:PORT` and `[IPv6]:PORT` with a non-zero port.
fn check_host_port(s: &str) -> Result<(), String> {
    let form = "must be HOST:PORT";
    let (host, port) = s.rsplit_once(':').ok_or_else(|| form.to_string())?;
    let port: u16 = port
        .parse()
        .map_err(|_| format!("{form} with a port number"))?;
    if port == 0 {
        return Err(format!("{form} with a non-zero port"));
    }
    let ok_host = if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        v6.parse::<std::net::Ipv6Addr>().is_ok()
    } else {
        !host.is_empty()
            && host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
    };
    if ok_host {
        Ok(())
    } else {
        Err(format!("{form} (IPv6 addresses in brackets)"))
    }
}
