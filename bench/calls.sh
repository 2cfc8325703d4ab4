#!/usr/bin/env bash
# What the mesh client costs a checkout. Two figures:
#  1. the caller's CPU per pricing call, bare reqwest (as orders priced a
#     checkout before the client) against the mesh client, alternating,
#     against one running catalog (the mesh_overhead example);
#  2. the CPU the whole `bazaar up` process spends per checkout
#     (POST /orders with wrk, the saga included), and that call's
#     overhead as a share of it. With BASE_BIN=path (a build from before
#     the client), the old and new systems also take the same checkout
#     load in alternating rounds, CPU per checkout each.
#
#   bench/calls.sh      Env: ROUNDS (3), DURATION (10s), CONNECTIONS (16), BIN, BASE_BIN
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10s}
CONNECTIONS=${CONNECTIONS:-16}
command -v wrk >/dev/null || { echo "bench: wrk is missing (apt-get install -y wrk)" >&2; exit 1; }
source bench/lib.sh
cargo build --release -q -p bazaar --example mesh_overhead
OVERHEAD=${CARGO_TARGET_DIR:-target}/release/examples/mesh_overhead

declare -A SYS_PID SYS_URL SYS_LUA
start_system() { # name binary
  local port; port=$(free_port)
  setsid "$2" up --port "$port" --data-dir "$WORK/data-$1" >"$WORK/up-$1.log" 2>&1 &
  SYS_PID[$1]=$!; EXTRA_PIDS+=($!)
  SYS_URL[$1]="http://127.0.0.1:$port"
  wait_up "${SYS_URL[$1]}"
  local gw=${SYS_URL[$1]} admin ids email token
  admin=$(curl -sf -X POST "$gw/api/v1/auth/login" -H 'content-type: application/json' \
    -d "{\"email\":\"$BAZAAR_ADMIN_EMAIL\",\"password\":\"$BAZAAR_ADMIN_PASSWORD\"}" | jq -r .access_token)
  ids=$(curl -sf "$gw/api/v1/products?limit=3" | jq -r '.items[].id')
  for id in $ids; do   # stock enough for every checkout
    curl -sf -X PUT "$gw/api/v1/inventory/$id" -H "authorization: Bearer $admin" \
      -H 'content-type: application/json' -d '{"available": 1000000000}' >/dev/null
  done
  email="calls$RANDOM$RANDOM@bench.local"
  curl -sf -X POST "$gw/api/v1/auth/register" -H 'content-type: application/json' \
    -d "{\"email\":\"$email\",\"password\":\"bench-password\",\"name\":\"Bench\"}" >/dev/null
  token=$(curl -sf -X POST "$gw/api/v1/auth/login" -H 'content-type: application/json' \
    -d "{\"email\":\"$email\",\"password\":\"bench-password\"}" | jq -r .access_token)
  SYS_LUA[$1]=$WORK/checkout-$1.lua
  cat >"${SYS_LUA[$1]}" <<LUA
local ids = { $(printf '"%s",' $ids) }
local n = 0
request = function()
  n = n + 1
  local body = '{"items":[{"product_id":"' .. ids[(n % #ids) + 1] .. '","quantity":1}]}'
  return wrk.format("POST", "/api/v1/orders", {
    ["Content-Type"] = "application/json",
    ["Authorization"] = "Bearer $token" }, body)
end
LUA
}

checkout() { # name -> "checkouts cpu_us_per_checkout"
  local gw=${SYS_URL[$1]} t0 t1 out n
  t0=$(ticks "${SYS_PID[$1]}")
  out=$(wrk -t2 -c"$CONNECTIONS" -d"$DURATION" -s "${SYS_LUA[$1]}" "$gw")
  sleep 3   # the sagas of the last checkouts finish
  t1=$(ticks "${SYS_PID[$1]}")
  n=$(awk '/requests in/ { print $1 }' <<<"$out")
  bad=$(awk '/Non-2xx/ {print $NF}' <<<"$out"); bad=${bad:-0}
  echo "$((n - bad)) $(awk -v t=$((t1 - t0)) -v n=$((n - bad)) -v hz="$TICK" 'BEGIN { printf "%.1f", t * 1e6 / hz / n }')"
}

start_system new "$BIN"
systems=(new)
if [[ -n ${BASE_BIN:-} ]]; then start_system base "$BASE_BIN"; systems=(new base); fi

catalog=$(curl -sf "${SYS_URL[new]}/_admin/services" | jq -r '[.[] | select(.name == "catalog")][0].address')
product=$(curl -sf "${SYS_URL[new]}/api/v1/products?limit=1" | jq -r '.items[0].id')
pricing=$("$OVERHEAD" "$catalog" "$product" 20000 "$((ROUNDS * 2 + 1))")
echo "pricing call: $pricing"

declare -A CPU
for r in $(seq 1 "$ROUNDS"); do
  order=("${systems[@]}"); (( r % 2 )) || order=($(printf '%s\n' "${systems[@]}" | tac))
  for s in "${order[@]}"; do
    read -r n cpu < <(checkout "$s")
    echo "round $r $s: $n checkouts, CPU $cpu µs/checkout"
    CPU[$s]+="$cpu "
  done
done
median() { tr ' ' '\n' | grep -v '^$' | sort -n | awk '{ a[NR] = $1 } END { print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }
new_cpu=$(median <<<"${CPU[new]}")
over=$(sed -E 's/.*overhead=(-?[0-9.]+).*/\1/' <<<"$pricing")
echo
echo "checkout: $new_cpu µs of CPU (median; the whole system, saga included)"
awk -v o="$over" -v c="$new_cpu" 'BEGIN { printf "the mesh client costs %.1f µs more than bare reqwest per pricing call: %.2f%% of a checkout even when every checkout misses the price cache (goal: <= 5%%)\n", o, 100 * o / c }'
if [[ -n ${BASE_BIN:-} ]]; then
  base_cpu=$(median <<<"${CPU[base]}")
  awk -v n="$new_cpu" -v b="$base_cpu" 'BEGIN { printf "CPU per checkout, this build / BASE_BIN: %.1f / %.1f µs = %.2f\n", n, b, n / b }'
fi
