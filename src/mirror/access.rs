//! Who may use the mirror and where it may go for them.
//!
//! - Peers: only sockets owned by a uid in `mirror.allow_uids` (containerd's) are served
//!   ([`Gate::admits`]); a refused connection is closed before anything is read.
//! - Loops: a request carrying [`HOP_HEADER`] is pullgate's own upstream request come back, and
//!   an `ns` naming one of pullgate's listen addresses would send it to itself: both are refused
//!   without fetching ([`Mirror::refuses_loop`]).
//! - Unscheduled blobs (no job needs them) are fetched only from registries pullgate has reason
//!   to know: one with its own directory under `mirror.hosts_dir`, or one a job pulled from since
//!   start; never from a link-local or cloud metadata address ([`Mirror::may_fetch_unscheduled`]).
//!   Anything else is a 404 and containerd fetches it from its next host.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tracing::warn;

use super::Mirror;
use crate::metrics::{Metrics, ReasonLabels};

/// Sent by pullgate's registry client on every upstream request.
pub use crate::registry::HOP_HEADER;

/// How often a refusal is logged at warn (the counter has them all).
const LOG_EVERY: Duration = Duration::from_secs(60);

/// The peer check at accept, with its rate-limited log.
pub struct Gate {
    allow: Vec<u32>,
    start: Instant,
    /// Per reason (index in [`REASONS`]): seconds since `start` of the last warn + 1 (0: never),
    /// so a flood of one kind never hides another.
    last_log: [AtomicU64; 4],
    /// Per reason: refusals since its last warn.
    unlogged: [AtomicU64; 4],
}

/// Why a connection was refused or closed (the metric's `reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Its uid is not in `mirror.allow_uids`.
    Uid(u32),
    /// Its uid could not be found (the peer is gone, or not a local socket).
    UnknownPeer,
    /// The table was full of connections mid-request.
    Cap,
    /// Closed to make room: it was the one waiting for a request head the longest.
    IdleEvicted,
}

impl Refusal {
    pub fn reason(self) -> &'static str {
        REASONS[self.index()]
    }

    fn index(self) -> usize {
        match self {
            Refusal::Uid(_) => 0,
            Refusal::UnknownPeer => 1,
            Refusal::Cap => 2,
            Refusal::IdleEvicted => 3,
        }
    }
}

use crate::metrics::MIRROR_REFUSAL_REASONS as REASONS;

impl Gate {
    pub fn new(allow: Vec<u32>) -> Gate {
        Gate {
            allow,
            start: Instant::now(),
            last_log: Default::default(),
            unlogged: Default::default(),
        }
    }

    /// Whether the peer `peer` of our socket `local` may use the mirror.
    pub async fn admits(&self, local: SocketAddr, peer: SocketAddr) -> Result<(), Refusal> {
        match super::peer::uid_of(local, peer).await {
            Ok(uid) if self.allow.contains(&uid) => Ok(()),
            Ok(uid) => Err(Refusal::Uid(uid)),
            Err(_) => Err(Refusal::UnknownPeer),
        }
    }

    /// Counts a refusal, and logs it unless one was logged in the last minute.
    pub fn refused(&self, metrics: &Metrics, peer: SocketAddr, why: Refusal) {
        metrics
            .mirror_refused_connections
            .get_or_create(&ReasonLabels {
                reason: why.reason(),
            })
            .inc();
        let (last_log, unlogged) = (&self.last_log[why.index()], &self.unlogged[why.index()]);
        let now = self.start.elapsed().as_secs() + 1;
        let last = last_log.load(Ordering::Relaxed);
        let due = last == 0 || now >= last + LOG_EVERY.as_secs();
        if !due
            || last_log
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            unlogged.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let also = unlogged.swap(0, Ordering::Relaxed);
        let allowed = &self.allow;
        match why {
            Refusal::Uid(uid) => warn!(
                %peer, uid, ?allowed, also_refused = also,
                "mirror: uid {uid} refused (not in mirror.allow_uids); the connection was closed \
                 unread (next such warning in 1 minute at most; see \
                 pullgate_mirror_refused_connections_total)"
            ),
            Refusal::UnknownPeer => warn!(
                %peer, also_refused = also,
                "mirror: the uid owning the connecting socket could not be found; closed unread"
            ),
            Refusal::Cap => warn!(
                %peer, also_refused = also,
                "mirror: all mirror.max_connections connections are mid-request; a new one was \
                 closed (containerd fetches from its next host)"
            ),
            Refusal::IdleEvicted => warn!(
                newcomer = %peer, also_evicted = also,
                "mirror: connection table full; the connection idle the longest (no request head) \
                 was closed to make room: a client is holding connections open"
            ),
        }
    }
}

