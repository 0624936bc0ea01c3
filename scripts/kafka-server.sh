# Sourced by scripts/test.sh. `start_kafka_server` fetches the Apache Kafka broker's jars
# from Maven Central (scripts/kafka/pom.xml, once, into
# ${EXACTLY_TOOLS_DIR:-~/.cache/exactly-tools}/kafka-<version>, ~20 s), formats a KRaft
# log directory, starts one broker+controller bound to 127.0.0.1 on free ports with
# settings for tests (one replica everywhere, transaction state log included), waits
# until it reports that it started, and exports EXACTLY_KAFKA_BROKERS;
# `stop_kafka_server` stops it and deletes its data (the caller traps EXIT). It fails
# loudly if any step fails.

KAFKA_VERSION=4.1.1

start_kafka_server() {
  local tools="${EXACTLY_TOOLS_DIR:-$HOME/.cache/exactly-tools}"
  local here
  here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
  local jars="$tools/kafka-$KAFKA_VERSION"
  if [ ! -f "$jars/.complete" ]; then
    echo "== fetching the Apache Kafka $KAFKA_VERSION broker (Maven Central, once)"
    command -v mvn >/dev/null || apt_install maven
    command -v java >/dev/null || apt_install openjdk-17-jre-headless
    rm -rf "$jars"
    mvn -q -B -f "$here/kafka/pom.xml" dependency:copy-dependencies \
      -DoutputDirectory="$jars" -DincludeScope=runtime
    touch "$jars/.complete"
  fi
  local ports broker controller
  ports=$(python3 -c '
import socket
ss = [socket.socket() for _ in range(2)]
for s in ss: s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in ss))')
  read -r broker controller <<<"$ports"
  KAFKA_DIR=$(mktemp -d)
  cat >"$KAFKA_DIR/server.properties" <<EOF
process.roles=broker,controller
node.id=1
controller.quorum.bootstrap.servers=127.0.0.1:$controller
listeners=PLAINTEXT://127.0.0.1:$broker,CONTROLLER://127.0.0.1:$controller
advertised.listeners=PLAINTEXT://127.0.0.1:$broker
controller.listener.names=CONTROLLER
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
log.dirs=$KAFKA_DIR/data
num.partitions=1
offsets.topic.replication.factor=1
offsets.topic.num.partitions=4
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=4
group.initial.rebalance.delay.ms=0
EOF
  local cp="$jars/*"
  echo "== starting Apache Kafka $KAFKA_VERSION (KRaft, 127.0.0.1:$broker)"
  if ! java -cp "$cp" kafka.tools.StorageTool format --standalone \
      -t "$(java -cp "$cp" kafka.tools.StorageTool random-uuid)" \
      -c "$KAFKA_DIR/server.properties" >"$KAFKA_DIR/format.log" 2>&1; then
    echo "formatting the Kafka log directory failed:" >&2
    cat "$KAFKA_DIR/format.log" >&2
    return 1
  fi
  java -Xmx768m -Dlog4j2.configurationFile="$here/kafka/log4j2.properties" \
    -cp "$cp" kafka.Kafka "$KAFKA_DIR/server.properties" >"$KAFKA_DIR/broker.log" 2>&1 &
  KAFKA_PID=$!
  local i
  for i in $(seq 1 300); do
    if grep -q "Kafka Server started" "$KAFKA_DIR/broker.log"; then
      export EXACTLY_KAFKA_BROKERS="127.0.0.1:$broker"
      return 0
    fi
    if ! kill -0 "$KAFKA_PID" 2>/dev/null; then
      break
    fi
    sleep 0.2
  done
  echo "the Kafka broker did not start on 127.0.0.1:$broker; its log:" >&2
  tail -n 100 "$KAFKA_DIR/broker.log" >&2
  return 1
}

stop_kafka_server() {
  if [ -n "${KAFKA_PID:-}" ]; then
    kill "$KAFKA_PID" 2>/dev/null || true
    wait "$KAFKA_PID" 2>/dev/null || true
    rm -rf "$KAFKA_DIR"
  fi
}
