#!/usr/bin/env bash
# Side-by-side pull benchmark (pullgate vs containerd direct); prints a markdown table.
# Needs root. `tests/bench.sh --quick` is the small smoke version CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."
tests/deps.sh
if [ ! -x /usr/sbin/nginx ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends nginx >/dev/null
fi
exec cargo bench --bench pull -- "$@"
