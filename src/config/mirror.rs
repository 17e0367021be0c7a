//! `[mirror]`: pullgate's registry mirror, the endpoint containerd fetches manifests and blobs
//! through (listed first in containerd's `hosts.toml`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::units;
use crate::vocab::Class;

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MirrorConfig {
    /// Serve the mirror and keep pullgate's entry in containerd's hosts.toml. Off: containerd
    /// fetches by itself, unpaced; pullgate still merges, orders and admits pulls.
    pub enabled: bool,
    /// Listen address; loopback only (a local process can read through it what running jobs may
    /// read, see the README).
    pub addr: SocketAddr,
    /// uids whose loopback sockets may use the mirror (the owner of the connecting socket, as the
    /// kernel reports it); others are closed unread. Default `[0]`: containerd runs as root. Add
    /// containerd's uid if it runs as another user (rootless).
    pub allow_uids: Vec<u32>,
    /// containerd's registry host directory, as in its CRI `registry.config_path`.
    pub hosts_dir: PathBuf,
    /// Keep pullgate's `[host]` first in every hosts.toml under `hosts_dir` (and `_default`).
    /// Off: the administrator lists `http://<addr>` first themselves.
    pub manage_hosts: bool,
    /// Send a job's registry credentials to the administrator's mirrors too (containerd does not).
    pub mirror_credentials: bool,
    /// Connecting and receiving response headers upstream; also the longest wait for the next
    /// chunk of a blob before the stream is resumed elsewhere.
    #[serde(with = "units::duration")]
    pub request_timeout: Duration,
    /// How long what a failed or interrupted pull downloaded stays in containerd, so that the
    /// next attempt resumes it (a containerd lease per forwarded pull); 0: containerd drops it
    /// with the pull.
    #[serde(with = "units::duration")]
    pub keep_partial: Duration,
    /// Free space containerd's root must keep for partial downloads to be kept (a quantity or a
    /// percentage of the filesystem); below it a failed pull's downloads are dropped at once.
    pub keep_partial_min_free: units::Share,
    /// Resumptions (ranged, from the byte reached) of one blob stream cut upstream.
    #[serde(deserialize_with = "units::whole::<_, _, 0, 100>")]
    pub retries: u32,
    /// Blobs of pulls that did not come through pullgate's CRI socket (e.g. `ctr pull`, or a
    /// kubelet still pointed at containerd): `urgent` (served at once, counted in the node budget),
    /// `prewarm` (paced like prewarm), or `bypass` (refused, so containerd fetches them itself).
    pub unscheduled: Unscheduled,
    /// A connection must send a request's headers within this long (also between requests).
    #[serde(with = "units::duration")]
    pub header_read_timeout: Duration,
    /// Connections served at once; one over the cap is closed (containerd then tries the next
    /// host).
    #[serde(deserialize_with = "units::whole::<_, _, 1, 65536>")]
    pub max_connections: usize,
    /// Connections one blob may use where a host is measured to cap each connection's rate
    /// (ranged parts, fetched at once and passed on in order); 1: always one.
    #[serde(deserialize_with = "units::whole::<_, _, 1, 16>")]
    pub parallel_ranges: usize,
    /// Size of one ranged part; 0: never split.
    pub range_part: units::Bytes,
    /// Blob bytes the whole node may hold fetched ahead of containerd's reads (split blobs
    /// reserve `(parallel_ranges - 1) × range_part` each); 0: never split.
    pub buffer_budget: units::Bytes,
}

impl Default for MirrorConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            addr: SocketAddr::from(([127, 0, 0, 1], 9783)),
            allow_uids: vec![0],
            hosts_dir: PathBuf::from("/etc/containerd/certs.d"),
            manage_hosts: true,
            mirror_credentials: false,
            request_timeout: Duration::from_secs(30),
            keep_partial: Duration::from_secs(3600),
            // kubelet's default hard eviction threshold `imagefs.available<15%`: below it kubelet
            // evicts pods and deletes images, so partials must not be what holds the space.
            keep_partial_min_free: units::Share::Percent(15),
            retries: 4,
            unscheduled: Unscheduled::Urgent,
            header_read_timeout: Duration::from_secs(10),
            max_connections: 1024,
            parallel_ranges: 4,
            range_part: units::Bytes(2 << 20),
            buffer_budget: units::Bytes(32 << 20),
        }
    }
}

impl MirrorConfig {
    /// The URL containerd is given for the mirror.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// How blobs of pulls pullgate did not schedule are served.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Unscheduled {
    Urgent,
    Prewarm,
    Bypass,
}

impl Unscheduled {
    /// The class they are paced at; `None`: not served.
    pub fn class(self) -> Option<Class> {
        match self {
            Unscheduled::Urgent => Some(Class::Urgent),
            Unscheduled::Prewarm => Some(Class::Prewarm),
            Unscheduled::Bypass => None,
        }
    }
}
