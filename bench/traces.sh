#!/usr/bin/env bash
# What tracing costs: `bazaar up` (embedded) under a fixed order rate
# with tracing off (trace_sample_ratio 0: no spans at all), on at 0.01,
# and on at 1 (the default) exporting every span over OTLP/HTTP to a
# local receiver (a stand-in that accepts and drops). The three run at
# once, each under its own `bazaar load`, so that they share the
# machine's speed of the moment: run one after the other, they differed
# by more (±20% from one run to the next) than what is measured.
# Prints, per round and arm, the CPU the process spent per confirmed
# order (the whole saga: gateway, orders, catalog, inventory, payments,
# notifications) and the latency to CONFIRMED; then each arm's mean CPU
# per order against tracing off. Goals: <= 3% at 0.01, <= 15% at 1.
#
# Env: RATE (orders/s for each arm, default 150), LOAD_SECONDS (default
# 15), ROUNDS (default 3), PROFILE (default release).
set -euo pipefail
cd "$(dirname "$0")/.."
RATE=${RATE:-150}
LOAD_SECONDS=${LOAD_SECONDS:-15}
ROUNDS=${ROUNDS:-3}
source bench/lib.sh

# The receiver: 200 to every POST.
RECEIVER_PORT=$(free_port)
python3 - "$RECEIVER_PORT" <<'PY' &
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()
    def log_message(self, *a):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
PY
EXTRA_PIDS+=($!)

# One round: a system per arm, all at once, each under its own load at
# RATE: they share the machine's speed of the moment, which drifts by
# more than the difference measured (MACHINE.md). Prints per arm
# "ratio cpu_ms_per_order load-line".
round() {
  local ratio endpoint port i
  local -a pids=() ports=()
  for i in "${!ARMS[@]}"; do
    ratio=${ARMS[$i]} endpoint="" port=$(free_port)
    rm -rf "$WORK/data$i"
    [[ $ratio == 1 ]] && endpoint="http://127.0.0.1:$RECEIVER_PORT"
    BAZAAR_TRACE_SAMPLE_RATIO=$ratio BAZAAR_OTLP_ENDPOINT=$endpoint \
      "$BIN" up --port "$port" --data-dir "$WORK/data$i" >"$WORK/up$i.log" 2>&1 &
    pids+=($!) ports+=("$port")
  done
  for i in "${!ARMS[@]}"; do wait_up "http://127.0.0.1:${ports[$i]}"; done
  # Warm up (stock set, connections made), then measure.
  local -a loads=()
  for i in "${!ARMS[@]}"; do
    "$LOAD_BIN" load --gateway "http://127.0.0.1:${ports[$i]}" --seconds 2 --rate "$RATE" --stock 100000000 >/dev/null 2>&1 &
    loads+=($!)
  done
  wait "${loads[@]}" || true
  local -a before=()
  for i in "${!ARMS[@]}"; do before+=("$(ticks "${pids[$i]}")"); done
  loads=()
  for i in "${!ARMS[@]}"; do
    "$LOAD_BIN" load --gateway "http://127.0.0.1:${ports[$i]}" --seconds "$LOAD_SECONDS" --rate "$RATE" 2>/dev/null >"$WORK/load$i.out" &
    loads+=($!)
  done
  wait "${loads[@]}" || true
  local after line confirmed
  for i in "${!ARMS[@]}"; do
    after=$(ticks "${pids[$i]}")
    line=$(grep '^load:' "$WORK/load$i.out")
    confirmed=$(sed -n 's/.* confirmed=\([0-9]*\).*/\1/p' <<<"$line")
    awk -v r="${ARMS[$i]}" -v t=$((after - ${before[$i]})) -v hz="$TICK" -v n="$confirmed" -v l="$line" \
      'BEGIN { printf "%s %.3f %s\n", r, t * 1000 / hz / n, l }'
  done
  for p in "${pids[@]}"; do kill "$p"; wait "$p" 2>/dev/null || true; done
}

declare -A SUM
ARMS=(0 0.01 1)
for r in $(seq 1 "$ROUNDS"); do
  while read -r ratio cpu line; do
    SUM[$ratio]=$(awk -v a="${SUM[$ratio]:-0}" -v b="$cpu" 'BEGIN { print a + b }')
    printf 'round %s  trace_sample_ratio=%s  cpu_ms_per_order=%s  %s\n' "$r" "$ratio" "$cpu" "$line"
  done < <(round)
done
for ratio in "${ARMS[@]}"; do
  awk -v off="${SUM[0]}" -v on="${SUM[$ratio]}" -v n="$ROUNDS" -v r="$ratio" 'BEGIN {
    printf "traces at %-4s: %.3f ms CPU per order (off: %.3f), %+.1f%%\n", r, on / n, off / n, (on / off - 1) * 100 }'
done
