#!/usr/bin/env bash
# Buy and list throughput through the gateway, with wrk.
#
#   bench/buy.sh [embedded|serve|all]      (default: all)
#
# embedded: `bazaar up` (SQLite, in-memory bus). serve: every service as a
# separate `bazaar serve` process on RabbitMQ and PostgreSQL
# (BAZAAR_TEST_AMQP_URL / BAZAAR_TEST_DATABASE_URL or the local defaults).
# Env: DURATION (default 10s), CONNECTIONS (default 32), PROFILE, BIN (a
# binary to run instead of building this tree).
# Prints one line per scenario: requests/s, p50, p99, non-2xx responses,
# and the CPU time (user + system) the system's processes spent per
# request, which drifts far less with this VM's speed than requests/s.
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-all}
DURATION=${DURATION:-10s}
CONNECTIONS=${CONNECTIONS:-32}

command -v wrk >/dev/null || { echo "bench: wrk is missing (apt-get install -y wrk)" >&2; exit 1; }
source bench/lib.sh

# wrk: requests/s, p50, p99, non-2xx.
run_wrk() { # label, wrk args...
  local label=$1; shift
  local t0; t0=$(ticks "${SYSTEM_PIDS[@]}")
  local out; out=$(wrk -t2 -c"$CONNECTIONS" -d"$DURATION" --latency "$@")
  local t1; t1=$(ticks "${SYSTEM_PIDS[@]}")
  local rps p50 p99 bad n cpu
  rps=$(awk '/^Requests\/sec/ {print $2}' <<<"$out")
  p50=$(awk '$1=="50%" {print $2}' <<<"$out")
  p99=$(awk '$1=="99%" {print $2}' <<<"$out")
  bad=$(awk '/Non-2xx/ {print $NF}' <<<"$out"); bad=${bad:-0}
  n=$(awk '/requests in/ { print $1 }' <<<"$out")
  cpu=$(awk -v t=$((t1 - t0)) -v n="$n" -v hz="$TICK" 'BEGIN { printf "%.1f", t * 1e6 / hz / n }')
  printf '%-28s %10s req/s   p50 %8s   p99 %8s   non-2xx %s   CPU/request %6s µs\n' "$label" "$rps" "$p50" "$p99" "$bad" "$cpu"
}

scenario() { # mode, gateway url
  local mode=$1 url=$2
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
  embedded_system
  SYSTEM_PIDS=("${EXTRA_PIDS[-1]}")
  scenario embedded "$GW"
  kill "${EXTRA_PIDS[-1]}"; wait "${EXTRA_PIDS[-1]}" 2>/dev/null || true
fi

if [[ $MODE == serve || $MODE == all ]]; then
  serve_system
  SYSTEM_PIDS=("${PID[@]}")
  scenario serve "$GW"
fi
