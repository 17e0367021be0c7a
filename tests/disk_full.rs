//! A full disk never stays full: containerd's root on a small tmpfs, an image larger than it
//! pulled through pullgate fails with containerd's ENOSPC, and the node pulls again at once; a
//! failed pull's retries keep one lease per image, and resume still works through them.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::daemon::Pullgate;
use common::slowproxy::SlowProxy;
use common::*;

/// The default, written out: the harness lowers it for tests on the build machine's disk.
const DEFAULT_MIN_FREE: &str = "keep_partial_min_free = \"15%\"";

/// A tmpfs mounted for the test, unmounted when dropped (after containerd has stopped).
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(at).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "mount tmpfs: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(at.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazy: a containerd shim still holding a file must not leave the mount behind.
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Fields drop in order: the processes stop before the tmpfs goes.
struct SmallDisk {
    pullgate: Pullgate,
    containerd: Containerd,
    _root: Tmpfs,
    registry: Registry,
    _dir: tempfile::TempDir,
}

impl SmallDisk {
    /// containerd's root on a `size` tmpfs; `mirror_toml` in pullgate's `[mirror]`.
    async fn start(size: &str, mirror_toml: &str) -> SmallDisk {
        let dir = tempdir();
        let registry = Registry::start(&dir.path().join("registry"), None).await;
        let root = Tmpfs::mount(&dir.path().join("ctd").join("root"), size);
        let containerd = Containerd::start(&dir.path().join("ctd"), &[&registry]).await;
        let pullgate = Pullgate::start(&dir.path().join("pg"), &containerd, mirror_toml).await;
        SmallDisk {
            pullgate,
            containerd,
            _root: root,
            registry,
            _dir: dir,
        }
    }

    fn via(
        &self,
    ) -> pullgate::proto::runtime::v1::image_service_client::ImageServiceClient<
        tonic::transport::Channel,
    > {
        image_client(&self.pullgate.socket())
    }

    /// pullgate's leases in containerd.
    fn our_leases(&self) -> Vec<String> {
        self.containerd
            .ctr(&["leases", "ls", "-q"])
            .lines()
            // Spare leases (made ahead for the next pod's pull) hold nothing of a pull.
            .filter(|l| l.starts_with("pullgate-") && !l.starts_with("pullgate-spare-"))
            .map(str::to_string)
            .collect()
    }

