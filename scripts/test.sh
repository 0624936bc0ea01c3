#!/usr/bin/env bash
# The whole test suite: formatting, lints, every test (unit, property, integration,
# kill-and-restore) and doctests. This is the README's test command and what CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo-nextest >/dev/null 2>&1; then
  echo "installing cargo-nextest (test runner)"
  cargo install --locked cargo-nextest
fi

# Building RocksDB from source needs a C++ compiler, make and libclang
# (RocksDB's bindings are generated at build time); python3-venv for the S3 server.
source scripts/apt.sh
apt_install g++ make libclang-dev python3-venv

echo "== cargo fmt --check"
cargo fmt --all -- --check

# The suite covers every opt-in feature (`--all-features`: S3, RocksDB, PostgreSQL, Kafka,
# Parquet and the fault-injection points), in one feature set, so tests and the example
# binaries they run share one build.
# Everything builds with the one optimised `ci` profile (debug assertions on): the
# RocksDB C++ library compiles once per profile (~16-20 min on 2 cores), so clippy,
# tests, doctests and docs share one build of it.
echo "== cargo clippy (warnings are errors)"
cargo clippy --workspace --all-targets --all-features --profile ci --quiet -- -D warnings

# Real servers for the tests that need them, bound to 127.0.0.1 and stopped when this
# script exits: SeaweedFS (S3), private PostgreSQL clusters and a Kafka-protocol broker
# (Apache Kafka, KRaft). No server, no test run.
source scripts/s3-server.sh
source scripts/pg-server.sh
source scripts/kafka-server.sh
trap 'stop_kafka_server; stop_pg_server; stop_s3_server' EXIT
start_s3_server
start_pg_server
start_kafka_server

# The kill-and-restore tests drive 1M-event jobs through child processes, so tests
# run optimised.
echo "== tests"
cargo nextest run --workspace --all-features --cargo-profile ci --no-fail-fast

echo "== doctests"
cargo test --workspace --doc --all-features --profile ci --quiet

echo "== API docs (broken links are errors)"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --all-features --profile ci --quiet
