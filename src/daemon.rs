//! `pullgate serve`: wires the front door, the pull path, containerd and the metrics endpoint,
//! and runs them until SIGTERM/SIGINT.
//!
//! The top with `cli`: may import any module.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use anyhow::Context as _;
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::api::{self, Api};
use crate::config::Config;
use crate::config::ProbeKind;
use crate::frontdoor::{self, CriProxy, FrontDoorThread, Priority};
use crate::health::Health;
use crate::jobs::JobBoard;
use crate::metrics::{self, ClassLabels, Metrics};
use crate::mirror::hosts_dir::HostsKeeper;
use crate::mirror::{Demand, Mirror};
use crate::prewarm::gate::P2pGate;
use crate::prewarm::Prewarmer;
use crate::pull::partials::Partials;
use crate::pull::{PullCoordinator, Puller, ScheduledPuller, Stager};
use crate::registry::{RegistryClient, RegistryConfig};
use crate::schedule::{Scheduler, Setup};
use crate::upstream::disk::Watch;
use crate::upstream::{Containerd, Leases};
use crate::vocab::Class;
use crate::watchdog::{self, Watchdog};

/// The pull path: the scheduled puller in front of containerd, and the mirror containerd fetches
/// through (when enabled), with pullgate's entries written into containerd's hosts.toml files.
async fn pull_path(
    cfg: &Config,
    containerd: &Containerd,
    metrics: &Arc<Metrics>,
    scheduler: &Arc<Scheduler>,
    stop: &CancellationToken,
) -> anyhow::Result<(Arc<dyn Puller>, Option<HostsKeeper>)> {
    let m = &cfg.mirror;
    let registry = RegistryClient::new(RegistryConfig {
        config_path: m.hosts_dir.clone(),
        request_timeout: m.request_timeout,
        user_agent: format!("pullgate/{}", env!("CARGO_PKG_VERSION")),
        mirror_credentials: m.mirror_credentials,
        skip_hosts: vec![m.addr.to_string(), cfg.metrics.addr.to_string()],
    });
    let demand = Demand::new();
    let mut hosts = None;
    let mut stager = None;
    if m.enabled {
        let mirror = Arc::new(
            Mirror::new(
                m.clone(),
                demand.clone(),
                Arc::new(registry.clone()),
                scheduler.clone(),
                metrics.clone(),
                crate::mirror::containerd_config::keepalive(&cfg.containerd.config_file),
            )
            .with_ingests(containerd.channel(), cfg.containerd.namespace.clone()),
        );
        mirror.also_own(cfg.metrics.addr);
        stager = Some(Stager::new(
            mirror.clone(),
            containerd.channel(),
            cfg.containerd.namespace.clone(),
        ));
        mirror
            .serve(stop.clone())
            .await
            .with_context(|| format!("cannot serve the registry mirror on {}", m.addr))?;
        info!(addr = %m.addr, hosts_dir = %m.hosts_dir.display(), "registry mirror serving containerd's fetches");
        if m.manage_hosts {
            let keeper = HostsKeeper::new(m.hosts_dir.clone(), m.url());
            keeper.ensure_all();
            hosts = Some(keeper);
        } else if !HostsKeeper::new(m.hosts_dir.clone(), m.url())
            .missing()
            .is_empty()
        {
            warn!(
                url = m.url(),
                "mirror.manage_hosts is off and some hosts.toml files do not list \
                  pullgate first: containerd fetches those registries unscheduled"
            );
        }
    } else {
        info!("mirror disabled: containerd fetches images itself, unpaced; pullgate still orders and admits pulls");
    }
    let partials = partials(cfg, containerd, metrics, stop);
    let puller = Arc::new(
        ScheduledPuller::new(
            scheduler.clone(),
            demand,
            registry,
            containerd.clone(),
            metrics.clone(),
        )
        .with_hosts(hosts.clone())
        .with_partials(partials.clone())
        .with_preempt(cfg.containerd.preempt_prewarm, &cfg.containerd.config_file)
        .with_stager(stager, cfg.containerd.stage_prewarm),
    );
    Ok((Arc::new(puller), hosts))
}

