#!/usr/bin/env bash
# The test suite: unit tests plus end-to-end tests against a real containerd and a real registry
# that the harness starts on loopback in temp dirs. Needs root (containerd).
set -euo pipefail
cd "$(dirname "$0")/.."
tests/deps.sh
exec cargo test --locked "$@"
