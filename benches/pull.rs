//! Side-by-side pull benchmark: the same cold pull through containerd directly and through
//! pullgate, on one machine in one run, alternating order, several rounds; prints medians and the
//! ratio. Scenarios:
//! - cold pull, plain loopback registry (overhead of fetching through pullgate);
//! - cold pull behind nginx capping every connection (`limit_rate`), where pullgate's parallel
//!   ranged requests should win.
//!
//! Run with `tests/bench.sh` (installs nginx, builds in release). `--quick`: small sizes, one
//! round (the CI smoke test; its numbers mean nothing).

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::daemon::Pullgate;
use common::nginx::Nginx;
use common::*;

struct Arm {
    direct: Vec<Duration>,
    pullgate: Vec<Duration>,
}

fn median(v: &[Duration]) -> Duration {
    let mut v = v.to_vec();
    v.sort();
    v[v.len() / 2]
}

/// One cold pull of `reference` on a fresh containerd (and pullgate), timed from the request to
/// the answer; everything is torn down afterwards.
async fn cold_pull(
    dir: &Path,
    hosts: &[String],
    reference: &str,
    through_pullgate: bool,
) -> Duration {
    let _ = std::fs::remove_dir_all(dir);
    let containerd = Containerd::start_with(&dir.join("ctd"), hosts, "").await;
    let pullgate = if through_pullgate {
        Some(Pullgate::start(&dir.join("pg"), &containerd, "").await)
    } else {
        None
    };
    let socket = pullgate
        .as_ref()
        .map(|p| p.socket())
        .unwrap_or_else(|| containerd.socket());
    let mut client = image_client(&socket);
    let started = Instant::now();
    client
        .pull_image(pull_request(reference))
        .await
        .unwrap_or_else(|e| panic!("pull of {reference} failed: {e}"));
    let took = started.elapsed();
    drop(pullgate);
    drop(containerd);
    let _ = std::fs::remove_dir_all(dir);
    took
}

async fn run_arm(root: &Path, hosts: &[String], reference: &str, rounds: usize) -> Arm {
    let mut arm = Arm {
        direct: vec![],
        pullgate: vec![],
    };
    for round in 0..rounds {
        // Alternate who goes first, so warm-up and page-cache effects do not favour one side.
        for through in [round % 2 == 1, round % 2 == 0] {
            let t = cold_pull(&root.join("node"), hosts, reference, through).await;
            eprintln!(
                "  round {} {:<9} {:>8.2}s",
                round + 1,
                if through { "pullgate" } else { "direct" },
                t.as_secs_f64()
            );
            if through {
                arm.pullgate.push(t)
            } else {
                arm.direct.push(t)
            }
        }
    }
    arm
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    // `loopback` or `capped` alone runs just that scenario.
    let only = |name: &str| {
        !args.iter().any(|a| a == "loopback" || a == "capped") || args.iter().any(|a| a == name)
    };
    let (layer, rounds, rate) = if quick {
        (8 << 20, 1, "8m")
    } else {
        (256 << 20, 3, "16m")
    };
    let dir = tempdir();
    let root = dir.path();
    let registry = Registry::start(&root.join("registry"), None).await;
    eprintln!("building a {} MiB image of 4 layers", (4 * layer) >> 20);
    let img = push_image(&registry, "bench/cold", "v1", &[layer; 4], None).await;
    let nginx = Nginx::start_rate_limited(&root.join("nginx"), &registry.addr(), rate).await;
    let hosts = vec![registry.addr(), nginx.addr().to_string()];

    let mut rows = Vec::new();
    if only("loopback") {
        eprintln!("cold pull, loopback registry");
        let plain = run_arm(root, &hosts, &img.reference(), rounds).await;
        rows.push(("cold pull, 4 layers, loopback".to_string(), plain, "≤ 1.00"));
    }
    if only("capped") {
        eprintln!("cold pull, registry behind nginx limit_rate {rate}/connection");
        let capped = run_arm(root, &hosts, &img.reference_via(nginx.addr()), rounds).await;
        rows.push((
            format!("cold pull, 4 layers, {rate}B/s per connection"),
            capped,
            "≤ 0.60",
        ));
    }

    println!();
    println!(
        "image: {} MiB in 4 layers; {} round(s) per arm; medians",
        img.total_size >> 20,
        rounds
    );
    println!();
    println!("| scenario | containerd direct | through pullgate | pullgate / direct | target |");
    println!("|---|---:|---:|---:|---|");
    for (name, arm, target) in rows {
        let (d, p) = (median(&arm.direct), median(&arm.pullgate));
        println!(
            "| {name} | {:.2} s | {:.2} s | {:.2} | {target} |",
            d.as_secs_f64(),
            p.as_secs_f64(),
            p.as_secs_f64() / d.as_secs_f64()
        );
    }
}