/// The leases that keep failed pulls' downloads (`None`: `mirror.keep_partial` is 0), and the
/// disk sampler that drops them when containerd's root runs low. An earlier process's leases are
/// sorted out off the start-up path.
fn partials(
    cfg: &Config,
    containerd: &Containerd,
    metrics: &Arc<Metrics>,
    stop: &CancellationToken,
) -> Option<Arc<Partials>> {
    let root = crate::upstream::disk::root(&cfg.containerd);
    let watch = || {
        Watch::new(
            root.clone(),
            cfg.mirror.keep_partial_min_free,
            metrics.clone(),
        )
    };
    let every = cfg
        .containerd
        .health_interval
        .min(crate::prewarm::gate::MAX_TICK);
    if cfg.mirror.keep_partial.is_zero() {
        let watch = watch();
        tokio::spawn(every_tick(every, stop.clone(), move || {
            watch.sample();
            async {}
        }));
        return None;
    }
    let partials = Arc::new(Partials::new(
        Leases::new(containerd.channel(), cfg.containerd.namespace.clone()),
        cfg.mirror.keep_partial,
        watch(),
        metrics.clone(),
    ));
    let (p, stop) = (partials.clone(), stop.clone());
    tokio::spawn(async move {
        p.adopt_stale().await;
        p.refill_spare();
        every_tick(every, stop, move || {
            let p = p.clone();
            async move { p.sweep().await }
        })
        .await
    });
    Some(partials)
}

/// Runs `f` every `every` until `stop`.
async fn every_tick<F, Fut>(every: std::time::Duration, stop: CancellationToken, f: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => f().await,
        }
    }
}

/// Reads the config again (file and flags) for SIGHUP.
pub type Reload = Box<dyn Fn() -> Result<Config, String> + Send>;

/// SIGTERM, SIGINT and SIGHUP, installed before anything starts so none is lost.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> anyhow::Result<Signals> {
        Ok(Signals {
            term: signal(SignalKind::terminate()).context("installing SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("installing SIGINT handler")?,
            hup: signal(SignalKind::hangup()).context("installing SIGHUP handler")?,
        })
    }
}

/// A socket pullgate serves, and whether it created the file (a socket systemd handed over
/// stays: calls queue on it until pullgate is back).
struct Served {
    path: std::path::PathBuf,
    owned: bool,
}

impl Drop for Served {
    fn drop(&mut self) {
        if self.owned {
            if let Err(e) = std::fs::remove_file(&self.path) {
                warn!(socket = %self.path.display(), error = %e, "could not remove socket");
            }
        }
    }
}

pub async fn run(cfg: Config, reload: Reload) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new());
    let containerd = Containerd::new(&cfg.containerd);
    let stop = CancellationToken::new();
    let mut signals = Signals::install()?;
    let dog = Arc::new(Watchdog::from_env());
    watchdog::fault::arm_if_asked();

    let board = JobBoard::new();
    let scheduler = scheduler(&cfg, &containerd, &board, &metrics, &stop);
    let (puller, hosts) = pull_path(&cfg, &containerd, &metrics, &scheduler, &stop).await?;
    let pulls = PullCoordinator::new(puller, metrics.clone(), board.clone());
    let health = health(&cfg, &containerd, &metrics, hosts);
    tokio::spawn(sample_loop(
        scheduler.clone(),
        board.clone(),
        metrics.clone(),
        stop.clone(),
    ));
    let metrics_task = serve_metrics(&cfg, &metrics, &health, &stop).await?;
    first_probe(&cfg, &health).await;
    tokio::spawn(probe_loop(
        health.clone(),
        cfg.containerd.health_interval,
        stop.clone(),
    ));

    let draining = CancellationToken::new();
    let prewarmer = Prewarmer::new(pulls.clone());
    let mut cri = serve_cri(&cfg, &pulls, &metrics, &draining).await?;
    let api_task = serve_api(&cfg, &pulls, &board, &prewarmer, &draining).await?;
    for path in frontdoor::activation::untaken() {
        warn!(socket = %path.display(),
              "systemd handed over a socket pullgate does not serve (check the unit's ListenStream= against server.socket and api.socket)");
    }
    health.serving.store(true, Ordering::SeqCst);
    dog.notify("READY=1");
    dog.start(&cfg, metrics, draining.clone())?;
    info!(socket = %cfg.server.socket.display(), upstream = %cfg.containerd.socket.display(),
          "serving CRI image service");
    if !cfg.prewarm.is_empty() {
        info!(images = cfg.prewarm.len(), "prewarm list loaded");
    }
    log_lane(&cfg.schedule);
    prewarmer.apply(&cfg.prewarm);
    let mut labels = NodeLabels {
        prewarmer: prewarmer.clone(),
        containerd: containerd.clone(),
        stop: stop.clone(),
        task: None,
    };
    if cfg.node_labels.enabled {
        labels.restart(&cfg.node_labels);
    }
    let mut running = cfg.clone();
    let name = loop {
        tokio::select! {
            r = &mut cri.server => break Err(joined(r).context("CRI server failed")),
            _ = signals.hup.recv() => {
                reload_config(&mut running, &reload, &scheduler, &prewarmer, &mut labels);
            }
            _ = signals.term.recv() => break Ok("SIGTERM"),
            _ = signals.int.recv() => break Ok("SIGINT"),
        }
    };
    let result = match name {
        Err(failed) => failed,
        Ok(name) => {
            health.serving.store(false, Ordering::SeqCst);
            dog.notify("STOPPING=1");
            info!(signal = name, grace = ?cfg.server.shutdown_grace, pulls_in_flight = pulls.in_flight(),
                  "shutting down: no new calls, waiting for calls in flight");
            drain(&cfg, &pulls, &draining, &mut cri.server).await
        }
    };
    prewarmer.stop();
    health.serving.store(false, Ordering::SeqCst);
    stop.cancel();
    if let Some(t) = metrics_task {
        let _ = t.await;
    }
    if let Some((t, socket)) = api_task {
        t.abort();
        drop(socket);
    }
    drop(cri);
    info!("stopped");
    result
}

