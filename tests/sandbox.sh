#!/usr/bin/env bash
# A throwaway sandbox: containerd + registry + pullgate in a temp dir, a test image pushed, and a
# pod-style pull through pullgate's socket. Ctrl-C tears it all down. Needs root (containerd).
set -euo pipefail
cd "$(dirname "$0")/.."
tests/deps.sh
exec cargo run --quiet --example sandbox -- "$@"
