//! Who may use the mirror, end to end on a real containerd and registry: only containerd's uid
//! (root) is served, pullgate never fetches for an `ns` it has no reason to know nor for a
//! request that would loop back to it, and sockets held open without a request head (slowloris)
//! neither push containerd's fetches out of the mirror nor grow pullgate's memory.

mod common;

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::fakeserver::{FakeResponse, FakeServer};
use common::node::Node;
use common::*;

const BLOB_2XX: &str = "pullgate_mirror_requests_total{kind=\"blob\",status=\"2xx\"}";

fn refused(reason: &str) -> String {
    format!("pullgate_mirror_refused_connections_total{{reason=\"{reason}\"}}")
}

fn digest() -> String {
    format!("sha256:{}", "ab".repeat(32))
}

/// curl, as `nobody` when `as_nobody`: (exit code, HTTP status printed, 0 for none).
fn curl(as_nobody: bool, url: &str, headers: &[&str]) -> (i32, u16) {
    let mut cmd = if as_nobody {
        let mut c = Command::new("setpriv");
        c.args([
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
            "curl",
        ]);
        c
    } else {
        Command::new("curl")
    };
    cmd.args([
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "--max-time",
        "10",
    ]);
    for h in headers {
        cmd.args(["-H", h]);
    }
    let out = cmd.arg(url).stderr(Stdio::null()).output().expect("curl");
    let code = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0);
    (out.status.code().unwrap_or(-1), code)
}

/// A server on 127.0.0.2 that would answer anything 200 with a body; records what it is asked.
async fn bait() -> FakeServer {
    FakeServer::start_on(
        "127.0.0.2:0",
        Arc::new(|_req| {
            Some(
                FakeResponse::new(200)
                    .header("Content-Type", "application/octet-stream")
                    .header("Docker-Content-Digest", &digest())
                    .body(b"metadata-secret".to_vec()),
            )
        }),
    )
    .await
}

fn raise_nofile() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain get/setrlimit on a local struct.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_max = lim.rlim_max.max(16384);
        lim.rlim_cur = lim.rlim_max;
        assert_eq!(
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim),
            0,
            "raise RLIMIT_NOFILE"
        );
    }
}