type ServerTask = tokio_util::task::AbortOnDropHandle<anyhow::Result<()>>;

/// The CRI server's task, the thread it runs on and its socket; dropped in that order.
struct Cri {
    server: ServerTask,
    _thread: FrontDoorThread,
    _socket: Served,
}

/// Waits up to `server.shutdown_grace` for the CRI calls in flight once `draining` is cancelled.
async fn drain(
    cfg: &Config,
    pulls: &PullCoordinator,
    draining: &CancellationToken,
    server: &mut ServerTask,
) -> anyhow::Result<()> {
    draining.cancel();
    match tokio::time::timeout(cfg.server.shutdown_grace, server).await {
        Ok(r) => joined(r).context("CRI server failed while draining"),
        Err(_) => {
            warn!(
                pulls_in_flight = pulls.in_flight(),
                "grace period over: cutting the calls still in flight"
            );
            Ok(())
        }
    }
}

/// The scheduler, with the P2P gate it waits on.
fn scheduler(
    cfg: &Config,
    containerd: &Containerd,
    board: &Arc<JobBoard>,
    metrics: &Arc<Metrics>,
    stop: &CancellationToken,
) -> Arc<Scheduler> {
    let gate = match cfg.p2p_gate.probe {
        ProbeKind::None => P2pGate::always_open(),
        _ => P2pGate::spawn(cfg.p2p_gate.clone(), containerd.clone(), stop.clone()),
    };
    Scheduler::new(
        Setup {
            admission: crate::schedule::Admission::from(&cfg.schedule),
            limits: crate::schedule::Limits::from(&cfg.schedule),
            max_blob_streams: cfg.schedule.max_blob_streams,
            gate: gate.subscribe(),
        },
        board,
        metrics.clone(),
    )
}

/// What `/readyz` checks: containerd, and that containerd fetches through the mirror.
fn health(
    cfg: &Config,
    containerd: &Containerd,
    metrics: &Arc<Metrics>,
    hosts: Option<HostsKeeper>,
) -> Arc<Health> {
    let health = Arc::new(Health {
        metrics: metrics.clone(),
        containerd: containerd.clone(),
        serving: false.into(),
        hosts,
        containerd_config: (cfg.mirror.enabled
            && !cfg.containerd.config_file.as_os_str().is_empty())
        .then(|| {
            (
                cfg.containerd.config_file.clone(),
                cfg.mirror.hosts_dir.clone(),
            )
        }),
    });
    if let Some(problem) = health.mirror_problem() {
        warn!(problem, "containerd does not fetch through pullgate's mirror: pulls work, unscheduled; /readyz answers 503 until this is fixed");
    }
    health
}

async fn serve_metrics(
    cfg: &Config,
    metrics: &Arc<Metrics>,
    health: &Arc<Health>,
    stop: &CancellationToken,
) -> anyhow::Result<Option<tokio::task::JoinHandle<()>>> {
    if !cfg.metrics.enabled {
        return Ok(None);
    }
    let task = metrics::serve(&cfg.metrics, metrics.clone(), health.clone(), stop.clone())
        .await
        .with_context(|| format!("cannot serve metrics on {}", cfg.metrics.addr))?;
    info!(addr = %cfg.metrics.addr, "metrics, /healthz and /readyz served over HTTP");
    Ok(Some(task))
}

