//! What the mirror serves under a digest is that digest, and upstream redirects cannot make
//! pullgate a proxy: on a real containerd and registry, with the fault proxy or a fake registry
//! upstream, and raw HTTP GETs to the mirror as a caller would send them.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::daemon::metric_value;
use common::fakeserver::{FakeResponse, FakeServer};
use common::faultproxy::Fault;
use common::node::Node;
use common::*;

/// The mirror's `host:port`, from pullgate's config file.
fn mirror_addr(node: &Node) -> String {
    let cfg = std::fs::read_to_string(node.pullgate.config_path()).unwrap();
    let line = cfg.lines().find(|l| l.starts_with("addr = ")).unwrap();
    line.trim_start_matches("addr = ")
        .trim_matches('"')
        .to_string()
}

/// Gives `registry` a directory under containerd's certs.d, as an operator's configured registry
/// has: the mirror serves blobs no job needs only for registries it knows (tests/mirror_access.rs).
fn configure(node: &Node, registry: &str) {
    std::fs::create_dir_all(node.containerd.dir().join("certs.d").join(registry)).unwrap();
}

/// GETs `path` from the mirror; returns status, Content-Length, bytes received, and whether the
/// body ended with an error.
async fn get(mirror: &str, path: &str) -> (u16, Option<u64>, Vec<u8>, bool) {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let mut resp = http
        .get(format!("http://{mirror}{path}"))
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let len = resp.content_length();
    let mut body = Vec::new();
    loop {
        match resp.chunk().await {
            Ok(Some(c)) => body.extend_from_slice(&c),
            Ok(None) => return (status, len, body, false),
            Err(_) => return (status, len, body, true),
        }
    }
}

