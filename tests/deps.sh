#!/usr/bin/env bash
# Installs the Debian packages pullgate's tests and sandbox run against, when missing:
# containerd (the real upstream) and docker-registry (a real OCI registry); then fetches the newer
# containerd versions the end-to-end matrix also runs (tests/containerd-versions.sh).
set -euo pipefail
need=()
command -v containerd >/dev/null || need+=(containerd)
command -v docker-registry >/dev/null || need+=(docker-registry)
if [ ${#need[@]} -eq 0 ]; then
  exec "$(dirname "$0")/containerd-versions.sh" >/dev/null
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "missing Debian packages: ${need[*]}; run as root or: sudo apt-get install ${need[*]}" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
# The packages start their own services where an init system runs; the tests start private
# instances and need none of them.
for svc in containerd docker-registry; do
  if command -v systemctl >/dev/null && systemctl is-active -q "$svc" 2>/dev/null; then
    echo "note: the system $svc service is running; the tests use their own instances" >&2
  fi
done
exec "$(dirname "$0")/containerd-versions.sh" >/dev/null
