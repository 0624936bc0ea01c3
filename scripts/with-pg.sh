#!/usr/bin/env bash
# Run a command with a private PostgreSQL cluster on 127.0.0.1 and EXACTLY_PG_URL set,
# e.g. `scripts/with-pg.sh cargo bench --bench postgres`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/pg-server.sh
trap stop_pg_server EXIT
start_pg_server
"$@"