async fn first_probe(cfg: &Config, health: &Health) {
    match health.probe().await {
        Ok(v) => {
            info!(socket = %cfg.containerd.socket.display(), version = v, "containerd reachable")
        }
        Err(s) => warn!(socket = %cfg.containerd.socket.display(), error = s.message(),
                        "containerd not reachable yet; calls fail with UNAVAILABLE until it is"),
    }
}

/// The CRI socket, served on the front door's own thread until `draining` is cancelled.
async fn serve_cri(
    cfg: &Config,
    pulls: &Arc<PullCoordinator>,
    metrics: &Arc<Metrics>,
    draining: &CancellationToken,
) -> anyhow::Result<Cri> {
    let cri = frontdoor::socket::listen(&cfg.server.socket, cfg.server.socket_mode_bits())
        .await
        .context("cannot serve the CRI socket")?;
    let served = Served {
        path: cfg.server.socket.clone(),
        owned: cri.owned,
    };
    let front = front_door_thread(cfg.server.nice)?;
    // The passthrough channel is built on the front door's runtime, which then runs its
    // connection; pulls go back to this runtime.
    let proxy = {
        let main = tokio::runtime::Handle::current();
        let _on = front.handle().enter();
        CriProxy::new(
            Containerd::new(&cfg.containerd),
            pulls.clone(),
            main,
            metrics.clone(),
        )
    };
    let listener = cri
        .listener
        .into_std()
        .context("cannot hand the CRI socket to its thread")?;
    let shutdown = draining.clone().cancelled_owned();
    let server = front.spawn(async move {
        let listener = tokio::net::UnixListener::from_std(listener)?;
        frontdoor::serve(listener, proxy, shutdown).await?;
        anyhow::Ok(())
    });
    Ok(Cri {
        server,
        _thread: front,
        _socket: served,
    })
}

/// pullgate's own API socket, when enabled.
async fn serve_api(
    cfg: &Config,
    pulls: &Arc<PullCoordinator>,
    board: &Arc<JobBoard>,
    prewarmer: &Arc<Prewarmer>,
    draining: &CancellationToken,
) -> anyhow::Result<Option<(tokio::task::JoinHandle<()>, Served)>> {
    if !cfg.api.enabled {
        return Ok(None);
    }
    let bound = frontdoor::socket::listen(&cfg.api.socket, cfg.api.socket_mode_bits())
        .await
        .context("cannot serve the API socket")?;
    let served = Served {
        path: cfg.api.socket.clone(),
        owned: bound.owned,
    };
    let api = Api {
        coordinator: pulls.clone(),
        board: board.clone(),
        prewarmer: prewarmer.clone(),
    };
    info!(socket = %cfg.api.socket.display(), "serving pullgate's API");
    let shutdown = draining.clone().cancelled_owned();
    let listener = bound.listener;
    let task = tokio::spawn(async move {
        if let Err(e) = api::serve(listener, api, shutdown).await {
            warn!(error = %crate::errors::chain(&e), "API server failed");
        }
    });
    Ok(Some((task, served)))
}

/// The front door's thread, with what became of its CPU priority in the log.
fn front_door_thread(nice: i32) -> anyhow::Result<FrontDoorThread> {
    let (thread, priority) =
        FrontDoorThread::start(nice).context("cannot start the CRI front door's thread")?;
    match priority {
        Priority::Unchanged => {}
        Priority::Set(nice) => info!(nice, "CRI front door relays on its own thread"),
        Priority::Refused(nice, error) => warn!(
            nice,
            error,
            "cannot set the CRI front door thread's priority (server.nice; a negative value needs \
             CAP_SYS_NICE): kubelet's calls may wait behind busy cores while a big pull runs"
        ),
    }
    Ok(thread)
}

fn joined(r: Result<anyhow::Result<()>, tokio::task::JoinError>) -> anyhow::Result<()> {
    r.map_err(anyhow::Error::from).and_then(|r| r)
}

