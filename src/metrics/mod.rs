//! Prometheus metrics and the HTTP endpoint that serves them with health and readiness.
//!
//! May import only `config` and `vocab`: readiness comes in through [`Readiness`].

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
    pub range_parts: Counter,
    pub fetch_fallbacks: Family<ReasonLabels, Counter>,
    pub queue_length: Family<ClassLabels, Gauge>,
    pub queue_wait: Family<ClassLabels, Histogram>,
    pub class_bytes: Family<ClassLabels, Counter>,
    pub class_rate: Family<ClassLabels, Gauge>,
    pub promotions: Counter,
    pub preemptions: Counter,
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
        let mut registry = Registry::with_prefix("pullgate");
        let pull_requests = Family::<ClassResultLabels, Counter>::default();
        registry.register(
            "pull_requests",
            "PullImage requests answered, by class and gRPC result",
            pull_requests.clone(),
        );
        // Pulls range from a cached hit (ms) to a multi-GiB image on a slow link (many minutes).
        let pull_duration = Family::<ClassLabels, Histogram>::new_with_constructor(|| {
            Histogram::new([
                0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
            ])
        });
        registry.register(
            "pull_duration_seconds",
            "Time from a PullImage request to its answer, by class",
            pull_duration.clone(),
        );
        let pulls_in_flight = Gauge::default();
        registry.register(
            "pulls_in_flight",
            "Upstream pulls currently running (merged requests count once)",
            pulls_in_flight.clone(),
        );
        let pull_requests_merged = Counter::default();
        registry.register(
            "pull_requests_merged",
            "PullImage requests that joined a pull already in flight",
            pull_requests_merged.clone(),
        );
        let upstream_pulls = Family::<ResultLabels, Counter>::default();
        registry.register(
            "upstream_pulls",
            "Pulls pullgate ran against containerd, by gRPC result (cancelled: every requester left)",
            upstream_pulls.clone(),
        );
        let cri_requests = Family::<CallLabels, Counter>::default();
        registry.register(
            "cri_requests",
            "gRPC calls received on the CRI socket, by method and gRPC code",
            cri_requests.clone(),
        );
        let upstream_up = Gauge::default();
        registry.register(
            "upstream_up",
            "1 when containerd answered the last health probe",
            upstream_up.clone(),
        );
        let fetched_bytes = Family::<SourceLabels, Counter>::default();
        registry.register(
            "fetched_bytes",
            "Blob bytes the mirror served to containerd, by where they came from (registry, mirror: an administrator's host)",
            fetched_bytes.clone(),
        );
        let mirror_requests = Family::<MirrorLabels, Counter>::default();
        registry.register(
            "mirror_requests",
            "Requests containerd made to pullgate's mirror, by kind and status class (a 404 sends containerd to its next host)",
            mirror_requests.clone(),
        );
        let mirror_unscheduled = Counter::default();
        registry.register(
            "mirror_unscheduled_blobs",
            "Blob requests served for pulls that did not come through pullgate's CRI socket (mirror.unscheduled)",
            mirror_unscheduled.clone(),
        );
        let mirror_refused_connections = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "mirror_refused_connections",
            "Mirror connections closed before a request was read: a uid not in mirror.allow_uids, a peer whose uid was not found, a full table of connections mid-request, or the longest-idle one closed to make room",
            mirror_refused_connections.clone(),
        );
        let blob_retries = Counter::default();
        registry.register(
            "blob_retries",
            "Blob streams the mirror resumed upstream with a Range after a cut or stall",
            blob_retries.clone(),
        );
        let digest_mismatches = Counter::default();
        registry.register(
            "mirror_digest_mismatches",
            "Blob responses the mirror cut before their last byte because upstream's bytes did not hash to the digest",
            digest_mismatches.clone(),
        );
        let rehashed_bytes = Counter::default();
        registry.register(
            "mirror_rehashed_bytes",
            "Bytes read upstream only to hash them, for containerd's Range requests past the mirror's last checkpoint of the blob",
            rehashed_bytes.clone(),
        );
        let parked_streams = Counter::default();
        registry.register(
            "mirror_parked_streams",
            "Prewarm blob streams whose upstream connection was closed while prewarm paused for a pod (reopened with a Range afterwards)",
            parked_streams.clone(),
        );
        let range_parts = Counter::default();
        registry.register(
            "mirror_range_parts",
            "Ranged parts the mirror fetched over extra connections, for hosts measured to cap each connection",
            range_parts.clone(),
        );
        let preemptions = Counter::default();
        registry.register(
            "prewarm_preemptions",
            "Prewarm pulls handed back from containerd while a pod's pull ran (containerd 2.x shares one download limit), forwarded again after",
            preemptions.clone(),
        );
        let fetch_fallbacks = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "fetch_fallbacks",
            "Pulls forwarded to containerd unresolved (containerd fetches them itself, not through the mirror's schedule), by reason",
            fetch_fallbacks.clone(),
        );
        let queue_length = Family::<ClassLabels, Gauge>::default();
        registry.register(
            "queue_length",
            "Jobs not yet fetching (waiting for the P2P gate, resolving, queued), by class",
            queue_length.clone(),
        );
        let queue_wait = Family::<ClassLabels, Histogram>::new_with_constructor(|| {
            Histogram::new([
                0.001, 0.01, 0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0,
            ])
        });
        registry.register(
            "queue_wait_seconds",
            "Time a job waited for its turn to fetch once resolved, by class at admission",
            queue_wait.clone(),
        );
        let class_bytes = Family::<ClassLabels, Counter>::default();
        registry.register(
            "class_bytes",
            "Blob bytes received from registries and mirrors, by class of the job",
            class_bytes.clone(),
        );
        let class_rate = Family::<ClassLabels, Gauge>::default();
        registry.register(
            "class_rate_bytes_per_second",
            "Receive rate over the last second, by class",
            class_rate.clone(),
        );
        let promotions = Counter::default();
        registry.register(
            "promotions",
            "Prewarm jobs promoted to urgent because a pod started waiting for them",
            promotions.clone(),
        );
        let prewarm_jobs = Family::<StateLabels, Gauge>::default();
        registry.register(
            "prewarm_jobs",
            "Live prewarm jobs by state",
            prewarm_jobs.clone(),
        );
        let p2p_gate_open = Gauge::default();
        registry.register(
            "p2p_gate_open",
            "1 when the P2P gate lets prewarm start",
            p2p_gate_open.clone(),
        );
        let lane_running = Gauge::default();
        registry.register(
            "lane_running",
            "Images fetching in the large-image lane (0 or 1)",
            lane_running.clone(),
        );
        let lane_waiting = Gauge::default();
        registry.register(
            "lane_waiting",
            "Large images waiting for the lane",
            lane_waiting.clone(),
        );
        let panics = Family::<TaskLabels, Counter>::default();
        registry.register(
            "panics",
            "Tasks that panicked (a bug in pullgate): a pull job's requesters got an internal error",
            panics.clone(),
        );
        let disk_free = Gauge::default();
        registry.register(
            "containerd_disk_free_bytes",
            "Bytes available on the filesystem of containerd's root",
            disk_free.clone(),
        );
        let disk_size = Gauge::default();
        registry.register(
            "containerd_disk_size_bytes",
            "Size of the filesystem of containerd's root",
            disk_size.clone(),
        );
        let disk_pressure = Gauge::default();
        registry.register(
            "disk_pressure",
            "1 when containerd's root has less free space than mirror.keep_partial_min_free \
             (failed pulls' downloads are not kept)",
            disk_pressure.clone(),
        );
        let kept_partials = Gauge::default();
        registry.register(
            "partial_leases",
            "Leases holding the downloads of failed or interrupted pulls for their next attempt",
            kept_partials.clone(),
        );
        let partials_dropped = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "partial_leases_dropped",
            "Leases of failed pulls deleted to free disk: disk_full (a pull hit ENOSPC), \
             low_disk (below mirror.keep_partial_min_free), stale (older attempts found at start)",
            partials_dropped.clone(),
        );
        for reason in DROP_REASONS {
            let _ = partials_dropped.get_or_create(&ReasonLabels { reason });
        }
        for task in ["pull", "prewarm"] {
            let _ = panics.get_or_create(&TaskLabels { task });
        }
        let watchdog_checks = Family::<ResultLabels, Counter>::default();
        registry.register(
            "watchdog_checks",
            "systemd watchdog self-checks of the CRI socket and the mirror, by result (failed: no ping sent)",
            watchdog_checks.clone(),
        );
        // Export both classes from the start, so dashboards and alerts see zeros, not gaps.
        for class in [Class::Urgent, Class::Prewarm] {
            let l = ClassLabels::new(class);
            let _ = pull_duration.get_or_create(&l);
            let _ = queue_length.get_or_create(&l);
            let _ = queue_wait.get_or_create(&l);
            let _ = class_bytes.get_or_create(&l);
            let _ = class_rate.get_or_create(&l);
        }
        // Series alerts compare with `increase(...) == 0` exist from the start: a series never
        // created would make such a rule empty, not zero.
        for reason in FALLBACK_REASONS {
            let _ = fetch_fallbacks.get_or_create(&ReasonLabels { reason });
        }
        for reason in MIRROR_REFUSAL_REASONS {
            let _ = mirror_refused_connections.get_or_create(&ReasonLabels { reason });
        }
        for kind in ["manifest", "blob"] {
            for status in ["2xx", "404", "5xx"] {
                let _ = mirror_requests.get_or_create(&MirrorLabels { kind, status });
            }
        }
        Metrics {
            registry,
            pull_requests,
            pull_duration,
            pulls_in_flight,
            pull_requests_merged,
            upstream_pulls,
            cri_requests,
            upstream_up,
            fetched_bytes,
            mirror_requests,
            mirror_unscheduled,
            mirror_refused_connections,
            blob_retries,
            digest_mismatches,
            rehashed_bytes,
            parked_streams,
            range_parts,
            fetch_fallbacks,
            queue_length,
            queue_wait,
            class_bytes,
            class_rate,
            promotions,
            preemptions,
            prewarm_jobs,
            p2p_gate_open,
            lane_running,
            lane_waiting,
            panics,
            watchdog_checks,
            disk_free,
            disk_size,
            disk_pressure,
            kept_partials,
            partials_dropped,
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
const CRI_METHODS: &[&str] = &[
    // ImageService
    "ListImages",
    "ImageStatus",
    "PullImage",
    "RemoveImage",
    "ImageFsInfo",
    // RuntimeService
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
            "ImageService" => CRI_METHODS[..5].contains(&method),
            "RuntimeService" => CRI_METHODS[5..].contains(&method),
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