impl Mirror {
    /// Why a request must not be served because it would come back to pullgate; `None`: it may.
    pub(super) fn refuses_loop(&self, hop: bool, ns: Option<&str>) -> Option<&'static str> {
        if hop {
            return Some("a request from pullgate itself came back to its mirror");
        }
        if ns.is_some_and(|ns| names_one_of(ns, &self.own_addrs())) {
            return Some("ns names pullgate's own listen address");
        }
        None
    }

    /// Whether a blob no job needs may be fetched from `registry` (the request's `ns`).
    pub(super) fn may_fetch_unscheduled(&self, registry: &str) -> bool {
        if metadata_address(registry) || names_one_of(registry, &self.own_addrs()) {
            return false;
        }
        let configured = registry != "_default"
            && !registry.starts_with('.')
            && !registry.contains('/')
            && self.cfg.hosts_dir.join(registry).is_dir();
        configured || self.demand.has_seen(registry)
    }
}

/// `host[:port]` split, with `[v6]` brackets taken off.
fn split_host(ns: &str) -> (&str, Option<u16>) {
    if let Some(rest) = ns.strip_prefix('[') {
        if let Some((host, tail)) = rest.split_once(']') {
            return (host, tail.strip_prefix(':').and_then(|p| p.parse().ok()));
        }
    }
    match ns.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => (h, p.parse().ok()),
        _ => (ns, None),
    }
}

fn host_ips(host: &str) -> Vec<IpAddr> {
    if host.eq_ignore_ascii_case("localhost") {
        return vec![Ipv4Addr::LOCALHOST.into(), Ipv6Addr::LOCALHOST.into()];
    }
    host.parse::<IpAddr>().into_iter().collect()
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Whether `ns` reaches one of `own` (a port-less `ns` is a registry on 443 or 80).
fn names_one_of(ns: &str, own: &[SocketAddr]) -> bool {
    let (host, port) = split_host(ns);
    host_ips(host).into_iter().any(|ip| {
        own.iter().any(|a| {
            let ip_hit =
                canonical(ip) == canonical(a.ip()) || (a.ip().is_unspecified() && ip.is_loopback());
            let port_hit = match port {
                Some(p) => p == a.port(),
                None => a.port() == 443 || a.port() == 80,
            };
            ip_hit && port_hit
        })
    })
}

/// Link-local and cloud metadata addresses: never a registry.
fn metadata_address(ns: &str) -> bool {
    let (host, _) = split_host(ns);
    if host.eq_ignore_ascii_case("metadata.google.internal") {
        return true;
    }
    match host.parse::<IpAddr>().map(canonical) {
        Ok(IpAddr::V4(v4)) => v4.is_link_local() || v4 == Ipv4Addr::new(100, 100, 100, 200),
        Ok(IpAddr::V6(v6)) => {
            (v6.segments()[0] & 0xffc0) == 0xfe80
                || v6 == Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254)
        }
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_addresses_are_recognised_in_every_spelling() {
        let own: Vec<SocketAddr> = vec![
            "127.0.0.1:9783".parse().unwrap(),
            "[::1]:9784".parse().unwrap(),
        ];
        for ns in [
            "127.0.0.1:9783",
            "localhost:9783",
            "LOCALHOST:9784",
            "[::1]:9784",
            "[::ffff:127.0.0.1]:9783",
        ] {
            assert!(names_one_of(ns, &own), "{ns}");
        }
        for ns in [
            "127.0.0.1:5000",
            "127.0.0.2:9783",
            "docker.io",
            "[::1]:9783x",
            "registry.example:9783",
            "127.0.0.1",
        ] {
            assert!(!names_one_of(ns, &own), "{ns}");
        }
        let on_443: Vec<SocketAddr> = vec!["127.0.0.1:443".parse().unwrap()];
        assert!(names_one_of("127.0.0.1", &on_443));
    }

    #[test]
    fn metadata_and_link_local_addresses_are_never_registries() {
        for ns in [
            "169.254.169.254",
            "169.254.169.254:80",
            "100.100.100.200",
            "[fd00:ec2::254]",
            "[fe80::1]:5000",
            "[febf::1]",
            "[::ffff:169.254.1.1]:80",
            "metadata.google.internal",
        ] {
            assert!(metadata_address(ns), "{ns}");
        }
        for ns in [
            "docker.io",
            "127.0.0.1:5000",
            "[fec0::1]",
            "100.100.100.201",
            "10.0.0.1",
        ] {
            assert!(!metadata_address(ns), "{ns}");
        }
    }
}
