//! `pullgate status`: one screen on whether this node's image path goes through pullgate and
//! works: the daemon, containerd, kubelet's image endpoint, containerd's hosts.toml files, the
//! P2P gate, the jobs and the last failures. Every check reads what the component itself reads
//! (its socket, its config file, its process's flags); a problem makes the exit code 1.
//!
//! May import `api`, `config`, `mirror` (its hosts.toml checks), `upstream`, `proto` and
//! `small_file`.

pub mod kubelet;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::Serialize;

use crate::config::Config;
use crate::mirror::hosts_dir::HostsKeeper;
use crate::upstream::Containerd;

/// Each probe's bound: a status screen answers even with a component hung.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);
/// Failed jobs shown.
const LAST_ERRORS: usize = 5;

#[derive(Debug, Serialize)]
pub struct Report {
    pub version: &'static str,
    pub ok: bool,
    /// What is wrong, one sentence each, saying what to check.
    pub problems: Vec<String>,
    pub daemon: Daemon,
    pub containerd: ContainerdState,
    /// `None`: no kubelet on this node (no process, no config file).
    pub kubelet: Option<KubeletState>,
    pub mirror: MirrorState,
    pub disk: DiskState,
    /// `None`: unknown (pullgate's metrics not reachable).
    pub p2p_gate_open: Option<bool>,
    /// Live jobs by class, then state.
    pub jobs: BTreeMap<String, BTreeMap<String, usize>>,
    pub last_errors: Vec<JobError>,
}

#[derive(Debug, Serialize)]
pub struct Daemon {
    pub cri_socket: String,
    pub api_reachable: bool,
    /// `/readyz`: `None` when the HTTP endpoint is off or unreachable.
    pub ready: Option<bool>,
    pub ready_detail: String,
}

#[derive(Debug, Serialize)]
pub struct ContainerdState {
    pub socket: String,
    pub version: Option<String>,
    pub error: Option<String>,
    pub snapshotter: Option<String>,
}

