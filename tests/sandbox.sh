#!/usr/bin/env bash
# A throwaway sandbox: containerd + registry + pullgate in a temp dir, test images pushed, pulls
# through pullgate's socket. Ctrl-C tears it all down (--once: exit after the demo). Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
tests/deps.sh
cargo build --quiet --bin pullgate --example sandbox
exec target/debug/examples/sandbox "$@"
