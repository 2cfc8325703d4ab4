#!/usr/bin/env bash
# Buy and list throughput through the gateway, with wrk.
#
#   bench/buy.sh [embedded|serve|all]      (default: all)
#
# embedded: `bazaar up` (SQLite, in-memory bus). serve: gateway, auth,
# catalog and orders as separate `bazaar serve` processes on RabbitMQ and
# PostgreSQL (BAZAAR_TEST_AMQP_URL / BAZAAR_TEST_DATABASE_URL or the local
# defaults). Env: DURATION (default 10s), CONNECTIONS (default 32).
# Prints one line per scenario: requests/s, p50, p99, non-2xx responses.
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-all}
DURATION=${DURATION:-10s}
CONNECTIONS=${CONNECTIONS:-32}
AMQP=${BAZAAR_TEST_AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}
DB=${BAZAAR_TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}

command -v wrk >/dev/null || { echo "bench: wrk is missing (apt-get install -y wrk)" >&2; exit 1; }
cargo build --release -q -p bazaar
BIN=${CARGO_TARGET_DIR:-target}/release/bazaar
WORK=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

export BAZAAR_ADMIN_EMAIL=admin@bench.local BAZAAR_ADMIN_PASSWORD=bench-admin-pw BAZAAR_LOG_FORMAT=json RUST_LOG=warn

wait_up() { # url
  for _ in $(seq 1 100); do curl -sf "$1/api/v1/products?limit=1" >/dev/null && return 0; sleep 0.2; done
  echo "bench: system at $1 did not come up" >&2; exit 1
}

# wrk: requests/s, p50, p99, non-2xx.
run_wrk() { # label, wrk args...
  local label=$1; shift
  local out; out=$(wrk -t2 -c"$CONNECTIONS" -d"$DURATION" --latency "$@")
  local rps p50 p99 bad
  rps=$(awk '/^Requests\/sec/ {print $2}' <<<"$out")
  p50=$(awk '$1=="50%" {print $2}' <<<"$out")
  p99=$(awk '$1=="99%" {print $2}' <<<"$out")
  bad=$(awk '/Non-2xx/ {print $NF}' <<<"$out"); bad=${bad:-0}
  printf '%-28s %10s req/s   p50 %8s   p99 %8s   non-2xx %s\n' "$label" "$rps" "$p50" "$p99" "$bad"
}

scenario() { # mode, gateway url
  local mode=$1 url=$2
  wait_up "$url"
  local email="bench$RANDOM$RANDOM@example.com"
  curl -sf -X POST "$url/api/v1/auth/register" -H 'content-type: application/json' \
    -d "{\"email\":\"$email\",\"password\":\"bench-password\",\"name\":\"Bench\"}" >/dev/null
  local token ids
  token=$(curl -sf -X POST "$url/api/v1/auth/login" -H 'content-type: application/json' \
    -d "{\"email\":\"$email\",\"password\":\"bench-password\"}" | python3 -c 'import json,sys; print(json.load(sys.stdin)["access_token"])')
  ids=$(curl -sf "$url/api/v1/products?limit=3" | python3 -c 'import json,sys; print(json.dumps([p["id"] for p in json.load(sys.stdin)["items"]]))')
  cat > "$WORK/buy.lua" <<LUA
wrk.method = "POST"
wrk.body = '{"ids": $ids}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer $token"
LUA
  run_wrk "$mode buy (3 items)" -s "$WORK/buy.lua" "$url/api/v1/products/buy"
  run_wrk "$mode list 100 products" "$url/api/v1/products?limit=100"
}

if [[ $MODE == embedded || $MODE == all ]]; then
  port=$(free_port)
  "$BIN" up --port "$port" --data-dir "$WORK/data" >"$WORK/up.log" 2>&1 &
  PIDS+=($!)
  scenario embedded "http://127.0.0.1:$port"
  kill "${PIDS[-1]}"; wait "${PIDS[-1]}" 2>/dev/null || true
fi

if [[ $MODE == serve || $MODE == all ]]; then
  declare -A PORT
  for s in auth orders catalog gateway; do PORT[$s]=$(free_port); done
  export BAZAAR_AMQP_URL=$AMQP BAZAAR_DATABASE_URL=$DB BAZAAR_REGISTRY=static
  export BAZAAR_DATABASE_SCHEMA_PREFIX="bench$(date +%s)_"
  for s in auth orders catalog gateway; do export "BAZAAR_SERVICES__${s^^}=http://127.0.0.1:${PORT[$s]}"; done
  for s in auth orders catalog gateway; do
    "$BIN" serve "$s" --port "${PORT[$s]}" >"$WORK/$s.log" 2>&1 &
    PIDS+=($!)
  done
  scenario serve "http://127.0.0.1:${PORT[gateway]}"
  for s in auth orders catalog; do
    psql "$DB" -qc "DROP SCHEMA IF EXISTS \"${BAZAAR_DATABASE_SCHEMA_PREFIX}$s\" CASCADE" 2>/dev/null || true
  done
fi
