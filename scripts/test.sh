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

# Tests need nothing beyond the Rust toolchain today. Interop peers (Go,
# Node.js, HAProxy) will be installed here when their tests land.

cargo test --locked "$@"
