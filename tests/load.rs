//! Load on a real containerd and registry: 300 concurrent pulls of 30 images that share a base
//! layer, half of them a pod's (urgent), half prewarm, over several client connections, repeated
//! (`PULLGATE_LOAD_ROUNDS`, default 10) with the images removed between rounds so every round
//! fetches again, on a node link narrow enough for prewarm to pause. Every pull completes, and no
//! job is left in `pullgate jobs` after a round.

mod common;

use std::time::{Duration, Instant};

use common::node::Node;
use common::registry::random_layer_tar;
use common::*;
use pullgate::proto::runtime::v1::*;

const IMAGES: usize = 30;
const PULLS: usize = 300;
/// Client connections the pulls are spread over (kubelet holds one; prewarm tools their own).
const CONNECTIONS: usize = 10;

fn rounds() -> usize {
    std::env::var("PULLGATE_LOAD_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hundred_concurrent_pulls_of_images_sharing_a_base_all_complete_every_round() {
    // A node link narrow enough that prewarm pauses for urgent streams of the shared base.
    let node = Node::start_with(None, "[schedule]\nbandwidth = \"20MB\"\n").await;
    let base = random_layer_tar(0, 2 << 20);
    let mut images = Vec::new();
    for i in 0..IMAGES {
        let repo = format!("load/app{i}");
        images.push(
            registry::push_image_on(&node.registry, &repo, "v1", Some(&base), &[512 << 10], None)
                .await,
        );
    }
    let clients: Vec<_> = (0..CONNECTIONS).map(|_| node.via()).collect();

    for round in 0..rounds() {
        let gets_before = node.registry.count_requests("GET", "/v2/");
        let started = Instant::now();
        let mut pulls = tokio::task::JoinSet::new();
        for k in 0..PULLS {
            let img = &images[k % IMAGES];
            let reference = img.reference();
            let want = img.config_digest.clone();
            let urgent = k % 2 == 0;
            let mut client = clients[k % CONNECTIONS].clone();
            pulls.spawn(async move {
                let req = if urgent {
                    pull_request(&reference)
                } else {
                    prewarm_request(&reference)
                };
                let reply = client.pull_image(req).await;
                (k, reference, want, reply)
            });
        }
        let mut failed = Vec::new();
        let deadline = Duration::from_secs(180);
        while let Some(done) = tokio::time::timeout(deadline, pulls.join_next())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "round {round}: {} pulls still running after {deadline:?}; jobs:\n{}",
                    pulls.len(),
                    node.pullgate
                        .log()
                        .lines()
                        .rev()
                        .take(40)
                        .collect::<Vec<_>>()
                        .join("\n")
                )
            })
        {
            let (k, reference, want, reply) = done.unwrap();
            match reply {
                Ok(r) if r.get_ref().image_ref == want => {}
                other => failed.push(format!("pull {k} of {reference}: {other:?}")),
            }
        }
        let took = started.elapsed();
        let gets = node.registry.count_requests("GET", "/v2/") - gets_before;
        eprintln!("round {round}: {PULLS} pulls in {took:?}, {gets} registry GETs");
        assert!(failed.is_empty(), "round {round}: {failed:#?}");
        // The images were removed after the last round: this one fetched them again.
        assert!(
            gets >= IMAGES,
            "round {round}: only {gets} registry GETs for {IMAGES} images"
        );

        wait_for(
            "no job left in `pullgate jobs`",
            Duration::from_secs(10),
            || async {
                let (code, table, _) = node.pullgate.cli(&["jobs"]).await;
                code == 0 && table.lines().skip(1).all(|l| l.trim().is_empty())
            },
        )
        .await;

        let mut direct = node.direct();
        for img in &images {
            direct
                .remove_image(RemoveImageRequest {
                    image: Some(ImageSpec {
                        image: img.reference(),
                        ..Default::default()
                    }),
                })
                .await
                .expect("RemoveImage");
        }
    }
    // Every request was answered once, and ok.
    let m = node.pullgate.metrics().await;
    let answered: Vec<&str> = m
        .lines()
        .filter(|l| l.starts_with("pullgate_pull_requests_total{"))
        .collect();
    eprintln!("{}", answered.join("\n"));
    let ok: f64 = answered
        .iter()
        .filter(|l| l.contains("result=\"ok\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(ok as usize, PULLS * rounds(), "{}", answered.join("\n"));
}
