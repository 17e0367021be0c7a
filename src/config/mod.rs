//! The TOML configuration file: types, defaults, loading and validation.
//!
//! Every key is optional; unknown keys are rejected so that a typo never silently falls back to a
//! default. Errors carry the key and the line (toml's span-aware errors).
//!
//! Owns the file's types and checks, no domain code: may import only `vocab`, `registry` (reference
//! parsing) and `small_file`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

mod gate;
pub mod labels;
mod legacy;
mod mirror;
mod prewarm;
mod spans;
pub mod units;

pub use mirror::{MirrorConfig, Unscheduled};
pub use prewarm::{Policy, PrewarmEntry};
pub use units::{Bytes, Share};

pub use gate::{GateConfig, ProbeKind};
pub use labels::check_label_name;

/// Where `pullgate serve` looks for its config when `--config` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/pullgate/config.toml";

/// The whole configuration.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub containerd: ContainerdConfig,
    pub metrics: MetricsConfig,
    pub log: LogConfig,
    pub mirror: MirrorConfig,
    pub schedule: ScheduleConfig,
    pub api: ApiConfig,
    pub p2p_gate: GateConfig,
    pub node_labels: NodeLabelsConfig,
    pub prewarm: Vec<PrewarmEntry>,
}

/// The node-feature-discovery local feature file naming the `[[prewarm]]` images present, so
/// pods can be scheduled onto nodes that already hold their image.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct NodeLabelsConfig {
    pub enabled: bool,
    /// Written only while its directory exists (NFD's `features.d`, made by NFD's worker).
    pub file: PathBuf,
    /// How often presence is checked (images also go away by kubelet's garbage collection).
    #[serde(with = "units::duration")]
    pub interval: Duration,
}

impl Default for NodeLabelsConfig {
    fn default() -> Self {
        NodeLabelsConfig {
            enabled: true,
            file: PathBuf::from(DEFAULT_FEATURE_FILE),
            interval: Duration::from_secs(30),
        }
    }
}

/// node-feature-discovery's local feature directory, and pullgate's file in it.
pub const DEFAULT_FEATURE_FILE: &str = "/etc/kubernetes/node-feature-discovery/features.d/pullgate";

/// The scheduler: priorities, bandwidth, concurrency, the large-image lane.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ScheduleConfig {
    /// Node bandwidth budget for blob downloads, bytes per second (0: unlimited).
    pub bandwidth: Bytes,
    /// What prewarm may use while no pod waits: a rate or a percentage of `bandwidth`
    /// (0: all of the budget).
    pub prewarm_bandwidth: Share,
    /// What prewarm keeps while a pod waits (0: prewarm pauses, its connections kept open).
    pub prewarm_floor: Bytes,
    /// Prewarm images fetched at once (0: unlimited).
    #[serde(deserialize_with = "units::whole::<_, _, 0, 1024>")]
    pub max_prewarm_jobs: usize,
    /// Blob downloads in flight across all jobs (0: unlimited), served by priority.
    #[serde(deserialize_with = "units::whole::<_, _, 0, 4096>")]
    pub max_blob_streams: usize,
    /// Prewarm images at least this big are fetched one at a time, in a deterministic order
    /// (0: no lane).
    pub large_image_size: Bytes,
    /// Which order the lane walks: the same on every node, or one per node.
    pub lane_order: LaneOrderConfig,
    /// This node's name, for the per-node lane order ("": `$NODE_NAME`, else the hostname).
    pub node_name: String,
}

/// `schedule.lane_order`.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum LaneOrderConfig {
    /// Every node walks one sequence: a shared cache of little room, or P2P that shares pieces
    /// of blobs still being fetched (Dragonfly), sees each blob asked for by every node at once.
    /// The default: since the lane hands over once an image's bytes are in, it beat containerd
    /// direct in every run of both bench models and the per-node order in every run of the
    /// seed-cache model, and tied it with peers that share only finished blobs (README,
    /// Performance).
    #[default]
    Shared,
    /// Each node walks its own sequence: P2P that shares only finished blobs (Spegel) finds
    /// an image finished at some peer instead of every node fetching it from the origin at once.
    PerNode,
}

impl Default for ScheduleConfig {
    fn default() -> Self {
        Self {
            bandwidth: Bytes(0),
            prewarm_bandwidth: Share::Bytes(0),
            prewarm_floor: Bytes(0),
            max_prewarm_jobs: 2,
            max_blob_streams: 16,
            large_image_size: Bytes(1 << 30),
            lane_order: LaneOrderConfig::Shared,
            node_name: String::new(),
        }
    }
}

impl ScheduleConfig {
    /// `node_name`, else `$NODE_NAME` (the Kubernetes node name, where a unit or manifest sets
    /// it), else the kernel's hostname (kubelet's default node name).
    pub fn node_name(&self) -> String {
        if !self.node_name.trim().is_empty() {
            return self.node_name.trim().to_string();
        }
        if let Some(n) = std::env::var("NODE_NAME")
            .ok()
            .filter(|n| !n.trim().is_empty())
        {
            return n.trim().to_string();
        }
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_default()
    }
}

/// pullgate's own gRPC API (prewarm, jobs, cancel), used by the `pullgate` CLI.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    pub enabled: bool,
    pub socket: PathBuf,
    /// Octal file mode; the API can cancel and submit pulls, so root only by default.
    pub socket_mode: String,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            socket: PathBuf::from(DEFAULT_API_SOCKET),
            socket_mode: "0600".into(),
        }
    }
}

