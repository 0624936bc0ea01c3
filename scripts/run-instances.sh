#!/usr/bin/env bash
# Run one job as N local processes, as an orchestrator would: instance i gets
# EXACTLY_INSTANCES=N and EXACTLY_INSTANCE=i, its output goes to instance-<i>.log, and
# SIGTERM or Ctrl-C is passed to every instance (each stops with a checkpoint). Exits
# non-zero if any instance did.
#
#   scripts/run-instances.sh 3 target/release/examples/ledger run --input kafka://... ...
set -uo pipefail
if [[ $# -lt 2 || ! $1 =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 N COMMAND [ARGS...]   (N instances of COMMAND)" >&2
  exit 2
fi
n=$1
shift
pids=()
for ((i = 0; i < n; i++)); do
  EXACTLY_INSTANCES=$n EXACTLY_INSTANCE=$i "$@" >"instance-$i.log" 2>&1 &
  pids+=($!)
  echo "instance $i of $n: pid ${pids[$i]}, log instance-$i.log"
done
stop() {
  echo "stopping every instance with a checkpoint" >&2
  kill -TERM "${pids[@]}" 2>/dev/null
}
trap stop TERM INT
status=0
for ((i = 0; i < n; i++)); do
  # `wait` returns early when a trapped signal arrives: wait again until it exited.
  while true; do
    wait "${pids[$i]}"
    code=$?
    kill -0 "${pids[$i]}" 2>/dev/null || break
  done
  echo "instance $i exited with $code"
  [[ $code -eq 0 ]] || status=1
done
exit $status
