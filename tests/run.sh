#!/usr/bin/env bash
# The test suite: unit tests once, then the end-to-end tests (tests/*.rs: a real containerd and a
# real registry that the harness starts on loopback in temp dirs) against each containerd version
# of the matrix: bookworm's 1.6, trixie's 1.7, sid's 2.1 (tests/containerd-versions.sh). Needs
# root (containerd).
#
#   tests/run.sh                      # everything
#   tests/run.sh mirror -- resume     # cargo test args for the end-to-end runs (here: one file)
#   PULLGATE_TEST_VERSIONS="sid" tests/run.sh   # only some versions (codenames)
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

failed=()
summary=()
for codename in $wanted; do
  line=$(awk -v c="$codename" '$1 == c' <<<"$versions")
  if [ -z "$line" ]; then
    echo "containerd $codename: not available (tests/containerd-versions.sh)" >&2
    failed+=("$codename (missing)")
    continue
  fi
  read -r _ package _ bin <<<"$line"
  echo "=== end-to-end tests against containerd $package ($codename): $bin"
  start=$SECONDS
  if PULLGATE_TEST_CONTAINERD=$bin cargo test --locked --quiet --no-fail-fast "${e2e[@]}"; then
    result=ok
  else
    result=FAILED
    failed+=("$codename ($package)")
  fi
  summary+=("containerd $package ($codename): $result in $((SECONDS - start)) s")
done

printf '%s\n' "${summary[@]}"
if [ ${#failed[@]} -gt 0 ]; then
  echo "end-to-end tests FAILED against: ${failed[*]}" >&2
  exit 1
fi
