#!/usr/bin/env bash
# The containerd versions the end-to-end suite runs against: bookworm's (the system
# /usr/bin/containerd from tests/deps.sh), trixie's and sid's. The newer two come from Debian's
# archive with `apt-get download` and are unpacked with `dpkg -x` into a cache directory; nothing
# installed changes (the suites are added to apt's sources with Pin-Priority 1, so apt never
# prefers them for an install or an upgrade).
#
#   tests/containerd-versions.sh          # fetch what is missing, then print one line per version:
#                                         #   <codename> <package version> <containerd --version> <binary>
#   tests/containerd-versions.sh --list   # only print what is cached (no apt, no root)
#
# Cache: $PULLGATE_CONTAINERD_CACHE (default /var/cache/pullgate-tests/containerd), one directory
# per codename; a codename already there is skipped. Only the containerd binary is used (CRI pulls
# need no runc or shim).
set -euo pipefail

cache=${PULLGATE_CONTAINERD_CACHE:-/var/cache/pullgate-tests/containerd}
codenames=(trixie sid)
list_only=false
[ "${1:-}" = "--list" ] && list_only=true

bin_version() { # the version containerd prints: "containerd <module> <version> <revision>"
  "$1" --version | awk '{print $3}'
}

add_sources() {
  local sources=/etc/apt/sources.list.d/pullgate-tests.sources
  local pin=/etc/apt/preferences.d/pullgate-tests
  local changed=false
  if [ ! -f "$sources" ]; then
    cat >"$sources" <<EOF
# Added by pullgate's tests/containerd-versions.sh: newer containerd packages are downloaded from
# these suites (apt-get download), never installed (see $pin).
Types: deb
URIs: http://deb.debian.org/debian
Suites: ${codenames[*]}
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    changed=true
  fi
  if [ ! -f "$pin" ]; then
    cat >"$pin" <<EOF
# Added by pullgate's tests/containerd-versions.sh: nothing is installed from these suites.
Package: *
Pin: release n=trixie
Pin-Priority: 1

Package: *
Pin: release n=sid
Pin-Priority: 1

Package: *
Pin: release a=unstable
Pin-Priority: 1
EOF
    changed=true
  fi
  if $changed || [ ! -e /var/lib/apt/lists/deb.debian.org_debian_dists_sid_InRelease ]; then
    apt-get -o DPkg::Lock::Timeout=300 update -qq
  fi
}

fetch() { # codename
  local codename=$1 dir=$cache/$1 tmp
  tmp=$(mktemp -d)
  chmod 755 "$tmp" # apt downloads as _apt
  # shellcheck disable=SC2064
  trap "rm -rf '$tmp'" RETURN
  (cd "$tmp" && apt-get -o DPkg::Lock::Timeout=300 download -qq "containerd/$codename" >/dev/null)
  mkdir -p "$tmp/root"
  dpkg -x "$tmp"/containerd_*.deb "$tmp/root"
  [ -x "$tmp/root/usr/bin/containerd" ] || {
    echo "containerd/$codename: no usr/bin/containerd in $(ls "$tmp")" >&2
    return 1
  }
  # It must run here (bookworm's glibc): --version loads every shared library it links.
  if ! "$tmp/root/usr/bin/containerd" --version >/dev/null; then
    echo "containerd/$codename does not run on this system:" >&2
    ldd "$tmp/root/usr/bin/containerd" >&2 || true
    return 1
  fi
  mkdir -p "$cache"
  rm -rf "$dir.partial"
  mv "$tmp/root" "$dir.partial"
  basename "$tmp"/containerd_*.deb >"$dir.partial/DEB"
  mv "$dir.partial" "$dir"
}

if ! $list_only; then
  missing=()
  for c in "${codenames[@]}"; do
    [ -x "$cache/$c/usr/bin/containerd" ] || missing+=("$c")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
      echo "containerd ${missing[*]} not in $cache; run $0 as root" >&2
      exit 1
    fi
    add_sources
    for c in "${missing[@]}"; do
      fetch "$c"
    done
  fi
fi

echo "bookworm $(dpkg-query -W -f '${Version}' containerd) $(bin_version /usr/bin/containerd) /usr/bin/containerd"
for c in "${codenames[@]}"; do
  bin=$cache/$c/usr/bin/containerd
  if [ -x "$bin" ]; then
    deb=$(cat "$cache/$c/DEB") # containerd_<version>_<arch>.deb, %-escaped
    deb=${deb#containerd_}
    echo "$c ${deb%_*} $(bin_version "$bin") $bin"
  fi
done
