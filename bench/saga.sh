#!/usr/bin/env bash
# Confirmed orders per second end to end (saga complete) and latency from
# POST /orders to CONFIRMED, with `bazaar load`:
#
#   bench/saga.sh [embedded|serve|all]      (default: all)
#
# embedded: `bazaar up` (SQLite, in-memory bus). serve: every service as
# its own `bazaar serve` process on RabbitMQ and PostgreSQL. Each mode runs
# twice: saturated (SHOPPERS, default 32) for throughput, and light
# (LIGHT_SHOPPERS, default 2) for latency when not saturated.
# Env: LOAD_SECONDS (default 20), PROFILE (release|debug).
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-all}
LOAD_SECONDS=${LOAD_SECONDS:-20}
SHOPPERS=${SHOPPERS:-32}
LIGHT_SHOPPERS=${LIGHT_SHOPPERS:-2}
source bench/lib.sh

measure() { # label
  for run in "saturated:$SHOPPERS" "light:$LIGHT_SHOPPERS"; do
    local line
    line=$("$BIN" load --gateway "$GW" --shoppers "${run#*:}" --seconds "$LOAD_SECONDS" \
      --stock 100000000 2>/dev/null | grep '^load:')
    printf '%-9s %-10s %s\n' "$1" "${run%%:*}" "$line"
  done
}

if [[ $MODE == embedded || $MODE == all ]]; then
  embedded_system
  measure embedded
  kill "${EXTRA_PIDS[-1]}"; wait "${EXTRA_PIDS[-1]}" 2>/dev/null || true
fi
if [[ $MODE == serve || $MODE == all ]]; then
  serve_system
  measure serve
fi
