#!/usr/bin/env bash
# Installs what pullgate's tests and sandbox run against, when missing: containerd (the real
# upstream) and docker-registry (a real OCI registry) from Debian; for the non-Rust CRI clients
# (tests/clients), Go with Debian's grpc-go, protoc and protoc-gen-go, and a Python venv with
# pinned grpcio from PyPI (in $PULLGATE_TEST_PY, default /var/cache/pullgate-tests/py); then the newer containerd
# versions the end-to-end matrix also runs (tests/containerd-versions.sh).
set -euo pipefail
need=()
command -v containerd >/dev/null || need+=(containerd)
command -v docker-registry >/dev/null || need+=(docker-registry)
command -v go >/dev/null || need+=(golang-go)
[ -d /usr/share/gocode/src/google.golang.org/grpc ] || need+=(golang-google-grpc-dev)
command -v protoc >/dev/null || need+=(protobuf-compiler)
# protoc-gen-go 1.3.5: the generator that matches the golang/protobuf 1.3 Debian's grpc-go uses.
command -v protoc-gen-go >/dev/null || need+=(golang-goprotobuf-dev)
python3 -c 'import venv, ensurepip' 2>/dev/null || need+=(python3-venv)
if [ ${#need[@]} -gt 0 ]; then
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
fi

# The Python client's packages, pinned; the venv is rebuilt when the pins change.
py_pins="grpcio==1.85.1 grpcio-tools==1.85.1 protobuf==7.36.2"
venv="${PULLGATE_TEST_PY:-/var/cache/pullgate-tests/py}"
if [ "$(cat "$venv/.pins" 2>/dev/null)" != "$py_pins" ]; then
  rm -rf "$venv"
  mkdir -p "$(dirname "$venv")"
  python3 -m venv "$venv"
  # shellcheck disable=SC2086
  "$venv/bin/pip" install -q --disable-pip-version-check $py_pins
  echo "$py_pins" >"$venv/.pins"
fi

"$(dirname "$0")/containerd-versions.sh" >/dev/null

# promtool, for the alert rules' unit tests: Debian's prometheus package, unpacked (not installed:
# no service, nothing on the system changes) into the tests' cache.
prom="${PULLGATE_PROMETHEUS_DIR:-/var/cache/pullgate-tests/prometheus}"
if [ ! -x "$prom/root/usr/bin/promtool" ]; then
  mkdir -p "$prom"
  rm -f "$prom"/prometheus_*.deb
  (cd "$prom" && apt-get download -q prometheus 2>/dev/null || { apt-get update -qq && apt-get download -q prometheus; })
  dpkg -x "$prom"/prometheus_*.deb "$prom/root"
fi