    async fn slow_proxy(&self, bytes_per_sec: u64) -> SlowProxy {
        let proxy = SlowProxy::start(&self.registry.addr(), bytes_per_sec).await;
        self.containerd.add_host(&proxy.addr);
        proxy
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_that_fills_the_disk_leaves_the_node_able_to_pull() {
    let node = SmallDisk::start("300m", DEFAULT_MIN_FREE).await;
    let big = push_image(&node.registry, "disk/big", "v1", &[400 << 20], None).await;
    let small = push_image(&node.registry, "disk/small", "v1", &[1 << 20], None).await;

    for attempt in 1..=2 {
        let err = node
            .via()
            .pull_image(pull_request(&big.reference()))
            .await
            .expect_err("an image larger than the disk cannot be pulled");
        eprintln!("attempt {attempt}: {}", err.message());
        assert!(
            err.message().contains("no space left on device"),
            "containerd's own error reaches the client: {err:?}"
        );
        // Freed before the reply: no lease of pullgate holds the partial layer.
        assert_eq!(node.our_leases(), Vec::<String>::new(), "attempt {attempt}");

        let started = Instant::now();
        let reply = tokio::time::timeout(
            Duration::from_secs(30),
            node.via().pull_image(pull_request(&small.reference())),
        )
        .await
        .expect("the small pull ends within 30 s")
        .expect("a small image pulls right after the full disk")
        .into_inner();
        eprintln!(
            "attempt {attempt}: small pull after ENOSPC took {:?}",
            started.elapsed()
        );
        assert_eq!(reply.image_ref, small.config_digest);
        // The next round pulls it again.
        node.containerd
            .ctr(&["images", "rm", "--sync", &small.reference()]);
    }
    let m = node.pullgate.metrics().await;
    assert!(
        common::daemon::metric_value(
            &m,
            "pullgate_partial_leases_dropped_total{reason=\"disk_full\"}"
        ) >= 2.0,
        "{m}"
    );
    assert!(
        common::daemon::metric_value(&m, "pullgate_containerd_disk_size_bytes") > 0.0,
        "{m}"
    );
    let log = node.pullgate.log();
    assert!(log.contains("containerd ran out of disk space"), "{log}");
}

/// Fails a pull of `reference` by cutting its registry mid-layer.
async fn fail_midway(node: &SmallDisk, proxy: &mut SlowProxy, reference: &str, at: u64) {
    let mut client = node.via();
    let req = pull_request(reference);
    let pull = tokio::spawn(async move { client.pull_image(req).await });
    wait_for(
        "part of the layer through",
        Duration::from_secs(30),
        || async { proxy.bytes() >= at },
    )
    .await;
    proxy.kill().await;
    tokio::time::timeout(Duration::from_secs(90), pull)
        .await
        .expect("the pull ends while the registry is down")
        .unwrap()
        .expect_err("the pull fails with the registry gone");
    proxy.revive().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_keep_one_lease_per_image_and_still_resume() {
    let node = SmallDisk::start("300m", DEFAULT_MIN_FREE).await;
    let size = 4 << 20;
    let img = push_image(&node.registry, "disk/retry", "v1", &[size], None).await;
    let mut proxy = node.slow_proxy(1 << 20).await;
    let reference = img.reference_via(&proxy.addr);

    fail_midway(&node, &mut proxy, &reference, 1 << 20).await;
    let first = node.our_leases();
    assert_eq!(first.len(), 1, "the failed pull's lease is kept: {first:?}");
    let at = proxy.bytes() + (1 << 20);
    fail_midway(&node, &mut proxy, &reference, at).await;
    // The retry's lease took in the first one's downloads; the first is gone.
    wait_for(
        "one lease for the image",
        Duration::from_secs(10),
        || async { node.our_leases().len() == 1 },
    )
    .await;
    assert_ne!(
        node.our_leases(),
        first,
        "the retry's lease is the one kept"
    );

    let reply = node
        .via()
        .pull_image(pull_request(&reference))
        .await
        .expect("pull completes once the registry is back")
        .into_inner();
    assert_eq!(reply.image_ref, img.config_digest);
    let ratio = proxy.bytes() as f64 / img.total_size as f64;
    eprintln!("registry bytes over three attempts: {ratio:.2}x the image");
    assert!(ratio <= 1.1, "re-fetched: {ratio:.2}x the image");
    wait_for("no lease left", Duration::from_secs(10), || async {
        node.our_leases().is_empty()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn below_the_free_space_threshold_a_failed_pull_keeps_nothing() {
    // 100%: the disk is always below the threshold.
    let node = SmallDisk::start("300m", "keep_partial_min_free = \"100%\"").await;
    let img = push_image(&node.registry, "disk/low", "v1", &[4 << 20], None).await;
    let mut proxy = node.slow_proxy(1 << 20).await;
    let reference = img.reference_via(&proxy.addr);
    fail_midway(&node, &mut proxy, &reference, 1 << 20).await;
    assert_eq!(node.our_leases(), Vec::<String>::new());
    let m = node.pullgate.metrics().await;
    assert_eq!(
        common::daemon::metric_value(&m, "pullgate_disk_pressure"),
        1.0,
        "{m}"
    );
    // `pullgate status` reads the same root (from containerd's config) and says so.
    let out = Command::new(common::daemon::binary())
        .arg("status")
        .arg("--config")
        .arg(node.pullgate.config_path())
        .args(["--kubelet-config", "/nonexistent", "--json"])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    assert_eq!(v["disk"]["pressure"], true, "{v}");
    assert_eq!(
        v["disk"]["root"],
        node.containerd.dir().join("root").display().to_string(),
        "{v}"
    );
    assert!(
        v["disk"]["size_bytes"].as_u64().unwrap() <= 300 << 20,
        "{v}"
    );
    assert!(
        v["problems"]
            .to_string()
            .contains("mirror.keep_partial_min_free"),
        "{v}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_staged_prewarm_that_fills_the_disk_leaves_the_node_able_to_pull() {
    // pullgate writes the prewarm's blobs into containerd's store itself (`stage_prewarm`):
    // containerd's ENOSPC ends the staging, containerd's own attempt fails the same way, and its
    // error reaches the requester; the partial blob is freed and a pod's pull works at once.
    let node = SmallDisk::start(
        "300m",
        &format!("{DEFAULT_MIN_FREE}\n[containerd]\nstage_prewarm = \"always\"\n"),
    )
    .await;
    let big = push_image(&node.registry, "stagedisk/big", "v1", &[400 << 20], None).await;
    let small = push_image(&node.registry, "stagedisk/small", "v1", &[1 << 20], None).await;
    let err = tokio::time::timeout(
        Duration::from_secs(120),
        node.via().pull_image(prewarm_request(&big.reference())),
    )
    .await
    .expect("the prewarm ends")
    .expect_err("an image larger than the disk cannot be pulled");
    eprintln!("prewarm: {}", err.message());
    assert!(
        err.message().contains("no space left on device"),
        "containerd's own error reaches the client: {err:?}"
    );
    assert_eq!(node.our_leases(), Vec::<String>::new());
    let reply = tokio::time::timeout(
        Duration::from_secs(30),
        node.via().pull_image(pull_request(&small.reference())),
    )
    .await
    .expect("the small pull ends within 30 s")
    .expect("a small image pulls right after the full disk")
    .into_inner();
    assert_eq!(reply.image_ref, small.config_digest);
    let m = node.pullgate.metrics().await;
    assert!(
        common::daemon::metric_value(&m, "pullgate_prewarm_stage_failures_total") >= 1.0,
        "{m}"
    );
    let log = node.pullgate.log();
    assert!(log.contains("cannot stage the blob"), "{}", tail(&log, 30));
}
