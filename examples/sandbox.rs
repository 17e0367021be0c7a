//! A throwaway sandbox: a registry, containerd and pullgate in a temp dir on loopback, a test
//! image pushed, and pulls through pullgate's socket the way kubelet makes them.
//! Run through `tests/sandbox.sh` (installs the Debian packages, builds pullgate).

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::Instant;

use common::daemon::{metric_value, Pullgate};
use common::*;
use pullgate::proto::runtime::v1::ListImagesRequest;

#[tokio::main]
async fn main() {
    let once = std::env::args().any(|a| a == "--once");
    let dir = tempdir();
    let root = dir.path();
    println!("sandbox in {}", root.display());

    let registry = Registry::start(&root.join("registry"), None).await;
    let containerd = Containerd::start(&root.join("containerd"), &[&registry]).await;
    let pullgate = Pullgate::start(&root.join("pullgate"), &containerd, "").await;
    println!("  registry    http://{}", registry.addr());
    println!("  containerd  {}", containerd.socket().display());
    println!(
        "  pullgate    {}  (log: {})",
        pullgate.socket().display(),
        root.join("pullgate/pullgate.log").display()
    );

    let web = push_image(
        &registry,
        "demo/web",
        "v1",
        &[8 << 20, 2 << 20, 512 << 10],
        None,
    )
    .await;
    let batch = push_image(&registry, "demo/batch", "v1", &[16 << 20], None).await;
    let model = push_image(&registry, "demo/model", "v1", &[24 << 20, 8 << 20], None).await;
    println!(
        "pushed {} ({} bytes) and {} ({} bytes)",
        web.reference(),
        web.total_size,
        batch.reference(),
        batch.total_size
    );

    // A pod's pull, as kubelet sends it.
    let started = Instant::now();
    let reply = image_client(&pullgate.socket())
        .pull_image(pull_request(&web.reference()))
        .await
        .unwrap_or_else(|e| panic!("pull through pullgate failed: {e}"));
    println!(
        "pod pull of {} through pullgate: {} in {:?}",
        web.reference(),
        reply.into_inner().image_ref,
        started.elapsed()
    );

    // containerd fetched every blob through pullgate's mirror, none from the registry itself.
    let by_containerd = registry
        .requests()
        .iter()
        .filter(|r| {
            r.method == "GET"
                && r.path.contains("/blobs/")
                && r.user_agent.starts_with("containerd/")
        })
        .count();
    println!(
        "blob downloads by containerd from the registry itself: {by_containerd} \
         (it fetched them through pullgate's mirror)"
    );

    // Five clients asking for one image at once: one upstream pull.
    let mut tasks = Vec::new();
    for _ in 0..5 {
        let mut client = image_client(&pullgate.socket());
        let req = prewarm_request(&batch.reference());
        tasks.push(tokio::spawn(async move { client.pull_image(req).await }));
    }
    for t in tasks {
        t.await
            .unwrap()
            .unwrap_or_else(|e| panic!("prewarm pull failed: {e}"));
    }
    println!(
        "5 concurrent pulls of {}: the registry served each of its {} blobs {} time(s) in all",
        batch.reference(),
        batch.blob_count(),
        registry.blob_gets(&batch.repo) as f64 / batch.blob_count() as f64
    );

    // pullgate's own prewarm, through its CLI and API, with progress; then the job table.
    println!(
        "$ pullgate prewarm {} --priority 5 --wait",
        model.reference()
    );
    let (code, out, err) = pullgate
        .cli(&["prewarm", &model.reference(), "--priority", "5", "--wait"])
        .await;
    print!("{err}{out}");
    assert_eq!(code, 0, "pullgate prewarm failed");
    println!("$ pullgate jobs --all");
    let (_, table, _) = pullgate.cli(&["jobs", "--all"]).await;
    print!("{table}");

    let images = image_client(&pullgate.socket())
        .list_images(ListImagesRequest { filter: None })
        .await
        .unwrap()
        .into_inner()
        .images;
    println!("images listed through pullgate:");
    for i in images {
        println!(
            "  {:<40} {} {} bytes",
            i.repo_tags.join(","),
            &i.id[..19],
            i.size
        );
    }

    let metrics = pullgate.metrics().await;
    println!("metrics:");
    for sample in [
        "pullgate_pull_requests_total{class=\"urgent\",result=\"ok\"}",
        "pullgate_pull_requests_total{class=\"prewarm\",result=\"ok\"}",
        "pullgate_pull_requests_merged_total",
        "pullgate_upstream_pulls_total{result=\"ok\"}",
        "pullgate_mirror_requests_total{kind=\"blob\",status=\"2xx\"}",
        "pullgate_fetched_bytes_total{source=\"registry\"}",
        "pullgate_class_bytes_total{class=\"prewarm\"}",
        "pullgate_upstream_up",
    ] {
        println!("  {sample} {}", metric_value(&metrics, sample));
    }

    if once {
        return;
    }
    println!();
    println!("Everything stays up until Ctrl-C. Try, from another shell:");
    println!(
        "  curl -s http://{}/metrics | grep ^pullgate_",
        pullgate.metrics_addr()
    );
    println!(
        "  crictl --image-endpoint unix://{} images",
        pullgate.socket().display()
    );
    println!(
        "  {} jobs --all --api-socket {}",
        common::daemon::binary().display(),
        pullgate.api_socket().display()
    );
    println!(
        "  crictl --image-endpoint unix://{} pull {}",
        pullgate.socket().display(),
        web.reference()
    );
    let _ = tokio::signal::ctrl_c().await;
    println!("tearing down");
}
