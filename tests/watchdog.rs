//! systemd's watchdog protocol as pullgate speaks it, against a real notify socket: READY=1,
//! then WATCHDOG=1 every third of WATCHDOG_USEC while pullgate's own doors answer; pings go on
//! while containerd is stopped and stop when pullgate's main runtime is wedged or the process
//! is stopped. A small supervisor stands in for systemd (kill when the pings stop, restart),
//! and the stall a wedge costs the node's pulls is measured and bounded.

mod common;

use parking_lot::Mutex;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::daemon::Pullgate;
use common::*;

const PERIOD: Duration = Duration::from_secs(1);
/// Wedge to first successful pull, both through pullgate and straight to containerd:
/// detection (PERIOD) + kill + restart + pull, with room for a loaded 2-core machine.
const STALL_BOUND: Duration = Duration::from_secs(15);

/// Every datagram received on the notify socket, with when it came.
#[derive(Clone, Default)]
struct Heard(Arc<Mutex<Vec<(Instant, String)>>>);

impl Heard {
    fn listen(path: &Path) -> Heard {
        let socket = tokio::net::UnixDatagram::bind(path).unwrap();
        let heard = Heard::default();
        let h = heard.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            while let Ok(n) = socket.recv(&mut buf).await {
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                h.0.lock().push((Instant::now(), text));
            }
        });
        heard
    }

    fn times(&self, what: &str, since: Instant) -> Vec<Instant> {
        let all = self.0.lock();
        all.iter()
            .filter(|(t, m)| *t >= since && m.lines().any(|l| l == what))
            .map(|(t, _)| *t)
            .collect()
    }

    fn last_ping(&self) -> Option<Instant> {
        self.times("WATCHDOG=1", Instant::now() - Duration::from_secs(3600))
            .last()
            .copied()
    }

    async fn wait_for(&self, what: &str, since: Instant, timeout: Duration) -> Instant {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(t) = self.times(what, since).first() {
                return *t;
            }
            assert!(Instant::now() < deadline, "no {what} within {timeout:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Asserts regular pings over `span` from now: none further apart than PERIOD.
    async fn assert_pinging(&self, span: Duration, why: &str) {
        let from = Instant::now();
        tokio::time::sleep(span).await;
        let mut t = self.times("WATCHDOG=1", from - PERIOD);
        t.push(Instant::now());
        let gaps: Vec<_> = t.windows(2).map(|w| w[1] - w[0]).collect();
        assert!(t.len() >= 3, "{why}: too few pings in {span:?}: {gaps:?}");
        assert!(
            gaps.iter().all(|g| *g < PERIOD),
            "{why}: a gap of WATCHDOG_USEC or more between pings: {gaps:?}"
        );
    }

    /// Asserts that pings stop within PERIOD of `at` and stay stopped for `span`.
    async fn assert_stopped(&self, at: Instant, span: Duration, why: &str) {
        tokio::time::sleep(span).await;
        let late = self.times("WATCHDOG=1", at + PERIOD);
        assert!(
            late.is_empty(),
            "{why}: {} pings came later than WATCHDOG_USEC after it",
            late.len()
        );
    }
}

fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}

