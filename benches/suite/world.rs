//! The bench's world: it runs inside a network namespace of its own (`tests/bench.sh` starts it
//! with `unshare --net`), whose loopback it shapes with `tc` to model a node's link. Everything
//! lives on 127.0.0.1 in that namespace and goes away with the process.

use std::process::Command;

/// Whether this process has a network namespace to itself (only `lo`, and we may shape it).
pub fn in_private_netns() -> bool {
    let Ok(out) = Command::new("ip").args(["-o", "link", "show"]).output() else {
        return false;
    };
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines().count() == 1 && text.contains(": lo:")
}

/// Runs `tc`; whether it succeeded. `quiet`: its complaint is not shown (an expected failure).
fn run_tc(args: &str, quiet: bool) -> bool {
    let mut cmd = Command::new("tc");
    cmd.args(args.split_whitespace());
    if quiet {
        cmd.stderr(std::process::Stdio::null());
    }
    cmd.status()
        .unwrap_or_else(|e| panic!("cannot run tc (apt-get install iproute2): {e}"))
        .success()
}

/// `tc` that may fail.
fn try_tc(args: &str) -> bool {
    run_tc(args, true)
}

/// `tc` that must succeed.
fn tc(args: &str) {
    assert!(run_tc(args, false), "tc {args} failed");
}

/// Root htb on `lo`: unshaped by default; classes added per shaped port.
pub fn init_shaping() {
    try_tc("qdisc del dev lo root");
    tc("qdisc add dev lo root handle 1: htb default 99 r2q 1000");
    tc("class add dev lo parent 1: classid 1:99 htb rate 100gbit quantum 200000");
}

/// `lo` without a qdisc while it lives, as a node's loopback is (`noqueue`); the root htb the
/// shaped scenarios need comes back when it is dropped. In the unshaped scenarios that htb
/// would charge every packet a qdisc and its lock, and pullgate's arm sends each byte over
/// loopback twice (registry to mirror, mirror to containerd) where a node sends the first hop
/// over its NIC and only the second over `lo`.
pub struct Noqueue(());

impl Noqueue {
    /// `None` outside a private namespace (nothing was shaped there).
    pub fn lo() -> Option<Noqueue> {
        in_private_netns().then(|| {
            try_tc("qdisc del dev lo root");
            Noqueue(())
        })
    }
}

impl Drop for Noqueue {
    fn drop(&mut self) {
        init_shaping();
    }
}

/// Caps what the server on `port` sends (its egress: source port `port`) at `bytes_per_sec`,
/// as a node's link or a registry's uplink would. `id` picks the htb class (1..98). The link's
/// queue is short: fq_codel (Linux's default qdisc) where the kernel has it, else a byte FIFO
/// holding 20 ms of traffic. htb's own default leaf is a FIFO of `lo`'s 1000 64 KiB packets, a
/// 64 MB queue no real link has, in which every new flow would wait over a second behind the
/// data already queued.
pub fn shape_port(id: u32, port: u16, bytes_per_sec: u64) {
    let bits = bytes_per_sec * 8;
    tc(&format!(
        "class replace dev lo parent 1: classid 1:{id} htb rate {bits}bit ceil {bits}bit \
         burst 256k cburst 256k"
    ));
    let handle = id + 100;
    if !try_tc(&format!(
        "qdisc replace dev lo parent 1:{id} handle {handle}: fq_codel"
    )) {
        let limit = (bytes_per_sec / 50).max(256 * 1024);
        tc(&format!(
            "qdisc replace dev lo parent 1:{id} handle {handle}: bfifo limit {limit}"
        ));
    }
    tc(&format!(
        "filter replace dev lo parent 1: protocol ip prio {id} u32 match ip sport {port} 0xffff \
         flowid 1:{id}"
    ));
}

/// Bytes htb class `id` has sent so far: what crossed a shaped link, whether or not the
/// receiver read it all (the registry's access log counts an aborted response in full).
pub fn class_bytes(id: u32) -> u64 {
    let out = std::process::Command::new("tc")
        .args([
            "-s",
            "class",
            "show",
            "dev",
            "lo",
            "classid",
            &format!("1:{id}"),
        ])
        .output()
        .expect("tc");
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_once("Sent ")
        .and_then(|(_, rest)| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no byte count for class 1:{id}: {text}"))
}

/// Like [`shape_port`], with a plain byte FIFO holding `queue` of traffic (a link's buffer:
/// a deeper queue delays every new flow, a pod's included, by that much).
pub fn shape_port_fifo(id: u32, port: u16, bytes_per_sec: u64, queue: std::time::Duration) {
    let bits = bytes_per_sec * 8;
    tc(&format!(
        "class replace dev lo parent 1: classid 1:{id} htb rate {bits}bit ceil {bits}bit \
         burst 256k cburst 256k"
    ));
    let limit = ((bytes_per_sec as f64 * queue.as_secs_f64()) as u64).max(64 * 1024);
    tc(&format!(
        "qdisc replace dev lo parent 1:{id} handle {}: bfifo limit {limit}",
        id + 100
    ));
    tc(&format!(
        "filter replace dev lo parent 1: protocol ip prio {id} u32 match ip sport {port} 0xffff \
         flowid 1:{id}"
    ));
}

/// The snapshotter the simulated nodes unpack into: overlayfs, containerd's default and what a
/// real node runs, when this kernel lets us mount it; else native (which copies each parent).
pub fn snapshotter() -> &'static str {
    if crate::common::containerd::overlayfs_mountable() {
        "overlayfs"
    } else {
        "native"
    }
}

/// A containerd 2.x binary for the arms that measure containerd's own newer answers:
/// `$PULLGATE_BENCH_CONTAINERD2`, else sid's from `tests/containerd-versions.sh`'s cache.
pub fn containerd2() -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PULLGATE_BENCH_CONTAINERD2")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| "/var/cache/pullgate-tests/containerd/sid/usr/bin/containerd".into());
    path.is_file().then_some(path)
}
