#!/usr/bin/env bash
# What recording traces costs: `bazaar up` (embedded) under a fixed order
# rate, with every trace recorded (trace_sample_ratio 1, the default) and
# with none (0), in interleaved rounds. Prints, per run, the CPU the
# process spent per confirmed order (the whole saga: gateway, orders,
# catalog, inventory, payments, notifications) and the latency to
# CONFIRMED, then the ratio of the mean CPU per order.
#
# Env: RATE (orders/s, default 300), LOAD_SECONDS (default 10), ROUNDS
# (default 2), PROFILE (default release).
set -euo pipefail
cd "$(dirname "$0")/.."
RATE=${RATE:-300}
LOAD_SECONDS=${LOAD_SECONDS:-10}
ROUNDS=${ROUNDS:-2}
source bench/lib.sh

run() { # ratio -> prints "cpu_ms_per_order line"
  local ratio=$1 port pid before after line confirmed
  port=$(free_port)
  rm -rf "$WORK/data"
  BAZAAR_TRACE_SAMPLE_RATIO=$ratio "$BIN" up --port "$port" --data-dir "$WORK/data" >"$WORK/up.log" 2>&1 &
  pid=$!
  wait_up "http://127.0.0.1:$port"
  # Warm up (stock set, connections made), then measure.
  "$BIN" load --gateway "http://127.0.0.1:$port" --seconds 2 --rate "$RATE" --stock 100000000 >/dev/null 2>&1 || true
  before=$(ticks "$pid")
  line=$("$BIN" load --gateway "http://127.0.0.1:$port" --seconds "$LOAD_SECONDS" --rate "$RATE" 2>/dev/null | grep '^load:')
  after=$(ticks "$pid")
  kill "$pid"; wait "$pid" 2>/dev/null || true
  confirmed=$(sed -n 's/.* confirmed=\([0-9]*\).*/\1/p' <<<"$line")
  awk -v t=$((after - before)) -v hz="$TICK" -v n="$confirmed" 'BEGIN { printf "%.3f", t * 1000 / hz / n }'
  printf ' %s\n' "$line"
}

declare -A SUM
for r in $(seq 1 "$ROUNDS"); do
  for ratio in 0 1; do
    out=$(run "$ratio")
    cpu=${out%% *}
    SUM[$ratio]=$(awk -v a="${SUM[$ratio]:-0}" -v b="$cpu" 'BEGIN { print a + b }')
    printf 'round %s  trace_sample_ratio=%s  cpu_ms_per_order=%s  %s\n' "$r" "$ratio" "$cpu" "${out#* }"
  done
done
awk -v off="${SUM[0]}" -v on="${SUM[1]}" -v n="$ROUNDS" 'BEGIN {
  printf "traces: %.3f ms CPU per order recorded, %.3f ms not; ratio %.2f\n", on / n, off / n, on / off }'
