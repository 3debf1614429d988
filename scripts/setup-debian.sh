#!/usr/bin/env bash
# Installs everything thinhv needs on a Debian 12 (bookworm) machine:
# QEMU >= 8 (from bookworm-backports), OVMF, Bochs, mtools/dosfstools,
# busybox-static, and the two Rust targets; g++ and libncurses-dev build a
# newer Bochs from Debian's source (scripts/build-bochs.sh, run by
# `cargo xtask test`). Safe to run again.
# Without root it prints the exact commands instead of running them.
set -euo pipefail

need_pkgs=(ovmf bochs bochs-term bochsbios vgabios mtools dosfstools busybox-static cpio xz-utils zstd kmod make gcc-12 libelf1 g++ libncurses-dev)
qemu_pkgs=(qemu-system-x86 qemu-utils)

run() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else echo "  sudo $*"; fi
}

qemu_ok() {
  command -v qemu-system-x86_64 >/dev/null 2>&1 || return 1
  local v
  v=$(qemu-system-x86_64 --version | sed -n 's/.*version \([0-9]*\)\..*/\1/p' | head -n1)
  [ -n "$v" ] && [ "$v" -ge 8 ]
}

missing=()
for p in "${need_pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done

if [ "$(id -u)" -ne 0 ] && { [ ${#missing[@]} -gt 0 ] || ! qemu_ok; }; then
  echo "thinhv setup: not root; run these commands (or re-run this script as root):"
fi

backports=/etc/apt/sources.list.d/thinhv-backports.sources
if ! qemu_ok; then
  if . /etc/os-release && [ "${VERSION_CODENAME:-}" = bookworm ]; then
    if [ ! -f "$backports" ] && [ -f /etc/apt/sources.list.d/debian.sources ]; then
      # Reuse the machine's own Debian mirror stanza (no host named here).
      stanza=$(awk 'BEGIN{RS="";ORS="\n\n"} /Suites:[^\n]*bookworm( |$|\n)/ && !/security/' \
        /etc/apt/sources.list.d/debian.sources | sed -e 's/^Suites: .*/Suites: bookworm-backports/')
      if [ "$(id -u)" -eq 0 ]; then
        printf '%s\n' "$stanza" >"$backports"
      else
        echo "  # add a bookworm-backports stanza to $backports:"
        printf '%s\n' "$stanza" | sed 's/^/  #   /'
      fi
    fi
    run apt-get update -qq
    run env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -t bookworm-backports "${qemu_pkgs[@]}"
  else
    run apt-get update -qq
    run env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${qemu_pkgs[@]}"
  fi
fi

if [ ${#missing[@]} -gt 0 ]; then
  [ -f /var/lib/apt/lists/lock ] || true
  run apt-get update -qq
  run env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

if command -v rustup >/dev/null 2>&1; then
  rustup target add x86_64-unknown-uefi x86_64-unknown-none >/dev/null
  rustup component add clippy rustfmt >/dev/null 2>&1 || true
else
  echo "thinhv setup: rustup not found; install Rust with rustup, then: rustup target add x86_64-unknown-uefi x86_64-unknown-none"
  exit 1
fi

if [ "$(id -u)" -ne 0 ] && { [ ${#missing[@]} -gt 0 ] || ! qemu_ok; }; then
  exit 1
fi
echo "thinhv setup: ok ($(qemu-system-x86_64 --version | head -n1))"
