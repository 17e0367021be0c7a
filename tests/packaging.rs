//! The operator's kit in `packaging/` against a running pullgate: every metric the Grafana
//! dashboard and the alert rules query is one pullgate serves, and the alert rules pass
//! `promtool check rules` and their `promtool test rules` unit tests.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::node::Node;
use common::*;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The `pullgate_*` names in a file's text.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("pullgate_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(tail.len());
        out.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
    out
}

/// Whether `name` (a sample name as queried) is served: a sample line, or the family's `# TYPE`
/// (a labelled family with no child yet has no sample), `_total` of a counter, `_bucket`,
/// `_sum`, `_count` of a histogram.
fn served(metrics: &str, name: &str) -> bool {
    let family = |f: &str, kind: &str| metrics.lines().any(|l| l == format!("# TYPE {f} {kind}"));
    if metrics
        .lines()
        .any(|l| l.starts_with(&format!("{name} ")) || l.starts_with(&format!("{name}{{")))
    {
        return true;
    }
    if let Some(f) = name.strip_suffix("_total") {
        if family(f, "counter") {
            return true;
        }
    }
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(f) = name.strip_suffix(suffix) {
            if family(f, "histogram") {
                return true;
            }
        }
    }
    family(name, "gauge")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_dashboard_and_alerts_query_is_served() {
    let node = Node::start(None).await;
    let img = push_image(&node.registry, "kit/app", "v1", &[64 << 10], None).await;
    node.via()
        .pull_image(pull_request(&img.reference()))
        .await
        .expect("a pull, so labelled families have samples");
    let metrics = node.pullgate.metrics().await;

    for file in [
        "packaging/grafana/pullgate-dashboard.json",
        "packaging/prometheus/pullgate-alerts.yml",
    ] {
        let text = std::fs::read_to_string(repo().join(file)).unwrap();
        if file.ends_with(".json") {
            let _: serde_json::Value =
                serde_json::from_str(&text).unwrap_or_else(|e| panic!("{file}: {e}"));
        }
        let names = metric_names(&text);
        assert!(names.len() >= 10, "{file}: only {names:?}");
        let missing: Vec<_> = names.iter().filter(|n| !served(&metrics, n)).collect();
        assert!(
            missing.is_empty(),
            "{file} queries metrics pullgate does not serve: {missing:?}"
        );
    }
    // The check can fail: a name pullgate does not serve is caught.
    assert!(!served(&metrics, "pullgate_no_such_metric_total"));
}

fn promtool() -> PathBuf {
    std::env::var_os("PULLGATE_PROMTOOL")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from("/var/cache/pullgate-tests/prometheus/root/usr/bin/promtool")
        })
}

fn run_promtool(args: &[&str]) -> (bool, String) {
    let out = Command::new(promtool())
        .args(args)
        .current_dir(repo().join("packaging/prometheus"))
        .output()
        .unwrap_or_else(|e| panic!("cannot run {:?} (tests/deps.sh): {e}", promtool()));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn the_alert_rules_pass_promtool_and_their_unit_tests() {
    let (ok, text) = run_promtool(&["check", "rules", "pullgate-alerts.yml"]);
    assert!(ok, "{text}");
    let (ok, text) = run_promtool(&["test", "rules", "pullgate-alerts.test.yml"]);
    assert!(ok, "{text}");
    assert!(text.contains("SUCCESS"), "{text}");
}
