#!/usr/bin/env bash
# The side-by-side benchmark suite (pullgate vs containerd direct): builds its own world in a
# private network namespace (shaped loopback), prints a markdown table and writes it, with the
# urgent-under-prewarm timeline PNG, to target/bench/. Needs root.
#   tests/bench.sh                 every scenario, full size (about 10 minutes on 2 cores)
#   tests/bench.sh --quick         small sizes, one round, debug build: the smoke test CI runs
#   tests/bench.sh urgent p2p      only these scenarios
#   PULLGATE_BENCH_ROUNDS=5 tests/bench.sh fast   more rounds than the default 3
#   PULLGATE_BENCH_FAST_RUN=2 tests/bench.sh fast  one of the fast-link setups only (from 0)
set -euo pipefail
cd "$(dirname "$0")/.."
tests/deps.sh
missing=()
[ -x /usr/sbin/nginx ] || missing+=(nginx)
[ -x /usr/sbin/varnishd ] || missing+=(varnish)
command -v tc >/dev/null && command -v ip >/dev/null || missing+=(iproute2)
[ -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || missing+=(fonts-dejavu-core)
if [ ${#missing[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# --quick is a smoke test (no timing is judged): it runs the debug build the tests already made
# instead of spending minutes on a release build.
run=bench
[[ " $* " == *" --quick "* ]] && run=test
# Build with the network, run without it: the namespace has only its own loopback.
cargo "$run" --locked --bench suite --no-run
exec unshare --net -- bash -c 'ip link set lo up && exec cargo "$0" --locked --offline --bench suite -- "$@"' "$run" "$@"
