//! End-to-end tests of the byte path on a real containerd and registry: containerd fetches every
//! blob through pullgate's mirror (its hosts.toml entry first; tags it resolves itself, upstream),
//! pullgate streams blobs from upstream, broken registries leave nothing corrupt in containerd,
//! and with pullgate down containerd still pulls by itself.

mod common;

use std::time::{Duration, Instant};

use common::daemon::metric_value;
use common::faultproxy::Fault;
use common::node::Node;
use common::registry::push_index;
use common::*;
use pullgate::proto::runtime::v1::*;

const CONTAINERD_UA: &str = "containerd/";
const PULLGATE_UA: &str = "pullgate/";

fn spec(image: &str) -> Option<ImageSpec> {
    Some(ImageSpec {
        image: image.to_string(),
        ..Default::default()
    })
}

async fn present(node: &Node, image: &str) -> bool {
    node.direct()
        .image_status(ImageStatusRequest {
            image: spec(image),
            verbose: false,
        })
        .await
        .unwrap()
        .into_inner()
        .image
        .is_some()
}

/// No unfinished download is left in containerd.
async fn assert_no_ingests(node: &Node) {
    let ingests = node.store().ingests().await;
    assert!(ingests.is_empty(), "ingests left: {ingests:?}");
}

fn blob_gets(node: &Node) -> Vec<common::registry::AccessLogEntry> {
    node.registry
        .requests()
        .into_iter()
        .filter(|r| r.method == "GET" && r.path.contains("/blobs/sha256:"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_fetches_every_blob_through_the_mirror() {
    let node = Node::start(None).await;
    let img = push_image(
        &node.registry,
        "mirror/app",
        "v1",
        &[3 << 20, 1 << 20, 200 << 10],
        None,
    )
    .await;
    let hosts = node
        .containerd
        .dir()
        .join("certs.d")
        .join(node.registry.addr())
        .join("hosts.toml");
    let text = std::fs::read_to_string(&hosts).unwrap();
    assert!(text.contains("# >>> pullgate mirror"), "{text}");

    let reply = node
        .via()
        .pull_image(pull_request(&img.reference()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.image_ref, img.config_digest);
    assert!(present(&node, &img.reference()).await);

    // Every blob came from pullgate's mirror (its user agent upstream), none from containerd.
    let gets = blob_gets(&node);
    assert!(
        gets.iter().all(|r| r.user_agent.starts_with(PULLGATE_UA)),
        "containerd fetched blobs itself: {gets:?}"
    );
    assert_eq!(gets.len(), img.blob_count(), "{gets:?}");
    // containerd resolves the tag at the registry itself (a HEAD: its errors stay the
    // registry's), and takes the manifest pullgate resolved from the mirror.
    let manifest_by_containerd: Vec<_> = node
        .registry
        .requests()
        .into_iter()
        .filter(|r| r.path.contains("/manifests/") && r.user_agent.starts_with(CONTAINERD_UA))
        .collect();
    assert!(
        manifest_by_containerd.iter().all(|r| r.method == "HEAD"),
        "{manifest_by_containerd:?}"
    );

    let m = node.pullgate.metrics().await;
    let blob_bytes: u64 = img.layer_blob_sizes.iter().sum::<u64>() + img.config_size;
    assert_eq!(
        metric_value(&m, "pullgate_fetched_bytes_total{source=\"registry\"}"),
        blob_bytes as f64,
        "{m}"
    );
    assert_eq!(
        metric_value(
            &m,
            "pullgate_mirror_requests_total{kind=\"blob\",status=\"2xx\"}"
        ),
        img.blob_count() as f64,
        "{m}"
    );
    // The pod's pull is forwarded before pullgate's resolution lands: the mirror held
    // containerd's early requests for it rather than serving them as unknown.
    assert_eq!(
        metric_value(&m, "pullgate_mirror_unscheduled_blobs_total"),
        0.0,
        "{m}"
    );
    let (code, body) = node.pullgate.http_get("/readyz").await.unwrap();
    assert_eq!(code, 200, "{body}");
    assert_no_ingests(&node).await;

    // The administrator's tool rewrites the file without pullgate: /readyz says so, and the next
    // pull puts the entry back before containerd reads it.
    node.containerd.add_registry(&node.registry);
    let (code, body) = node.pullgate.http_get("/readyz").await.unwrap();
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("hosts.toml"), "{body}");
    node.via()
        .remove_image(RemoveImageRequest {
            image: spec(&img.reference()),
        })
        .await
        .unwrap();
    node.via()
        .pull_image(pull_request(&img.reference()))
        .await
        .unwrap();
    assert_eq!(node.pullgate.http_get("/readyz").await.unwrap().0, 200);
    assert!(blob_gets(&node)
        .iter()
        .all(|r| r.user_agent.starts_with(PULLGATE_UA)));
    assert_no_ingests(&node).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pods_pull_is_forwarded_before_pullgate_resolves_it_and_still_scheduled() {
    let node = Node::start(None).await;
    let img = push_image(
        &node.registry,
        "early/app",
        "v1",
        &[1 << 20, 256 << 10],
        None,
    )
    .await;
    // pullgate's resolution (a manifest GET) answered 2 s late; containerd's own (a HEAD) not.
    let proxy = common::faultproxy::FaultProxy::start(&node.registry.addr()).await;
    let delay = Duration::from_secs(2);
    proxy.delay_manifest_gets(delay);
    node.via()
        .pull_image(pull_request(&img.reference_via(&proxy.addr)))
        .await
        .expect("pod's pull");
    let seen = proxy.requests();
    let by = |ua: &str, method: &str| {
        seen.iter()
            .find(|r| {
                r.user_agent.starts_with(ua) && r.method == method && r.path.contains("/manifests/")
            })
            .unwrap_or_else(|| panic!("no manifest {method} by {ua}: {seen:?}"))
            .at
    };
    let (resolve, head) = (by(PULLGATE_UA, "GET"), by(CONTAINERD_UA, "HEAD"));
    assert!(
        head < resolve + delay,
        "containerd started only after pullgate's resolution: {seen:?}"
    );
    // containerd asked the mirror for the manifest and blobs before the resolution landed: the
    // mirror held them (no 404 sending containerd to the registry, no blob served unscheduled).
    let m = node.pullgate.metrics().await;
    for (name, want) in [
        (
            "pullgate_mirror_requests_total{kind=\"manifest\",status=\"404\"}",
            0.0,
        ),
        ("pullgate_mirror_unscheduled_blobs_total", 0.0),
        (
            "pullgate_mirror_requests_total{kind=\"blob\",status=\"2xx\"}",
            img.blob_count() as f64,
        ),
    ] {
        assert_eq!(metric_value(&m, name), want, "{name}\n{m}");
    }
    assert!(
        seen.iter()
            .filter(|r| r.path.contains("/blobs/"))
            .all(|r| r.user_agent.starts_with(PULLGATE_UA)),
        "containerd fetched blobs itself: {seen:?}"
    );
    assert_no_ingests(&node).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_pullgate_never_saw_still_works_through_the_mirror_unscheduled() {
    let node = Node::start(None).await;
    let img = push_image(&node.registry, "unseen/app", "v1", &[512 << 10], None).await;
    // Through containerd's own socket: pullgate's mirror gets requests for blobs no job needs.
    node.direct()
        .pull_image(pull_request(&img.reference()))
        .await
        .expect("pull through containerd's socket");
    assert!(present(&node, &img.reference()).await);
    let m = node.pullgate.metrics().await;
    assert_eq!(
        metric_value(&m, "pullgate_mirror_unscheduled_blobs_total"),
        img.blob_count() as f64,
        "{m}"
    );
    assert!(blob_gets(&node)
        .iter()
        .all(|r| r.user_agent.starts_with(PULLGATE_UA)));
    // The manifest was not pullgate's to serve: containerd resolved it at the registry.
    assert!(
        metric_value(
            &m,
            "pullgate_mirror_requests_total{kind=\"manifest\",status=\"404\"}"
        ) >= 1.0,
        "{m}"
    );
    assert_no_ingests(&node).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_image_pullgate_never_saw_is_left_to_containerds_credentials() {
    let node = Node::start(Some(("dora", "d0ra-pass-91"))).await;
    let img = push_image(
        &node.registry,
        "unseen/private",
        "v1",
        &[256 << 10],
        Some(("dora", "d0ra-pass-91")),
    )
    .await;
    let mut req = pull_request(&img.reference());
    req.auth = Some(auth_config("dora", "d0ra-pass-91"));
    node.direct()
        .pull_image(req)
        .await
        .expect("containerd pulls with its own credentials");
    // pullgate was refused anonymously upstream and answered 404: containerd went on itself.
    assert!(blob_gets(&node)
        .iter()
        .filter(|r| r.status == 200)
        .all(|r| r.user_agent.starts_with(CONTAINERD_UA)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_pullgate_down_containerd_pulls_by_itself() {
    let mut node = Node::start(None).await;
    let img = push_image(&node.registry, "down/app", "v1", &[256 << 10], None).await;
    node.pullgate.kill_now();
    let started = Instant::now();
    node.direct()
        .pull_image(pull_request(&img.reference()))
        .await
        .expect("pull with pullgate's mirror down");
    let took = started.elapsed();
    eprintln!("pull with the mirror's port closed: {took:?}");
    assert!(present(&node, &img.reference()).await);
    assert!(blob_gets(&node)
        .iter()
        .all(|r| r.user_agent.starts_with(CONTAINERD_UA)));
    assert!(took < Duration::from_secs(30), "fallback took {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pullgate_killed_mid_pull_the_retry_resumes_what_containerd_kept() {
    let mut node = Node::start(None).await;
    let size = 4 << 20;
    let img = push_image(&node.registry, "crash/app", "v1", &[size], None).await;
    let proxy = node.slow_proxy(1 << 20).await;
    let reference = img.reference_via(&proxy.addr);

    let mut client = node.via();
    let req = pull_request(&reference);
    let first = tokio::spawn(async move { client.pull_image(req).await });
    wait_for(
        "half the layer through",
        Duration::from_secs(30),
        || async { proxy.bytes() >= 2 << 20 },
    )
    .await;
    node.pullgate.kill_now();
    assert!(first.await.unwrap().is_err(), "the client sees the crash");
    let before = proxy.bytes();
    let ingests = node.store().ingests().await;
    eprintln!("after kill -9: {before} bytes sent, containerd's ingests: {ingests:?}");

    node.pullgate.restart().await;
    let reply = node
        .via()
        .pull_image(pull_request(&reference))
        .await
        .expect("pull completes after restart")
        .into_inner();
    assert_eq!(reply.image_ref, img.config_digest);
    let total = proxy.bytes();
    let ratio = total as f64 / img.total_size as f64;
    eprintln!(
        "registry bytes over both attempts: {total} for a {} byte image ({ratio:.2}x)",
        img.total_size
    );
    // containerd kept the partial layer under the pull's lease and asked for the rest. The
    // excess over the image is what was in flight when pullgate died (socket buffers of the
    // killed hop, a few hundred KiB); a retry from zero would add the whole kept part again.
    let kept: i64 = ingests.iter().map(|(_, offset, _)| *offset).sum();
    assert!(kept >= 1 << 20, "containerd kept {kept} bytes of the layer");
    let excess = total.saturating_sub(img.total_size);
    assert!(
        excess < kept as u64 / 2,
        "re-fetched {excess} bytes of the {kept} containerd kept"
    );
    assert_no_ingests(&node).await;
    // The restarted pullgate adopted the killed pull's lease, the retry's took in its downloads
    // (one lease per image), and the pull that succeeded deleted its own (just after replying).
    // Both pulls ran under a spare lease (made ahead, so a pod's pull never waits on
    // containerd's metadata store); the killed one's spare was taken into its image's lease at
    // adoption, the unused spare it had made for the next pull deleted, and the new process
    // keeps one spare ready.
    let ours = |spare: bool| {
        let leases = node.containerd.ctr(&["leases", "ls", "-q"]);
        leases
            .lines()
            .filter(|l| l.starts_with("pullgate-"))
            .filter(|l| l.starts_with("pullgate-spare-") == spare)
            .count()
    };
    wait_for(
        "no lease of pullgate left but one spare",
        Duration::from_secs(10),
        || async { ours(false) == 0 && ours(true) == 1 },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_registry_dying_mid_pull_the_retry_resumes_what_containerd_kept() {
    let node = Node::start(None).await;
    let size = 4 << 20;
    let img = push_image(&node.registry, "regdeath/app", "v1", &[size], None).await;
    let mut proxy = node.slow_proxy(1 << 20).await;
    let reference = img.reference_via(&proxy.addr);

    let mut client = node.via();
    let req = pull_request(&reference);
    let first = tokio::spawn(async move { client.pull_image(req).await });
    wait_for(
        "half the layer through",
        Duration::from_secs(30),
        || async { proxy.bytes() >= 2 << 20 },
    )
    .await;
    // The registry goes away for longer than the mirror's resumptions last.
    proxy.kill().await;
    let failed = tokio::time::timeout(Duration::from_secs(60), first)
        .await
        .expect("the pull ends while the registry is down")
        .unwrap()
        .expect_err("the pull fails with the registry gone");
    let before = proxy.bytes();
    let ingests = node.store().ingests().await;
    eprintln!("registry down: {failed:?}; {before} bytes sent, containerd's ingests: {ingests:?}");
    assert!(!present(&node, &reference).await);
    assert!(
        !ingests.is_empty(),
        "the partial layer is kept for the retry"
    );

    proxy.revive().await;
    let reply = node
        .via()
        .pull_image(pull_request(&reference))
        .await
        .expect("pull completes once the registry is back")
        .into_inner();
    assert_eq!(reply.image_ref, img.config_digest);
    let total = proxy.bytes();
    let ratio = total as f64 / img.total_size as f64;
    eprintln!(
        "registry bytes over both attempts: {total} for a {} byte image ({ratio:.2}x)",
        img.total_size
    );
    assert!(ratio <= 1.05, "re-fetched: {ratio:.2}x the image");
    assert_no_ingests(&node).await;
    // containerd commits a blob only when its digest matches.
    assert!(node.store().has(&img.layer_digests[0]).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_upstream_body_is_resumed_and_containerd_sees_one_stream() {
    let node = Node::start(None).await;
    let img = push_image(&node.registry, "fault/trunc", "v1", &[2 << 20], None).await;
    let proxy = node.fault_proxy().await;
    let layer = img.layer_digests[0].clone();
    proxy.inject(&layer, Fault::Truncate, 1);

    let reference = img.reference_via(&proxy.addr);
    let reply = node
        .via()
        .pull_image(pull_request(&reference))
        .await
        .expect("pull survives a truncated body")
        .into_inner();
    assert_eq!(reply.image_ref, img.config_digest);
    let gets = proxy.blob_gets(&layer);
    assert_eq!(gets.len(), 2, "{gets:?}");
    assert!(gets.iter().all(|g| g.user_agent.starts_with(PULLGATE_UA)));
    let range = gets[1]
        .range
        .clone()
        .expect("second GET resumes with Range");
    let half = img.layer_blob_sizes[0] / 2;
    assert!(range.starts_with(&format!("bytes={half}-")), "{range}");
    let m = node.pullgate.metrics().await;
    assert_eq!(metric_value(&m, "pullgate_blob_retries_total"), 1.0, "{m}");
    assert_no_ingests(&node).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_blob_is_refused_by_containerd_and_never_committed() {
    let node = Node::start(None).await;
    let img = push_image(&node.registry, "fault/flip", "v1", &[512 << 10], None).await;
    let proxy = node.fault_proxy().await;
    let layer = img.layer_digests[0].clone();
    proxy.inject(&layer, Fault::Flip, 1000);

    let reference = img.reference_via(&proxy.addr);
    let direct = node
        .direct()
        .pull_image(pull_request(&reference))
        .await
        .expect_err("corrupt blob fails containerd's own pull");
    let via = node
        .via()
        .pull_image(pull_request(&reference))
        .await
        .expect_err("corrupt blob must fail the pull");
    // containerd's own check fails its commit; through pullgate the mirror's check cuts the
    // body first (see tests/mirror_integrity.rs).
    assert!(direct.message().contains(&layer[7..]), "{direct:?}");
    let m = node.pullgate.metrics().await;
    assert!(
        metric_value(&m, "pullgate_mirror_digest_mismatches_total") >= 1.0,
        "{via:?}"
    );
    assert!(!node.store().has(&layer).await, "corrupt blob committed");
    // containerd keeps the failed ingest (uncommitted) as it does without pullgate; the next pull
    // starts it over.

    // pullgate dropped the complete, corrupt ingest containerd kept (under the pull's lease, and
    // on containerd 2.x even without one), so once the registry heals the next pull fetches the
    // blob again instead of failing its commit once more.
    let ingests = node.store().ingests().await;
    assert!(
        ingests.iter().all(|(r, _, _)| !r.ends_with(&layer[7..])),
        "{ingests:?}"
    );
    proxy.inject(&layer, Fault::None, 0);
    node.via()
        .pull_image(pull_request(&reference))
        .await
        .expect("pull after the fault is gone");
    assert!(node.store().has(&layer).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_registry_fails_the_pull_cleanly() {
    let node = Node::start_with(None, "retries = 1\nrequest_timeout = \"1s\"").await;
    let img = push_image(&node.registry, "fault/stall", "v1", &[1 << 20], None).await;
    let proxy = node.fault_proxy().await;
    let layer = img.layer_digests[0].clone();
    proxy.inject(&layer, Fault::Stall, 1000);

    let reference = img.reference_via(&proxy.addr);
    let started = Instant::now();
    let err = node
        .via()
        .pull_image(pull_request(&reference))
        .await
        .expect_err("stalled blob must fail the pull");
    eprintln!("stalled registry: {err:?} after {:?}", started.elapsed());
    assert!(started.elapsed() < Duration::from_secs(60));
    assert!(!node.store().has(&layer).await);
    assert!(node.pullgate.log().contains("blob stream cut upstream"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_off_leaves_the_fetch_to_containerd() {
    let node = Node::start_with(None, "enabled = false").await;
    let img = push_image(&node.registry, "off/app", "v1", &[256 << 10], None).await;
    node.via()
        .pull_image(pull_request(&img.reference()))
        .await
        .unwrap();
    let gets = blob_gets(&node);
    assert_eq!(gets.len(), img.blob_count());
    assert!(gets.iter().all(|r| r.user_agent.starts_with(CONTAINERD_UA)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_administrators_mirror_comes_after_pullgate_and_never_gets_credentials() {
    const USER: &str = "erin";
    const PASS: &str = "3rin-pass-55";
    let node = Node::start(Some((USER, PASS))).await;
    let img = push_image(
        &node.registry,
        "admin/app",
        "v1",
        &[256 << 10],
        Some((USER, PASS)),
    )
    .await;
    // The administrator's mirror: a recording proxy to the registry, listed as a [host].
    let proxy = common::faultproxy::FaultProxy::start(&node.registry.addr()).await;
    let reg = node.registry.addr();
    let hosts = node
        .containerd
        .dir()
        .join("certs.d")
        .join(&reg)
        .join("hosts.toml");
    std::fs::write(
        &hosts,
        format!(
            "server = \"http://{reg}\"\n\n[host.\"http://{}\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
            proxy.addr
        ),
    )
    .unwrap();
    let mut req = pull_request(&img.reference());
    req.auth = Some(auth_config(USER, PASS));
    node.via().pull_image(req).await.expect("pull");
    // pullgate asked the administrator's mirror first, without the credentials (it answered
    // 401), then the registry with them.
    let seen = proxy.requests();
    assert!(
        seen.iter().any(|r| r.user_agent.starts_with(PULLGATE_UA)),
        "{seen:?}"
    );
    // (containerd itself resolves the tag there and, answered 401, sends the pull's credentials:
    // its own behaviour, README.)
    assert!(
        seen.iter()
            .filter(|r| r.user_agent.starts_with(PULLGATE_UA))
            .all(|r| r.authorization.is_none()),
        "{seen:?}"
    );
    let text = std::fs::read_to_string(&hosts).unwrap();
    let (ours, theirs) = (
        text.find("# >>> pullgate").unwrap(),
        text.find(&proxy.addr).unwrap(),
    );
    assert!(ours < theirs, "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_index_resolves_to_the_nodes_platform() {
    let node = Node::start(None).await;
    let arm = push_image(&node.registry, "multi/app", "arm64", &[128 << 10], None).await;
    let amd = push_image(&node.registry, "multi/app", "amd64", &[96 << 10], None).await;
    let index = push_index(
        &node.registry,
        "multi/app",
        "v1",
        &[("arm64", "v8", &arm), ("amd64", "", &amd)],
    )
    .await;
    let reference = format!("{}/{}:{}", index.registry, index.repo, index.tag);
    let reply = node
        .via()
        .pull_image(pull_request(&reference))
        .await
        .unwrap()
        .into_inner();
    let (node_arch, other) = if cfg!(target_arch = "aarch64") {
        (&arm, &amd)
    } else {
        (&amd, &arm)
    };
    assert_eq!(reply.image_ref, node_arch.config_digest);
    let gets = blob_gets(&node);
    let fetched = |digest: &str| gets.iter().filter(|r| r.path.ends_with(digest)).count();
    assert_eq!(fetched(&node_arch.layer_digests[0]), 1);
    assert_eq!(fetched(&other.layer_digests[0]), 0);
    assert!(gets.iter().all(|r| r.user_agent.starts_with(PULLGATE_UA)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_capping_each_connection_is_read_in_ranged_parts_without_rereading() {
    let node = Node::start(None).await;
    // 24 MiB behind a proxy pacing each connection at 4 MiB/s: one connection needs 6 s.
    let size = 24 << 20;
    let img = push_image(&node.registry, "capped/app", "v1", &[size], None).await;
    let proxy = node.slow_proxy(4 << 20).await;
    let reference = img.reference_via(&proxy.addr);

    let mut client = node.via();
    let pull = tokio::spawn(async move { client.pull_image(pull_request(&reference)).await });
    let mut most_open = 0;
    while !pull.is_finished() {
        most_open = most_open.max(proxy.open_connections());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let reply = pull.await.unwrap().expect("pull completes").into_inner();
    assert_eq!(reply.image_ref, img.config_digest);

    let m = node.pullgate.metrics().await;
    let parts = metric_value(&m, "pullgate_mirror_range_parts_total");
    let sent = proxy.bytes();
    let ratio = sent as f64 / img.total_size as f64;
    eprintln!("ranged parts: {parts}, most connections open: {most_open}, proxy bytes {ratio:.3}x the image");
    // The probe found the cap (one connection, then two reading twice as fast) and split the
    // rest of the layer over `mirror.parallel_ranges` (4) connections.
    assert!(
        parts >= 3.0,
        "parts: {parts}\n{}",
        tail(&node.pullgate.log(), 30)
    );
    assert!(most_open >= 3, "connections open at once: {most_open}");
    // Parts are asked for from where the single stream stopped: nothing is read twice.
    assert!(ratio <= 1.02, "read {ratio:.3}x the image");
    assert!(
        node.pullgate.log().contains("host caps each connection"),
        "{}",
        tail(&node.pullgate.log(), 30)
    );
    assert_no_ingests(&node).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prewarm_pull_paused_longer_than_containerds_progress_timeout_is_kept_alive() {
    // containerd 1.7 and 2.x cancel a CRI pull whose streams read nothing for
    // image_pull_progress_timeout (1.6 has no such setting). A 4 MB/s node budget: the pod's
    // 24 MiB pull keeps prewarm paused for about 6 s, past the 3 s timeout set here.
    let node = Node::start_tuned(
        None,
        "[schedule]\nbandwidth = \"4MB\"\n",
        "native",
        "image_pull_progress_timeout = \"3s\"",
    )
    .await;
    let pre = push_image(&node.registry, "keep/pre", "v1", &[12 << 20], None).await;
    let pod = push_image(&node.registry, "keep/pod", "v1", &[24 << 20], None).await;

    let mut client = node.via();
    let r = pre.reference();
    let prewarm = tokio::spawn(async move { client.pull_image(prewarm_request(&r)).await });
    wait_for("prewarm bytes flowing", Duration::from_secs(20), || async {
        node.pullgate
            .metric("pullgate_class_bytes_total{class=\"prewarm\"}")
            .await
            > 1.0 * (1 << 20) as f64
    })
    .await;
    let started = Instant::now();
    node.via()
        .pull_image(pull_request(&pod.reference()))
        .await
        .expect("pod's pull");
    let paused = started.elapsed();
    // The premise: prewarm stayed paused longer than containerd's timeout.
    assert!(
        paused > Duration::from_secs(4),
        "pod pull took only {paused:?}"
    );
    let reply = tokio::time::timeout(Duration::from_secs(60), prewarm)
        .await
        .expect("prewarm pull answered")
        .unwrap()
        .expect("the paused prewarm pull was not cancelled by containerd")
        .into_inner();
    assert_eq!(reply.image_ref, pre.config_digest);
    let parked = node
        .pullgate
        .metric("pullgate_mirror_parked_streams_total")
        .await;
    let preempted = node
        .pullgate
        .metric("pullgate_prewarm_preemptions_total")
        .await;
    eprintln!("pod pull {paused:?}; parked prewarm streams {parked}, preemptions {preempted}");
    // Parked (its connection closed, kept alive towards containerd) or, on containerd 2.x,
    // handed back from containerd while the pod's pull ran and forwarded again.
    assert!(parked + preempted >= 1.0, "prewarm never paused");
    assert!(
        !node.containerd.log().contains("no progress"),
        "containerd cancelled a pull"
    );
    assert_no_ingests(&node).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prewarm_blob_read_in_ranged_parts_is_kept_alive_while_paused() {
    // The prewarm layer comes from a host capping each connection at 4 MiB/s, so it is read in
    // parts; the pod's layer from one capping at 1 MiB/s keeps prewarm paused for over 6 s, past
    // containerd's 3 s image_pull_progress_timeout (1.7 and 2.x; 1.6 has none) and the period
    // it checks that timeout at.
    let node = Node::start_tuned(None, "", "native", "image_pull_progress_timeout = \"3s\"").await;
    let pre = push_image(&node.registry, "keepparts/pre", "v1", &[64 << 20], None).await;
    let pod = push_image(&node.registry, "keepparts/pod", "v1", &[24 << 20], None).await;
    let fast = node.slow_proxy(4 << 20).await;
    let slow = node.slow_proxy(1 << 20).await;

    let mut client = node.via();
    let r = pre.reference_via(&fast.addr);
    let prewarm = tokio::spawn(async move { client.pull_image(prewarm_request(&r)).await });
    // The probe's one part, then (the host found capped) three more ahead: by then containerd's
    // stream reads from the parts, no longer from the first connection.
    wait_for(
        "the prewarm layer split",
        Duration::from_secs(30),
        || async {
            node.pullgate
                .metric("pullgate_mirror_range_parts_total")
                .await
                >= 4.0
        },
    )
    .await;
    let started = Instant::now();
    node.via()
        .pull_image(pull_request(&pod.reference_via(&slow.addr)))
        .await
        .expect("pod's pull");
    let paused = started.elapsed();
    assert!(
        paused > Duration::from_secs(6),
        "pod pull took only {paused:?}"
    );
    let reply = tokio::time::timeout(Duration::from_secs(90), prewarm)
        .await
        .expect("prewarm pull answered")
        .unwrap()
        .unwrap_or_else(|e| {
            panic!(
                "the paused prewarm pull was cancelled by containerd: {e:?}\npullgate:\n{}\ncontainerd:\n{}",
                tail(&node.pullgate.log(), 60),
                tail(&node.containerd.log(), 20)
            )
        })
        .into_inner();
    assert_eq!(reply.image_ref, pre.config_digest);
    let m = node.pullgate.metrics().await;
    let parked = metric_value(&m, "pullgate_mirror_parked_streams_total");
    let preempted = metric_value(&m, "pullgate_prewarm_preemptions_total");
    let ratio = fast.bytes() as f64 / pre.total_size as f64;
    eprintln!(
        "pod pull {paused:?}; parked {parked}, preemptions {preempted}, prewarm proxy bytes {ratio:.3}x"
    );
    assert!(parked + preempted >= 1.0, "prewarm never paused");
    // Paused parts reopen with a Range; what was in flight on a connection as it closed (its
    // socket buffers, measured 300-400 KiB here) is read again. On containerd 2.x the prewarm
    // pull is handed back instead (preempted) and forwarded again: containerd resumes what it
    // wrote, and the parts pullgate held ahead (at most 4 × 2 MiB of the 64) are read again.
    let bound = if preempted > 0.0 {
        1.15
    } else {
        1.01 + parked * (512 << 10) as f64 / pre.total_size as f64
    };
    assert!(
        ratio <= bound,
        "read {ratio:.3}x the prewarm image (bound {bound:.3})"
    );
    assert!(
        !node.containerd.log().contains("no progress"),
        "containerd cancelled a pull"
    );
    assert_no_ingests(&node).await;
}
