#!/usr/bin/env bash
# The Debian package, for real on this machine (CI's throwaway one; needs root): builds it with
# cargo-deb, installs it with dpkg -i, checks that the install changed neither containerd's nor
# kubelet's configuration and started nothing, checks its files, `pullgate check-config` of the
# shipped config, `systemd-analyze verify` and `security` of its units, then removes it
# (pullgate's hosts.toml entries go, the administrator's hosts stay) and purges it.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d "$HOME/.cargo/bin" ] && export PATH="$HOME/.cargo/bin:$PATH"
cargo_deb_version=3.8.0
if [ "$(cargo deb --version 2>/dev/null | awk '{print $2}')" != "$cargo_deb_version" ]; then
  cargo install --locked --quiet cargo-deb --version "$cargo_deb_version"
fi
if dpkg -s pullgate >/dev/null 2>&1; then
  echo "pullgate is installed on this machine already; not touching it" >&2
  exit 1
fi
cargo deb --locked --quiet
deb=$(ls -t target/debian/pullgate_*.deb | head -1)
echo "package: $deb"

fail() { echo "package test FAILED: $*" >&2; exit 1; }
hosts=/etc/containerd/certs.d
backup=$(mktemp -d)
# Leave the machine's hosts.toml files and containerd config as they were, whatever happens.
[ -d "$hosts" ] && cp -a "$hosts" "$backup/certs.d"
restore() {
  dpkg --purge pullgate >/dev/null 2>&1 || true
  rm -rf "$hosts"
  [ -d "$backup/certs.d" ] && cp -a "$backup/certs.d" "$hosts"
  rm -rf "$backup"
}
trap restore EXIT

state() { # what installing must not change
  { cat /etc/containerd/config.toml /var/lib/kubelet/config.yaml 2>/dev/null || true
    find "$hosts" -type f -exec sha256sum {} + 2>/dev/null | sort || true; } | sha256sum
}
before=$(state)
out=$(dpkg -i "$deb" 2>&1) || fail "dpkg -i: $out"
echo "$out"
[ "$(state)" = "$before" ] || fail "installing changed containerd's or kubelet's configuration"
grep -q "imageServiceEndpoint: unix:///run/pullgate/pullgate.sock" <<<"$out" || fail "postinst does not say what to wire"
pgrep -x pullgate >/dev/null && fail "installing started pullgate"

for f in /usr/bin/pullgate /etc/pullgate/config.toml /lib/systemd/system/pullgate.service \
  /lib/systemd/system/pullgate.socket /usr/share/doc/pullgate/README.node.md \
  /usr/share/doc/pullgate/README.md /usr/share/pullgate/grafana/pullgate-dashboard.json \
  /usr/share/pullgate/prometheus/pullgate-alerts.yml; do
  [ -f "$f" ] || fail "$f missing"
done
dpkg-query -W -f='${Conffiles}\n' pullgate | grep -q /etc/pullgate/config.toml || fail "config not a conffile"
/usr/bin/pullgate --version
/usr/bin/pullgate check-config /etc/pullgate/config.toml || fail "the shipped config does not validate"
systemd-analyze verify /lib/systemd/system/pullgate.socket /lib/systemd/system/pullgate.service \
  || fail "systemd-analyze verify"
security=$(systemd-analyze security --offline=true /lib/systemd/system/pullgate.service)
exposure=$(awk '/Overall exposure level/ {print $(NF-2)}' <<<"$security")
echo "systemd-analyze security: exposure $exposure"
awk -v e="$exposure" 'BEGIN { exit !(e <= 2.5) }' || fail "exposure $exposure above 2.5"

# An administrator's registry entry, and pullgate's entries written as `pullgate serve` would.
mkdir -p "$hosts/registry.test"
printf 'server = "https://registry.test"\n\n[host."https://cache.example"]\n  capabilities = ["pull"]\n' \
  >"$hosts/registry.test/hosts.toml"
/usr/bin/pullgate mirror-hosts --write
grep -q "127.0.0.1:9783" "$hosts/registry.test/hosts.toml" || fail "mirror-hosts --write"

dpkg -r pullgate
[ -e /usr/bin/pullgate ] && fail "binary left after dpkg -r"
grep -q "127.0.0.1:9783" "$hosts/registry.test/hosts.toml" && fail "pullgate's entry left after dpkg -r"
grep -q "cache.example" "$hosts/registry.test/hosts.toml" || fail "the administrator's host went too"
[ -e "$hosts/_default/hosts.toml" ] && fail "pullgate's _default/hosts.toml left"
[ -f /etc/pullgate/config.toml ] || fail "dpkg -r removed the conffile (purge does)"
dpkg --purge pullgate
[ -e /etc/pullgate/config.toml ] && fail "config left after purge"
echo "package: installs, checks and removes cleanly"
