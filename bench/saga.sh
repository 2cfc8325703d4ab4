#!/usr/bin/env bash
# Confirmed orders per second end to end (saga complete) and latency from
# POST /orders to CONFIRMED, with `bazaar load`:
#
#   bench/saga.sh [embedded|serve|all]      (default: all)
#
# embedded: `bazaar up` (SQLite, in-memory bus). serve: every service as
# its own `bazaar serve` process on RabbitMQ and PostgreSQL. Each mode runs
# the load at a few fixed order rates (orders/s offered, open loop); each
# line reports the rate the sagas completed at and the latency from
# POST /orders to CONFIRMED. Where confirmed_per_s falls below the offered
# rate (and latency climbs), the system is saturated.
# Env: LOAD_SECONDS (default 20), SHOPPERS (default 32), PROFILE, BIN,
# LOAD_BIN (bench/lib.sh),
# EMBEDDED_RATES (default "50 500 800 1000 1200"), SERVE_RATES (default "50 200 300 350").
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-all}
LOAD_SECONDS=${LOAD_SECONDS:-20}
SHOPPERS=${SHOPPERS:-32}
EMBEDDED_RATES=${EMBEDDED_RATES:-50 500 800 1000 1200}
SERVE_RATES=${SERVE_RATES:-50 200 300 350}
source bench/lib.sh

measure() { # label, rates...
  local label=$1; shift
  for rate in "$@"; do
    local line
    line=$("$LOAD_BIN" load --gateway "$GW" --shoppers "$SHOPPERS" --seconds "$LOAD_SECONDS" \
      --stock 100000000 --rate "$rate" 2>/dev/null | grep '^load:') || true
    printf '%-9s offered %-5s %s\n' "$label" "$rate" "$line"
  done
}

if [[ $MODE == embedded || $MODE == all ]]; then
  embedded_system
  # shellcheck disable=SC2086
  measure embedded $EMBEDDED_RATES
  kill "${EXTRA_PIDS[-1]}"; wait "${EXTRA_PIDS[-1]}" 2>/dev/null || true
fi
if [[ $MODE == serve || $MODE == all ]]; then
  serve_system
  # shellcheck disable=SC2086
  measure serve $SERVE_RATES
fi
