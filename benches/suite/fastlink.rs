//! A pod's pull on a fast link while a big prewarm runs: the prewarm's bytes are in before the
//! pod arrives, so what the pod waits on is the node (containerd verifying, writing and
//! unpacking the prewarm's layers on the same CPUs and disk), not the link. Unshaped loopback,
//! the Go CRI client, on containerd 1.6 (the system's) and 2.x when the test cache has it.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::common::containerd::{version_of, DEFAULT_CONTAINERD_BIN};
use crate::common::*;
use crate::scenarios::{
    order, pg_toml, prewarm_pull, pull, pull_split, Site, ARMS, LONE_SAMPLES, MB, MIB,
};
use crate::{median, secs, world, Opts, Row};

/// The prewarm starts this long before the pod's pull (the setting).
const HEAD_START: Duration = Duration::from_secs(2);

/// Stall time so far (µs) in `/proc/pressure/{what}`'s "some" line: time in which at least one
/// task waited for the resource. System-wide; the bench is the only load here.
fn stalled_us(what: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/pressure/{what}"))
        .ok()
        .and_then(|t| {
            let line = t.lines().find(|l| l.starts_with("some"))?;
            line.split_once("total=")?.1.trim().parse().ok()
        })
        .unwrap_or(0)
}

/// Dirty and under-writeback page cache (MB) from `/proc/meminfo`: file data the kernel still has
/// to write, which a pod's fsyncs may queue behind.
fn unwritten_mb() -> u64 {
    let t = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let kb = |key: &str| -> u64 {
        t.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    (kb("Dirty:") + kb("Writeback:")) / 1024
}

/// CPU time (ms) used so far: the whole machine's non-idle time from `/proc/stat`, or one
/// process's (all its threads, user and system) from `/proc/<pid>/stat`. Clock ticks of 10 ms.
fn cpu_ms(pid: Option<u32>) -> u64 {
    let ticks: u64 = match pid {
        None => std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|t| {
                let f: Vec<u64> = t
                    .lines()
                    .next()?
                    .split_whitespace()
                    .skip(1)
                    .filter_map(|v| v.parse().ok())
                    .collect();
                // user nice system idle iowait irq softirq steal: all but idle and iowait.
                Some(f.iter().take(8).sum::<u64>() - f.get(3)? - f.get(4)?)
            })
            .unwrap_or(0),
        Some(pid) => std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|t| {
                // After the command's closing parenthesis: state is field 3, utime 14, stime 15.
                let f: Vec<&str> = t.rsplit_once(')')?.1.split_whitespace().collect();
                Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
            })
            .unwrap_or(0),
    };
    ticks * 10
}

/// Bytes (MB) received by sockets connected to `port` (on loopback: containerd's fetches from
/// that port) that their reader has not read yet, from `/proc/net/tcp`'s `rx_queue`: what
/// containerd still writes after the sender stops.
fn unread_mb(port: u16) -> u64 {
    let t = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    let bytes: u64 = t
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let remote = u16::from_str_radix(f.get(2)?.rsplit_once(':')?.1, 16).ok()?;
            let rx = u64::from_str_radix(f.get(4)?.split_once(':')?.1, 16).ok()?;
            (remote == port).then_some(rx)
        })
        .sum();
    bytes / 1_000_000
}

/// The port containerd fetches from: pullgate's mirror, or the registry for direct.
fn fetch_port(s: &Site, registry: &str) -> u16 {
    let addr = s
        .pullgate
        .as_ref()
        .map(|p| p.mirror_addr())
        .unwrap_or_else(|| registry.to_string());
    addr.rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .unwrap_or(0)
}

struct Pressure {
    cpu: u64,
    io: u64,
    unwritten: u64,
    unread: u64,
    /// The machine's CPU time, then pullgate's and containerd's (0 where absent).
    used: [u64; 3],
    pids: [Option<u32>; 2],
    at: Instant,
}

impl Pressure {
    fn now(s: &Site, registry: &str) -> Pressure {
        let pids = [s.pullgate.as_ref().map(|p| p.pid()), s.containerd.pid()];
        Pressure {
            cpu: stalled_us("cpu"),
            io: stalled_us("io"),
            unwritten: unwritten_mb(),
            unread: unread_mb(fetch_port(s, registry)),
            used: [
                cpu_ms(None),
                pids[0].map_or(0, |p| cpu_ms(Some(p))),
                pids[1].map_or(0, |p| cpu_ms(Some(p))),
            ],
            pids,
            at: Instant::now(),
        }
    }