async fn mirror_requests(node: &Node) -> f64 {
    let m = node.pullgate.metrics().await;
    m.lines()
        .filter(|l| l.starts_with("pullgate_mirror_requests_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_bytes_under_a_digest_never_reach_a_caller_complete() {
    let node = Node::start(None).await;
    let img = push_image(&node.registry, "integrity/raw", "v1", &[256 << 10], None).await;
    let proxy = node.fault_proxy().await;
    let layer = img.layer_digests[0].clone();
    proxy.inject(&layer, Fault::Flip, 1000);
    let path = format!("/v2/integrity/raw/blobs/{layer}?ns={}", proxy.addr);
    let (status, len, body, failed) = get(&mirror_addr(&node), &path).await;
    assert_eq!(status, 200);
    let len = len.expect("Content-Length");
    assert_eq!(len, img.layer_blob_sizes[0]);
    assert!(
        (body.len() as u64) < len,
        "the body stops short: {}",
        body.len()
    );
    assert!(failed, "the body ends in an error");
    let m = node.pullgate.metrics().await;
    assert_eq!(
        metric_value(&m, "pullgate_mirror_digest_mismatches_total"),
        1.0
    );
    assert!(node
        .pullgate
        .log()
        .contains("do not match the blob's digest"));

    // A digest the mirror cannot check is not served (containerd goes to its next host).
    let path = format!(
        "/v2/integrity/raw/blobs/sha384:{}?ns={}",
        "a".repeat(96),
        proxy.addr
    );
    assert_eq!(get(&mirror_addr(&node), &path).await.0, 404);

    // Healed upstream: the whole blob, and a resumed range hashed from the blob's start.
    proxy.inject(&layer, Fault::None, 0);
    let path = format!("/v2/integrity/raw/blobs/{layer}?ns={}", proxy.addr);
    let (status, _, body, failed) = get(&mirror_addr(&node), &path).await;
    assert_eq!((status, failed), (200, false));
    assert_eq!(sha256_digest(&body), layer);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_of_wrong_bytes_fails_commits_nothing_and_the_next_pull_succeeds() {
    let node = Node::start(None).await;
    let img = push_image(&node.registry, "integrity/pull", "v1", &[1 << 20], None).await;
    let proxy = node.fault_proxy().await;
    let layer = img.layer_digests[0].clone();
    proxy.inject(&layer, Fault::Flip, 1000);
    let reference = img.reference_via(&proxy.addr);
    let e = node
        .via()
        .pull_image(pull_request(&reference))
        .await
        .expect_err("wrong bytes fail the pull");
    assert!(!node.store().has(&layer).await, "corrupt blob committed");
    let m = node.pullgate.metrics().await;
    assert!(
        metric_value(&m, "pullgate_mirror_digest_mismatches_total") >= 1.0,
        "{e:?}"
    );
    // The download containerd kept (one byte short, corrupt) is dropped.
    let hex = layer[7..].to_string();
    let store = node.store();
    wait_for("the cut download dropped", Duration::from_secs(15), || {
        let store = &store;
        let hex = hex.clone();
        async move {
            store
                .ingests()
                .await
                .iter()
                .all(|(r, _, _)| !r.ends_with(&hex))
        }
    })
    .await;
    proxy.inject(&layer, Fault::None, 0);
    node.via()
        .pull_image(pull_request(&reference))
        .await
        .expect("pull after the fault is gone");
    assert!(node.store().has(&layer).await);
}

/// A fake registry: the blob's size HEAD/GET and GET all answer 307 to `location(request)`.
async fn redirecting(location: Arc<dyn Fn(&str) -> String + Send + Sync>) -> FakeServer {
    FakeServer::start(Arc::new(move |r| {
        if r.target.starts_with("/v2/") && r.target.contains("/blobs/") {
            return Some(FakeResponse::new(307).header("Location", &location(&r.target)));
        }
        if r.target == "/v2/" {
            return Some(FakeResponse::new(200).body("{}"));
        }
        Some(FakeResponse::new(404))
    }))
    .await
}

const DIGEST: &str = "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_to_metadata_or_pullgate_itself_are_refused() {
    let node = Node::start(None).await;
    let mirror = mirror_addr(&node);
    let fake = redirecting(Arc::new(|_| {
        "http://169.254.169.254/latest/meta-data/".into()
    }))
    .await;
    configure(&node, &fake.addr.to_string());
    let started = Instant::now();
    let (status, _, body, _) =
        get(&mirror, &format!("/v2/x/y/blobs/{DIGEST}?ns={}", fake.addr)).await;
    let body = String::from_utf8_lossy(&body);
    assert!(status >= 400, "{status} {body}");
    assert!(
        body.contains("169.254.169.254") && body.contains("metadata"),
        "{body}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "no connect attempt"
    );

    // Back to the mirror itself: refused, no recursion.
    let own = format!("http://{mirror}/v2/x/y/blobs/{DIGEST}?ns=127.0.0.1:1");
    let fake = redirecting(Arc::new(move |_| own.clone())).await;
    configure(&node, &fake.addr.to_string());
    let before = mirror_requests(&node).await;
    let (status, _, body, _) =
        get(&mirror, &format!("/v2/x/y/blobs/{DIGEST}?ns={}", fake.addr)).await;
    let body = String::from_utf8_lossy(&body);
    assert!(status >= 400, "{status} {body}");
    assert!(body.contains("own listen address"), "{body}");
    let after = mirror_requests(&node).await;
    assert!(after - before <= 1.0, "{before} -> {after}");
    // And to its metrics listener.
    let metrics = format!("http://{}/metrics", node.pullgate.metrics_addr());
    let fake = redirecting(Arc::new(move |_| metrics.clone())).await;
    configure(&node, &fake.addr.to_string());
    let (_, _, body, _) = get(&mirror, &format!("/v2/x/y/blobs/{DIGEST}?ns={}", fake.addr)).await;
    let body = String::from_utf8_lossy(&body);
    assert!(!body.contains("pullgate_"), "{body}");
    assert!(body.contains("own listen address"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_of_redirects_stops_at_five_and_an_html_page_is_no_blob() {
    let node = Node::start(None).await;
    let mirror = mirror_addr(&node);
    // Ten hops on the fake itself, each to a new path.
    let hops: Arc<parking_lot::Mutex<String>> = Default::default();
    let base = hops.clone();
    let fake = FakeServer::start(Arc::new(move |r| {
        let base = base.lock().clone();
        if let Some(n) = r.target.strip_prefix("/hop/") {
            let n: u32 = n.parse().unwrap_or(99);
            return Some(if n < 10 {
                FakeResponse::new(307).header("Location", &format!("{base}/hop/{}", n + 1))
            } else {
                FakeResponse::new(200).body("not the blob")
            });
        }
        Some(FakeResponse::new(307).header("Location", &format!("{base}/hop/1")))
    }))
    .await;
    configure(&node, &fake.addr.to_string());
    *hops.lock() = format!("http://{}", fake.addr);
    let (status, _, body, _) =
        get(&mirror, &format!("/v2/x/y/blobs/{DIGEST}?ns={}", fake.addr)).await;
    let body = String::from_utf8_lossy(&body);
    assert!(status >= 400, "{status} {body}");
    assert!(body.contains("more than 5 redirects"), "{body}");
    let hop_requests = fake
        .requests()
        .iter()
        .filter(|r| r.target.starts_with("/hop/"))
        .count();
    assert!(hop_requests <= 5, "{hop_requests}");
    assert!(fake
        .requests()
        .iter()
        .all(|r| r.headers.get("x-pullgate-hop").map(String::as_str) == Some("1")));

    // An internal host on loopback serving an HTML page: whatever is fetched, the page never
    // reaches the caller as a complete blob.
    let page = b"<html><body>internal admin page</body></html>".to_vec();
    let internal = FakeServer::start(Arc::new(move |_| {
        Some(
            FakeResponse::new(200)
                .header("Content-Type", "text/html")
                .body(page.clone()),
        )
    }))
    .await;
    let target = format!("http://{}/admin", internal.addr);
    let fake = redirecting(Arc::new(move |_| target.clone())).await;
    configure(&node, &fake.addr.to_string());
    let (status, len, body, failed) =
        get(&mirror, &format!("/v2/x/y/blobs/{DIGEST}?ns={}", fake.addr)).await;
    if status == 200 {
        assert!(failed, "the body must end in an error");
        assert!((body.len() as u64) < len.unwrap_or(u64::MAX));
        assert!(!String::from_utf8_lossy(&body).contains("</html>"));
    }
    let m = node.pullgate.metrics().await;
    assert!(metric_value(&m, "pullgate_mirror_digest_mismatches_total") >= 1.0 || status != 200);
}
