#!/usr/bin/env bash
# Builds a newer Bochs than Debian 12's 2.7 for the Intel VMX test bed,
# from Debian's own source package (trixie's 3.0), into BUILD/cache/bochs
# (the binary `bochs` and its version in `VERSION`). The tests then run it
# instead of the packaged one (`ovmf/src/bochs.rs`). Safe to run again:
# it does nothing when the build is there.
#
# Why: Bochs 2.7's VMX wakes a processor by NMI only once and leaves an
# INIT pending after an INIT VM exit (fixed in 2.8); the appliance test
# and the wait-for-SIPI test need both (`docs/emulator-faults.md`).
# Built without CET: Bochs 3.0 stops ("PAE: asked to set dirty on paging
# leaf entry with R/W bit clear") when Debian 12's OVMF writes a read-only
# page with CR0.WP clear on a CPU model with CET (tigerlake).
#
# Needs g++, make, libncurses-dev and apt-get (scripts/setup-debian.sh
# installs them); no root: the source list and its index are private.
set -euo pipefail

build=${1:-build}
out="$build/cache/bochs"
if [ -x "$out/bochs" ] && [ -s "$out/VERSION" ]; then
  echo "thinhv bochs: $(cat "$out/VERSION") built ($out)"
  exit 0
fi
for tool in g++ make apt-get tar; do
  command -v "$tool" >/dev/null 2>&1 || { echo "thinhv bochs: $tool not found"; exit 1; }
done

mkdir -p "$build/cache"
work="$(cd "$build/cache" && pwd)/bochs-src"
rm -rf "$work"
mkdir -p "$work/lists/partial" "$work/cache/archives/partial"

# The machine's own Debian mirror (no host named here), trixie's sources.
uri=
if [ -f /etc/apt/sources.list.d/debian.sources ]; then
  uri=$(awk '/^URIs:/ && !/security/ { print $2; exit }' /etc/apt/sources.list.d/debian.sources)
fi
if [ -z "$uri" ] && [ -f /etc/apt/sources.list ]; then
  uri=$(awk '$1 == "deb" && $2 !~ /security/ { print $2; exit }' /etc/apt/sources.list)
fi
[ -n "$uri" ] || { echo "thinhv bochs: no Debian mirror in the apt sources"; exit 1; }
echo "deb-src $uri trixie main" >"$work/sources.list"
apt_opts=(-o "Dir::Etc::sourcelist=$work/sources.list" -o Dir::Etc::sourceparts=-
  -o "Dir::State::Lists=$work/lists" -o "Dir::Cache=$work/cache"
  -o APT::Sandbox::User=root -qq)
apt-get "${apt_opts[@]}" update
# The source tarball is what is needed; a missing .dsc is not fatal.
(cd "$work" && apt-get "${apt_opts[@]}" source --download-only bochs) >"$work/source.log" 2>&1 || true
tarball=$(ls "$work"/bochs_*.orig.tar.* 2>/dev/null | head -n1)
[ -n "$tarball" ] || { cat "$work/source.log"; echo "thinhv bochs: no bochs source tarball from $uri (trixie)"; exit 1; }
version=$(basename "$tarball" | sed -n 's/^bochs_\([0-9]*\.[0-9]*\).*/\1/p')

tar -xf "$tarball" -C "$work"
src=$(find "$work" -mindepth 1 -maxdepth 1 -type d -name 'bochs-*' | head -n1)
(
  cd "$src"
  ./configure --with-term --with-nogui --disable-plugins --disable-readline \
    --enable-x86-64 --enable-smp --enable-vmx=2 --enable-svm --enable-cpu-level=6 \
    --enable-avx --enable-evex --enable-amx --enable-uintr --enable-protection-keys \
    --enable-memtype --enable-pci --enable-a20-pin --enable-all-optimizations \
    --enable-repeat-speedups --enable-debugger --enable-x86-debugger --enable-fpu \
    --enable-3dnow --enable-idle-hack --enable-cdrom >configure.log 2>&1 ||
    { tail -20 configure.log; exit 1; }
  make -j"$(nproc)" >make.log 2>&1 || { tail -20 make.log; exit 1; }
)
mkdir -p "$out"
cp "$src/bochs" "$out/bochs"
echo "$version" >"$out/VERSION"
rm -rf "$work"
echo "thinhv bochs: $version built ($out)"