    /// "cpu N %, io M %": the share of the time since `self` in which some task stalled, and
    /// the page cache still to be written at the start.
    fn since(&self) -> String {
        let us = self.at.elapsed().as_micros().max(1) as f64;
        let all = cpu_ms(None).saturating_sub(self.used[0]);
        let pg = self.pids[0].map_or(0, |p| cpu_ms(Some(p)).saturating_sub(self.used[1]));
        let ctrd = self.pids[1].map_or(0, |p| cpu_ms(Some(p)).saturating_sub(self.used[2]));
        format!(
            "PSI some: cpu {:.0} %, io {:.0} %; CPU used {all} ms: containerd {ctrd}, pullgate \
             {pg}, the rest {}; unwritten {} MB, unread by containerd {} MB at start",
            (stalled_us("cpu") - self.cpu) as f64 * 100.0 / us,
            (stalled_us("io") - self.io) as f64 * 100.0 / us,
            all.saturating_sub(pg + ctrd),
            self.unwritten,
            self.unread
        )
    }
}

pub async fn fast_link(o: &Opts) -> Vec<Row> {
    let (pod_layers, pre_layers) = if o.quick {
        (vec![2 * MB; 2], vec![16 * MIB; 4])
    } else {
        (vec![25 * MB; 2], vec![256 * MIB; 4])
    };
    eprintln!("== fast link: pod pull under a big prewarm, unshaped loopback");
    let dir = tempdir();
    let registry = Registry::start(&dir.path().join("registry"), None).await;
    let pod = push_image(&registry, "fast/pod", "v1", &pod_layers, None).await;
    let pre = push_image(&registry, "fast/pre", "v1", &pre_layers, None).await;
    let _lo = world::Noqueue::lo();
    let hosts = vec![registry.addr()];
    // containerd 2.x at its default download limit (3 shared slots: pullgate stages the prewarm)
    // and with the limit raised (room for a pod: prewarm pauses at the mirror instead), the latter
    // twice: as pullgate's default leaves it (not staged: the slots leave a
    // pod room) and with every prewarm staged. (containerd 1.6 staged was measured too: 1.11× and
    // 1.13× against 1.03× and 0.89× not staged, the prewarm 1.7–1.9× later; not kept.)
    let mut runs = vec![(Path::new(DEFAULT_CONTAINERD_BIN).to_path_buf(), "", "")];
    if let Some(bin) = world::containerd2() {
        runs.push((bin.clone(), "", ""));
        runs.push((bin.clone(), ROOMY_LIMIT, ""));
        runs.push((bin, ROOMY_LIMIT, STAGED));
    }
    // `$PULLGATE_BENCH_FAST_RUN=N`: only the Nth run of these (from 0), to trace one setup.
    let only: Option<usize> = std::env::var("PULLGATE_BENCH_FAST_RUN")
        .ok()
        .and_then(|v| v.parse().ok());
    let mut rows = Vec::new();
    for (i, (bin, transfer, pg)) in runs.into_iter().enumerate() {
        if only.is_some_and(|n| n != i) {
            continue;
        }
        let v = version_of(&bin);
        let version = v.text;
        let limit = if v.major < 2 {
            String::new()
        } else if transfer.is_empty() {
            ", download limit 3 (default)".to_string()
        } else {
            format!(", transfer {transfer}")
        };
        let limit = if pg.is_empty() {
            limit
        } else {
            format!("{limit}, stage_prewarm = \"always\"")
        };
        let name = format!(
            "fast link, containerd {version}{limit}: {} MB pod pull, {} MiB prewarm ({} layers) \
             started {} s before, unshaped loopback",
            pod_layers.iter().sum::<usize>() / MB,
            pre_layers.iter().sum::<usize>() / MIB,
            pre_layers.len(),
            HEAD_START.as_secs()
        );
        eprintln!("== {name}");
        let node = Node {
            bin: &bin,
            transfer,
            dir: &dir.path().join("node"),
            hosts: &hosts,
            pg,
        };
        let m = measure(o, &node, &pod, &pre).await;
        rows.push(m.row(name));
    }
    rows
}

#[derive(Default)]
struct Measured {
    alone: [Vec<Duration>; 2],
    loaded: [Vec<Duration>; 2],
    /// From the prewarm's start to its end, in the loaded runs.
    prewarm: [Vec<Duration>; 2],
}

impl Measured {
    fn ratio(&self, arm: usize) -> f64 {
        median(&self.loaded[arm]).as_secs_f64() / median(&self.alone[arm]).as_secs_f64()
    }

