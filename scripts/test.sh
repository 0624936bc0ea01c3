#!/usr/bin/env bash
# The whole test suite: formatting, lints, every test (unit, property, integration,
# kill-and-restore) and doctests. This is the README's test command and what CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo-nextest >/dev/null 2>&1; then
  echo "installing cargo-nextest (test runner)"
  cargo install --locked cargo-nextest
fi

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy (warnings are errors)"
cargo clippy --workspace --all-targets --quiet -- -D warnings

# Tests build once, with the optimised `ci` profile (debug assertions on): the
# kill-and-restore test drives a 1M-event job through a child process.
echo "== tests"
cargo nextest run --workspace --cargo-profile ci --no-fail-fast

echo "== doctests"
cargo test --workspace --doc --quiet