/// containerd's root filesystem, as the daemon samples it.
#[derive(Debug, Serialize)]
pub struct DiskState {
    pub root: String,
    pub free_bytes: Option<u64>,
    pub size_bytes: Option<u64>,
    /// `mirror.keep_partial_min_free` in bytes of this filesystem.
    pub min_free_bytes: Option<u64>,
    /// Below the threshold: failed pulls' downloads are not kept.
    pub pressure: bool,
    pub error: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct KubeletState {
    pub source: String,
    pub image_endpoint: Option<String>,
    pub uses_pullgate: bool,
}

#[derive(Debug, Serialize)]
pub struct MirrorState {
    pub enabled: bool,
    pub url: String,
    pub hosts_dir: String,
    /// Why containerd's config does not read `hosts_dir`, if it does not.
    pub config_problem: Option<String>,
    /// hosts.toml files that do not list pullgate first.
    pub files_not_first: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct JobError {
    pub id: u64,
    pub image: String,
    pub class: String,
    pub message: String,
}

/// Gathers the report; `kubelet_config` is read when no running kubelet names another.
pub async fn gather(cfg: &Config, kubelet_config: &Path) -> Report {
    let mut problems = Vec::new();

    let containerd = Containerd::new(&cfg.containerd);
    let (version, error) = match containerd.version(PROBE_TIMEOUT).await {
        Ok(v) => (Some(v), None),
        Err(s) => {
            problems.push(format!(
                "containerd does not answer at {}: {} (systemctl status containerd)",
                cfg.containerd.socket.display(),
                s.message()
            ));
            (None, Some(s.message().to_string()))
        }
    };
    let containerd = ContainerdState {
        socket: cfg.containerd.socket.display().to_string(),
        version,
        error,
        snapshotter: crate::mirror::containerd_config::snapshotter(&cfg.containerd.config_file),
    };

    let (api_reachable, jobs, last_errors) = api_jobs(cfg, &mut problems).await;
    let (ready, ready_detail, p2p_gate_open) = http_state(cfg, &mut problems).await;
    let daemon = Daemon {
        cri_socket: cfg.server.socket.display().to_string(),
        api_reachable,
        ready,
        ready_detail,
    };

    let kubelet = kubelet::endpoint(kubelet_config).map(|e| {
        let uses_pullgate = e
            .image_endpoint
            .as_deref()
            .is_some_and(|ep| kubelet::names_socket(ep, &cfg.server.socket));
        if !uses_pullgate {
            problems.push(format!(
                "kubelet's image endpoint is {} ({}), not pullgate's socket unix://{}",
                e.image_endpoint
                    .as_deref()
                    .unwrap_or("not set (containerd's)"),
                e.source,
                cfg.server.socket.display()
            ));
        }
        KubeletState {
            source: e.source,
            image_endpoint: e.image_endpoint,
            uses_pullgate,
        }
    });

    let mirror = mirror_state(cfg, &mut problems);
    let disk = disk_state(cfg, &mut problems);
    Report {
        version: env!("CARGO_PKG_VERSION"),
        ok: problems.is_empty(),
        problems,
        daemon,
        containerd,
        kubelet,
        mirror,
        disk,
        p2p_gate_open,
        jobs,
        last_errors,
    }
}

type Jobs = BTreeMap<String, BTreeMap<String, usize>>;

async fn api_jobs(cfg: &Config, problems: &mut Vec<String>) -> (bool, Jobs, Vec<JobError>) {
    let mut by_class = Jobs::new();
    if !cfg.api.enabled {
        return (false, by_class, vec![]);
    }
    let listed = tokio::time::timeout(PROBE_TIMEOUT, async {
        let mut c = crate::api::client::connect(&cfg.api.socket).await?;
        c.list(crate::proto::pullgate::v1::ListRequest { all: true })
            .await
            .map(|r| r.into_inner().jobs)
            .map_err(|s| s.message().to_string())
    })
    .await
    .unwrap_or_else(|_| Err("no answer".into()));
    let mut jobs = match listed {
        Ok(j) => j,
        Err(e) => {
            problems.push(format!(
                "pullgate's API does not answer at {}: {e} (systemctl status pullgate)",
                cfg.api.socket.display()
            ));
            return (false, by_class, vec![]);
        }
    };
    for j in &jobs {
        if !matches!(j.state.as_str(), "done" | "failed" | "cancelled") {
            *by_class
                .entry(j.class.clone())
                .or_default()
                .entry(j.state.clone())
                .or_default() += 1;
        }
    }
    jobs.retain(|j| j.state == "failed");
    jobs.sort_by_key(|j| std::cmp::Reverse((j.created_unix, j.id)));
    let errors = jobs
        .into_iter()
        .take(LAST_ERRORS)
        .map(|j| JobError {
            id: j.id,
            image: j.image,
            class: j.class,
            message: j.message,
        })
        .collect();
    (true, by_class, errors)
}

/// `/readyz` and the P2P gate from `/metrics`.
async fn http_state(
    cfg: &Config,
    problems: &mut Vec<String>,
) -> (Option<bool>, String, Option<bool>) {
    if !cfg.metrics.enabled {
        return (None, "metrics endpoint disabled".into(), None);
    }
    let addr = cfg.metrics.addr;
    let (ready, detail) = match http_get(addr, "/readyz").await {
        Ok((200, body)) => (Some(true), body.trim().to_string()),
        Ok((_, body)) => {
            problems.push(format!("pullgate is not ready: {}", body.trim()));
            (Some(false), body.trim().to_string())
        }
        Err(e) => {
            problems.push(format!("pullgate's /readyz at {addr} does not answer: {e}"));
            (None, e)
        }
    };
    let gate = match http_get(addr, "/metrics").await {
        Ok((200, body)) => body
            .lines()
            .find_map(|l| l.strip_prefix("pullgate_p2p_gate_open "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .map(|v| v > 0.0),
        _ => None,
    };
    (ready, detail, gate)
}

fn disk_state(cfg: &Config, problems: &mut Vec<String>) -> DiskState {
    use crate::upstream::disk;
    let root = disk::root(&cfg.containerd);
    let mut state = DiskState {
        root: root.display().to_string(),
        free_bytes: None,
        size_bytes: None,
        min_free_bytes: None,
        pressure: false,
        error: None,
    };
    match disk::room(&root) {
        Ok(r) => {
            let min = cfg.mirror.keep_partial_min_free.of(r.size);
            state.free_bytes = Some(r.free);
            state.size_bytes = Some(r.size);
            state.min_free_bytes = Some(min);
            state.pressure = r.pressure(cfg.mirror.keep_partial_min_free);
            if state.pressure {
                problems.push(format!(
                    "containerd's disk {} has {} free of {} (below mirror.keep_partial_min_free, \
                     {}): failed pulls start over; free space (crictl rmi --prune)",
                    state.root,
                    disk::human(r.free),
                    disk::human(r.size),
                    disk::human(min)
                ));
            }
        }
        Err(e) => state.error = Some(e.to_string()),
    }
    state
}

fn mirror_state(cfg: &Config, problems: &mut Vec<String>) -> MirrorState {
    let m = &cfg.mirror;
    let mut state = MirrorState {
        enabled: m.enabled,
        url: m.url(),
        hosts_dir: m.hosts_dir.display().to_string(),
        config_problem: None,
        files_not_first: vec![],
    };
    if !m.enabled {
        return state;
    }
    if let Err(e) =
        crate::mirror::containerd_config::check(&cfg.containerd.config_file, &m.hosts_dir)
    {
        problems.push(e.clone());
        state.config_problem = Some(e);
    }
    state.files_not_first = HostsKeeper::new(m.hosts_dir.clone(), m.url())
        .missing()
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    if !state.files_not_first.is_empty() {
        problems.push(format!(
            "these hosts.toml files do not send containerd through pullgate first: {} \
             (pullgate mirror-hosts --write)",
            state.files_not_first.join(", ")
        ));
    }
    state
}

/// A GET of pullgate's own metrics endpoint (loopback, never through a proxy): status code and
/// body.
async fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(PROBE_TIMEOUT)
        .build()
        .map_err(|e| e.to_string())?;
    let answer = client
        .get(format!("http://{addr}{path}"))
        .send()
        .await
        .map_err(|e| {
            if e.is_timeout() {
                "no answer".into()
            } else {
                e.to_string()
            }
        })?;
    let code = answer.status().as_u16();
    let body = answer.text().await.map_err(|e| e.to_string())?;
    Ok((code, body))
}

/// The screen: one line per part of the node, then the last errors and the problems.
pub fn render(r: &Report) -> String {
    let verdict = if r.ok {
        "OK".to_string()
    } else {
        format!("{} PROBLEM(S)", r.problems.len())
    };
    let gate = match r.p2p_gate_open {
        Some(true) => "open",
        Some(false) => "closed (prewarm waits; pods do not)",
        None => "unknown",
    };
    let mut lines = vec![
        format!("pullgate {}: {verdict}", r.version),
        daemon_line(&r.daemon),
        containerd_line(&r.containerd),
        kubelet_line(r.kubelet.as_ref()),
        disk_line(&r.disk),
        mirror_line(&r.mirror),
        format!("  p2p gate    {gate}"),
        format!("  jobs        {}", jobs_text(&r.jobs)),
    ];
    for (i, e) in r.last_errors.iter().enumerate() {
        let label = if i == 0 { "last errors" } else { "" };
        lines.push(format!(
            "  {label:<11} #{} {} ({}): {}",
            e.id, e.image, e.class, e.message
        ));
    }
    if !r.problems.is_empty() {
        lines.push("problems:".into());
        lines.extend(r.problems.iter().map(|p| format!("  - {p}")));
    }
    lines.join("\n") + "\n"
}

/// Live jobs as `class: n state, ...; class: ...`.
fn jobs_text(jobs: &BTreeMap<String, BTreeMap<String, usize>>) -> String {
    if jobs.is_empty() {
        return "none running".into();
    }
    jobs.iter()
        .map(|(class, states)| {
            let s: Vec<String> = states.iter().map(|(st, n)| format!("{n} {st}")).collect();
            format!("{class}: {}", s.join(", "))
        })
        .collect::<Vec<_>>()
        .join("; ")
}

fn daemon_line(d: &Daemon) -> String {
    let ready = match d.ready {
        Some(true) => "ready".to_string(),
        Some(false) => format!("NOT READY: {}", d.ready_detail),
        None => format!("readiness unknown ({})", d.ready_detail),
    };
    let api = if d.api_reachable {
        "API answers"
    } else {
        "API unreachable"
    };
    format!("  daemon      {}, {ready}, {api}", d.cri_socket)
}

fn containerd_line(c: &ContainerdState) -> String {
    let snap = c
        .snapshotter
        .as_deref()
        .unwrap_or("unknown (config unreadable)");
    match &c.version {
        Some(v) => format!("  containerd  {v} at {}, snapshotter {snap}", c.socket),
        None => {
            let err = c.error.as_deref().unwrap_or("");
            format!("  containerd  UNREACHABLE at {}: {err}", c.socket)
        }
    }
}

fn kubelet_line(k: Option<&KubeletState>) -> String {
    let Some(k) = k else {
        return "  kubelet     not found on this node (no process, no config file)".into();
    };
    let ep = k
        .image_endpoint
        .as_deref()
        .unwrap_or("not set (uses containerd)");
    let verdict = if k.uses_pullgate {
        "pullgate"
    } else {
        "NOT pullgate"
    };
    format!(
        "  kubelet     image endpoint {ep} ({}): {verdict}",
        k.source
    )
}

fn disk_line(d: &DiskState) -> String {
    let (Some(free), Some(size)) = (d.free_bytes, d.size_bytes) else {
        let err = d.error.as_deref().unwrap_or("");
        return format!("  disk        unreadable at {}: {err}", d.root);
    };
    let h = crate::upstream::disk::human;
    let verdict = if d.pressure {
        "LOW: failed pulls' downloads are not kept"
    } else {
        "room for partial downloads"
    };
    format!(
        "  disk        {} free of {} at {} (keeps partials above {}): {verdict}",
        h(free),
        h(size),
        d.root,
        h(d.min_free_bytes.unwrap_or(0))
    )
}

fn mirror_line(m: &MirrorState) -> String {
    if !m.enabled {
        return "  mirror      off: containerd fetches by itself, unpaced".into();
    }
    let files = if m.files_not_first.is_empty() {
        "every hosts.toml lists it first".to_string()
    } else {
        format!(
            "{} hosts.toml file(s) do NOT list it first",
            m.files_not_first.len()
        )
    };
    let config = match &m.config_problem {
        None => format!("containerd reads {}", m.hosts_dir),
        Some(_) => format!("containerd does NOT read {}", m.hosts_dir),
    };
    format!("  mirror      {}: {config}, {files}", m.url)
}
