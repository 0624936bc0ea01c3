# Sourced by scripts/test.sh and scripts/with-pg.sh. `start_pg_server` installs the
# PostgreSQL server from Debian if it is missing, starts a private cluster (its own data
# directory, bound to 127.0.0.1 on a free port, max_prepared_transactions = 64 for the
# two-phase-commit sink) and exports EXACTLY_PG_URL, plus a second one with
# max_prepared_transactions = 0 (EXACTLY_PG_NO2PC_URL: the sink must refuse it), and a
# third one that the outage test stops and starts (EXACTLY_PG_OUTAGE_URL, _STOP, _START);
# `stop_pg_server` stops them all (the caller traps EXIT). It fails loudly if any step fails.

start_pg_server() {
  local bin
  bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1 || true)
  if [ -z "$bin" ] || [ ! -x "$bin/initdb" ]; then
    source scripts/apt.sh
    apt_install postgresql
    bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
  fi
  # initdb refuses to run as root: run the server as the `postgres` user when root.
  local as=()
  if [ "$(id -u)" = 0 ]; then
    id postgres >/dev/null 2>&1 || useradd --system --home /var/lib/postgresql postgres
    as=(runuser -u postgres --)
  fi
  PG_AS=("${as[@]}")
  PG_BIN=$bin
  PG_DATA=$(mktemp -d)
  chmod 755 "$PG_DATA"
  local pwfile="$PG_DATA/pw"
  echo "exactly-test" >"$pwfile"
  [ "$(id -u)" = 0 ] && chown -R postgres "$PG_DATA"
  echo "== starting PostgreSQL ($("$bin/postgres" --version | awk '{print $3}')) on 127.0.0.1"
  "${as[@]}" "$bin/initdb" -D "$PG_DATA/db" -U postgres --auth-host=scram-sha-256 \
    --auth-local=trust --pwfile="$pwfile" >"$PG_DATA/initdb.log" 2>&1 || {
    echo "initdb failed:" >&2; cat "$PG_DATA/initdb.log" >&2; return 1; }
  "${as[@]}" cp -a "$PG_DATA/db" "$PG_DATA/db-no2pc"
  "${as[@]}" cp -a "$PG_DATA/db" "$PG_DATA/db-outage"
  local port
  port=$(pg_cluster "$bin" db 64) || return 1
  export EXACTLY_PG_URL="host=127.0.0.1 port=$port user=postgres password=exactly-test dbname=postgres"
  port=$(pg_cluster "$bin" db-no2pc 0) || return 1
  export EXACTLY_PG_NO2PC_URL="host=127.0.0.1 port=$port user=postgres password=exactly-test dbname=postgres"
  # A cluster of its own for the outage test, which stops and restarts it (the other
  # tests keep theirs): the commands to do that are exported with it.
  port=$(pg_cluster "$bin" db-outage 64) || return 1
  export EXACTLY_PG_OUTAGE_URL="host=127.0.0.1 port=$port user=postgres password=exactly-test dbname=postgres"
  export EXACTLY_PG_OUTAGE_STOP="${as[*]} $bin/pg_ctl -D $PG_DATA/db-outage -m immediate -w stop"
  export EXACTLY_PG_OUTAGE_START="${as[*]} $bin/pg_ctl -D $PG_DATA/db-outage -w -l $PG_DATA/db-outage.log -o '-c listen_addresses=127.0.0.1 -c port=$port -c max_prepared_transactions=64 -c unix_socket_directories=$PG_DATA' start"
}

# Start the cluster in $PG_DATA/$2 with max_prepared_transactions = $3; prints its port.
pg_cluster() {
  local bin=$1 dir=$2 prepared=$3 port
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  "${PG_AS[@]}" "$bin/pg_ctl" -D "$PG_DATA/$dir" -w -l "$PG_DATA/$dir.log" -o \
    "-c listen_addresses=127.0.0.1 -c port=$port -c max_prepared_transactions=$prepared -c unix_socket_directories=$PG_DATA" \
    start >/dev/null || {
    echo "PostgreSQL ($dir) did not start; its log:" >&2; cat "$PG_DATA/$dir.log" >&2; return 1; }
  echo "$port"
}

stop_pg_server() {
  if [ -n "${PG_DATA:-}" ]; then
    local dir
    for dir in db db-no2pc db-outage; do
      "${PG_AS[@]}" "$PG_BIN/pg_ctl" -D "$PG_DATA/$dir" -m fast stop >/dev/null 2>&1 || true
    done
    rm -rf "$PG_DATA"
  fi
}