/// Where the API listens and the CLI connects by default.
pub const DEFAULT_API_SOCKET: &str = "/run/pullgate/api.sock";

/// The CRI front door kubelet talks to.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Unix socket kubelet's `imageServiceEndpoint` points at.
    pub socket: PathBuf,
    /// File mode of the socket, as an octal string such as "0660".
    pub socket_mode: String,
    /// How long in-flight calls may run after SIGTERM/SIGINT before they are cut.
    #[serde(with = "units::duration")]
    pub shutdown_grace: Duration,
    /// Nice value of the thread that serves the socket (-20 to 19, 0 = as the process), so that
    /// kubelet's calls are relayed at once while the cores are busy with a pull.
    pub nice: i32,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            socket: PathBuf::from("/run/pullgate/pullgate.sock"),
            socket_mode: "0660".into(),
            shutdown_grace: Duration::from_secs(30),
            nice: -10,
        }
    }
}

impl ServerConfig {
    /// The socket mode as permission bits (validated at load).
    pub fn socket_mode_bits(&self) -> u32 {
        parse_mode(&self.socket_mode).unwrap_or(0o660)
    }
}

impl ApiConfig {
    pub fn socket_mode_bits(&self) -> u32 {
        parse_mode(&self.socket_mode).unwrap_or(0o600)
    }
}

/// The containerd that every call is forwarded to.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ContainerdConfig {
    /// containerd's gRPC socket (its CRI plugin serves on the same socket).
    pub socket: PathBuf,
    /// containerd namespace used for pullgate's own calls (the CRI plugin uses `k8s.io`).
    pub namespace: String,
    /// Timeout for establishing a connection to containerd.
    #[serde(with = "units::duration")]
    pub connect_timeout: Duration,
    /// How often containerd's liveness is probed for `/healthz` and `pullgate_upstream_up`.
    #[serde(with = "units::duration")]
    pub health_interval: Duration,
    /// containerd's own config file, read to check that its CRI registry `config_path` is
    /// `mirror.hosts_dir` (at start and in `/readyz`); empty: not checked.
    pub config_file: PathBuf,
    /// containerd's root directory, whose free space decides whether partial downloads are kept
    /// (`mirror.keep_partial_min_free`); empty: `root` of `config_file`, else
    /// `/var/lib/containerd`.
    pub root: PathBuf,
    /// Hand prewarm pulls back from containerd while a pod's pull runs (what they downloaded is
    /// kept, see `mirror.keep_partial`), and forward them again after: `auto` on containerd 2.x,
    /// whose transfer service limits the downloads of every pull on the node with one semaphore
    /// (`max_concurrent_downloads`, default 3, read from `config_file`) that paused prewarm
    /// streams would hold, when the prewarm pulls forwarded could hold all but 3 of it; `always`;
    /// `never` (prewarm streams are paused at the mirror instead).
    pub preempt_prewarm: Preempt,
    /// Write a prewarm image's blobs into containerd's content store through its content
    /// service (at the mirror's pace, under the pull's lease) before forwarding the pull, which
    /// then only unpacks: such writes take none of containerd 2.x's shared download slots, so
    /// a pod's pull never waits for one and nothing is handed back. `auto` where prewarm would be
    /// handed back (see `preempt_prewarm`), `always`, `never`.
    pub stage_prewarm: Preempt,
}

/// When prewarm pulls are handed back from containerd for a pod's pull (or staged).
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Preempt {
    Auto,
    Always,
    Never,
}

impl Default for ContainerdConfig {
    fn default() -> Self {
        Self {
            socket: PathBuf::from("/run/containerd/containerd.sock"),
            namespace: "k8s.io".into(),
            connect_timeout: Duration::from_secs(5),
            health_interval: Duration::from_secs(5),
            config_file: PathBuf::from("/etc/containerd/config.toml"),
            root: PathBuf::new(),
            preempt_prewarm: Preempt::Auto,
            stage_prewarm: Preempt::Auto,
        }
    }
}

/// Prometheus metrics and health endpoints.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Serve `/metrics`, `/healthz` and `/readyz` at all.
    pub enabled: bool,
    /// HTTP listen address. Loopback by default: expose it deliberately.
    pub addr: SocketAddr,
    /// A connection must send a request's complete headers within this long after it opens or
    /// after its previous response (keep-alive idle), else it is closed.
    #[serde(with = "units::duration")]
    pub header_read_timeout: Duration,
    /// Connections served at once; one over the cap is closed as soon as it is accepted.
    #[serde(deserialize_with = "units::whole::<_, _, 1, 65536>")]
    pub max_connections: usize,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            addr: SocketAddr::from(([127, 0, 0, 1], 9782)),
            header_read_timeout: Duration::from_secs(10),
            max_connections: 64,
        }
    }
}

