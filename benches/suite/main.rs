//! The side-by-side benchmark suite: pullgate against containerd direct, in one run, on the
//! scenarios pullgate exists for. It builds its own world (shaped loopback in a private network
//! namespace, registry, containerd per simulated node, pullgate, nginx where needed), prints a
//! markdown table of medians and ratios, and draws the urgent-under-prewarm timeline.
//!
//! `tests/bench.sh` installs what it needs, builds in release and runs this inside
//! `unshare --net`. Arguments: `--quick` (small sizes, one round: CI's smoke test, numbers mean
//! nothing), `--out DIR` (default `target/bench`), and scenario names to run only those:
//! urgent, fast, cold, capped, p2p, seed, peers, dedupe, passthrough, memory, cap.

#[path = "../../tests/common/mod.rs"]
mod common;
mod fastlink;
mod passthrough;
mod peers;
mod scenarios;
mod timeline;
mod world;

use std::path::PathBuf;
use std::time::Duration;

/// One line of the results table.
pub struct Row {
    pub scenario: String,
    pub direct: String,
    pub pullgate: String,
    /// The compared figure (pullgate / direct, or the scenario's own measure).
    pub result: String,
    pub target: String,
    pub met: Option<bool>,
}

/// pullgate's peak RSS in every scenario stays under this.
const RSS_TARGET_MIB: f64 = 64.0;

pub struct Opts {
    pub quick: bool,
    pub rounds: usize,
    pub out: PathBuf,
    pub shaped: bool,
}

pub fn median(v: &[Duration]) -> Duration {
    let mut v = v.to_vec();
    v.sort();
    v[v.len() / 2]
}

pub fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    let out = args
        .iter()
        .position(|a| a == "--out")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target/bench"));
    let names = [
        "urgent",
        "fast",
        "cold",
        "capped",
        "p2p",
        "seed",
        "peers",
        "dedupe",
        "passthrough",
        "memory",
        "cap",
    ];
    let picked: Vec<&str> = names
        .iter()
        .copied()
        .filter(|n| args.iter().any(|a| a == n))
        .collect();
    let run = |n: &str| picked.is_empty() || picked.contains(&n);
    let shaped = world::in_private_netns();
    if shaped {
        world::init_shaping();
    } else {
        eprintln!(
            "not in a private network namespace: shaped scenarios are skipped \
             (run tests/bench.sh, which uses unshare --net)"
        );
    }
    std::fs::create_dir_all(&out).unwrap();
    let opts = Opts {
        quick,
        // `$PULLGATE_BENCH_ROUNDS`: more rounds where the machine's noise hides a difference.
        rounds: std::env::var("PULLGATE_BENCH_ROUNDS")
            .ok()
            .and_then(|r| r.parse().ok())
            .filter(|&r| r > 0)
            .unwrap_or(if quick { 1 } else { 3 }),
        out: out.clone(),
        shaped,
    };
    // Built before anything is timed: the Go CRI client every bench pull goes through.
    tokio::task::block_in_place(common::clients::prepare);
    let started = std::time::Instant::now();
    // Each scenario's rows, with pullgate's peak RSS over that scenario.
    let mut rows: Vec<(Row, Option<f64>)> = Vec::new();
    let mut add = |scenario_rows: Vec<Row>| {
        let peak = scenarios::take_peak_rss();
        rows.extend(scenario_rows.into_iter().map(|r| (r, peak)));
    };
    if run("urgent") {
        add(scenarios::urgent_under_prewarm(&opts).await);
    }
    if run("fast") {
        add(fastlink::fast_link(&opts).await);
    }
    if run("cold") {
        add(scenarios::cold_pull(&opts).await);
    }
    if run("capped") {
        add(scenarios::capped(&opts).await);
    }
    if run("p2p") {
        add(scenarios::p2p_cache(&opts).await);
    }
    if run("seed") {
        add(scenarios::p2p_seed(&opts).await);
    }
    if run("peers") {
        add(scenarios::p2p_peers(&opts).await);
    }
    if run("dedupe") {
        add(scenarios::dedupe(&opts).await);
    }
    if run("passthrough") {
        add(scenarios::passthrough(&opts).await);
    }
    if run("memory") {
        add(scenarios::memory(&opts).await);
    }
    if run("cap") {
        add(scenarios::cap_accuracy(&opts).await);
    }

    let mut md = String::new();
    md.push_str(&format!(
        "| scenario | containerd direct | pullgate | result | target | met | pullgate peak RSS (≤ {RSS_TARGET_MIB} MiB) |\n"
    ));
    md.push_str("|---|---:|---:|---:|---|---|---:|\n");
    for (r, rss) in &rows {
        let met = match r.met {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "",
        };
        let rss = match rss {
            Some(m) if *m <= RSS_TARGET_MIB => format!("{m:.0} MiB"),
            Some(m) => format!("**{m:.0} MiB**"),
            None => "-".into(),
        };
        md.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {rss} |\n",
            r.scenario, r.direct, r.pullgate, r.result, r.target, met
        ));
    }
    let mode = if quick { "quick (smoke test)" } else { "full" };
    println!();
    println!(
        "pullgate benchmark suite, {mode}, {} round(s) per arm, medians, {} snapshotter; {:.0} s \
         in all",
        opts.rounds,
        world::snapshotter(),
        started.elapsed().as_secs_f64()
    );
    println!();
    print!("{md}");
    std::fs::write(out.join("results.md"), &md).unwrap();
    println!();
    println!(
        "written: {}/results.md and the timeline PNG(s) beside it",
        out.display()
    );
}