    fn row(&self, name: String) -> Row {
        let cell = |arm: usize| {
            format!(
                "alone {}, under prewarm {} ({:.2}×); prewarm done in {}",
                secs(median(&self.alone[arm])),
                secs(median(&self.loaded[arm])),
                self.ratio(arm),
                secs(median(&self.prewarm[arm])),
            )
        };
        let later = median(&self.prewarm[1]).as_secs_f64() / median(&self.prewarm[0]).as_secs_f64();
        Row {
            scenario: name,
            direct: cell(0),
            pullgate: cell(1),
            result: format!(
                "pullgate {:.2}× vs direct {:.2}×; prewarm ends {later:.2}× direct's time",
                self.ratio(1),
                self.ratio(0)
            ),
            target: "pullgate ≤ 1.10×".into(),
            met: Some(self.ratio(1) <= 1.10),
        }
    }
}

/// With `$PULLGATE_BENCH_LOGS` set, the logs of every run go to `out/fast-logs/` (where the
/// README's account of the pod's time comes from).
fn keep_logs(o: &Opts, s: &Site, run: &str) {
    if std::env::var_os("PULLGATE_BENCH_LOGS").is_none() {
        return;
    }
    let dir = o.out.join("fast-logs");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join(format!("{run}-containerd.log")),
        s.containerd.log(),
    )
    .unwrap();
    if let Some(p) = &s.pullgate {
        std::fs::write(dir.join(format!("{run}-pullgate.log")), p.log()).unwrap();
    }
}

/// containerd 2.x's transfer service setting that leaves a pod's pull room beside a 4-layer
/// prewarm (see `pull/slots.rs`), as `packaging/containerd/config.toml.snippet` shows for
/// prewarm throughput.
const ROOMY_LIMIT: &str = "max_concurrent_downloads = 16";

/// One containerd setup, both arms on it.
struct Node<'a> {
    bin: &'a Path,
    /// Lines for the transfer service's settings (containerd 2.x).
    transfer: &'a str,
    dir: &'a Path,
    hosts: &'a [String],
    /// pullgate's config beside the harness's.
    pg: &'a str,
}

/// Every prewarm staged, wherever pullgate's default would not.
const STAGED: &str = "[containerd]\nstage_prewarm = \"always\"\n";

async fn site(n: &Node<'_>, arm: usize) -> Site {
    Site::start_tuned(n.bin, "", n.transfer, n.dir, n.hosts, pg_toml(arm, n.pg)).await
}

async fn measure(o: &Opts, node: &Node<'_>, pod: &TestImage, pre: &TestImage) -> Measured {
    let bin = node.bin;
    let mut m = Measured::default();
    // The version as a file name: "1.6.20", "2.1.9unknown".
    let mut tag = version_of(bin)
        .text
        .split('~')
        .next()
        .unwrap_or("")
        .replace(['+', ' '], "");
    if !node.transfer.is_empty() {
        tag.push_str("-roomy");
    }
    if !node.pg.is_empty() {
        tag.push_str("-staged");
    }
    for round in 0..o.rounds {
        for i in 0..LONE_SAMPLES {
            for arm in order(round + i) {
                let s = site(node, arm).await;
                let psi = Pressure::now(&s, &node.hosts[0]);
                let t = pull(&s.client(), &pod.reference(), true).await;
                let during = psi.since();
                let pg_log = s.pullgate.as_ref().map(|p| p.log());
                let split = pull_split(&s.containerd.log(), pg_log.as_deref(), &pod.repo);
                eprintln!(
                    "  round {} {:<18} alone  {:>6.2}s ({split}; {during})",
                    round + 1,
                    ARMS[arm],
                    t.as_secs_f64()
                );
                keep_logs(o, &s, &format!("{tag}-alone-{arm}-{round}-{i}"));
                m.alone[arm].push(t);
            }
        }
        for arm in order(round) {
            let s = site(node, arm).await;
            let t0 = Instant::now();
            let (c, r) = (s.client(), pre.reference());
            let prewarm = tokio::spawn(async move {
                prewarm_pull(&c, &r).await;
                t0.elapsed()
            });
            tokio::time::sleep(HEAD_START).await;
            let psi = Pressure::now(&s, &node.hosts[0]);
            let t = pull(&s.client(), &pod.reference(), true).await;
            let during = psi.since();
            let done = prewarm.await.unwrap();
            let pg_log = s.pullgate.as_ref().map(|p| p.log());
            let split = pull_split(&s.containerd.log(), pg_log.as_deref(), &pod.repo);
            eprintln!(
                "  round {} {:<18} loaded {:>6.2}s ({split}; {during}); prewarm done after {:.2}s",
                round + 1,
                ARMS[arm],
                t.as_secs_f64(),
                done.as_secs_f64()
            );
            keep_logs(o, &s, &format!("{tag}-loaded-{arm}-{round}"));
            m.loaded[arm].push(t);
            m.prewarm[arm].push(done);
        }
    }
    m
}