/// Pulls `image` on `socket` until it succeeds, as kubelet retries; how long it took.
async fn pull_until_ok(socket: std::path::PathBuf, image: String) -> Duration {
    let started = Instant::now();
    loop {
        match image_client(&socket).pull_image(pull_request(&image)).await {
            Ok(_) => return started.elapsed(),
            Err(e) => {
                eprintln!(
                    "pull of {image} on {} failed after {:?}: {e}",
                    socket.display(),
                    started.elapsed()
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// The supervisor: as systemd with WatchdogSec=PERIOD and WatchdogSignal=SIGKILL, kills
/// pullgate once no ping came for PERIOD, then starts it again. Returns when it was killed.
async fn supervise_once(pg: &mut Pullgate, heard: &Heard) -> Instant {
    loop {
        let last = heard.last_ping().expect("pinged before");
        if last.elapsed() >= PERIOD {
            let killed = Instant::now();
            pg.kill_now();
            pg.restart().await;
            return killed;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A wedge (or a stop) of pullgate during a pull: the pull through pullgate and one straight to
/// containerd (which fetches through pullgate's mirror) both complete within STALL_BOUND.
async fn pulls_survive(
    pg: &mut Pullgate,
    heard: &Heard,
    containerd: &Containerd,
    via_pullgate: &TestImage,
    direct: &TestImage,
    fault: impl FnOnce(u32),
    what: &str,
) {
    let pid = pg.pid();
    let restarted_since = Instant::now();
    fault(pid);
    let wedged = Instant::now();
    // Started while pullgate hangs, as kubelet's and a CRI client's would be.
    let through = tokio::spawn(pull_until_ok(pg.socket(), via_pullgate.reference()));
    let straight = tokio::spawn(pull_until_ok(containerd.socket(), direct.reference()));
    heard
        .assert_stopped(wedged, PERIOD + Duration::from_millis(300), what)
        .await;
    let killed = supervise_once(pg, heard).await;
    let ready = heard
        .wait_for("READY=1", restarted_since, Duration::from_secs(20))
        .await;
    let t = tokio::time::timeout(STALL_BOUND, through)
        .await
        .unwrap_or_else(|_| panic!("{what}: the pull through pullgate took over {STALL_BOUND:?}"))
        .unwrap();
    let d = tokio::time::timeout(STALL_BOUND.saturating_sub(wedged.elapsed()), straight)
        .await
        .unwrap_or_else(|_| {
            panic!("{what}: the pull straight to containerd took over {STALL_BOUND:?}")
        })
        .unwrap();
    eprintln!(
        "{what}: killed {:?} after the fault, READY again {:?} after the kill; \
         pull through pullgate {t:?}, straight to containerd {d:?}",
        killed - wedged,
        ready - killed
    );
    assert!(t < STALL_BOUND && d < STALL_BOUND, "{what}: {t:?} / {d:?}");
    heard
        .assert_pinging(Duration::from_secs(2), &format!("after {what}, restarted"))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchdog_pings_track_pullgates_own_doors_and_a_supervisor_ends_a_hang() {
    let dir = tempdir();
    let registry = Registry::start(&dir.path().join("registry"), None).await;
    let mut images = Vec::new();
    for i in 0..4 {
        images.push(push_image(&registry, &format!("dog/app{i}"), "v1", &[512 << 10], None).await);
    }
    let mut containerd = Containerd::start(&dir.path().join("ctd"), &[&registry]).await;
    let notify = dir.path().join("notify.sock");
    let heard = Heard::listen(&notify);
    let started = Instant::now();
    let usec = PERIOD.as_micros().to_string();
    let mut pg = Pullgate::start_with_env(
        &dir.path().join("pg"),
        &containerd,
        "",
        &[
            ("NOTIFY_SOCKET", notify.to_str().unwrap()),
            ("WATCHDOG_USEC", &usec),
            ("PULLGATE_FAULT_INJECTION", "1"),
        ],
    )
    .await;
    heard
        .wait_for("READY=1", started, Duration::from_secs(5))
        .await;
    heard
        .assert_pinging(Duration::from_secs(2), "serving")
        .await;
    let ok = pg
        .metric("pullgate_watchdog_checks_total{result=\"ok\"}")
        .await;
    assert!(ok >= 3.0, "checks counted: {ok}");

    // containerd stopped: restarting pullgate would not help, so the pings go on.
    let ctd = containerd.pid().expect("containerd runs");
    signal(ctd, libc::SIGSTOP);
    heard
        .assert_pinging(Duration::from_secs(3), "containerd stopped")
        .await;
    signal(ctd, libc::SIGCONT);

    // The main runtime wedged (every worker blocked), the front door's thread still up.
    pulls_survive(
        &mut pg,
        &heard,
        &containerd,
        &images[0],
        &images[1],
        |pid| signal(pid, libc::SIGUSR2),
        "main runtime wedged",
    )
    .await;

    // The whole process stopped.
    pulls_survive(
        &mut pg,
        &heard,
        &containerd,
        &images[2],
        &images[3],
        |pid| signal(pid, libc::SIGSTOP),
        "pullgate SIGSTOPped",
    )
    .await;

    // Drain: STOPPING=1, then no more pings.
    pg.signal(libc::SIGTERM);
    let stopping = heard
        .wait_for("STOPPING=1", started, Duration::from_secs(5))
        .await;
    assert_eq!(pg.wait_exit(Duration::from_secs(40)).await, Some(0));
    assert!(heard.last_ping().unwrap() <= stopping + PERIOD / 3);
    containerd.kill_now();
}
