#!/usr/bin/env bash
# The project's test command (README, and .ci/run). It installs what the
# tests need on a fresh machine, then runs the whole suite: unit tests,
# integration tests on loopback with real certificates, and doc tests.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo is required (https://rustup.rs); this project builds on stable Rust" >&2
  exit 1
fi

# Debian puts haproxy, nft, iptables and ip in /usr/sbin, which a non-root
# user's PATH often lacks: the tests and the install check find them there.
export PATH="$PATH:/usr/sbin:/sbin"

# The interop tests (tests/interop.rs) run peers built on other HTTP/2
# stacks: Go, Node.js, HAProxy and curl, from Debian packages. This installs
# whichever are missing and returns at once when all are present.
bash scripts/install-test-deps.sh

cargo test --workspace --locked "$@"

# The fuzz targets' checks on stable, over their seeds and fixed-seed
# mutations (FUZZING.md). fuzz/ is its own workspace (libFuzzer needs it);
# building it here keeps it compiling, and sharing the build directory
# rebuilds only the library.
cargo test --manifest-path fuzz/Cargo.toml --locked --target-dir "${CARGO_TARGET_DIR:-target}"
