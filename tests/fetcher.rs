//! End-to-end tests of pullgate's layer fetcher on a real containerd and registry: blobs go into
//! containerd's content store through pullgate, containerd fetches none of them, and broken
//! registries get clean errors with nothing corrupt committed.

mod common;

use std::time::Duration;

use common::daemon::metric_value;
use common::faultproxy::Fault;
use common::node::Node;
use common::registry::push_index;
use common::*;
use pullgate::proto::runtime::v1::*;
use tonic::Code;

const CONTAINERD_UA: &str = "containerd/";

fn spec(image: &str) -> Option<ImageSpec> {
    Some(ImageSpec {
        image: image.to_string(),
        ..Default::default()
    })
}

/// Nothing pullgate made is left in containerd: no lease, no unfinished ingest.
async fn assert_no_leftovers(node: &Node) {
    let content = node.content();
    let leases = content.pullgate_leases().await.unwrap();
    assert!(leases.is_empty(), "leases left: {leases:?}");
    let ingests = content.list_ingests("").await.unwrap();
    assert!(ingests.is_empty(), "ingests left: {ingests:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cold_pull_is_fetched_by_pullgate_and_containerd_fetches_no_blob() {
    let node = Node::start(None).await;
    let img = push_image(
        &node.registry,
        "fetch/app",
        "v1",
        &[3 << 20, 1 << 20, 200 << 10],
        None,
    )
    .await;
    let reply = node
        .via()
        .pull_image(pull_request(&img.reference()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.image_ref, img.config_digest);

    // Every blob came from pullgate, none from containerd.
    let blob_gets: Vec<_> = node
        .registry
        .requests()
        .into_iter()
        .filter(|r| r.method == "GET" && r.path.contains("/blobs/sha256:"))
        .collect();
    assert!(
        blob_gets
            .iter()
            .all(|r| !r.user_agent.starts_with(CONTAINERD_UA)),
        "containerd fetched blobs itself: {blob_gets:?}"
    );
    assert_eq!(blob_gets.len(), img.blob_count(), "{blob_gets:?}");

    // The image is complete and usable: containerd unpacked it and reports it.
    let status = node
        .direct()
        .image_status(ImageStatusRequest {
            image: spec(&img.reference()),
            verbose: false,
        })
        .await
        .unwrap()
        .into_inner()
        .image
        .expect("image recorded");
    assert_eq!(status.size, img.total_size);

    let m = node.pullgate.metrics().await;
    assert_eq!(
        metric_value(&m, "pullgate_blobs_total{outcome=\"fetched\"}"),
        img.blob_count() as f64,
        "{m}"
    );
    let blob_bytes: u64 = img.layer_blob_sizes.iter().sum::<u64>() + img.config_size;
    assert_eq!(
        metric_value(&m, "pullgate_fetched_bytes_total{source=\"registry\"}"),
        blob_bytes as f64
    );
    assert_eq!(
        metric_value(&m, "pullgate_fetch_fallbacks_total{reason=\"unsupported\"}"),
        0.0
    );
    assert_no_leftovers(&node).await;

    // Removed (containerd collects the blobs) and pulled again: a fresh fetch, no leftovers.
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
    assert_no_leftovers(&node).await;
}

/// The chain IDs of an image's layers, from its config in containerd's content store.
async fn chain_ids(node: &Node, config_digest: &str) -> Vec<String> {
    use sha2::{Digest, Sha256};
    let config = node
        .content()
        .read_small(config_digest, 1 << 20)
        .await
        .unwrap();
    let config: serde_json::Value = serde_json::from_slice(&config).unwrap();
    let mut chain = String::new();
    let mut out = Vec::new();
    for d in config["rootfs"]["diff_ids"].as_array().unwrap() {
        let d = d.as_str().unwrap();
        chain = if chain.is_empty() {
            d.to_string()
        } else {
            let h = Sha256::digest(format!("{chain} {d}").as_bytes());
            format!(
                "sha256:{}",
                h.iter().map(|b| format!("{b:02x}")).collect::<String>()
            )
        };
        out.push(chain.clone());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn layers_are_unpacked_ahead_and_kept_by_the_image_alone() {
    let node = Node::start(None).await;
    let img = push_image(
        &node.registry,
        "ahead/app",
        "v1",
        &[2 << 20, 1 << 20, 300 << 10],
        None,
    )
    .await;
    let other = push_image(&node.registry, "ahead/other", "v1", &[100 << 10], None).await;
    node.via()
        .pull_image(pull_request(&img.reference()))
        .await
        .unwrap();
    let m = node.pullgate.metrics().await;
    assert_eq!(
        metric_value(&m, "pullgate_layers_unpacked_ahead_total"),
        3.0,
        "{m}"
    );
    assert_eq!(
        metric_value(
            &m,
            "pullgate_fetch_fallbacks_total{reason=\"unpack_ahead\"}"
        ),
        0.0
    );
    let chains = chain_ids(&node, &img.config_digest).await;
    assert_eq!(chains.len(), 3);
    let snaps = node.snapshots();
    for c in &chains {
        assert!(snaps.exists("native", c).await.unwrap(), "no snapshot {c}");
    }
    // The pull's lease is gone; a garbage collection (containerd runs one synchronously when
    // an image is removed) keeps the snapshots: containerd's finish tied them to the image.
    assert_no_leftovers(&node).await;
    node.via()
        .pull_image(pull_request(&other.reference()))
        .await
        .unwrap();
    node.via()
        .remove_image(RemoveImageRequest {
            image: spec(&other.reference()),
        })
        .await
        .unwrap();
    for c in &chains {
        assert!(snaps.exists("native", c).await.unwrap(), "{c} collected");
    }
    // Removing the image frees them like any unpacked image.
    node.via()
        .remove_image(RemoveImageRequest {
            image: spec(&img.reference()),
        })
        .await
        .unwrap();
    for c in &chains {
        assert!(!snaps.exists("native", c).await.unwrap(), "{c} left behind");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unpack_ahead_finds_containerds_snapshotter() {
    // pullgate asks containerd which snapshotter CRI unpacks into (1.x: its status; 2.x: its
    // image filesystem) and unpacks ahead into that one, whichever it is.
    let mut snapshotters = vec!["native"];
    if common::containerd::overlayfs_mountable() {
        snapshotters.push("overlayfs");
    } else {
        eprintln!("overlayfs cannot be mounted here: only native is checked");
    }
    for snapshotter in snapshotters {
        let node = Node::start_on(None, "", snapshotter).await;
        assert_eq!(
            node.snapshots().cri_snapshotter().await.unwrap(),
            snapshotter
        );
        let img = push_image(
            &node.registry,
            "ahead/found",
            "v1",
            &[1 << 20, 200 << 10],
            None,
        )
        .await;
        node.via()
            .pull_image(pull_request(&img.reference()))
            .await
            .unwrap();
        let m = node.pullgate.metrics().await;
        assert_eq!(
            metric_value(&m, "pullgate_layers_unpacked_ahead_total"),
            2.0,
            "{snapshotter}: {m}"
        );
        let snaps = node.snapshots();
        for c in chain_ids(&node, &img.config_digest).await {
            assert!(
                snaps.exists(snapshotter, &c).await.unwrap(),
                "{snapshotter}: no {c}"
            );
        }
        let log = node.pullgate.log();
        assert!(
            log.contains(&format!("snapshotter={snapshotter}"))
                || log.contains(&format!("snapshotter=\"{snapshotter}\"")),
            "{snapshotter}: {}",
            common::tail(&log, 20)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_unpack_ahead_is_left_to_containerd() {
    // A snapshotter containerd does not have: every extraction fails at prepare.
    let node = Node::start_with(None, "snapshotter = \"no-such-snapshotter\"\n").await;
    let img = push_image(
        &node.registry,
        "ahead/broken",
        "v1",
        &[1 << 20, 200 << 10],
        None,
    )
    .await;
    node.via()
        .pull_image(pull_request(&img.reference()))
        .await
        .expect("containerd unpacks what pullgate could not");
    let m = node.pullgate.metrics().await;
    assert_eq!(
        metric_value(
            &m,
            "pullgate_fetch_fallbacks_total{reason=\"unpack_ahead\"}"
        ),
        1.0,
        "{m}"
    );
    assert_eq!(
        metric_value(&m, "pullgate_layers_unpacked_ahead_total"),
        0.0
    );
    // containerd unpacked into its own snapshotter instead.
    let snaps = node.snapshots();
    for c in chain_ids(&node, &img.config_digest).await {
        assert!(snaps.exists("native", &c).await.unwrap(), "no snapshot {c}");
    }
    assert_no_leftovers(&node).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_body_is_resumed_with_a_range_request() {
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
    let range = gets[1]
        .range
        .clone()
        .expect("second GET resumes with Range");
    let half = img.layer_blob_sizes[0] / 2;
    assert!(range.starts_with(&format!("bytes={half}-")), "{range}");
    assert_no_leftovers(&node).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_blob_is_never_committed_and_fails_cleanly() {
    let node = Node::start_with(None, "retries = 1").await;
    let img = push_image(&node.registry, "fault/flip", "v1", &[512 << 10], None).await;
    let proxy = node.fault_proxy().await;
    let layer = img.layer_digests[0].clone();
    proxy.inject(&layer, Fault::Flip, 100);

    let reference = img.reference_via(&proxy.addr);
    let err = node
        .via()
        .pull_image(pull_request(&reference))
        .await
        .expect_err("corrupt blob must fail the pull");
    assert_eq!(err.code(), Code::DataLoss, "{err:?}");
    for part in [reference.as_str(), layer.as_str(), "corrupt"] {
        assert!(
            err.message().contains(part),
            "{part} not in {:?}",
            err.message()
        );
    }
    // Tried twice (retries = 1), nothing committed, nothing left half-written.
    assert_eq!(proxy.blob_gets(&layer).len(), 2);
    assert_eq!(node.content().info(&layer).await.unwrap(), None);
    assert_no_leftovers(&node).await;

    // The registry heals: the next pull works.
    proxy.inject(&layer, Fault::None, 0);
    node.via()
        .pull_image(pull_request(&reference))
        .await
        .expect("pull after the fault is gone");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_registry_hits_the_no_progress_timeout() {
    let node = Node::start_with(None, "retries = 0\nno_progress_timeout = \"1s\"").await;
    let img = push_image(&node.registry, "fault/stall", "v1", &[1 << 20], None).await;
    let proxy = node.fault_proxy().await;
    let layer = img.layer_digests[0].clone();
    proxy.inject(&layer, Fault::Stall, 1);

    let reference = img.reference_via(&proxy.addr);
    let started = std::time::Instant::now();
    let err = node
        .via()
        .pull_image(pull_request(&reference))
        .await
        .expect_err("stalled blob must fail the pull");
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert!(
        err.message().contains(&layer) && err.message().contains("stalled"),
        "{err:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(30));
    assert_eq!(node.content().info(&layer).await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetcher_off_leaves_the_fetch_to_containerd() {
    let node = Node::start_with(None, "enabled = false").await;
    let img = push_image(&node.registry, "off/app", "v1", &[256 << 10], None).await;
    node.via()
        .pull_image(pull_request(&img.reference()))
        .await
        .unwrap();
    let by_containerd = node
        .registry
        .requests()
        .into_iter()
        .filter(|r| r.path.contains("/blobs/sha256:") && r.user_agent.starts_with(CONTAINERD_UA))
        .count();
    assert_eq!(by_containerd, img.blob_count());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pullgate_killed_mid_blob_resumes_after_restart() {
    let mut node = Node::start(None).await;
    let size = 4 << 20;
    let img = push_image(&node.registry, "crash/app", "v1", &[size], None).await;
    let proxy = node.slow_proxy(1 << 20).await;
    let reference = img.reference_via(&proxy.addr);
    let layer = img.layer_digests[0].clone();
    let ingest = pullgate::fetch::ingest_ref("application/vnd.oci.image.layer.v1.tar", &layer);

    let mut client = node.via();
    let req = pull_request(&reference);
    let first = tokio::spawn(async move { client.pull_image(req).await });
    let content = node.content();
    wait_for(
        "half the layer in the ingest",
        Duration::from_secs(30),
        || async {
            content
                .status(&ingest)
                .await
                .ok()
                .flatten()
                .is_some_and(|s| s.offset >= 2 << 20)
        },
    )
    .await;
    node.pullgate.kill_now();
    let sent_before_kill = proxy.bytes();
    assert!(first.await.unwrap().is_err(), "the client sees the crash");
    let stored = content
        .status(&ingest)
        .await
        .unwrap()
        .expect("ingest kept")
        .offset;

    node.pullgate.restart().await;
    let reply = node
        .via()
        .pull_image(pull_request(&reference))
        .await
        .expect("pull completes after restart")
        .into_inner();
    assert_eq!(reply.image_ref, img.config_digest);
    // Only what was not stored yet crossed the wire again, plus at most one chunk in flight.
    let after = proxy.bytes() - sent_before_kill;
    let missing = size as u64 - stored;
    assert!(
        after <= missing + (1 << 20),
        "re-fetched {after} bytes for {missing} missing"
    );
    assert_no_leftovers(&node).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_the_fetcher_cannot_handle_is_left_to_containerd() {
    // An anonymous pull from a private registry: the fetcher is refused, containerd tries with
    // its own logic and gives its own answer, exactly as without pullgate.
    let node = Node::start(Some(("carol", "c4rol-pass"))).await;
    let img = push_image(
        &node.registry,
        "fb/app",
        "v1",
        &[64 << 10],
        Some(("carol", "c4rol-pass")),
    )
    .await;
    let direct = node
        .direct()
        .pull_image(pull_request(&img.reference()))
        .await
        .unwrap_err();
    let via = node
        .via()
        .pull_image(pull_request(&img.reference()))
        .await
        .unwrap_err();
    assert_eq!(direct.code(), via.code());
    let m = node.pullgate.metrics().await;
    assert_eq!(
        metric_value(
            &m,
            "pullgate_fetch_fallbacks_total{reason=\"unauthorized\"}"
        ),
        1.0,
        "{m}"
    );
    assert_no_leftovers(&node).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn big_blobs_are_fetched_as_parallel_ranges_written_in_order() {
    let node = Node::start_with(None, "range_chunk_mib = 1\nrange_connections = 3").await;
    let size = (5 << 20) + 12345;
    let img = push_image(&node.registry, "ranges/app", "v1", &[size], None).await;
    let proxy = node.fault_proxy().await;
    let reference = img.reference_via(&proxy.addr);
    let reply = node
        .via()
        .pull_image(pull_request(&reference))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.image_ref, img.config_digest);

    let layer = &img.layer_digests[0];
    let blob_size = img.layer_blob_sizes[0];
    let mut ranges: Vec<String> = proxy
        .blob_gets(layer)
        .into_iter()
        .map(|r| r.range.expect("every layer GET is ranged"))
        .collect();
    ranges.sort_by_key(|r| {
        r.trim_start_matches("bytes=")
            .split('-')
            .next()
            .unwrap()
            .parse::<u64>()
            .unwrap()
    });
    let mib = 1u64 << 20;
    let expected: Vec<String> = (0..blob_size)
        .step_by(mib as usize)
        .map(|s| format!("bytes={}-{}", s, (s + mib).min(blob_size) - 1))
        .collect();
    assert_eq!(ranges, expected);
    // containerd accepted the assembled blob: the digest matched.
    assert_no_leftovers(&node).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_from_hosts_toml_is_used_and_skipped_when_down() {
    let node = Node::start(None).await;
    let img = push_image(
        &node.registry,
        "mirror/app",
        "v1",
        &[512 << 10, 64 << 10],
        None,
    )
    .await;
    let mut mirror = Registry::start_mirror(&node.dir.path().join("mirror"), &node.registry).await;
    // containerd's format: mirrors as [host] entries in order, the registry itself last.
    let reg = node.registry.addr();
    std::fs::write(
        node.containerd.dir().join("certs.d").join(&reg).join("hosts.toml"),
        format!(
            "server = \"http://{reg}\"\n\n[host.\"http://{}\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
            mirror.addr()
        ),
    )
    .unwrap();

    node.via()
        .pull_image(pull_request(&img.reference()))
        .await
        .expect("pull through the mirror");
    let m = node.pullgate.metrics().await;
    let from_mirror = metric_value(&m, "pullgate_fetched_bytes_total{source=\"mirror\"}");
    assert!(from_mirror > 0.0, "{m}");
    assert_eq!(
        metric_value(&m, "pullgate_fetched_bytes_total{source=\"registry\"}"),
        0.0
    );
    // pullgate asked the mirror, never the registry, for blobs.
    let direct_blob_gets = node
        .registry
        .requests()
        .into_iter()
        .filter(|r| r.path.contains("/blobs/sha256:") && r.user_agent.starts_with("pullgate/"))
        .count();
    assert_eq!(direct_blob_gets, 0);

    // Mirror down: the registry serves.
    node.via()
        .remove_image(RemoveImageRequest {
            image: spec(&img.reference()),
        })
        .await
        .unwrap();
    mirror.stop();
    node.via()
        .pull_image(pull_request(&img.reference()))
        .await
        .expect("pull with the mirror down");
    let m = node.pullgate.metrics().await;
    assert!(
        metric_value(&m, "pullgate_fetched_bytes_total{source=\"registry\"}") > 0.0,
        "{m}"
    );
    assert_no_leftovers(&node).await;
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
    // pullgate fetched exactly that platform's blobs; containerd fetched none.
    let gets: Vec<_> = node
        .registry
        .requests()
        .into_iter()
        .filter(|r| r.method == "GET")
        .collect();
    let fetched = |digest: &str| {
        gets.iter()
            .filter(|r| r.path.ends_with(digest) && r.path.contains("/blobs/"))
            .count()
    };
    assert_eq!(fetched(&node_arch.layer_digests[0]), 1);
    assert_eq!(fetched(&other.layer_digests[0]), 0);
    assert!(gets
        .iter()
        .filter(|r| r.path.contains("/blobs/"))
        .all(|r| !r.user_agent.starts_with(CONTAINERD_UA)));
    assert_no_leftovers(&node).await;
}
