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

# The interop tests (tests/interop.rs) run peers built on other HTTP/2
# stacks: Go, Node.js, HAProxy and curl, from Debian packages. This installs
# whichever are missing and returns at once when all are present.
bash scripts/install-test-deps.sh

cargo test --workspace --locked "$@"
