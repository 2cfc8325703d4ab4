#!/usr/bin/env bash
# Instructions the gateway spends on one proxied request, counted by
# valgrind's callgrind: the same setup as bench/gateway.sh (one catalog
# upstream; the token verified, a rate limit checked, metrics on, cache
# and access log off), GET one product N times on one keep-alive
# connection after a warm-up, with only those requests counted.
#
#   bench/gateway_instructions.sh
#   BASE_BIN=/path/to/other/bazaar bench/gateway_instructions.sh
#
# Unlike requests/s or CPU time, the count does not drift with this
# VM's speed or with what else runs: two builds compare to the
# instruction. It counts user-space work only (the kernel's share of a
# request, its socket calls, is the same for both and is not seen), so a
# difference here is a difference of the proxy's own code. With BASE_BIN
# that build's gateway is counted the same way, against the same
# upstream, and the ratio printed. valgrind is installed with apt-get if
# missing. Env: N (default 2000), PROFILE (release), BASE_BIN,
# CALLGRIND_OUT (a directory to keep the profiles in, for
# callgrind_annotate).
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-2000}
PROFILE=${PROFILE:-release}

if ! command -v valgrind >/dev/null || ! command -v callgrind_control >/dev/null; then
  echo "bench: installing valgrind" >&2
  apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq valgrind >/dev/null
fi
if [[ $PROFILE == release ]]; then cargo build --release -q -p bazaar; else cargo build -q -p bazaar; fi
BIN=${CARGO_TARGET_DIR:-target}/$PROFILE/bazaar
WORK=$(mktemp -d)
OUT=${CALLGRIND_OUT:-$WORK}
mkdir -p "$OUT"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
# Ports, environment and $WORK/gateway.toml of the upstream and gateway.
source bench/edge_setup.sh
"$BIN" serve auth --port "$AUTH_PORT" >"$WORK/auth.log" 2>&1 & PIDS+=($!)
"$BIN" serve catalog --port "$CATALOG_PORT" >"$WORK/catalog.log" 2>&1 & PIDS+=($!)
wait_http "http://127.0.0.1:$AUTH_PORT/health" auth
wait_http "http://127.0.0.1:$CATALOG_PORT/health" catalog
ID=$(curl -sf "http://127.0.0.1:$CATALOG_PORT/products?limit=1" | python3 -c 'import json,sys; print(json.load(sys.stdin)["items"][0]["id"])')

# A curl config of `count` fetches of `url`: one connection, kept alive.
fetches() { # url count
  for _ in $(seq 1 "$2"); do printf 'url = "%s"\noutput = "/dev/null"\n' "$1"; done
}

declare -A IR
count() { # label binary
  local label=$1 bin=$2 port; port=$(free_port)
  valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$OUT/$label.%p" \
    "$bin" --config "$WORK/gateway.toml" serve gateway --port "$port" >"$WORK/$label.log" 2>&1 &
  local vg=$!; PIDS+=("$vg")
  wait_http "http://127.0.0.1:$port/health" "$label gateway"
  local gw="http://127.0.0.1:$port" token
  token=$(curl -sf -X POST "$gw/api/v1/auth/login" -H 'content-type: application/json' \
    -d '{"email":"admin@bench.local","password":"bench-admin-pw"}' \
    | python3 -c 'import json,sys; print(json.load(sys.stdin)["access_token"])')
  local url="$gw/api/v1/products/$ID"
  fetches "$url" 300 >"$WORK/warm.cfg"; fetches "$url" "$N" >"$WORK/load.cfg"
  curl -s -H "authorization: Bearer $token" -K "$WORK/warm.cfg"
  rm -f "$OUT/$label.$vg"*
  callgrind_control -i on "$vg" >/dev/null 2>&1
  local codes; codes=$(curl -s -w '%{http_code}\n' -H "authorization: Bearer $token" -K "$WORK/load.cfg" | sort | uniq -c)
  callgrind_control -d "$vg" >/dev/null 2>&1
  callgrind_control -i off "$vg" >/dev/null 2>&1
  [[ $(awk '{ print $1 " " $2 }' <<<"$codes") == "$N 200" ]] \
    || { echo "bench: $label answered other than $N × 200: $codes" >&2; exit 1; }
  local total; total=$(awk '/^totals:/ { s += $2 } END { print s + 0 }' "$OUT/$label.$vg".*)
  (( total > 0 )) || { echo "bench: no instructions counted for $label" >&2; exit 1; }
  IR[$label]=$((total / N))
  kill "$vg" 2>/dev/null || true
  printf '%-8s %8d instructions per proxied request (%d requests counted)\n' "$label" "${IR[$label]}" "$N"
}

echo "== callgrind: GET one product through the gateway, $N requests on one connection"
count gateway "$BIN"
if [[ -n ${BASE_BIN:-} ]]; then
  count base "$BASE_BIN"
  awk -v a="${IR[gateway]}" -v b="${IR[base]}" \
    'BEGIN { printf "gateway/base  %.3f  (%+d instructions per request)\n", a / b, a - b }'
fi
