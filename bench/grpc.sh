#!/usr/bin/env bash
# user.UserService/GetUser over gRPC, straight to the users service and
# through the gateway (h2c), on `bazaar up` (release): at ~1,000 calls/s
# (p50, p99, and the latency the gateway adds) and as fast as 32 callers
# go (calls/s), with the CPU time (user + system) the bazaar process spent
# per call. The two targets alternate, ROUNDS times each.
#
#   bench/grpc.sh        Env: ROUNDS (3), SECONDS_PER_RUN (10), RATE (1000), BIN
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}
SECS=${SECONDS_PER_RUN:-10}
RATE=${RATE:-1000}
source bench/lib.sh
cargo build --release -q -p bazaar --example grpc_load
LOAD=${CARGO_TARGET_DIR:-target}/release/examples/grpc_load

port=$(free_port)
setsid "$BIN" up --port "$port" --data-dir "$WORK/data" >"$WORK/up.log" 2>&1 &
UP=$!; EXTRA_PIDS+=($UP)
GW="http://127.0.0.1:$port"
wait_up "$GW"
email="grpc$RANDOM$RANDOM@bench.local"
curl -sf -X POST "$GW/api/v1/auth/register" -H 'content-type: application/json' \
  -d "{\"email\":\"$email\",\"password\":\"bench-password\",\"name\":\"Bench\"}" >/dev/null
TOKEN=$(curl -sf -X POST "$GW/api/v1/auth/login" -H 'content-type: application/json' \
  -d "{\"email\":\"$email\",\"password\":\"bench-password\"}" | jq -r .access_token)
for _ in $(seq 1 100); do
  ID=$(curl -sf "$GW/api/v1/users/me" -H "authorization: Bearer $TOKEN" | jq -r .id) && break
  sleep 0.1
done
USERS=$(curl -sf "$GW/_admin/services" | jq -r '[.[] | select(.caller == "gateway" and .name == "users")][0].address')
[[ $USERS == http* ]] || { echo "bench: no users instance found" >&2; exit 1; }

run() { # label url rate|max seconds
  local t0 t1 out calls
  t0=$(ticks "$UP")
  out=$("$LOAD" "$2" "$TOKEN" "$ID" "$3" "$4" 32)
  t1=$(ticks "$UP")
  calls=$(sed -E 's/.*calls=([0-9]+).*/\1/' <<<"$out")
  printf '%-9s %-5s %s cpu_us_per_call=%s\n' "$1" "$3" "$out" \
    "$(awk -v t=$((t1 - t0)) -v n="$calls" -v hz="$TICK" 'BEGIN { printf "%.1f", t * 1e6 / hz / n }')"
}

"$LOAD" "$USERS" "$TOKEN" "$ID" 200 2 >/dev/null   # warm both paths
"$LOAD" "$GW" "$TOKEN" "$ID" 200 2 >/dev/null
results=$WORK/results
for r in $(seq 1 "$ROUNDS"); do
  if (( r % 2 )); then order="direct gateway"; else order="gateway direct"; fi
  for target in $order; do
    url=$USERS; [[ $target == gateway ]] && url=$GW
    run "$target" "$url" "$RATE" "$SECS" | tee -a "$results"
    run "$target" "$url" max 5 | tee -a "$results"
  done
done

# Medians over the rounds.
median() { sort -n | awk '{ a[NR] = $1 } END { print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }
field() { # target mode key
  grep "^$1 *$2 " "$results" | sed -E "s/.* $3=([0-9.]+).*/\1/" | median
}
echo
for t in direct gateway; do
  printf '%-8s at %s/s: p50 %s ms, p99 %s ms, CPU %s µs/call;  max: %s calls/s, CPU %s µs/call\n' "$t" "$RATE" \
    "$(field "$t" "$RATE" p50_ms)" "$(field "$t" "$RATE" p99_ms)" "$(field "$t" "$RATE" cpu_us_per_call)" \
    "$(field "$t" max rate)" "$(field "$t" max cpu_us_per_call)"
done
awk -v d="$(field direct "$RATE" p99_ms)" -v g="$(field gateway "$RATE" p99_ms)" \
  -v d5="$(field direct "$RATE" p50_ms)" -v g5="$(field gateway "$RATE" p50_ms)" \
  'BEGIN { printf "the gateway adds %.3f ms at p50 and %.3f ms at p99 (goal: <= 0.3 ms at p99)\n", g5 - d5, g - d }'
