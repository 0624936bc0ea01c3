#!/usr/bin/env bash
# Run a command with a private S3-compatible server (SeaweedFS on 127.0.0.1) and the
# AWS_* variables pointing at it, e.g. to measure S3 in the benchmarks:
#   scripts/with-s3.sh cargo bench --bench large_state
# EXACTLY_BENCH_S3 is set to s3://exactly/bench for the benchmarks.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/s3-server.sh
trap stop_s3_server EXIT
start_s3_server
export EXACTLY_BENCH_S3="s3://$EXACTLY_S3_BUCKET/bench"
"$@"