/// A process's soft open-files limit and resident memory (KiB), from /proc.
fn nofile_and_rss(pid: u32) -> (u64, u64) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let nofile = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let rss = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    (nofile, rss)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_containerds_uid_is_served() {
    let node = Node::start(None).await;
    let mirror = node.pullgate.mirror_addr();
    let base = format!("http://{mirror}/v2/");

    // root (containerd's uid) is answered.
    assert_eq!(curl(false, &base, &[]).1, 200);
    let before = node.pullgate.metric(&refused("uid")).await;

    // nobody gets no HTTP answer at all: the connection is closed unread.
    let (rc, code) = curl(true, &base, &[]);
    assert_eq!(code, 0, "nobody got an HTTP answer (curl exit {rc})");
    assert!(
        rc == 52 || rc == 56,
        "curl exit {rc}: expected an empty reply or a reset"
    );
    // A raw socket as nobody: connects, then reads EOF without having sent anything.
    let out = Command::new("setpriv")
        .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups"])
        .args(["/usr/bin/python3", "-c"])
        .arg(format!(
            "import socket; s = socket.create_connection(('127.0.0.1', {})); s.settimeout(5); \
             print(len(s.recv(100)))",
            mirror.rsplit_once(':').unwrap().1
        ))
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && printed.trim() == "0",
        "raw socket as nobody: {printed} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let after = node.pullgate.metric(&refused("uid")).await;
    assert!(after >= before + 2.0, "refused{{uid}} {before} -> {after}");
    let log = node.pullgate.log();
    assert!(log.contains("uid 65534 refused"), "{}", tail(&log, 20));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ns_pullgate_has_no_reason_to_know_is_never_fetched() {
    let node = Node::start(None).await;
    let fake = bait().await;
    let mirror = node.pullgate.mirror_addr();
    let url = format!("http://{mirror}/v2/x/blobs/{}?ns={}", digest(), fake.addr);
    for as_nobody in [true, false] {
        let (rc, code) = curl(as_nobody, &url, &[]);
        assert_ne!(code, 200, "as_nobody={as_nobody}: served (curl exit {rc})");
    }
    // A metadata address: refused without a connection attempt (nothing listens there anyway).
    let meta = format!("http://{mirror}/v2/x/blobs/{}?ns=169.254.169.254", digest());
    assert_eq!(curl(false, &meta, &[]).1, 404);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        fake.requests().is_empty(),
        "pullgate fetched for a stranger: {:?}",
        fake.requests()
    );

    // The node's own registry (its directory under hosts_dir) is still served unscheduled.
    let img = push_image(&node.registry, "access/app", "v1", &[64 << 10], None).await;
    let url = format!(
        "http://{mirror}/v2/{}/blobs/{}?ns={}",
        img.repo,
        img.layer_digests[0],
        node.registry.addr()
    );
    assert_eq!(curl(false, &url, &[]).1, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_that_would_loop_back_are_refused_without_fetching() {
    let node = Node::start(None).await;
    let mirror = node.pullgate.mirror_addr();
    let img = push_image(&node.registry, "access/loop", "v1", &[64 << 10], None).await;
    let blob = format!("/v2/{}/blobs/{}", img.repo, img.layer_digests[0]);
    let gets_before = node.registry.blob_gets(&img.repo);

    // pullgate's own upstream request, come back.
    let url = format!("http://{mirror}{blob}?ns={}", node.registry.addr());
    assert_eq!(curl(false, &url, &["x-pullgate-hop: 1"]).1, 508);
    // An ns naming the mirror itself, or the metrics endpoint.
    for own in [mirror.clone(), node.pullgate.metrics_addr().to_string()] {
        let url = format!("http://{mirror}{blob}?ns={own}");
        let t = Instant::now();
        assert_eq!(curl(false, &url, &[]).1, 508, "ns={own}");
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    }
    let localhost = mirror.replace("127.0.0.1", "localhost");
    let url = format!("http://{mirror}{blob}?ns={localhost}");
    assert_eq!(curl(false, &url, &[]).1, 508);
    assert_eq!(node.registry.blob_gets(&img.repo), gets_before);
    assert!(
        !node.pullgate.log().contains("x-pullgate-hop"),
        "the hop header is not something to log"
    );
}

/// Holds `n` connections to `addr` open without a byte sent, as `nobody` (a child process) or
/// as root (this process).
enum Held {
    Child(std::process::Child),
    Sockets(#[allow(dead_code)] Vec<std::net::TcpStream>),
}

fn hold(addr: &str, n: usize, as_nobody: bool) -> Held {
    if !as_nobody {
        let socks = (0..n)
            .map(|_| std::net::TcpStream::connect(addr).expect("connect"))
            .collect();
        return Held::Sockets(socks);
    }
    let (host, port) = addr.rsplit_once(':').unwrap();
    let mut child = Command::new("setpriv")
        .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups"])
        .args(["/usr/bin/python3", "-c"])
        .arg(format!(
            "import socket, sys, time\n\
             s = [socket.create_connection(('{host}', {port})) for _ in range({n})]\n\
             print('held', flush=True)\n\
             time.sleep(120)\n"
        ))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::BufRead;
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "held", "the nobody holder did not connect");
    Held::Child(child)
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Held::Child(c) = self {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

async fn slowloris(as_nobody: bool) {
    raise_nofile();
    let node = Node::start(None).await;
    let mirror = node.pullgate.mirror_addr();
    let (nofile, rss_start) = nofile_and_rss(node.pullgate.pid());
    assert!(nofile > 2048, "pullgate may open only {nofile} files");
    let mut rss = vec![];
    for round in 0..3 {
        let img = push_image(
            &node.registry,
            &format!("access/loris{round}"),
            "v1",
            &[1 << 20, 256 << 10],
            None,
        )
        .await;
        let served = node.pullgate.metric(BLOB_2XX).await;
        let held = hold(&mirror, 2000, as_nobody);
        // Let pullgate accept them all.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let reply = node
            .via()
            .pull_image(pull_request(&img.reference()))
            .await
            .expect("pull through pullgate");
        assert_eq!(reply.into_inner().image_ref, img.config_digest);
        let now = node.pullgate.metric(BLOB_2XX).await;
        assert!(
            now >= served + img.blob_count() as f64,
            "round {round}: the mirror served {} blobs of {} (containerd went around it)",
            now - served,
            img.blob_count()
        );
        rss.push(nofile_and_rss(node.pullgate.pid()).1);
        drop(held);
    }
    let reason = if as_nobody { "uid" } else { "idle_evicted" };
    assert!(node.pullgate.metric(&refused(reason)).await >= 2000.0);
    println!("pullgate RSS KiB: start {rss_start}, after each round of 2000 sockets {rss:?}");
    let max = *rss.iter().max().unwrap();
    assert!(
        max < rss_start + 64 * 1024,
        "RSS grew from {rss_start} to {max} KiB"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_as_nobody_neither_blocks_containerd_nor_grows_memory() {
    slowloris(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_as_root_neither_blocks_containerd_nor_grows_memory() {
    slowloris(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_as_root_still_pulls_through_the_mirror() {
    let node = Node::start(None).await;
    let layers = [512 << 10, 4 << 20, 1 << 20, 2 << 20, 256 << 10, 8 << 20];
    let img = push_image(&node.registry, "access/plain", "v1", &layers, None).await;
    let served = node.pullgate.metric(BLOB_2XX).await;
    let accepted = || {
        node.pullgate
            .log()
            .matches("mirror: connection accepted")
            .count()
    };
    let before = accepted();
    node.via()
        .pull_image(pull_request(&img.reference()))
        .await
        .expect("pull");
    assert!(node.pullgate.metric(BLOB_2XX).await >= served + img.blob_count() as f64);
    // What the peer check costs depends on this: one lookup per connection, not per request.
    println!(
        "containerd opened {} mirror connections for {} blobs",
        accepted() - before,
        img.blob_count()
    );
    let text = node.pullgate.metrics().await;
    for reason in ["uid", "unknown_peer", "cap"] {
        let sample = refused(reason);
        assert!(text.contains(&sample), "no {sample} series");
        assert_eq!(
            common::daemon::metric_value(&text, &sample),
            0.0,
            "{reason}"
        );
    }
}