async fn probe_loop(health: Arc<Health>, every: std::time::Duration, stop: CancellationToken) {
    let mut was_up = None;
    // tokio's `Delay` ticks compute `now + period`, which overflows for absurd periods.
    let mut tick = tokio::time::interval(every.min(crate::prewarm::gate::MAX_TICK));
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

/// SIGHUP: the prewarm list, scheduling limits and node labels apply at once; other sections
/// need a restart (and say so). An invalid file is refused and the running config kept.
fn reload_config(
    running: &mut Config,
    reload: &Reload,
    scheduler: &Arc<Scheduler>,
    prewarmer: &Arc<Prewarmer>,
    labels: &mut NodeLabels,
) {
    let new = match reload() {
        Ok(c) => c,
        Err(e) => {
            error!(error = %e, "SIGHUP: config refused; the running config stays in force");
            return;
        }
    };
    // Destructured without `..`: a new section does not compile until it is handled here.
    let Config {
        server,
        containerd,
        metrics,
        log,
        mirror,
        schedule,
        api,
        p2p_gate,
        node_labels,
        prewarm,
    } = new;
    let mut needs_restart = Vec::new();
    let mut check = |name: &'static str, changed: bool| {
        if changed {
            needs_restart.push(name);
        }
    };
    check("server", server != running.server);
    check("containerd", containerd != running.containerd);
    check("metrics", metrics != running.metrics);
    check("log", log != running.log);
    check("mirror", mirror != running.mirror);
    check("api", api != running.api);
    check("p2p_gate", p2p_gate != running.p2p_gate);

    scheduler
        .bandwidth
        .set_limits(crate::schedule::Limits::from(&schedule));
    scheduler.streams.set_capacity(schedule.max_blob_streams);
    scheduler.set_admission(crate::schedule::Admission::from(&schedule));
    if schedule.lane_order != running.schedule.lane_order
        || schedule.node_name != running.schedule.node_name
    {
        log_lane(&schedule);
    }
    prewarmer.apply(&prewarm);
    let labels_changed = node_labels != running.node_labels;
    if labels_changed {
        labels.restart(&node_labels);
    }
    info!(
        prewarm_images = prewarm.len(),
        node_labels_changed = labels_changed,
        "SIGHUP: config reloaded (schedule, prewarm, node_labels)"
    );
    if !needs_restart.is_empty() {
        warn!(sections = ?needs_restart, "SIGHUP: changes to these sections apply at the next restart");
    }
    // What is in force: the reloaded parts from the new file, the rest as started.
    running.schedule = schedule;
    running.prewarm = prewarm;
    running.node_labels = node_labels;
}

/// The node-feature-discovery file's task, restarted when `[node_labels]` changes on SIGHUP.
struct NodeLabels {
    prewarmer: Arc<Prewarmer>,
    containerd: Containerd,
    stop: CancellationToken,
    task: Option<CancellationToken>,
}

impl NodeLabels {
    fn restart(&mut self, cfg: &crate::config::NodeLabelsConfig) {
        if let Some(t) = self.task.take() {
            t.cancel();
        }
        if !cfg.enabled {
            info!("node labels off");
            return;
        }
        let token = self.stop.child_token();
        tokio::spawn(crate::prewarm::labels::run(
            cfg.clone(),
            self.prewarmer.clone(),
            self.containerd.clone(),
            token.clone(),
        ));
        self.task = Some(token);
    }
}

/// Which order the large-image lane walks, and for which node: two nodes that should differ
/// (or agree) are told apart at 3 a.m. from this line.
fn log_lane(s: &crate::config::ScheduleConfig) {
    if s.large_image_size.0 == 0 {
        info!("large-image lane off");
        return;
    }
    match s.lane_order {
        crate::config::LaneOrderConfig::Shared => {
            info!(
                large_image_size = s.large_image_size.0,
                "large-image lane: one order on every node"
            )
        }
        crate::config::LaneOrderConfig::PerNode => info!(
            large_image_size = s.large_image_size.0,
            node_name = %s.node_name(),
            "large-image lane: this node's own order"
        ),
    }
}

/// Scheduling gauges and per-class rates, once a second.
async fn sample_loop(
    scheduler: Arc<Scheduler>,
    board: Arc<JobBoard>,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    let mut last = [0u64; 2];
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        scheduler.sample(&board);
        for (i, class) in [Class::Urgent, Class::Prewarm].into_iter().enumerate() {
            let now = scheduler.bandwidth.received(class);
            metrics
                .class_rate
                .get_or_create(&ClassLabels::new(class))
                .set((now - last[i]) as i64);
            last[i] = now;
        }
    }
}
