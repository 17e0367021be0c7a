//! Files pullgate reads or writes besides its own sockets, on a real node: `/readyz` agrees with
//! the start-up check of containerd's config (imports followed), SIGHUP refuses an empty file and
//! applies `[node_labels]`, a node-labels file pullgate did not write is never replaced, and
//! `check-config` / `serve` refuse a `hosts_dir` that is no certs.d tree and bound what they read.

mod common;

use std::time::Duration;

use common::daemon::binary;
use common::node::Node;
use common::*;

async fn readyz(node: &Node) -> (u16, String) {
    node.pullgate
        .http_get("/readyz")
        .await
        .expect("readyz answers")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_agrees_with_containerds_config_and_its_imports() {
    let node = Node::start(None).await;
    assert_eq!(readyz(&node).await.0, 200);
    let file = node.containerd.config_path().to_path_buf();
    let original = std::fs::read_to_string(&file).unwrap();
    let config_path = format!("{:?}", node.containerd.dir().join("certs.d"));
    assert!(original.contains(&config_path), "{original}");
    // containerd read its file at start; only pullgate reads it again now.
    let without: String = original
        .lines()
        .filter(|l| !l.trim_start().starts_with("config_path"))
        .collect::<Vec<_>>()
        .join("\n");
    let dropins = node.dir.path().join("conf.d");
    std::fs::create_dir_all(&dropins).unwrap();
    let table = if original.contains("io.containerd.cri.v1.images") {
        "io.containerd.cri.v1.images"
    } else {
        "io.containerd.grpc.v1.cri"
    };
    // The setting moved to a drop-in: containerd reads it there, and so must pullgate.
    let dropin = dropins.join("10-registry.toml");
    let cri_section: String = {
        // The whole CRI section goes to the drop-in (containerd replaces sections whole).
        let t: toml::Table = original.parse().unwrap();
        let section = t["plugins"][table].clone();
        let mut plugins = toml::Table::new();
        plugins.insert(table.into(), section);
        let mut top = toml::Table::new();
        top.insert("plugins".into(), toml::Value::Table(plugins));
        toml::to_string(&top).unwrap()
    };
    std::fs::write(&dropin, cri_section).unwrap();
    std::fs::write(
        &file,
        format!("imports = [{:?}]\n{without}\n", dropins.join("*.toml")),
    )
    .unwrap();
    let (code, body) = readyz(&node).await;
    assert_eq!(code, 200, "config_path set in an import: {body}");
    std::fs::remove_file(&dropin).unwrap();
    let (code, body) = readyz(&node).await;
    assert_eq!(code, 503, "no config_path anywhere: {body}");
    assert!(body.contains("config_path"), "{body}");
    std::fs::write(&file, &original).unwrap();
    assert_eq!(readyz(&node).await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_refuses_an_empty_file_and_applies_node_labels() {
    let node = Node::start_with(None, "").await;
    let pg = &node.pullgate;
    let config = pg.config_path();
    let original = std::fs::read_to_string(&config).unwrap();

    std::fs::write(&config, "").unwrap();
    pg.signal(libc::SIGHUP);
    wait_for(
        "the empty file refused",
        Duration::from_secs(10),
        || async { pg.log().contains("the file is empty") },
    )
    .await;

    let features = node.dir.path().join("features.d");
    std::fs::create_dir_all(&features).unwrap();
    let labels = features.join("pullgate");
    std::fs::write(
        &config,
        format!("{original}\n[node_labels]\nfile = {labels:?}\ninterval = \"1s\"\n"),
    )
    .unwrap();
    pg.signal(libc::SIGHUP);
    wait_for(
        "the node-labels file written after SIGHUP",
        Duration::from_secs(15),
        || async {
            std::fs::read_to_string(&labels).is_ok_and(|t| t.starts_with("# Written by pullgate"))
        },
    )
    .await;
    assert!(
        pg.log().contains("node_labels_changed=true"),
        "{}",
        pg.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_labels_file_pullgate_did_not_write_is_never_replaced() {
    let dir = tempdir();
    let foreign = dir.path().join("passwd");
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap();
    std::fs::write(&foreign, &passwd).unwrap();
    let node = Node::start_with(
        None,
        &format!("\n[node_labels]\nfile = {foreign:?}\ninterval = \"1s\"\n"),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(std::fs::read_to_string(&foreign).unwrap(), passwd);
    assert!(
        node.pullgate.log().contains("node labels not written"),
        "{}",
        node.pullgate.log()
    );
    let out = std::process::Command::new(binary())
        .args(["check-config"])
        .arg(node.pullgate.config_path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "a warning, not an error: {err}");
    assert!(err.contains("did not write it"), "{err}");
}

#[test]
fn check_config_and_serve_refuse_what_would_damage_the_node() {
    let dir = tempdir();
    let config = dir.path().join("config.toml");
    std::fs::write(&config, "[mirror]\nhosts_dir = \"/\"\n").unwrap();
    for args in [vec!["check-config"], vec!["serve", "--config"]] {
        let out = std::process::Command::new(binary())
            .args(&args)
            .arg(&config)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains("mirror.hosts_dir"), "{args:?}: {err}");
    }
    // Bounded reads: /dev/zero is refused at once, not read for gigabytes.
    let start = std::time::Instant::now();
    let out = std::process::Command::new(binary())
        .args(["check-config", "/dev/zero"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a regular file"));
    assert!(start.elapsed() < Duration::from_secs(5));
    // Warnings for what the settings expose.
    std::fs::write(
        &config,
        "[server]\nsocket_mode = \"0777\"\n[metrics]\naddr = \"0.0.0.0:9782\"\n",
    )
    .unwrap();
    let out = std::process::Command::new(binary())
        .arg("check-config")
        .arg(&config)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("server.socket_mode") && err.contains("metrics.addr"),
        "{err}"
    );
}
