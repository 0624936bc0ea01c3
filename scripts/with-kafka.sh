#!/usr/bin/env bash
# Run a command with a private Apache Kafka broker on 127.0.0.1 and
# EXACTLY_KAFKA_BROKERS set, e.g. `scripts/with-kafka.sh cargo bench --features kafka
# --bench kafka`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/apt.sh
source scripts/kafka-server.sh
trap stop_kafka_server EXIT
start_kafka_server
"$@"
