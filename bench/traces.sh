#!/usr/bin/env bash
# What tracing costs: `bazaar up` (embedded) under a fixed order rate,
# in interleaved rounds, with tracing off (trace_sample_ratio 0: no spans
# at all), on at 0.01, and on at 1 (the default) exporting every span
# over OTLP/HTTP to a local receiver (a stand-in that accepts and drops).
# Prints, per run, the CPU the process spent per confirmed order (the
# whole saga: gateway, orders, catalog, inventory, payments,
# notifications) and the latency to CONFIRMED; then each arm's mean CPU
# per order against tracing off. Goals: <= 3% at 0.01, <= 15% at 1.
#
# Env: RATE (orders/s, default 300), LOAD_SECONDS (default 10), ROUNDS
# (default 2), PROFILE (default release).
set -euo pipefail
cd "$(dirname "$0")/.."
RATE=${RATE:-300}
LOAD_SECONDS=${LOAD_SECONDS:-10}
ROUNDS=${ROUNDS:-2}
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

run() { # ratio -> prints "cpu_ms_per_order line"
  local ratio=$1 port pid before after line confirmed endpoint=""
  port=$(free_port)
  rm -rf "$WORK/data"
  [[ $ratio == 1 ]] && endpoint="http://127.0.0.1:$RECEIVER_PORT"
  BAZAAR_TRACE_SAMPLE_RATIO=$ratio BAZAAR_OTLP_ENDPOINT=$endpoint \
    "$BIN" up --port "$port" --data-dir "$WORK/data" >"$WORK/up.log" 2>&1 &
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
ARMS=(0 0.01 1)
for r in $(seq 1 "$ROUNDS"); do
  for ratio in "${ARMS[@]}"; do
    out=$(run "$ratio")
    cpu=${out%% *}
    SUM[$ratio]=$(awk -v a="${SUM[$ratio]:-0}" -v b="$cpu" 'BEGIN { print a + b }')
    printf 'round %s  trace_sample_ratio=%s  cpu_ms_per_order=%s  %s\n' "$r" "$ratio" "$cpu" "${out#* }"
  done
done
for ratio in "${ARMS[@]}"; do
  awk -v off="${SUM[0]}" -v on="${SUM[$ratio]}" -v n="$ROUNDS" -v r="$ratio" 'BEGIN {
    printf "traces at %-4s: %.3f ms CPU per order (off: %.3f), %+.1f%%\n", r, on / n, off / n, (on / off - 1) * 100 }'
done
