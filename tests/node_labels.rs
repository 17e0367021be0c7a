//! Node labels on a real containerd and registry: the node-feature-discovery feature file lists
//! the `[[prewarm]]` images present, gains a line when one is pulled, loses it when the image is
//! removed from containerd, and is never seen half written.

mod common;

use std::time::Duration;

use common::node::Node;
use common::*;
use pullgate::proto::runtime::v1::*;

fn names(text: &str) -> Vec<&str> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_feature_file_follows_the_prewarm_images_containerd_holds() {
    let dir = tempdir();
    let features = dir.path().join("features.d");
    std::fs::create_dir_all(&features).unwrap();
    let file = features.join("pullgate");
    let node = Node::start_with(
        None,
        &format!("[node_labels]\nfile = {file:?}\ninterval = \"1s\"\n"),
    )
    .await;
    let a = push_image(&node.registry, "labels/a", "v1", &[256 << 10], None).await;
    let b = push_image(&node.registry, "labels/b", "v1", &[256 << 10], None).await;
    // Nothing configured yet: the file holds no label.
    wait_for("the file is written", Duration::from_secs(10), || async {
        file.exists()
    })
    .await;
    assert_eq!(
        names(&std::fs::read_to_string(&file).unwrap()),
        Vec::<&str>::new()
    );

    let path = node.pullgate.config_path();
    let mut text = std::fs::read_to_string(&path).unwrap();
    text.push_str(&format!(
        "[[prewarm]]\nimage = {:?}\nlabel = \"labels-a\"\n[[prewarm]]\nimage = {:?}\n",
        a.reference(),
        b.reference()
    ));
    std::fs::write(&path, text).unwrap();
    node.pullgate.signal(libc::SIGHUP);
    let (code, out, err) = node
        .pullgate
        .cli(&["wait", "--prewarmed", "--timeout", "30s"])
        .await;
    assert_eq!(code, 0, "{out}{err}");
    wait_for("both labels", Duration::from_secs(10), || async {
        names(&std::fs::read_to_string(&file).unwrap_or_default()).len() == 2
    })
    .await;
    let text = std::fs::read_to_string(&file).unwrap();
    let lines = names(&text);
    assert!(lines.contains(&"labels-a=true"), "{text}");
    let derived = lines.iter().find(|l| **l != "labels-a=true").unwrap();
    assert!(derived.starts_with("pullgate-b-v1-"), "{text}");

    // kubelet's image garbage collection (or anyone) removes b: its label goes.
    node.direct()
        .remove_image(RemoveImageRequest {
            image: Some(ImageSpec {
                image: b.reference(),
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    wait_for("b's label removed", Duration::from_secs(10), || async {
        names(&std::fs::read_to_string(&file).unwrap_or_default()) == ["labels-a=true"]
    })
    .await;
    // Rewritten by rename: no temp file is left beside it.
    let left: Vec<_> = std::fs::read_dir(&features)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(left, ["pullgate"], "{left:?}");
    assert!(node.pullgate.log().contains("node labels rewritten"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_nfds_directory_nothing_is_written() {
    let dir = tempdir();
    let file = dir.path().join("absent/features.d/pullgate");
    let node = Node::start_with(
        None,
        &format!("[node_labels]\nfile = {file:?}\ninterval = \"1s\"\n"),
    )
    .await;
    wait_for("the log says why", Duration::from_secs(10), || async {
        node.pullgate.log().contains("node labels not written")
    })
    .await;
    assert!(!file.exists());
    assert!(
        !dir.path().join("absent").exists(),
        "NFD's directory is not created"
    );
}
