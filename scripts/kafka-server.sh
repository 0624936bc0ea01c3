# Sourced by scripts/test.sh. `start_kafka_server` installs the tansu broker (a
# Kafka-protocol server written in Rust; crates.io, pinned, built once into
# ${EXACTLY_TOOLS_DIR:-~/.cache/exactly-tools}, ~12 min) if missing, starts it bound to
# 127.0.0.1 on a free port with in-memory storage, waits until it accepts connections,
# and exports EXACTLY_KAFKA_BROKERS; `stop_kafka_server` stops it (the caller traps
# EXIT). It fails loudly if any step fails. tansu does not commit transactions (EndTxn),
# so only the source is tested against it.

start_kafka_server() {
  local tools="${EXACTLY_TOOLS_DIR:-$HOME/.cache/exactly-tools}"
  local tansu="$tools/tansu/bin/tansu"
  if [ ! -x "$tansu" ]; then
    echo "== installing the tansu Kafka broker (crates.io: tansu 0.6.0, ~12 min once)"
    cargo install tansu --version 0.6.0 --features dynostore --locked --root "$tools/tansu"
  fi
  local port
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  KAFKA_LOG=$(mktemp)
  echo "== starting tansu (Kafka protocol on 127.0.0.1:$port)"
  "$tansu" broker --listener-url "tcp://127.0.0.1:$port" \
    --advertised-listener-url "tcp://127.0.0.1:$port" \
    --storage-engine memory://tansu/ >"$KAFKA_LOG" 2>&1 &
  KAFKA_PID=$!
  if ! python3 - "$port" <<'PY'
import socket, sys, time
for _ in range(100):
    try:
        socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=1).close()
        sys.exit(0)
    except OSError:
        time.sleep(0.2)
sys.exit(1)
PY
  then
    echo "tansu did not start on 127.0.0.1:$port; its log:" >&2
    cat "$KAFKA_LOG" >&2
    return 1
  fi
  export EXACTLY_KAFKA_BROKERS="127.0.0.1:$port"
}

stop_kafka_server() {
  if [ -n "${KAFKA_PID:-}" ]; then
    kill "$KAFKA_PID" 2>/dev/null || true
    wait "$KAFKA_PID" 2>/dev/null || true
    rm -f "$KAFKA_LOG"
  fi
}
