#!/usr/bin/env bash
# Installs what building and testing shunt needs on a fresh Debian machine, and nothing that is
# already there. Idempotent; safe to run before every test run.
#
# - netfilter and lab tools: nftables, iptables, conntrack, iproute2, ethtool, iperf3;
# - the eBPF toolchain: the rustup toolchains here carry no rust-src, so the kernel programs are
#   built with Debian's rustc-web (+ rust-web-src for -Z build-std=core), linked into rustup as
#   the toolchain `debian`, and bpf-linker built against the same LLVM major as that rustc.
set -euo pipefail

BPF_LINKER_VERSION=0.13.0
need_root() {
    if [ "$(id -u)" -ne 0 ]; then
        echo "install-deps: need root to install $*" >&2
        exit 1
    fi
}

apt_packages=(nftables iptables conntrack iproute2 ethtool iperf3 rustc-web cargo-web rust-web-src)
missing=()
for p in "${apt_packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
apt_updated=0
apt_install() {
    need_root "$*"
    if [ "$apt_updated" -eq 0 ]; then
        apt-get update -qq
        apt_updated=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}
if [ ${#missing[@]} -gt 0 ]; then
    echo "install-deps: installing ${missing[*]}"
    apt_install "${missing[@]}"
fi

# The LLVM major of Debian's rustc decides bpf-linker's LLVM feature (bpf-linker must emit
# bitcode-compatible objects for the same LLVM that compiled the eBPF crate).
llvm_major=$(/usr/bin/rustc -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')
if [ -z "$llvm_major" ]; then
    echo "install-deps: cannot read the LLVM version of /usr/bin/rustc" >&2
    exit 1
fi
llvm_missing=()
for p in "llvm-${llvm_major}-dev" "libpolly-${llvm_major}-dev" zlib1g-dev libzstd-dev; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || llvm_missing+=("$p")
done

if ! rustup toolchain list | grep -q '^debian'; then
    echo "install-deps: linking Debian's rustc as rustup toolchain 'debian'"
    rustup toolchain link debian /usr
fi

cargo_bin="${CARGO_HOME:-$HOME/.cargo}/bin"
if ! "$cargo_bin/bpf-linker" --version 2>/dev/null | grep -q "$BPF_LINKER_VERSION"; then
    if [ ${#llvm_missing[@]} -gt 0 ]; then
        echo "install-deps: installing ${llvm_missing[*]}"
        apt_install "${llvm_missing[@]}"
    fi
    echo "install-deps: building bpf-linker $BPF_LINKER_VERSION against LLVM $llvm_major (about a minute)"
    LLVM_PREFIX="/usr/lib/llvm-${llvm_major}" cargo install bpf-linker \
        --version "$BPF_LINKER_VERSION" --locked --no-default-features \
        --features "llvm-${llvm_major}" --quiet
fi
echo "install-deps: ok (rustc for eBPF: $(rustup run debian rustc --version), $("$cargo_bin/bpf-linker" --version))"