/// Log output.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `text` or `json`.
    pub format: LogFormat,
    /// A tracing filter such as `info` or `pullgate=debug,info`; `RUST_LOG` overrides it.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            level: "info".into(),
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// A config file that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = crate::small_file::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        // An empty file is most often a truncated write (an editor or a config tool caught
        // mid-way): taken as "all defaults" it would lift every limit on SIGHUP.
        if text.trim().is_empty() {
            return Err(ConfigError::Invalid {
                path: path.to_owned(),
                message: "the file is empty (a truncated write?); to run on the defaults, \
                          write at least a comment line"
                    .into(),
            });
        }
        Config::parse(&text).map_err(|message| ConfigError::Invalid {
            path: path.to_owned(),
            message,
        })
    }

    /// The file given with `--config`, else the default path if it exists, else defaults.
    pub fn load_default_or(path: Option<&Path>) -> Result<(Config, Option<PathBuf>), ConfigError> {
        match path {
            Some(p) => Ok((Config::load(p)?, Some(p.to_owned()))),
            None if Path::new(DEFAULT_CONFIG_PATH).exists() => {
                let p = PathBuf::from(DEFAULT_CONFIG_PATH);
                Ok((Config::load(&p)?, Some(p)))
            }
            None => Ok((Config::default(), None)),
        }
    }

    /// Parses and validates config text; the error names the key and line.
    pub fn parse(text: &str) -> Result<Config, String> {
        if let Ok(table) = text.parse::<toml::Table>() {
            if let Err((key, instead)) = legacy::check(&table) {
                return Err(format!(
                    "{}{key}: no longer exists since pullgate serves containerd as its registry \
                     mirror: {instead}",
                    spans::Spans::new(text).line(&key)
                ));
            }
        }
        let cfg: Config = toml::from_str(text).map_err(|e| e.to_string())?;
        cfg.validate(text)?;
        Ok(cfg)
    }

    /// Checks values that the types alone do not; `text` (the file, if any) locates the key.
    /// Every value that passes here can be used as is: no duration, size or path accepted here
    /// makes an arithmetic overflow, a formatting failure or a relative-path surprise later.
    pub fn validate(&self, text: &str) -> Result<(), String> {
        let spans = spans::Spans::new(text);
        let located = |(key, why): (&str, String)| format!("{}{key}: {why}", spans.line(key));
        self.check_server().map_err(located)?;
        self.check_paths().map_err(located)?;
        self.check_mirror().map_err(located)?;
        self.check_ranges(&spans).map_err(located)?;
        self.check_api().map_err(located)?;
        self.check_schedule().map_err(located)?;
        self.validate_prewarm(&spans)?;
        self.check_log().map_err(located)
    }

    /// The CRI socket's mode, nice value and path.
    fn check_server(&self) -> Checked {
        if parse_mode(&self.server.socket_mode).is_none() {
            return fail(
                "server.socket_mode",
                format!(
                    "{:?} is not an octal file mode such as \"0660\"",
                    self.server.socket_mode
                ),
            );
        }
        if !(-20..=19).contains(&self.server.nice) {
            return fail(
                "server.nice",
                format!(
                    "{} is out of range: expected a nice value from -20 to 19",
                    self.server.nice
                ),
            );
        }
        if self.server.socket == self.containerd.socket {
            return fail(
                "server.socket",
                "must differ from containerd.socket (pullgate would forward to itself)".into(),
            );
        }
        Ok(())
    }

    /// Paths are absolute.
    fn check_paths(&self) -> Checked {
        let mut paths = vec![
            (
                "server.socket",
                &self.server.socket,
                "/run/pullgate/pullgate.sock",
            ),
            (
                "containerd.socket",
                &self.containerd.socket,
                "/run/containerd/containerd.sock",
            ),
            (
                "mirror.hosts_dir",
                &self.mirror.hosts_dir,
                "/etc/containerd/certs.d",
            ),
        ];
        if self.api.enabled {
            paths.push(("api.socket", &self.api.socket, DEFAULT_API_SOCKET));
        }
        if self.node_labels.enabled {
            paths.push((
                "node_labels.file",
                &self.node_labels.file,
                DEFAULT_FEATURE_FILE,
            ));
        }
        if !self.containerd.config_file.as_os_str().is_empty() {
            paths.push((
                "containerd.config_file",
                &self.containerd.config_file,
                "/etc/containerd/config.toml",
            ));
        }
        if !self.containerd.root.as_os_str().is_empty() {
            paths.push((
                "containerd.root",
                &self.containerd.root,
                "/var/lib/containerd",
            ));
        }
        for (key, path, like) in paths {
            if let Err(why) = absolute(path, like) {
                return fail(key, why);
            }
        }
        Ok(())
    }

    /// The mirror listens on loopback for known uids.
    fn check_mirror(&self) -> Checked {
        if !self.mirror.addr.ip().is_loopback() {
            return fail(
                "mirror.addr",
                format!(
                    "{} is not a loopback address: the mirror serves what running jobs may read, \
                     so it listens on 127.0.0.0/8 or ::1 only",
                    self.mirror.addr
                ),
            );
        }
        if self.mirror.allow_uids.is_empty() {
            return fail(
                "mirror.allow_uids",
                "is empty: no client could use the mirror (containerd runs as uid 0: [0]; to \
                 turn the mirror off, set mirror.enabled = false)"
                    .into(),
            );
        }
        if self.mirror.allow_uids.contains(&u32::MAX) {
            return fail(
                "mirror.allow_uids",
                "4294967295 is (uid_t)-1, no user: expected containerd's uid, like [0]".into(),
            );
        }
        if self.metrics.enabled && self.mirror.enabled && self.metrics.addr == self.mirror.addr {
            return fail("mirror.addr", "must differ from metrics.addr".into());
        }
        if self.containerd.namespace.is_empty() {
            return fail("containerd.namespace", "must not be empty".into());
        }
        Ok(())
    }

    /// Durations and sizes within their ranges.
    fn check_ranges(&self, spans: &spans::Spans) -> Checked {
        for (key, d, range) in self.durations() {
            if let Err(why) = range.check(d, spans.written(key)) {
                return fail(key, why);
            }
        }
        for (key, b, range) in self.sizes() {
            if let Err(why) = range.check(b, spans.written(key)) {
                return fail(key, why);
            }
        }
        Ok(())
    }

    /// The API socket is not open to every user.
    fn check_api(&self) -> Checked {
        if parse_mode(&self.api.socket_mode).is_none() {
            return fail(
                "api.socket_mode",
                format!("{:?} is not an octal file mode", self.api.socket_mode),
            );
        }
        // The API starts and cancels pulls for the whole node: never for every local user.
        if parse_mode(&self.api.socket_mode).is_some_and(|m| m & 0o002 != 0) {
            return fail(
                "api.socket_mode",
                format!(
                    "{:?} lets every local user start and cancel pulls; use \"0600\" (root) \
                     or \"0660\" with a group",
                    self.api.socket_mode
                ),
            );
        }
        if self.api.enabled
            && (self.api.socket == self.server.socket || self.api.socket == self.containerd.socket)
        {
            return fail(
                "api.socket",
                "must differ from server.socket and containerd.socket".into(),
            );
        }
        Ok(())
    }

    /// Bandwidth shares and the P2P gate.
    fn check_schedule(&self) -> Checked {
        let s = &self.schedule;
        if let Share::Percent(_) = s.prewarm_bandwidth {
            if s.bandwidth.0 == 0 {
                return fail(
                    "schedule.prewarm_bandwidth",
                    "a percentage needs schedule.bandwidth set".into(),
                );
            }
        }
        if s.bandwidth.0 > 0 && s.prewarm_floor.0 > s.bandwidth.0 {
            return fail(
                "schedule.prewarm_floor",
                "must not exceed schedule.bandwidth".into(),
            );
        }
        if let Err(e) = self.p2p_gate.validate() {
            return fail("p2p_gate", e);
        }
        Ok(())
    }

    /// The log filter parses.
    fn check_log(&self) -> Checked {
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            return fail(
                "log.level",
                format!("{:?} is not a valid filter: {e}", self.log.level),
            );
        }
        Ok(())
    }

    /// Every duration key with the range it accepts (documented in config/pullgate.toml).
    fn durations(&self) -> [(&'static str, Duration, DurationRange); 10] {
        let ms = Duration::from_millis;
        let s = Duration::from_secs;
        let (min, hour) = (s(60), s(3600));
        [
            // 0: calls in flight are cut at once.
            (
                "server.shutdown_grace",
                self.server.shutdown_grace,
                DurationRange::new(Duration::ZERO, hour, "30s"),
            ),
            (
                "containerd.connect_timeout",
                self.containerd.connect_timeout,
                DurationRange::new(ms(10), 5 * min, "5s"),
            ),
            (
                "containerd.health_interval",
                self.containerd.health_interval,
                DurationRange::new(ms(100), hour, "5s"),
            ),
            (
                "mirror.request_timeout",
                self.mirror.request_timeout,
                DurationRange::new(s(1), 10 * min, "30s"),
            ),
            // A lease expiry becomes an RFC 3339 label: a week outlives any retry.
            (
                "mirror.keep_partial",
                self.mirror.keep_partial,
                DurationRange::new(min, 7 * 24 * hour, "1h").or_zero(),
            ),
            (
                "mirror.header_read_timeout",
                self.mirror.header_read_timeout,
                DurationRange::new(ms(10), 10 * min, "10s"),
            ),
            (
                "metrics.header_read_timeout",
                self.metrics.header_read_timeout,
                DurationRange::new(ms(10), 10 * min, "10s"),
            ),
            (
                "node_labels.interval",
                self.node_labels.interval,
                DurationRange::new(s(1), hour, "30s"),
            ),
            (
                "p2p_gate.interval",
                self.p2p_gate.interval,
                DurationRange::new(ms(10), hour, "2s"),
            ),
            (
                "p2p_gate.timeout",
                self.p2p_gate.timeout,
                DurationRange::new(ms(10), 5 * min, "1s"),
            ),
        ]
    }

    /// Every byte quantity key with the range it accepts; 0 means "unlimited" or "off" for all.
    fn sizes(&self) -> [(&'static str, u64, SizeRange); 6] {
        const KB: u64 = 1000;
        const TB: u64 = 1_000_000_000_000;
        let rate = SizeRange {
            min: KB,
            max: TB,
            like: "100MB",
        };
        let s = &self.schedule;
        let prewarm = match s.prewarm_bandwidth {
            Share::Bytes(b) => b,
            Share::Percent(_) => 0,
        };
        [
            ("schedule.bandwidth", s.bandwidth.0, rate),
            (
                "schedule.prewarm_bandwidth",
                prewarm,
                SizeRange {
                    like: "20MB",
                    ..rate
                },
            ),
            (
                "schedule.prewarm_floor",
                s.prewarm_floor.0,
                SizeRange {
                    like: "1MB",
                    ..rate
                },
            ),
            (
                "schedule.large_image_size",
                s.large_image_size.0,
                SizeRange {
                    min: 1_000_000,
                    max: 1 << 40,
                    like: "1GiB",
                },
            ),
            (
                "mirror.range_part",
                self.mirror.range_part.0,
                SizeRange {
                    min: 64 << 10,
                    max: 1 << 30,
                    like: "2MiB",
                },
            ),
            (
                "mirror.buffer_budget",
                self.mirror.buffer_budget.0,
                SizeRange {
                    min: 1 << 20,
                    max: 16 << 30,
                    like: "32MiB",
                },
            ),
        ]
    }

    fn validate_prewarm(&self, spans: &spans::Spans) -> Result<(), String> {
        let s = Duration::from_secs;
        let day = s(86_400);
        let mut seen = std::collections::HashSet::new();
        for (i, p) in self.prewarm.iter().enumerate() {
            let line = spans.line(&format!("prewarm.{i}.image"));
            let fail = |what: String| Err(format!("{line}prewarm[{i}] ({}): {what}", p.image));
            let reference = match crate::registry::reference::parse_reference(&p.image) {
                Ok(r) => r.whole(),
                Err(why) => return fail(format!("invalid image reference {:?}: {why}", p.image)),
            };
            if !seen.insert(reference.clone()) {
                return fail(format!("{reference} is listed twice"));
            }
            // The interval gets up to 10 % jitter added: a bound keeps that sum finite.
            for (key, d, range) in [
                (
                    "interval",
                    p.interval,
                    DurationRange::new(s(1), 365 * day, "24h"),
                ),
                (
                    "timeout",
                    p.timeout,
                    DurationRange::new(s(1), 7 * day, "30m").or_zero(),
                ),
                (
                    "deadline",
                    p.deadline,
                    DurationRange::new(s(1), 30 * day, "2h").or_zero(),
                ),
            ] {
                if let Err(why) = range.check(d, None) {
                    return fail(format!("{key}: {why}"));
                }
            }
            if let Some(label) = &p.label {
                if let Err(why) = check_label_name(label) {
                    return fail(format!("label: {why}"));
                }
            }
            if let Some(path) = &p.docker_config {
                if let Err(why) = absolute(path, "/etc/pullgate/docker-config.json") {
                    return fail(format!("docker_config: {why}"));
                }
            }
        }
        Ok(())
    }
}

/// The durations a key accepts: `min..=max`, and 0 too where 0 means "no limit".
#[derive(Clone, Copy)]
struct DurationRange {
    min: Duration,
    max: Duration,
    zero: bool,
    like: &'static str,
}

impl DurationRange {
    fn new(min: Duration, max: Duration, like: &'static str) -> Self {
        DurationRange {
            min,
            max,
            zero: false,
            like,
        }
    }

    fn or_zero(self) -> Self {
        DurationRange { zero: true, ..self }
    }

    /// `written`: the value as the file spells it, shown back in the message.
    fn check(&self, d: Duration, written: Option<String>) -> Result<(), String> {
        if (self.zero && d.is_zero()) || (self.min..=self.max).contains(&d) {
            return Ok(());
        }
        let shown = written.unwrap_or_else(|| units::show_duration(d));
        let zero = if self.zero { "0 (no limit) or " } else { "" };
        Err(format!(
            "{shown} is out of range: expected {zero}a duration between {} and {}, like \"{}\"",
            units::show_duration(self.min),
            units::show_duration(self.max),
            self.like
        ))
    }
}

/// The byte quantities a key accepts: 0 (unlimited, or off) or `min..=max`.
#[derive(Clone, Copy)]
struct SizeRange {
    min: u64,
    max: u64,
    like: &'static str,
}

impl SizeRange {
    fn check(&self, b: u64, written: Option<String>) -> Result<(), String> {
        if b == 0 || (self.min..=self.max).contains(&b) {
            return Ok(());
        }
        let shown = written.unwrap_or_else(|| b.to_string());
        Err(format!(
            "{shown} is out of range: expected 0 or a byte quantity between {} and {}, like \"{}\"",
            units::show_bytes(self.min),
            units::show_bytes(self.max),
            self.like
        ))
    }
}

/// A path that must not depend on pullgate's working directory (a systemd unit's is `/`).
fn absolute(path: &Path, like: &str) -> Result<(), String> {
    if path.is_absolute() {
        return Ok(());
    }
    let shown = if path.as_os_str().is_empty() {
        "an empty path".to_string()
    } else {
        format!("{:?} is a relative path", path.display().to_string())
    };
    Err(format!("{shown}: expected an absolute path, like {like:?}"))
}

/// A failed check: the key and why.
type Checked = Result<(), (&'static str, String)>;

fn fail(key: &'static str, why: String) -> Checked {
    Err((key, why))
}

/// Parses an octal mode such as "0660" or "660".
fn parse_mode(s: &str) -> Option<u32> {
    let m = u32::from_str_radix(s, 8).ok()?;
    (m <= 0o777).then_some(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_file_is_refused_but_a_comment_only_one_gives_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("config.toml");
        for empty in ["", "\n  \n\t"] {
            std::fs::write(&file, empty).unwrap();
            let e = Config::load(&file).unwrap_err().to_string();
            assert!(e.contains("the file is empty"), "{e}");
        }
        std::fs::write(&file, "# defaults\n").unwrap();
        assert_eq!(Config::load(&file).unwrap(), Config::default());
        let e = Config::load(Path::new("/dev/zero"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a regular file"), "{e}");
    }

    #[test]
    fn a_world_writable_api_socket_is_refused() {
        let e = Config::parse("[api]\nsocket_mode = \"0666\"\n").unwrap_err();
        assert!(
            e.contains("api.socket_mode") && e.contains("every local user"),
            "{e}"
        );
        Config::parse("[api]\nsocket_mode = \"0660\"\n").unwrap();
    }

    #[test]
    fn empty_file_gives_defaults() {
        assert_eq!(Config::parse("").unwrap(), Config::default());
    }

    #[test]
    fn shipped_example_config_is_valid_and_matches_defaults() {
        let text = include_str!("../../config/pullgate.toml");
        assert_eq!(Config::parse(text).unwrap(), Config::default());
    }

    #[test]
    fn values_are_read() {
        let cfg = Config::parse(
            r#"
[server]
socket = "/tmp/x.sock"
socket_mode = "0600"
shutdown_grace = "5s"
[containerd]
socket = "/tmp/c.sock"
[metrics]
addr = "127.0.0.1:1234"
[log]
format = "json"
"#,
        )
        .unwrap();
        assert_eq!(cfg.server.socket, PathBuf::from("/tmp/x.sock"));
        assert_eq!(cfg.server.socket_mode_bits(), 0o600);
        assert_eq!(cfg.server.shutdown_grace, Duration::from_secs(5));
        assert_eq!(cfg.metrics.addr.port(), 1234);
        assert_eq!(cfg.log.format, LogFormat::Json);
    }

    #[test]
    fn unknown_key_is_named_with_its_line() {
        let err =
            Config::parse("[server]\nsocket = \"/a.sock\"\nsockte_mode = \"0660\"\n").unwrap_err();
        assert!(err.contains("sockte_mode"), "{err}");
        assert!(err.contains("line 3"), "{err}");
    }

    #[test]
    fn bad_value_type_is_named_with_its_line() {
        let err = Config::parse("[metrics]\n\naddr = 12\n").unwrap_err();
        assert!(err.contains("line 3"), "{err}");
        assert!(err.contains("addr"), "{err}");
    }

    #[test]
    fn bad_mode_and_duration_are_rejected() {
        let err = Config::parse("[server]\nsocket_mode = \"rw-rw----\"\n").unwrap_err();
        assert!(err.contains("line 2: server.socket_mode"), "{err}");
        let err = Config::parse("[server]\nshutdown_grace = \"soon\"\n").unwrap_err();
        assert!(
            err.contains("shutdown_grace") && err.contains("line 2"),
            "{err}"
        );
        let err = Config::parse("[containerd]\nhealth_interval = \"0s\"\n").unwrap_err();
        assert!(err.contains("containerd.health_interval"), "{err}");
    }

    #[test]
    fn relative_or_identical_sockets_are_rejected() {
        let err = Config::parse("[server]\nsocket = \"pullgate.sock\"\n").unwrap_err();
        assert!(err.contains("server.socket"), "{err}");
        let err =
            Config::parse("[server]\nsocket = \"/a.sock\"\n[containerd]\nsocket = \"/a.sock\"\n")
                .unwrap_err();
        assert!(err.contains("must differ"), "{err}");
    }

    #[test]
    fn an_unset_node_name_is_never_empty() {
        // Unset: $NODE_NAME or the hostname, never an empty seed.
        let cfg = Config::parse("[schedule]\nlane_order = \"per-node\"\n").unwrap();
        assert!(!cfg.schedule.node_name().is_empty());
    }

    #[test]
    fn schedule_and_prewarm_are_read() {
        let cfg = Config::parse(
            r#"
[schedule]
bandwidth = "100MB/s"
prewarm_bandwidth = "30%"
prewarm_floor = "1MiB"
large_image_size = "512MiB"
[p2p_gate]
probe = "tcp"
target = "127.0.0.1:65001"
[[prewarm]]
image = "busybox"
priority = 3
policy = "keep"
interval = "1h"
[[prewarm]]
image = "registry.example/ml/model:v3"
"#,
        )
        .unwrap();
        assert_eq!(cfg.schedule.bandwidth.0, 100_000_000);
        assert_eq!(cfg.schedule.large_image_size.0, 512 << 20);
        assert_eq!(cfg.prewarm.len(), 2);
        assert_eq!(cfg.prewarm[0].policy, Policy::Keep);
        assert_eq!(cfg.prewarm[1].policy, Policy::Once);
        assert_eq!(cfg.prewarm[1].interval, Duration::from_secs(86400));
    }

    #[test]
    fn bad_schedule_and_prewarm_values_are_named() {
        let err = Config::parse("[schedule]\nprewarm_bandwidth = \"30%\"\n").unwrap_err();
        assert!(err.contains("schedule.prewarm_bandwidth"), "{err}");
        let err = Config::parse("[schedule]\nbandwidth = \"fast\"\n").unwrap_err();
        assert!(err.contains("line 2") && err.contains("fast"), "{err}");
        let err = Config::parse("[[prewarm]]\nimage = \"Bad Ref\"\n").unwrap_err();
        assert!(
            err.contains("line 2") && err.contains("prewarm[0]"),
            "{err}"
        );
        let err = Config::parse(
            "[[prewarm]]\nimage = \"busybox\"\n[[prewarm]]\nimage = \"docker.io/library/busybox:latest\"\n",
        )
        .unwrap_err();
        assert!(err.contains("listed twice"), "{err}");
        let err = Config::parse("[[prewarm]]\nimage = \"a\"\npolicy = \"always\"\n").unwrap_err();
        assert!(err.contains("policy") && err.contains("line 3"), "{err}");
        let err = Config::parse("[p2p_gate]\nprobe = \"http\"\n").unwrap_err();
        assert!(err.contains("p2p_gate"), "{err}");
    }

    /// Each rule: a file, then fragments its error must contain (key, line, expected form).
    #[test]
    fn out_of_range_and_malformed_values_are_refused_with_the_expected_form() {
        let cases: &[(&str, &[&str])] = &[
            // Durations: ranges per key.
            ("[mirror]\nrequest_timeout = \"10000y\"\n", &["line 2: mirror.request_timeout: 10000y is out of range: expected a duration between 1s and 10m, like \"30s\""]),
            ("[mirror]\nrequest_timeout = \"500ms\"\n", &["mirror.request_timeout: 500ms is out of range"]),
            ("[server]\nshutdown_grace = \"2h\"\n", &["server.shutdown_grace", "between 0s and 1h"]),
            ("[server]\nnice = -21\n", &["line 2: server.nice: -21 is out of range", "-20 to 19"]),
            ("[containerd]\nconnect_timeout = \"1ms\"\n", &["containerd.connect_timeout", "between 10ms and 5m"]),
            ("[containerd]\nhealth_interval = \"0s\"\n", &["containerd.health_interval: 0s is out of range", "between 100ms and 1h"]),
            ("[mirror]\nheader_read_timeout = \"0s\"\n", &["mirror.header_read_timeout", "between 10ms and 10m"]),
            ("[mirror]\nkeep_partial = \"30s\"\n", &["mirror.keep_partial", "expected 0 (no limit) or a duration between 1m and 7d"]),
            ("[mirror]\nrequest_timeout = \"1d\"\n", &["mirror.request_timeout", "between 1s and 10m"]),
            ("[metrics]\nheader_read_timeout = \"0s\"\n", &["metrics.header_read_timeout", "between 10ms and 10m"]),
            ("[p2p_gate]\ninterval = \"0s\"\n", &["p2p_gate.interval", "between 10ms and 1h"]),
            ("[p2p_gate]\ntimeout = \"1h\"\n", &["p2p_gate.timeout", "between 10ms and 5m"]),
            ("[[prewarm]]\nimage = \"busybox\"\ninterval = \"0s\"\n", &["line 2: prewarm[0] (busybox): interval: 0s is out of range", "between 1s and 365d"]),
            ("[[prewarm]]\nimage = \"busybox\"\ntimeout = \"30d\"\n", &["prewarm[0] (busybox): timeout", "expected 0 (no limit) or a duration between 1s and 7d"]),
            ("[[prewarm]]\nimage = \"busybox\"\ndeadline = \"100d\"\n", &["prewarm[0] (busybox): deadline", "between 1s and 30d"]),
            // Durations: wrong forms.
            ("[mirror]\nrequest_timeout = 1979-05-27T07:32:00Z\n", &["line 2", "a date or time is not a duration: expected a duration like \"30s\""]),
            ("[mirror]\nrequest_timeout = { a = 1 }\n", &["line 2", "a table is not a duration: expected a duration like \"30s\""]),
            ("[mirror]\nrequest_timeout = 5\n", &["line 2", "5 has no unit", "\"5s\""]),
            ("[mirror]\nrequest_timeout = \"soon\"\n", &["line 2", "\"soon\" is not a duration", "like \"30s\""]),
            ("[mirror]\nrequest_timeout = \"99999999999999999999999y\"\n", &["line 2", "is not a duration"]),
            // Byte quantities and shares.
            ("[schedule]\nbandwidth = \"300%\"\n", &["line 2", "a percentage is accepted only by schedule.prewarm_bandwidth", "\"64MiB\""]),
            ("[schedule]\nbandwidth = 40000000\nprewarm_bandwidth = \"300%\"\n", &["line 3", "a percentage must be a whole number from 1% to 100%"]),
            ("[schedule]\nbandwidth = 40000000\nprewarm_bandwidth = \"0%\"\n", &["from 1% to 100%"]),
            ("[schedule]\nbandwidth = 99999999999999999999\n", &["line 2", "is too large: byte quantities go up to 18446744073709551615"]),
            ("[schedule]\nbandwidth = \"99999999999T\"\n", &["line 2", "is too large"]),
            ("[schedule]\nbandwidth = \"2TB\"\n", &["line 2: schedule.bandwidth: 2TB is out of range: expected 0 or a byte quantity between 1KB and 1TB"]),
                        ("[schedule]\nprewarm_bandwidth = \"5TB/s\"\n", &["schedule.prewarm_bandwidth"]),
            ("[schedule]\nprewarm_floor = 1\n", &["schedule.prewarm_floor"]),
            ("[schedule]\nlarge_image_size = \"10TB\" # big\n", &["schedule.large_image_size: 10TB is out of range", "between 1MB and 1TiB"]),
            ("[schedule]\nlane_order = \"random\"\n", &["line 2", "lane_order", "random", "shared", "per-node"]),
            // Whole numbers: the range, never "i128".
            ("[schedule]\nmax_blob_streams = 99999999999999999999\n", &["line 2", "max_blob_streams", "99999999999999999999 is out of range: expected a whole number from 0 to 4096"]),
            ("[schedule]\nmax_prewarm_jobs = -1\n", &["from 0 to 1024"]),
            ("[mirror]\nmax_connections = 0\n", &["from 1 to 65536"]),
            ("[mirror]\nretries = 99999999999\n", &["from 0 to 100"]),
            ("[mirror]\nretries = 2.5\n", &["2.5 is not a whole number"]),
            ("[mirror]\nretries = \"3\"\n", &["is a string", "without quotes"]),
            ("[metrics]\nmax_connections = 0\n", &["from 1 to 65536"]),
            ("[[prewarm]]\nimage = \"busybox\"\nbackoff_limit = 5000\n", &["from 0 to 1000"]),
            ("[[prewarm]]\nimage = \"busybox\"\npriority = 9999999999\n", &["from -2147483648 to 2147483647"]),
            // Paths that must be absolute.
            ("[server]\nsocket = \"pullgate.sock\"\n", &["line 2: server.socket: \"pullgate.sock\" is a relative path: expected an absolute path, like \"/run/pullgate/pullgate.sock\""]),
            ("[containerd]\nsocket = \"\"\n", &["containerd.socket: an empty path: expected an absolute path"]),
            ("[mirror]\nhosts_dir = \"certs.d\"\n", &["line 2: mirror.hosts_dir", "relative path"]),
            ("[mirror]\naddr = \"0.0.0.0:9783\"\n", &["line 2: mirror.addr", "not a loopback address"]),
            ("[mirror]\nunscheduled = \"sometimes\"\n", &["line 2", "unscheduled"]),
            ("[mirror]\nallow_uids = []\n", &["line 2: mirror.allow_uids: is empty", "[0]", "mirror.enabled = false"]),
            ("[mirror]\nallow_uids = [-1]\n", &["line 2", "allow_uids"]),
            ("[mirror]\nallow_uids = [4294967295]\n", &["line 2: mirror.allow_uids", "no user"]),
            ("[mirror]\nallow_uids = 0\n", &["line 2", "allow_uids"]),
            ("[fetch]\nhosts_dir = \"/etc/containerd/certs.d\"\n", &["line 2: fetch.hosts_dir: no longer exists", "use mirror.hosts_dir"]),
            ("[fetch]\nunpack_ahead = false\n", &["fetch.unpack_ahead", "containerd unpacks"]),
            ("[schedule]\nmax_unpacks = 2\n", &["line 2: schedule.max_unpacks: no longer exists"]),
            ("[api]\nsocket = \"api.sock\"\n", &["api.socket", "relative path"]),
            ("[[prewarm]]\nimage = \"busybox\"\ndocker_config = \"auth.json\"\n", &["prewarm[0] (busybox): docker_config: \"auth.json\" is a relative path"]),
        ];
        for (text, wants) in cases {
            let err = Config::parse(text).expect_err(text);
            for want in *wants {
                assert!(
                    err.contains(want),
                    "{text:?}\n  error: {err}\n  wanted: {want}"
                );
            }
            assert!(!err.contains("i128"), "{err}");
        }
    }

    #[test]
    fn the_bounds_themselves_are_accepted() {
        for text in [
            "[mirror]\nrequest_timeout = \"1s\"\naddr = \"127.0.0.2:80\"\n",
            "[mirror]\naddr = \"[::1]:9783\"\nunscheduled = \"bypass\"\n",
            "[server]\nshutdown_grace = \"0s\"\n",
            "[containerd]\nconnect_timeout = \"10ms\"\n",
            "[mirror]\nrequest_timeout = \"10m\"\n",
            "[schedule]\nbandwidth = \"1TB\"\nprewarm_floor = \"1KB\"\n",
            "[schedule]\nbandwidth = \"1KB/s\"\nprewarm_bandwidth = \"100%\"\n",
            "[schedule]\nlarge_image_size = \"1TiB\"\n",
            "[schedule]\nmax_blob_streams = 4096\n",
            "[mirror]\nretries = 0\nmax_connections = 65536\n",
            "[mirror]\nallow_uids = [0, 999, 4294967294]\n",
            "[api]\nenabled = false\nsocket = \"relative-but-unused.sock\"\n",
            "[[prewarm]]\nimage = \"busybox\"\ninterval = \"1s\"\ntimeout = \"0s\"\npriority = -5\n",
        ] {
            Config::parse(text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
        }
    }

    #[test]
    fn durations_and_sizes_show_in_config_notation() {
        use units::{show_bytes, show_duration};
        let cases = [
            (Duration::from_secs(7 * 86_400), "7d"),
            (Duration::from_secs(90), "90s"),
            (Duration::from_millis(1500), "1500ms"),
            (Duration::ZERO, "0s"),
        ];
        for (d, want) in cases {
            assert_eq!(show_duration(d), want);
        }
        for (b, want) in [
            (1000, "1KB"),
            (1 << 40, "1TiB"),
            (1_000_000_000_000, "1TB"),
            (7, "7"),
        ] {
            assert_eq!(show_bytes(b), want);
        }
    }
}
