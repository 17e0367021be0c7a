#!/usr/bin/env bash
# The test suite: unit tests once, then the end-to-end tests (tests/*.rs: a real containerd and a
# real registry that the harness starts on loopback in temp dirs) against each containerd version
# of the matrix: bookworm's 1.6, trixie's 1.7, sid's 2.1 (tests/containerd-versions.sh). Needs
# root (containerd).
#
#   tests/run.sh                      # everything
#   tests/run.sh mirror -- resume     # cargo test args for the end-to-end runs (here: one file)
#   PULLGATE_TEST_VERSIONS="sid" tests/run.sh   # only some versions (codenames)
#   PULLGATE_TEST_JOBS=1 tests/run.sh            # one version after another (default: all at once)
#
# The versions run side by side, each in a network namespace of its own (`unshare --net`, loopback
# only, as the tests need), so their free ports and 127.0.0.x listeners cannot meet. Each run's
# output goes to target/e2e/<codename>.log and is printed, whole, when it ends. A version's run
# uses about 0.75 of a core (most of a test is waiting on containerd and the registry), so on 2
# cores three at once take about the time of the longest alone, not of all three in a row.
set -euo pipefail
cd "$(dirname "$0")/.."
tests/deps.sh
versions=$(tests/containerd-versions.sh --list)
echo "$versions"
wanted=${PULLGATE_TEST_VERSIONS:-bookworm trixie sid}

# Build once; every run below reuses the binaries.
cargo test --locked --no-run --quiet
if [ $# -eq 0 ]; then
  e2e=(--test '*')
else
  e2e=(--test "$@")
fi

start=$SECONDS
cargo test --locked --quiet --lib --bins
echo "unit tests: $((SECONDS - start)) s"

jobs=${PULLGATE_TEST_JOBS:-3}
logs=target/e2e
mkdir -p "$logs"
failed=()
summary=()
running=()

one_version() { # codename package bin: the end-to-end suite against one containerd, in its own netns
  local codename=$1 package=$2 bin=$3 start=$SECONDS result
  echo "=== end-to-end tests against containerd $package ($codename): $bin"
  if PULLGATE_TEST_CONTAINERD=$bin unshare --net -- bash -c \
    'ip link set lo up && exec cargo test --locked --offline --quiet --no-fail-fast "$@"' \
    bash "${e2e[@]}"; then
    result=0
  else
    result=1
  fi
  echo "containerd $package ($codename): $( ((result)) && echo FAILED || echo ok) in $((SECONDS - start)) s"
  return $result
}

finish() { # the oldest run still going: wait for it, print its log, record its verdict
  local codename=${running[0]}
  running=("${running[@]:1}")
  local ok=true
  wait "${pids[$codename]}" || ok=false
  cat "$logs/$codename.log"
  summary+=("$(tail -n 1 "$logs/$codename.log")")
  $ok || failed+=("$codename")
}

declare -A pids
for codename in $wanted; do
  line=$(awk -v c="$codename" '$1 == c' <<<"$versions")
  if [ -z "$line" ]; then
    echo "containerd $codename: not available (tests/containerd-versions.sh)" >&2
    failed+=("$codename (missing)")
    continue
  fi
  read -r _ package _ bin <<<"$line"
  [ ${#running[@]} -ge "$jobs" ] && finish
  one_version "$codename" "$package" "$bin" >"$logs/$codename.log" 2>&1 &
  pids[$codename]=$!
  running+=("$codename")
done
while [ ${#running[@]} -gt 0 ]; do finish; done

printf '%s\n' "${summary[@]}"
if [ ${#failed[@]} -gt 0 ]; then
  echo "end-to-end tests FAILED against: ${failed[*]}" >&2
  exit 1
fi
