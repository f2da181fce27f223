#!/usr/bin/env bash
# Installs what the interop tests (tests/interop.rs) need on a fresh Debian
# machine: the Go toolchain (stdlib-only HTTP/2 peers), Node.js (its http2
# module), HAProxy (an HTTP/1.1 CONNECT -> HTTP/2 CONNECT relay), curl,
# iptables (tests/netns.rs black-holes a peer inside its own network namespace;
# tests/capture.rs runs a node on iptables too),
# and nftables, python3 and ip (tests/capture.rs: `hbone node` installs its rules
# with nft, and the plain client and app of two namespaced hosts are python3).
# Idempotent: does nothing (and asks no registry) when all are present.
# Must run as root, or with sudo available, when something is missing.
set -euo pipefail

# command name -> Debian package
declare -A wanted=(
  [go]=golang-go
  [node]=nodejs
  [haproxy]=haproxy
  [curl]=curl
  [iptables]=iptables
  [nft]=nftables
  [python3]=python3
  [ip]=iproute2
)

missing=()
for cmd in go node haproxy curl iptables nft python3 ip; do
  if ! command -v "$cmd" >/dev/null 2>&1; then
    missing+=("${wanted[$cmd]}")
  fi
done

if [ "${#missing[@]}" -eq 0 ]; then
  exit 0
fi

echo "install-test-deps: installing ${missing[*]}" >&2
if [ "$(id -u)" -eq 0 ]; then
  sudo=()
elif command -v sudo >/dev/null 2>&1; then
  sudo=(sudo)
else
  echo "install-test-deps: need root to install ${missing[*]} (Debian packages)" >&2
  exit 1
fi

export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -q
"${sudo[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"

for cmd in go node haproxy curl iptables nft python3 ip; do
  if ! command -v "$cmd" >/dev/null 2>&1; then
    echo "install-test-deps: '$cmd' still missing after installing ${missing[*]}" >&2
    exit 1
  fi
done
