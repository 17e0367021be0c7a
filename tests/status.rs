//! `pullgate status` on a real node: containerd, registry, pullgate, and a kubelet config file.
//! OK (exit 0) when everything sends pulls through pullgate; exit 1 naming the problem when
//! kubelet's image endpoint is containerd's, a hosts.toml file skips pullgate, or containerd
//! is down; the last failed pull is listed.

mod common;

use std::path::Path;
use std::process::Stdio;

use common::daemon::binary;
use common::node::Node;
use common::*;
use serde_json::Value;

/// The daemon's config with the addresses its flags set, as an operator's file would hold them.
fn status_config(node: &Node) -> std::path::PathBuf {
    let pg = &node.pullgate;
    let text = std::fs::read_to_string(pg.config_path()).unwrap();
    let mut t: toml::Table = text.parse().unwrap();
    let mut table = |name: &str, key: &str, value: String| {
        t.entry(name)
            .or_insert_with(|| toml::Value::Table(Default::default()))
            .as_table_mut()
            .unwrap()
            .insert(key.into(), toml::Value::String(value));
    };
    table("server", "socket", pg.socket().display().to_string());
    table(
        "containerd",
        "socket",
        node.containerd.socket().display().to_string(),
    );
    table("metrics", "addr", pg.metrics_addr().to_string());
    let path = pg.config_path().with_file_name("status.toml");
    std::fs::write(&path, toml::to_string(&t).unwrap()).unwrap();
    path
}

async fn status(config: &Path, kubelet: &Path) -> (i32, Value, String) {
    let out = tokio::process::Command::new(binary())
        .arg("status")
        .arg("--config")
        .arg(config)
        .arg("--kubelet-config")
        .arg(kubelet)
        .arg("--json")
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {text}{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().unwrap_or(-1), v, text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_says_ok_when_the_node_pulls_through_pullgate_and_names_each_problem() {
    let mut node = Node::start(None).await;
    let config = status_config(&node);
    let kubelet = node.dir.path().join("kubelet-config.yaml");
    std::fs::write(
        &kubelet,
        format!(
            "apiVersion: kubelet.config.k8s.io/v1beta1\nkind: KubeletConfiguration\n\
             containerRuntimeEndpoint: unix://{}\nimageServiceEndpoint: unix://{}\n",
            node.containerd.socket().display(),
            node.pullgate.socket().display()
        ),
    )
    .unwrap();
    // A pull that fails, for the last errors.
    let missing = format!("{}/status/app:nope", node.registry.addr());
    let _ = node.via().pull_image(pull_request(&missing)).await;

    let (code, v, text) = status(&config, &kubelet).await;
    assert_eq!(code, 0, "{text}");
    assert_eq!(v["ok"], true, "{text}");
    assert!(
        v["containerd"]["version"]
            .as_str()
            .is_some_and(|s| !s.is_empty()),
        "{text}"
    );
    assert_eq!(v["containerd"]["snapshotter"], "native", "{text}");
    assert_eq!(v["daemon"]["ready"], true, "{text}");
    assert_eq!(v["daemon"]["api_reachable"], true, "{text}");
    assert_eq!(v["kubelet"]["uses_pullgate"], true, "{text}");
    assert_eq!(
        v["mirror"]["files_not_first"],
        serde_json::json!([]),
        "{text}"
    );
    assert_eq!(v["p2p_gate_open"], true, "{text}");
    let errors = v["last_errors"].as_array().unwrap();
    assert!(
        errors
            .iter()
            .any(|e| e["image"].as_str().unwrap().ends_with("status/app:nope")),
        "{text}"
    );
    // The human screen says the same.
    let out = tokio::process::Command::new(binary())
        .args(["status", "--config"])
        .arg(&config)
        .arg("--kubelet-config")
        .arg(&kubelet)
        .output()
        .await
        .unwrap();
    let screen = String::from_utf8_lossy(&out.stdout);
    eprintln!("{screen}");
    assert!(screen.contains(": OK"), "{screen}");
    assert!(screen.contains("status/app:nope"), "{screen}");

    // kubelet still sends image calls to containerd.
    std::fs::write(
        &kubelet,
        format!(
            "imageServiceEndpoint: unix://{}\n",
            node.containerd.socket().display()
        ),
    )
    .unwrap();
    let (code, v, text) = status(&config, &kubelet).await;
    assert_eq!(code, 1, "{text}");
    assert_eq!(v["kubelet"]["uses_pullgate"], false, "{text}");
    assert!(
        v["problems"]
            .to_string()
            .contains("kubelet's image endpoint"),
        "{text}"
    );

    // A registry's hosts.toml that no longer lists pullgate (the administrator rewrote it).
    let hosts_dir = node.containerd.dir().join("certs.d");
    let registry_dir = std::fs::read_dir(&hosts_dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| !p.ends_with("_default"))
        .expect("a registry directory");
    let hosts = registry_dir.join("hosts.toml");
    std::fs::write(
        &hosts,
        format!("server = \"http://{}\"\n", node.registry.addr()),
    )
    .unwrap();
    std::fs::write(
        &kubelet,
        format!(
            "imageServiceEndpoint: unix://{}\n",
            node.pullgate.socket().display()
        ),
    )
    .unwrap();
    let (code, v, text) = status(&config, &kubelet).await;
    assert_eq!(code, 1, "{text}");
    assert!(
        v["mirror"]["files_not_first"]
            .to_string()
            .contains("hosts.toml"),
        "{text}"
    );

    // containerd down.
    node.containerd.kill_now();
    let (code, v, text) = status(&config, &kubelet).await;
    assert_eq!(code, 1, "{text}");
    assert!(v["containerd"]["version"].is_null(), "{text}");
    assert!(
        v["problems"]
            .to_string()
            .contains("containerd does not answer"),
        "{text}"
    );
}
