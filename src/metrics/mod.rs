//! Prometheus metrics and the HTTP endpoint that serves them with health and readiness.
//!
//! May import only `config`, `vocab` and `http_server`: readiness comes in through [`Readiness`].

mod http;

pub use self::http::{serve, Readiness};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tonic::Code;

use crate::vocab::Class;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClassLabels {
    pub class: &'static str,
}

impl ClassLabels {
    pub fn new(class: Class) -> Self {
        ClassLabels {
            class: class.as_str(),
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClassResultLabels {
    pub class: &'static str,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    pub source: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MirrorLabels {
    /// `manifest`, `blob`, `base`, `other`.
    pub kind: &'static str,
    /// `2xx`, `404`, `4xx`, `5xx`.
    pub status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    pub state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TaskLabels {
    pub task: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabels {
    pub method: String,
    pub code: &'static str,
}

/// Why a pull went to containerd unresolved (`pullgate_fetch_fallbacks_total{reason}`).
pub const FALLBACK_REASONS: [&str; 5] = [
    "unsupported",
    "unauthorized",
    "not_found",
    "registry",
    "reference",
];

/// Why the mirror refused or closed a connection (`pullgate_mirror_refused_connections_total`'s
/// `reason`), in the order of `mirror::access::Refusal`.
pub const MIRROR_REFUSAL_REASONS: [&str; 4] = ["uid", "unknown_peer", "cap", "idle_evicted"];

/// Every metric pullgate exports.
pub struct Metrics {
    registry: Registry,
    pub pull_requests: Family<ClassResultLabels, Counter>,
    pub pull_duration: Family<ClassLabels, Histogram>,
    pub pulls_in_flight: Gauge,
    pub pull_requests_merged: Counter,
    pub upstream_pulls: Family<ResultLabels, Counter>,
    pub cri_requests: Family<CallLabels, Counter>,
    pub upstream_up: Gauge,
    pub fetched_bytes: Family<SourceLabels, Counter>,
    pub mirror_requests: Family<MirrorLabels, Counter>,
    pub mirror_unscheduled: Counter,
    /// Mirror connections closed unread, by reason (`uid`, `unknown_peer`, `cap`, `idle_evicted`).
    pub mirror_refused_connections: Family<ReasonLabels, Counter>,
    pub blob_retries: Counter,
    pub digest_mismatches: Counter,
    pub rehashed_bytes: Counter,
    pub parked_streams: Counter,
    /// Seconds prewarm streams waited for containerd to read what it had received.
    pub backlog_waits: Counter<f64, std::sync::atomic::AtomicU64>,
    pub range_parts: Counter,
    pub fetch_fallbacks: Family<ReasonLabels, Counter>,
    pub queue_length: Family<ClassLabels, Gauge>,
    pub queue_wait: Family<ClassLabels, Histogram>,
    pub class_bytes: Family<ClassLabels, Counter>,
    pub class_rate: Family<ClassLabels, Gauge>,
    pub promotions: Counter,
    pub preemptions: Counter,
    pub staged_blobs: Counter,
    pub staged_fallbacks: Counter,
    pub prewarm_jobs: Family<StateLabels, Gauge>,
    pub p2p_gate_open: Gauge,
    pub lane_running: Gauge,
    pub lane_waiting: Gauge,
    /// Tasks that panicked (a bug), by task: `pull` (the job's requesters got INTERNAL),
    /// `prewarm` (the config entry's loop ended).
    pub panics: Family<TaskLabels, Counter>,
    /// systemd watchdog self-checks by result (`ok`: a ping was sent, `failed`: none).
    pub watchdog_checks: Family<ResultLabels, Counter>,
    /// containerd's root filesystem, sampled every `containerd.health_interval`.
    pub disk_free: Gauge,
    pub disk_size: Gauge,
    pub disk_pressure: Gauge,
    pub kept_partials: Gauge,
    pub partials_dropped: Family<ReasonLabels, Counter>,
}

/// Why kept partial downloads were dropped (`pullgate_partial_leases_dropped_total{reason}`).
pub const DROP_REASONS: [&str; 3] = ["disk_full", "low_disk", "stale"];

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut m = Metrics {
            registry: Registry::with_prefix("pullgate"),
            pull_requests: Default::default(),
            // Pulls range from a cached hit (ms) to a multi-GiB image on a slow link (many minutes).
            pull_duration: Family::<ClassLabels, Histogram>::new_with_constructor(|| {
                Histogram::new([
                    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
                    1800.0,
                ])
            }),
            pulls_in_flight: Default::default(),
            pull_requests_merged: Default::default(),
            upstream_pulls: Default::default(),
            cri_requests: Default::default(),
            upstream_up: Default::default(),
            fetched_bytes: Default::default(),
            mirror_requests: Default::default(),
            mirror_unscheduled: Default::default(),
            mirror_refused_connections: Default::default(),
            blob_retries: Default::default(),
            digest_mismatches: Default::default(),
            rehashed_bytes: Default::default(),
            parked_streams: Default::default(),
            backlog_waits: Default::default(),
            range_parts: Default::default(),
            preemptions: Default::default(),
            staged_blobs: Default::default(),
            staged_fallbacks: Default::default(),
            fetch_fallbacks: Default::default(),
            queue_length: Default::default(),
            queue_wait: Family::<ClassLabels, Histogram>::new_with_constructor(|| {
                Histogram::new([
                    0.001, 0.01, 0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0,
                ])
            }),
            class_bytes: Default::default(),
            class_rate: Default::default(),
            promotions: Default::default(),
            prewarm_jobs: Default::default(),
            p2p_gate_open: Default::default(),
            lane_running: Default::default(),
            lane_waiting: Default::default(),
            panics: Default::default(),
            disk_free: Default::default(),
            disk_size: Default::default(),
            disk_pressure: Default::default(),
            kept_partials: Default::default(),
            partials_dropped: Default::default(),
            watchdog_checks: Default::default(),
        };
        m.register_pulls();
        m.register_mirror();
        m.register_schedule();
        m.register_node();
        m.create_series();
        m
    }

    /// PullImage requests and the pulls behind them.
    fn register_pulls(&mut self) {
        let r = &mut self.registry;
        r.register(
            "pull_requests",
            "PullImage requests answered, by class and gRPC result",
            self.pull_requests.clone(),
        );
        r.register(
            "pull_duration_seconds",
            "Time from a PullImage request to its answer, by class",
            self.pull_duration.clone(),
        );
        r.register(
            "pulls_in_flight",
            "Upstream pulls currently running (merged requests count once)",
            self.pulls_in_flight.clone(),
        );
        r.register(
            "pull_requests_merged",
            "PullImage requests that joined a pull already in flight",
            self.pull_requests_merged.clone(),
        );
        r.register("upstream_pulls", "Pulls pullgate ran against containerd, by gRPC result (cancelled: every requester left)", self.upstream_pulls.clone());
        r.register(
            "cri_requests",
            "gRPC calls received on the CRI socket, by method and gRPC code",
            self.cri_requests.clone(),
        );
        r.register("fetch_fallbacks", "Pulls forwarded to containerd unresolved (containerd fetches them itself, not through the mirror's schedule), by reason", self.fetch_fallbacks.clone());
        r.register("prewarm_preemptions", "Prewarm pulls handed back from containerd while a pod's pull ran (containerd 2.x shares one download limit), forwarded again after", self.preemptions.clone());
        r.register("prewarm_staged_blobs", "Prewarm blobs pullgate wrote into containerd's content store before forwarding the pull (containerd.stage_prewarm), or found there", self.staged_blobs.clone());
        r.register("prewarm_stage_failures", "Prewarm blobs pullgate could not write into containerd's content store: containerd fetched them itself", self.staged_fallbacks.clone());
        r.register("panics", "Tasks that panicked (a bug in pullgate): a pull job's requesters got an internal error", self.panics.clone());
    }

    /// The mirror's requests, connections and bytes.
    fn register_mirror(&mut self) {
        let r = &mut self.registry;
        r.register("fetched_bytes", "Blob bytes the mirror served to containerd, by where they came from (registry, mirror: an administrator's host)", self.fetched_bytes.clone());
        r.register("mirror_requests", "Requests containerd made to pullgate's mirror, by kind and status class (a 404 sends containerd to its next host)", self.mirror_requests.clone());
        r.register("mirror_unscheduled_blobs", "Blob requests served for pulls that did not come through pullgate's CRI socket (mirror.unscheduled)", self.mirror_unscheduled.clone());
        r.register("mirror_refused_connections", "Mirror connections closed before a request was read: a uid not in mirror.allow_uids, a peer whose uid was not found, a full table of connections mid-request, or the longest-idle one closed to make room", self.mirror_refused_connections.clone());
        r.register(
            "blob_retries",
            "Blob streams the mirror resumed upstream with a Range after a cut or stall",
            self.blob_retries.clone(),
        );
        r.register("mirror_digest_mismatches", "Blob responses the mirror cut before their last byte because upstream's bytes did not hash to the digest", self.digest_mismatches.clone());
        r.register("mirror_rehashed_bytes", "Bytes read upstream only to hash them, for containerd's Range requests past the mirror's last checkpoint of the blob", self.rehashed_bytes.clone());
        r.register("mirror_parked_streams", "Prewarm blob streams whose upstream connection was closed while prewarm paused for a pod (reopened with a Range afterwards)", self.parked_streams.clone());
        r.register("mirror_prewarm_backlog_wait_seconds", "Time prewarm blob streams waited for containerd to read what its socket had already received (kept under 1 MiB, so a pause for a pod leaves containerd little prewarm to write)", self.backlog_waits.clone());
        r.register("mirror_range_parts", "Ranged parts the mirror fetched over extra connections, for hosts measured to cap each connection", self.range_parts.clone());
    }

    /// The scheduler's queues, classes and lane.
    fn register_schedule(&mut self) {
        let r = &mut self.registry;
        r.register(
            "queue_length",
            "Jobs not yet fetching (waiting for the P2P gate, resolving, queued), by class",
            self.queue_length.clone(),
        );
        r.register(
            "queue_wait_seconds",
            "Time a job waited for its turn to fetch once resolved, by class at admission",
            self.queue_wait.clone(),
        );
        r.register(
            "class_bytes",
            "Blob bytes received from registries and mirrors, by class of the job",
            self.class_bytes.clone(),
        );
        r.register(
            "class_rate_bytes_per_second",
            "Receive rate over the last second, by class",
            self.class_rate.clone(),
        );
        r.register(
            "promotions",
            "Prewarm jobs promoted to urgent because a pod started waiting for them",
            self.promotions.clone(),
        );
        r.register(
            "prewarm_jobs",
            "Live prewarm jobs by state",
            self.prewarm_jobs.clone(),
        );
        r.register(
            "p2p_gate_open",
            "1 when the P2P gate lets prewarm start",
            self.p2p_gate_open.clone(),
        );
        r.register(
            "lane_running",
            "Images fetching in the large-image lane (0 or 1)",
            self.lane_running.clone(),
        );
        r.register(
            "lane_waiting",
            "Large images waiting for the lane",
            self.lane_waiting.clone(),
        );
    }

    /// containerd's health and disk, the watchdog and kept partial downloads.
    fn register_node(&mut self) {
        let r = &mut self.registry;
        r.register(
            "upstream_up",
            "1 when containerd answered the last health probe",
            self.upstream_up.clone(),
        );
        r.register("watchdog_checks", "systemd watchdog self-checks of the CRI socket and the mirror, by result (failed: no ping sent)", self.watchdog_checks.clone());
        r.register(
            "containerd_disk_free_bytes",
            "Bytes available on the filesystem of containerd's root",
            self.disk_free.clone(),
        );
        r.register(
            "containerd_disk_size_bytes",
            "Size of the filesystem of containerd's root",
            self.disk_size.clone(),
        );
        r.register(
            "disk_pressure",
            "1 when containerd's root has less free space than mirror.keep_partial_min_free \
             (failed pulls' downloads are not kept)",
            self.disk_pressure.clone(),
        );
        r.register(
            "partial_leases",
            "Leases holding the downloads of failed or interrupted pulls for their next attempt",
            self.kept_partials.clone(),
        );
        r.register(
            "partial_leases_dropped",
            "Leases of failed pulls deleted to free disk: disk_full (a pull hit ENOSPC), \
             low_disk (below mirror.keep_partial_min_free), stale (older attempts found at start)",
            self.partials_dropped.clone(),
        );
    }

    /// Series that exist from the start, zeros rather than gaps.
    fn create_series(&self) {
        for reason in DROP_REASONS {
            let _ = self
                .partials_dropped
                .get_or_create(&ReasonLabels { reason });
        }
        for task in ["pull", "prewarm"] {
            let _ = self.panics.get_or_create(&TaskLabels { task });
        }
        // Export both classes from the start, so dashboards and alerts see zeros, not gaps.
        for class in [Class::Urgent, Class::Prewarm] {
            let l = ClassLabels::new(class);
            let _ = self.pull_duration.get_or_create(&l);
            let _ = self.queue_length.get_or_create(&l);
            let _ = self.queue_wait.get_or_create(&l);
            let _ = self.class_bytes.get_or_create(&l);
            let _ = self.class_rate.get_or_create(&l);
        }
        // Series alerts compare with `increase(...) == 0` exist from the start: a series never
        // created would make such a rule empty, not zero.
        for reason in FALLBACK_REASONS {
            let _ = self.fetch_fallbacks.get_or_create(&ReasonLabels { reason });
        }
        for reason in MIRROR_REFUSAL_REASONS {
            let _ = self
                .mirror_refused_connections
                .get_or_create(&ReasonLabels { reason });
        }
        for kind in ["manifest", "blob"] {
            for status in ["2xx", "404", "5xx"] {
                let _ = self
                    .mirror_requests
                    .get_or_create(&MirrorLabels { kind, status });
            }
        }
    }

    /// The metrics in Prometheus text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }

    pub fn record_call(&self, method: &str, code: Code) {
        self.cri_requests
            .get_or_create(&CallLabels {
                method: method_label(method).to_string(),
                code: code_label(code),
            })
            .inc();
    }
}

/// A gRPC code as a metric label, e.g. `not_found`.
pub fn code_label(code: Code) -> &'static str {
    match code {
        Code::Ok => "ok",
        Code::Cancelled => "cancelled",
        Code::Unknown => "unknown",
        Code::InvalidArgument => "invalid_argument",
        Code::DeadlineExceeded => "deadline_exceeded",
        Code::NotFound => "not_found",
        Code::AlreadyExists => "already_exists",
        Code::PermissionDenied => "permission_denied",
        Code::ResourceExhausted => "resource_exhausted",
        Code::FailedPrecondition => "failed_precondition",
        Code::Aborted => "aborted",
        Code::OutOfRange => "out_of_range",
        Code::Unimplemented => "unimplemented",
        Code::Internal => "internal",
        Code::Unavailable => "unavailable",
        Code::DataLoss => "data_loss",
        Code::Unauthenticated => "unauthenticated",
    }
}

/// Methods of the CRI `ImageService` and `RuntimeService` (k8s.io/cri-api v1, also served as
/// `v1alpha2` by containerd 1.6), the only paths that get their own metric label.
const IMAGE_METHODS: &[&str] = &[
    "ListImages",
    "ImageStatus",
    "PullImage",
    "RemoveImage",
    "ImageFsInfo",
];

const RUNTIME_METHODS: &[&str] = &[
    "Version",
    "RunPodSandbox",
    "StopPodSandbox",
    "RemovePodSandbox",
    "PodSandboxStatus",
    "ListPodSandbox",
    "CreateContainer",
    "StartContainer",
    "StopContainer",
    "RemoveContainer",
    "ListContainers",
    "ContainerStatus",
    "UpdateContainerResources",
    "ReopenContainerLog",
    "ExecSync",
    "Exec",
    "Attach",
    "PortForward",
    "ContainerStats",
    "ListContainerStats",
    "PodSandboxStats",
    "ListPodSandboxStats",
    "UpdateRuntimeConfig",
    "Status",
    "CheckpointContainer",
    "GetContainerEvents",
    "ListMetricDescriptors",
    "ListPodSandboxMetrics",
    "RuntimeConfig",
    "UpdatePodSandboxResources",
];

/// The method label of a gRPC path. Any client may send any path; only the known CRI methods
/// become labels of their own, everything else is `other`, so no client can grow the metric's
/// cardinality.
fn method_label(path: &str) -> &str {
    let known = path
        .strip_prefix("/runtime.")
        .and_then(|p| p.split_once('.'))
        .filter(|(version, _)| matches!(*version, "v1" | "v1alpha2"))
        .and_then(|(_, rest)| rest.split_once('/'))
        .is_some_and(|(service, method)| match service {
            "ImageService" => IMAGE_METHODS.contains(&method),
            "RuntimeService" => RUNTIME_METHODS.contains(&method),
            _ => false,
        });
    if known {
        path
    } else {
        "other"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn method_labels_are_bounded() {
        for (path, label) in [
            (
                "/runtime.v1.ImageService/PullImage",
                "/runtime.v1.ImageService/PullImage",
            ),
            (
                "/runtime.v1.ImageService/ImageFsInfo",
                "/runtime.v1.ImageService/ImageFsInfo",
            ),
            (
                "/runtime.v1alpha2.ImageService/ListImages",
                "/runtime.v1alpha2.ImageService/ListImages",
            ),
            (
                "/runtime.v1.RuntimeService/Version",
                "/runtime.v1.RuntimeService/Version",
            ),
            (
                "/runtime.v1.RuntimeService/ListContainers",
                "/runtime.v1.RuntimeService/ListContainers",
            ),
            // An ImageService path with a RuntimeService method, and the other way round.
            ("/runtime.v1.ImageService/Version", "other"),
            ("/runtime.v1.RuntimeService/PullImage", "other"),
            // Well-formed but unknown: before, each of these became a series of its own.
            ("/runtime.v1.ImageService/PullImage2", "other"),
            ("/runtime.v1.X/Y", "other"),
            ("/runtime.v9.ImageService/PullImage", "other"),
            ("/containerd.services.version.v1.Version/Version", "other"),
            ("/pullgate.v1.Pullgate/Submit", "other"),
            ("/runtime.v1.ImageService/../../etc", "other"),
            ("/runtime.v1.ImageService/PullImage/", "other"),
            ("runtime.v1.ImageService/PullImage", "other"),
            ("", "other"),
        ] {
            assert_eq!(method_label(path), label, "{path}");
        }
        let long = format!("/runtime.v1.X/{}", "a".repeat(200));
        assert_eq!(method_label(&long), "other");
    }

    #[test]
    fn unknown_methods_share_one_series() {
        let m = Metrics::new();
        for i in 0..50 {
            m.record_call(&format!("/runtime.v1.Fake/M{i}"), Code::Unimplemented);
        }
        let text = m.encode();
        let series = text
            .lines()
            .filter(|l| l.starts_with("pullgate_cri_requests_total{"))
            .collect::<Vec<_>>();
        assert_eq!(
            series,
            ["pullgate_cri_requests_total{method=\"other\",code=\"unimplemented\"} 50"],
            "{text}"
        );
    }

    #[test]
    fn encodes_registered_metrics() {
        let m = Metrics::new();
        m.record_call("/runtime.v1.ImageService/ListImages", Code::Ok);
        m.pull_requests
            .get_or_create(&ClassResultLabels {
                class: Class::Urgent.as_str(),
                result: "ok",
            })
            .inc();
        let text = m.encode();
        assert!(text.contains(
            "pullgate_cri_requests_total{method=\"/runtime.v1.ImageService/ListImages\",code=\"ok\"} 1"
        ), "{text}");
        assert!(
            text.contains("pullgate_pull_requests_total{class=\"urgent\",result=\"ok\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE pullgate_pull_duration_seconds histogram"),
            "{text}"
        );
    }
}
