//! End-to-end tests of the scheduler on a real containerd and registry: urgent pulls before
//! prewarm, promotion, bandwidth caps, `keep` prewarm entries, the P2P gate, the CLI and SIGHUP.

mod common;

use std::time::{Duration, Instant};

use common::node::Node;
use common::*;
use pullgate::api::client::connect;
use pullgate::proto::pullgate::v1 as api;
use pullgate::proto::runtime::v1::*;

const MB: usize = 1_000_000;

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
        .map(|r| r.into_inner().image.is_some())
        .unwrap_or(false)
}

async fn jobs(node: &Node, all: bool) -> Vec<api::Job> {
    let mut c = connect(&node.pullgate.api_socket()).await.unwrap();
    c.list(api::ListRequest { all })
        .await
        .unwrap()
        .into_inner()
        .jobs
}

async fn job_of(node: &Node, image: &str) -> Option<api::Job> {
    jobs(node, true)
        .await
        .into_iter()
        .rev()
        .find(|j| j.image.ends_with(image.split_once('/').unwrap().1))
}

async fn submit(node: &Node, image: &str, priority: i32) -> u64 {
    let mut c = connect(&node.pullgate.api_socket()).await.unwrap();
    c.submit(api::SubmitRequest {
        image: image.to_string(),
        priority,
    })
    .await
    .unwrap()
    .into_inner()
    .job_id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn urgent_pull_during_four_big_prewarms_finishes_first_and_prewarms_complete() {
    // A 40 MB/s node link: four 24 MB prewarms need ~2.4 s, the 6 MB pod image alone ~0.15 s.
    let node = Node::start_with(
        None,
        "[schedule]\nbandwidth = \"40MB\"\nmax_prewarm_jobs = 4\n",
    )
    .await;
    let mut prewarms = Vec::new();
    for i in 0..4 {
        let img = push_image(
            &node.registry,
            &format!("big/p{i}"),
            "v1",
            &[12 * MB, 12 * MB],
            None,
        )
        .await;
        prewarms.push(img);
    }
    let pod_img = push_image(&node.registry, "pod/app", "v1", &[3 * MB, 3 * MB], None).await;
    for p in &prewarms {
        submit(&node, &p.reference(), 0).await;
    }
    wait_for("prewarm bytes flowing", Duration::from_secs(20), || async {
        node.pullgate
            .metric("pullgate_class_bytes_total{class=\"prewarm\"}")
            .await
            > 4.0 * MB as f64
    })
    .await;
    // What each prewarm had when the pod came: on containerd 1.7 one of them now and then has
    // its whole image in by then (not investigated yet: 1 run in 4 to 8), and that one may
    // finish before the pod's.
    let states = |all: Vec<api::Job>| {
        all.iter()
            .filter(|j| j.class == "prewarm")
            .map(|j| format!("{} {} {} B", j.image, j.state, j.bytes_done))
            .collect::<Vec<_>>()
    };
    let at_start = jobs(&node, true).await;
    let nearly_done = at_start
        .iter()
        .filter(|j| j.class == "prewarm" && j.bytes_done + MB as u64 >= j.bytes_total)
        .count();
    let before = states(at_start);
    let started = std::time::Instant::now();
    tokio::time::timeout(
        Duration::from_secs(60),
        node.via().pull_image(pull_request(&pod_img.reference())),
    )
    .await
    .expect("the pod's pull never waits forever behind paused prewarm")
    .expect("urgent pull");
    let unfinished = {
        let all = jobs(&node, false).await;
        all.iter().filter(|j| j.class == "prewarm").count()
    };
    eprintln!(
        "pod pull under four prewarms: {:?}, prewarm jobs still running: {unfinished}",
        started.elapsed()
    );
    // containerd 2.x (its default limit: 3 downloads shared by every pull on the node): the
    // prewarm blobs went into containerd's store through its content service, so the pod's
    // pull got the slots.
    assert!(
        unfinished + nearly_done >= 4 && nearly_done <= 1,
        "the pod's pull finished while all four prewarms were still running; before it: \
         {before:?}, after: {:?}",
        states(jobs(&node, true).await)
    );
    if common::containerd::containerd_version().major >= 2 {
        // Staged into containerd's store (`stage_prewarm = "auto"`), so no prewarm pull held a
        // slot; or handed back.
        let m = node.pullgate.metrics().await;
        let metric = |name| common::daemon::metric_value(&m, name);
        assert!(
            metric("pullgate_prewarm_staged_blobs_total") >= 1.0
                || metric("pullgate_prewarm_preemptions_total") >= 1.0,
            "{m}"
        );
    }
    for p in &prewarms {
        let r = p.reference();
        wait_for("prewarm completes", Duration::from_secs(60), || async {
            present(&node, &r).await
        })
        .await;
    }
    // containerd lists the image as soon as it records it, a moment before its PullImage
    // answer reaches pullgate and the job is marked done.
    for p in &prewarms {
        let r = p.reference();
        wait_for("prewarm job done", Duration::from_secs(10), || async {
            job_of(&node, &r).await.is_some_and(|j| j.state == "done")
        })
        .await;
    }
    let log = node.pullgate.log();
    assert!(!log.contains("panicked"), "{}", tail(&log, 30));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_room_in_containerds_download_slots_prewarm_is_paused_not_handed_back() {
    // containerd 2.x with the transfer service's limit raised (as the packaging snippet shows
    // for prewarm throughput): a prewarm of 3 blobs leaves a pod its slots, so pullgate pauses it
    // at the mirror instead of handing it back (which costs the pod containerd's cleanup of the
    // cancelled pull). containerd 1.x limits each pull by itself: never handed back there.
    let dir = tempdir();
    let registry = Registry::start(&dir.path().join("registry"), None).await;
    let containerd = Containerd::start_binary(
        &common::containerd::containerd_bin(),
        &dir.path().join("ctd"),
        &[registry.addr()],
        "",
        "native",
        "",
        "max_concurrent_downloads = 16",
    )
    .await;
    let pullgate = common::daemon::Pullgate::start(
        &dir.path().join("pg"),
        &containerd,
        "[schedule]\nbandwidth = \"20MB\"\n",
    )
    .await;
    let node = Node {
        pullgate,
        containerd,
        registry,
        dir,
    };
    let pre = push_image(&node.registry, "roomy/pre", "v1", &[12 * MB, 12 * MB], None).await;
    let pod = push_image(&node.registry, "roomy/pod", "v1", &[2 * MB], None).await;
    submit(&node, &pre.reference(), 0).await;
    wait_for("prewarm bytes flowing", Duration::from_secs(20), || async {
        node.pullgate
            .metric("pullgate_class_bytes_total{class=\"prewarm\"}")
            .await
            > 2.0 * MB as f64
    })
    .await;
    tokio::time::timeout(
        Duration::from_secs(60),
        node.via().pull_image(pull_request(&pod.reference())),
    )
    .await
    .expect("the pod's pull never waits forever behind paused prewarm")
    .expect("urgent pull");
    assert!(
        !present(&node, &pre.reference()).await,
        "the prewarm finished before the pod's pull: nothing was paused"
    );
    let m = node.pullgate.metrics().await;
    assert_eq!(
        common::daemon::metric_value(&m, "pullgate_prewarm_preemptions_total"),
        0.0,
        "handed back although containerd's 16 slots leave the pod room"
    );
    let r = pre.reference();
    wait_for("prewarm completes", Duration::from_secs(60), || async {
        present(&node, &r).await
    })
    .await;
    assert!(
        node.pullgate.log().contains("shared_slots=16")
            || common::containerd::containerd_version().major < 2,
        "the limit was not read from containerd's config"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_layer_shared_with_a_paused_prewarm_streams_at_the_pods_class() {
    // A 20 MB/s link; prewarm pauses while a pod's bytes flow.
    let node = Node::start_with(None, "[schedule]\nbandwidth = \"20MB\"\n").await;
    let base = common::registry::random_layer_tar(0, 12 * MB);
    let pre = common::registry::push_image_on(
        &node.registry,
        "share/pre",
        "v1",
        Some(&base),
        &[12 * MB],
        None,
    )
    .await;
    let pod = common::registry::push_image_on(
        &node.registry,
        "share/pod",
        "v1",
        Some(&base),
        &[MB],
        None,
    )
    .await;
    assert_eq!(
        pre.layer_digests[0], pod.layer_digests[0],
        "one shared base layer"
    );
    submit(&node, &pre.reference(), 0).await;
    wait_for("prewarm bytes flowing", Duration::from_secs(20), || async {
        node.pullgate
            .metric("pullgate_class_bytes_total{class=\"prewarm\"}")
            .await
            > 2.0 * MB as f64
    })
    .await;
    let started = std::time::Instant::now();
    node.via()
        .pull_image(pull_request(&pod.reference()))
        .await
        .expect("pod pull");
    let took = started.elapsed();
    let urgent = node
        .pullgate
        .metric("pullgate_class_bytes_total{class=\"urgent\"}")
        .await;
    eprintln!("pod pull sharing a base with a prewarm: {took:?}, urgent bytes {urgent}");
    // The rest of the shared base came at the pod's class, not only the pod's own layer: the pod
    // did not wait for a paused prewarm stream (containerd fetches a digest once; the pod's pull
    // waits on that download).
    assert!(
        urgent > (pod.layer_blob_sizes[1] + MB as u64) as f64,
        "urgent bytes {urgent}: the shared layer stayed at prewarm pace"
    );
    // At link speed: under the 24 MB both images hold at 20 MB/s, with room for a noisy machine.
    assert!(took < Duration::from_secs(4), "{took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_waiting_for_a_prewarm_image_promotes_the_job_without_refetching() {
    // Prewarm is held to 4 MB/s; the pod's pull of the same image joins and promotes it.
    let node = Node::start_with(None, "[schedule]\nprewarm_bandwidth = \"4MB\"\n").await;
    let img = push_image(
        &node.registry,
        "promo/app",
        "v1",
        &[8 * MB, 8 * MB, 8 * MB],
        None,
    )
    .await;
    let id = submit(&node, &img.reference(), 0).await;
    wait_for("prewarm fetching", Duration::from_secs(20), || async {
        jobs(&node, false)
            .await
            .iter()
            .any(|j| j.id == id && j.bytes_done > 2 * MB as u64)
    })
    .await;
    let started = Instant::now();
    node.via()
        .pull_image(pull_request(&img.reference()))
        .await
        .expect("pod pull");
    let took = started.elapsed();
    assert_eq!(node.pullgate.metric("pullgate_promotions_total").await, 1.0);
    assert_eq!(
        node.pullgate
            .metric("pullgate_pull_requests_merged_total")
            .await,
        1.0
    );
    // Each blob was fetched once: the promoted job kept the bytes it had (where the prewarm's
    // blobs were being staged, containerd resumes them with a Range).
    assert_eq!(
        node.registry.blob_gets_from_start(&img.repo),
        img.blob_count(),
        "{:?}",
        node.registry.requests()
    );
    let j = job_of(&node, &img.reference()).await.unwrap();
    assert_eq!(
        (j.state.as_str(), j.class.as_str()),
        ("done", "urgent"),
        "{j:?}"
    );
    // At the prewarm rate the remaining >18 MB would need >4 s.
    assert!(took < Duration::from_secs(30), "{took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prewarm_throughput_stays_within_5_percent_of_its_cap() {
    let cap = 8_000_000.0;
    let node = Node::start_with(None, "[schedule]\nprewarm_bandwidth = \"8MB\"\n").await;
    let img = push_image(&node.registry, "cap/app", "v1", &[24 * MB, 24 * MB], None).await;
    let metric = "pullgate_class_bytes_total{class=\"prewarm\"}";
    submit(&node, &img.reference(), 0).await;
    // Samples of (time, bytes) while the pull runs; the rate is taken between the first sample
    // past 10 % and the last one before 90 %, away from start-up and the tail.
    let total = (48 * MB) as f64;
    let mut samples = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let b = node.pullgate.metric(metric).await;
        samples.push((Instant::now(), b));
        if b >= 0.9 * total || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let window: Vec<_> = samples
        .iter()
        .filter(|(_, b)| *b >= 0.1 * total && *b <= 0.9 * total)
        .collect();
    assert!(window.len() >= 10, "too few samples: {samples:?}");
    let (t0, b0) = window.first().unwrap();
    let (t1, b1) = window.last().unwrap();
    let rate = (b1 - b0) / t1.duration_since(*t0).as_secs_f64();
    assert!(
        (rate - cap).abs() <= 0.05 * cap,
        "prewarm rate {:.2} MB/s, cap 8 MB/s",
        rate / 1e6
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_entry_repulls_an_image_removed_behind_pullgates_back() {
    let dir = tempdir();
    let registry = Registry::start(&dir.path().join("registry"), None).await;
    let img = push_image(&registry, "keep/app", "v1", &[MB], None).await;
    let containerd = Containerd::start(&dir.path().join("ctd"), &[&registry]).await;
    let pullgate = common::daemon::Pullgate::start(
        &dir.path().join("pg"),
        &containerd,
        &format!(
            "[[prewarm]]\nimage = {:?}\npolicy = \"keep\"\ninterval = \"1s\"\n",
            img.reference()
        ),
    )
    .await;
    let node = Node {
        pullgate,
        containerd,
        registry,
        dir,
    };
    wait_for(
        "prewarm pulls the image",
        Duration::from_secs(30),
        || async { present(&node, &img.reference()).await },
    )
    .await;
    let ok = "pullgate_upstream_pulls_total{result=\"ok\"}";
    let before = node.pullgate.metric(ok).await;
    node.direct()
        .remove_image(RemoveImageRequest {
            image: spec(&img.reference()),
        })
        .await
        .unwrap();
    // With a 1 s interval the re-pull may be done before we could look for the gap, and the
    // blobs may still be in containerd's store (its GC is lazy), so the registry need not see
    // them again: the proof is the image back after a pull that ended after the removal.
    wait_for("keep re-pulls it", Duration::from_secs(30), || async {
        node.pullgate.metric(ok).await > before && present(&node, &img.reference()).await
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p2p_gate_holds_prewarm_until_the_probe_answers_and_urgent_never_waits() {
    let port = free_port();
    let node = Node::start_with(
        None,
        &format!(
            "[p2p_gate]\nprobe = \"tcp\"\ntarget = \"127.0.0.1:{port}\"\ninterval = \"100ms\"\n"
        ),
    )
    .await;
    let pre = push_image(&node.registry, "gate/pre", "v1", &[MB], None).await;
    let pod = push_image(&node.registry, "gate/pod", "v1", &[MB], None).await;
    let (code, out, err) = node.pullgate.cli(&["prewarm", &pre.reference()]).await;
    assert_eq!(code, 0, "{out}{err}");
    wait_for("job waits for p2p", Duration::from_secs(10), || async {
        job_of(&node, &pre.reference())
            .await
            .is_some_and(|j| j.state == "waiting-for-p2p")
    })
    .await;
    let (_, table, _) = node.pullgate.cli(&["jobs"]).await;
    assert!(table.contains("waiting-for-p2p"), "{table}");
    assert_eq!(node.pullgate.metric("pullgate_p2p_gate_open").await, 0.0);
    // Urgent work passes a closed gate.
    node.via()
        .pull_image(pull_request(&pod.reference()))
        .await
        .expect("urgent pull with the gate closed");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!present(&node, &pre.reference()).await);
    assert_eq!(node.registry.blob_gets(&pre.repo), 0);
    // The P2P agent comes up.
    let _agent = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    wait_for("prewarm completes", Duration::from_secs(30), || async {
        present(&node, &pre.reference()).await
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_shows_progress_and_wait_prewarmed_exits_when_done() {
    // 2 MB/s for prewarm: the configured 8 MB image takes about 4 s.
    let dir = tempdir();
    let registry = Registry::start(&dir.path().join("registry"), None).await;
    let cfg_img = push_image(&registry, "cli/configured", "v1", &[4 * MB, 4 * MB], None).await;
    let cli_img = push_image(&registry, "cli/adhoc", "v1", &[3 * MB], None).await;
    let containerd = Containerd::start(&dir.path().join("ctd"), &[&registry]).await;
    let pullgate = common::daemon::Pullgate::start(
        &dir.path().join("pg"),
        &containerd,
        &format!(
            "[schedule]\nprewarm_bandwidth = \"2MB\"\n[[prewarm]]\nimage = {:?}\n",
            cfg_img.reference()
        ),
    )
    .await;
    let node = Node {
        pullgate,
        containerd,
        registry,
        dir,
    };
    let mut wait = node
        .pullgate
        .cli_command(&["wait", "--prewarmed", "--timeout", "60s"])
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        wait.try_wait().unwrap().is_none(),
        "wait --prewarmed exited before the image was there"
    );
    let status = tokio::time::timeout(Duration::from_secs(60), wait.wait())
        .await
        .expect("wait --prewarmed exits")
        .unwrap();
    assert!(status.success());
    assert!(present(&node, &cfg_img.reference()).await);

    let (code, out, err) = node
        .pullgate
        .cli(&["prewarm", &cli_img.reference(), "--priority", "5", "--wait"])
        .await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        err.contains("fetching") && err.contains('%'),
        "progress shown: {err}"
    );
    assert!(out.contains("done in"), "{out}");
    let (code, table, _) = node.pullgate.cli(&["jobs", "--all"]).await;
    assert_eq!(code, 0);
    let row = table
        .lines()
        .find(|l| l.contains("cli/adhoc"))
        .unwrap_or_else(|| panic!("{table}"));
    assert!(
        row.contains("done") && row.contains("prewarm") && row.contains(" 5 "),
        "{row}"
    );
    // Cancelling an ended job is a clean error.
    let (code, _, err) = node.pullgate.cli(&["cancel", "999"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("no job 999"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_a_prewarm_and_leaves_nothing_behind() {
    let node = Node::start_with(None, "[schedule]\nprewarm_bandwidth = \"2MB\"\n").await;
    let img = push_image(&node.registry, "cancel/app", "v1", &[16 * MB], None).await;
    let id = submit(&node, &img.reference(), 0).await;
    wait_for("prewarm fetching", Duration::from_secs(20), || async {
        jobs(&node, false)
            .await
            .iter()
            .any(|j| j.id == id && j.bytes_done > 0)
    })
    .await;
    let (code, out, err) = node.pullgate.cli(&["cancel", &id.to_string()]).await;
    assert_eq!(code, 0, "{out}{err}");
    let j = job_of(&node, &img.reference()).await.unwrap();
    assert_eq!(j.state, "cancelled");
    assert!(!present(&node, &img.reference()).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_with_a_broken_config_keeps_the_old_one_and_a_good_one_applies() {
    let node = Node::start(None).await;
    let a = push_image(&node.registry, "hup/a", "v1", &[MB], None).await;
    let b = push_image(&node.registry, "hup/b", "v1", &[MB], None).await;
    let path = node.pullgate.config_path();
    let original = std::fs::read_to_string(&path).unwrap();
    let with = |images: &[&str]| {
        let mut text = original.clone();
        for i in images {
            text.push_str(&format!("[[prewarm]]\nimage = {i:?}\n"));
        }
        text
    };
    std::fs::write(&path, with(&[&a.reference()])).unwrap();
    node.pullgate.signal(libc::SIGHUP);
    wait_for("a prewarmed", Duration::from_secs(30), || async {
        present(&node, &a.reference()).await
    })
    .await;

    std::fs::write(&path, "[schedule\nbandwidth = ").unwrap();
    node.pullgate.signal(libc::SIGHUP);
    wait_for("reload refused", Duration::from_secs(10), || async {
        node.pullgate.log().contains("config refused")
    })
    .await;
    let (code, out, err) = node
        .pullgate
        .cli(&["wait", "--prewarmed", "--timeout", "5s"])
        .await;
    assert_eq!(code, 0, "old config still in force: {out}{err}");
    assert!(out.contains("all 1 prewarm images present"), "{out}");

    std::fs::write(&path, with(&[&a.reference(), &b.reference()])).unwrap();
    let reloads = |log: String| log.matches("SIGHUP: config reloaded").count();
    let before = reloads(node.pullgate.log());
    node.pullgate.signal(libc::SIGHUP);
    // The signal is handled in the background: `wait` must see the new list, not the old one.
    wait_for(
        "the good config applied",
        Duration::from_secs(10),
        || async { reloads(node.pullgate.log()) > before },
    )
    .await;
    let (code, out, err) = node
        .pullgate
        .cli(&["wait", "--prewarmed", "--timeout", "30s"])
        .await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(present(&node, &b.reference()).await);
    // The daemon kept serving throughout.
    assert_eq!(node.pullgate.http_get("/readyz").await.unwrap().0, 200);
}

/// The images of `images` in the order this node's lane admitted them (its log).
fn lane_sequence(log: &str, images: &[String]) -> Vec<String> {
    log.lines()
        .filter(|l| l.contains("admitted: containerd pulls through the mirror"))
        .filter_map(|l| {
            let image = images
                .iter()
                .find(|i| l.contains(&format!("image={i}}}")))?;
            assert!(l.contains("lane=true"), "not in the lane: {l}");
            Some(image.clone())
        })
        .collect()
}

/// On real containerd, with the images known before the lane starts (they wait for the P2P
/// gate, as prewarm does on a node whose P2P agent is still starting): the shared order is the
/// references' order, the per-node order the node's hash order, whatever the arrival order,
/// one image at a time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lane_walks_large_images_one_at_a_time_in_the_shared_or_the_nodes_own_order() {
    for (order, expected) in [
        ("shared", pullgate::schedule::LaneOrder::Shared),
        (
            "per-node",
            pullgate::schedule::LaneOrder::per_node("worker-17"),
        ),
    ] {
        let port = free_port();
        let node = Node::start_with(
            None,
            &format!(
                "[schedule]\nlarge_image_size = \"1MB\"\nmax_prewarm_jobs = 4\n\
                 lane_order = \"{order}\"\nnode_name = \"worker-17\"\n\
                 [p2p_gate]\nprobe = \"tcp\"\ntarget = \"127.0.0.1:{port}\"\ninterval = \"100ms\"\n"
            ),
        )
        .await;
        let mut images = Vec::new();
        for i in 0..4 {
            let repo = format!("lane/img{i}");
            let img = push_image(&node.registry, &repo, "v1", &[MB + MB / 5], None).await;
            images.push(img.reference());
        }
        // Submitted in reverse order of reference: arrival must not decide.
        for image in images.iter().rev() {
            submit(&node, image, 0).await;
        }
        wait_for(
            "every job waits for p2p",
            Duration::from_secs(10),
            || async {
                let j = jobs(&node, false).await;
                j.len() == 4 && j.iter().all(|j| j.state == "waiting-for-p2p")
            },
        )
        .await;
        let _agent = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
        wait_for("every image present", Duration::from_secs(60), || async {
            for i in &images {
                if !present(&node, i).await {
                    return false;
                }
            }
            true
        })
        .await;
        // The gauge is sampled once a second, and a pull's reply may land after its image.
        wait_for("the lane empties", Duration::from_secs(10), || async {
            node.pullgate.metric("pullgate_lane_running").await == 0.0
        })
        .await;
        let mut want = images.clone();
        want.sort_by_key(|i| (expected.rank(i), i.clone()));
        let log = node.pullgate.log();
        assert_eq!(lane_sequence(&log, &images), want, "lane_order = {order}");
        // Each image hands the lane on once its bytes are in, before the next one is admitted.
        let line_of = |what: &str, image: &str| {
            log.lines()
                .position(|l| l.contains(what) && l.contains(&format!("image={image}}}")))
                .unwrap_or_else(|| panic!("no \"{what}\" for {image} in:\n{log}"))
        };
        for pair in want.windows(2) {
            assert!(
                line_of("bytes in: the lane moves on", &pair[0])
                    < line_of("admitted: containerd pulls", &pair[1]),
                "{} left the lane after {} was admitted:\n{log}",
                pair[0],
                pair[1]
            );
        }
        line_of("bytes in: the lane moves on", want.last().unwrap());
    }
}

/// The registry's answers to blob GETs of `digest` in `repo`, by status (200: from the start,
/// 206: resumed with a Range).
fn blob_answers(node: &Node, repo: &str, digest: &str) -> (usize, usize) {
    let path = format!("/v2/{repo}/blobs/{digest}");
    let gets: Vec<_> = node
        .registry
        .requests()
        .into_iter()
        .filter(|r| r.method == "GET" && r.path.starts_with(&path))
        .collect();
    let count = |code| gets.iter().filter(|r| r.status == code).count();
    (count(200), count(206))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_staged_prewarm_holds_no_download_slot_and_lands_whole() {
    // `stage_prewarm = "always"`: pullgate writes the prewarm image's blobs into containerd's
    // content store itself, then forwards the pull to unpack. While the blobs are written no
    // containerd pull holds a download slot, so a pod's pull starts at once on every version
    // (containerd 2.x shares 3 slots between all pulls), and nothing is handed back.
    let node = Node::start_with(
        None,
        "[schedule]\nbandwidth = \"20MB\"\n[containerd]\nstage_prewarm = \"always\"\n",
    )
    .await;
    let pre = push_image(&node.registry, "stage/pre", "v1", &[12 * MB, 12 * MB], None).await;
    let pod = push_image(&node.registry, "stage/pod", "v1", &[2 * MB], None).await;
    submit(&node, &pre.reference(), 0).await;
    wait_for("prewarm bytes flowing", Duration::from_secs(20), || async {
        node.pullgate
            .metric("pullgate_class_bytes_total{class=\"prewarm\"}")
            .await
            > 2.0 * MB as f64
    })
    .await;
    // The bytes go into containerd's ingests under its own refs, written by pullgate.
    let ingests = node.store().ingests().await;
    assert!(
        ingests
            .iter()
            .any(|(r, n, _)| r.starts_with("layer-sha256:") && *n > 0),
        "no staged ingest: {ingests:?}"
    );
    tokio::time::timeout(
        Duration::from_secs(60),
        node.via().pull_image(pull_request(&pod.reference())),
    )
    .await
    .expect("the pod's pull never waits behind the staged prewarm")
    .expect("urgent pull");
    assert!(
        !present(&node, &pre.reference()).await,
        "the prewarm finished before the pod's pull: nothing was paused"
    );
    let r = pre.reference();
    wait_for("prewarm completes", Duration::from_secs(60), || async {
        present(&node, &r).await
    })
    .await;
    let m = node.pullgate.metrics().await;
    let metric = |name| common::daemon::metric_value(&m, name);
    assert_eq!(metric("pullgate_prewarm_preemptions_total"), 0.0, "{m}");
    assert_eq!(metric("pullgate_prewarm_stage_failures_total"), 0.0, "{m}");
    assert!(
        metric("pullgate_prewarm_staged_blobs_total") >= pre.blob_count() as f64,
        "{m}"
    );
    // containerd verified and unpacked what pullgate wrote: the image is whole, nothing is left
    // half-written, and containerd fetched no blob again.
    let ingests = node.store().ingests().await;
    assert!(ingests.is_empty(), "ingests left: {ingests:?}");
    // Each layer read from its start once; pauses resume it with a Range.
    for d in &pre.layer_digests {
        let (full, _) = blob_answers(&node, "stage/pre", d);
        assert_eq!(full, 1, "layer {d} fetched from its start {full} times");
    }
    let store = node.store();
    for d in &pre.layer_digests {
        assert!(store.has(d).await, "layer {d} not in containerd's store");
    }
    let log = node.pullgate.log();
    assert!(
        log.contains("forwarding the pull to unpack"),
        "{}",
        tail(&log, 30)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_staged_prewarm_cut_by_a_crash_resumes_where_containerd_stopped() {
    // pullgate killed (-9) while it writes a prewarm's blobs: containerd keeps the ingests under
    // the pull's lease, and the restarted pullgate's staging resumes each at containerd's offset.
    let mut node = Node::start_with(
        None,
        "[schedule]\nbandwidth = \"20MB\"\n[containerd]\nstage_prewarm = \"always\"\n",
    )
    .await;
    let pre = push_image(
        &node.registry,
        "stagecut/pre",
        "v1",
        &[16 * MB, 16 * MB],
        None,
    )
    .await;
    submit(&node, &pre.reference(), 0).await;
    wait_for(
        "half the prewarm written",
        Duration::from_secs(30),
        || async {
            let written: i64 = node.store().ingests().await.iter().map(|i| i.1).sum();
            written as usize > 12 * MB
        },
    )
    .await;
    node.pullgate.kill_now();
    let kept: i64 = node.store().ingests().await.iter().map(|i| i.1).sum();
    node.pullgate.restart().await;
    submit(&node, &pre.reference(), 0).await;
    let r = pre.reference();
    wait_for("prewarm completes", Duration::from_secs(60), || async {
        present(&node, &r).await
    })
    .await;
    // Each layer read from its start once: after the restart, from containerd's offset on.
    assert!(kept > 0);
    let mut resumed = 0;
    for d in &pre.layer_digests {
        let (full, ranged) = blob_answers(&node, "stagecut/pre", d);
        eprintln!("layer {d}: {full} read from the start, {ranged} resumed");
        assert_eq!(full, 1, "layer {d} fetched from its start {full} times");
        resumed += ranged;
    }
    assert!(resumed >= 1, "nothing resumed");
    let log = node.pullgate.log();
    assert!(
        log.lines()
            .any(|l| l.contains("staged blob=") && !l.ends_with("from=0")),
        "no blob staged from an offset: {}",
        tail(&log, 30)
    );
    let ingests = node.store().ingests().await;
    assert!(ingests.is_empty(), "ingests left: {ingests:?}");
}

/// Bytes (and the largest receive buffer) of containerd's sockets connected to `port` that
/// containerd has not read yet: `ss`'s Recv-Q and `skmem` rb, summed and maxed.
fn unread_by_containerd(port: u16) -> (u64, u64) {
    let out = std::process::Command::new("ss")
        .args([
            "-tnmH",
            "state",
            "established",
            "dport",
            &format!("= :{port}"),
        ])
        .output()
        .expect("ss (iproute2)");
    let text = String::from_utf8_lossy(&out.stdout);
    let (mut queued, mut buffer) = (0, 0);
    for line in text.lines() {
        if let Some(q) = line
            .split_whitespace()
            .next()
            .and_then(|q| q.parse::<u64>().ok())
        {
            queued += q;
        }
        if let Some(rb) = line
            .split_once("skmem:(")
            .and_then(|(_, m)| m.split(',').find_map(|f| f.strip_prefix("rb")))
            .and_then(|rb| rb.parse::<u64>().ok())
        {
            buffer = buffer.max(rb);
        }
    }
    (queued, buffer)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prewarm_stream_never_runs_more_than_a_mebibyte_ahead_of_containerds_reads() {
    // On a fast link containerd is a prewarm stream's bottleneck, and whatever its socket holds
    // unread it still writes after prewarm pauses for a pod. With containerd stopped mid-stream,
    // nothing is read: its socket fills to the window (megabytes once it has read fast), unless
    // pullgate holds the stream back at 1 MiB unread.
    let node = Node::start_with(None, "[containerd]\nstage_prewarm = \"never\"\n").await;
    let pre = push_image(&node.registry, "ahead/pre", "v1", &[160 * MB], None).await;
    let port: u16 = node
        .pullgate
        .mirror_addr()
        .rsplit_once(':')
        .unwrap()
        .1
        .parse()
        .unwrap();
    submit(&node, &pre.reference(), 0).await;
    wait_for("prewarm bytes flowing", Duration::from_secs(30), || async {
        node.pullgate
            .metric("pullgate_class_bytes_total{class=\"prewarm\"}")
            .await
            > 24.0 * MB as f64
    })
    .await;
    let ctd = node.containerd.pid().expect("containerd runs") as libc::pid_t;
    // SAFETY: signals to the test's own child.
    unsafe { libc::kill(ctd, libc::SIGSTOP) };
    let (mut most, mut buffer) = (0, 0);
    let until = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < until {
        let (q, rb) = unread_by_containerd(port);
        most = most.max(q);
        buffer = buffer.max(rb);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // SAFETY: as above.
    unsafe { libc::kill(ctd, libc::SIGCONT) };
    let waited = node
        .pullgate
        .metric("pullgate_mirror_prewarm_backlog_wait_seconds_total")
        .await;
    let r = pre.reference();
    wait_for("prewarm completes", Duration::from_secs(60), || async {
        present(&node, &r).await
    })
    .await;
    eprintln!("containerd stopped: {most} bytes unread at most, receive buffer up to {buffer}");
    assert!(
        most <= 5 << 19,
        "containerd's socket held {most} bytes of prewarm it had not read (limit 1 MiB, plus what \
         was on its way)"
    );
    assert!(
        buffer > 5 << 20,
        "containerd's receive buffer ({buffer} bytes) never grew past the bound: this run \
         could not tell a held-back stream from one that was not"
    );
    assert!(
        waited > 1.0,
        "the stream did not wait on containerd: {waited} s"
    );
}
