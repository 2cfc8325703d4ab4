#!/usr/bin/env bash
# The gateway against nginx, on the same upstream, in one run.
#
#   bench/gateway.sh
#
# One catalog instance (`bazaar serve catalog`, SQLite) is the upstream of
#   (a) nobody: wrk calls it directly,
#   (b) nginx: proxy_pass to a keep-alive upstream, worker_processes = cores,
#       access log off,
#   (c) the Bazaar gateway: the token verified on every request (the route
#       requires it), a rate limit checked on every request, metrics on,
#       cache off for the route, access log off.
# Each is loaded by wrk for DURATION at CONNECTIONS connections, fetching
# one product (GET /products/{id}), in ROUNDS interleaved rounds whose
# order alternates, nginx and the gateway always back to back (the median
# of each is kept: this VM's speed drifts by ±20% within a minute, so
# many short rounds, each compared with its neighbour, say more than a
# few long ones); then each is called at a paced ~1,000 requests/s to
# compare latency at a moderate load.
# Prints requests/s, p50 and p99 for each, the throughput ratios
# gateway/nginx (of the medians, and the median of each round's own
# ratio, and in how many rounds it was at least 1.00) and
# gateway/direct, and the p50/p99 the gateway adds at ~1,000
# requests/s; with each, the CPU time (user + system) the proxy's
# processes and the upstream spent per request: on a small shared machine
# requests/s drift with the machine's speed, CPU per request much less.
# nginx and wrk are installed with apt-get if missing.
# Env: DURATION (default 5s), CONNECTIONS (default 64), ROUNDS (default 10),
# PROFILE (release), BASE_BIN (another build's binary: its gateway joins
# the rounds as "base", on the same upstream, to compare two builds).
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-5s}
CONNECTIONS=${CONNECTIONS:-64}
ROUNDS=${ROUNDS:-10}
PROFILE=${PROFILE:-release}
CORES=$(nproc)

if ! command -v wrk >/dev/null || ! command -v nginx >/dev/null; then
  echo "bench: installing nginx and wrk" >&2
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light wrk >/dev/null 2>&1 \
    || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx wrk >/dev/null
fi

if [[ $PROFILE == release ]]; then cargo build --release -q -p bazaar; else cargo build -q -p bazaar; fi
BIN=${CARGO_TARGET_DIR:-target}/$PROFILE/bazaar
WORK=$(mktemp -d)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  [[ -f $WORK/nginx.pid ]] && kill "$(cat "$WORK/nginx.pid")" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
# Ports, environment and $WORK/gateway.toml of the upstream and gateway.
source bench/edge_setup.sh
GW_PORT=$(free_port); NGINX_PORT=$(free_port)

# Each server in a session of its own, as nginx puts itself (it daemonizes)
# and as separate services run: with the kernel's autogroup scheduling on
# (the default on desktop and many server kernels) CPU time is shared
# between sessions first, so a proxy left in the session of wrk and the
# upstream would get a smaller share than nginx does in its own, and the
# comparison would not be like for like.
setsid "$BIN" serve auth --port "$AUTH_PORT" >"$WORK/auth.log" 2>&1 & PIDS+=($!)
setsid "$BIN" serve catalog --port "$CATALOG_PORT" >"$WORK/catalog.log" 2>&1 & CATALOG_PID=$!; PIDS+=($!)
wait_http "http://127.0.0.1:$AUTH_PORT/health" auth
wait_http "http://127.0.0.1:$CATALOG_PORT/health" catalog
setsid "$BIN" --config "$WORK/gateway.toml" serve gateway --port "$GW_PORT" >"$WORK/gateway.log" 2>&1 & GW_PID=$!; PIDS+=($!)
wait_http "http://127.0.0.1:$GW_PORT/health" gateway
TARGETS="direct nginx gateway"
if [[ -n ${BASE_BIN:-} ]]; then
  BASE_PORT=$(free_port)
  setsid "$BASE_BIN" --config "$WORK/gateway.toml" serve gateway --port "$BASE_PORT" >"$WORK/base.log" 2>&1 & BASE_PID=$!; PIDS+=($!)
  wait_http "http://127.0.0.1:$BASE_PORT/health" "base gateway"
  TARGETS="direct nginx gateway base"
fi
# setsid runs the server itself (the script is no process-group leader),
# so these are the processes whose CPU time is read below.
for p in "$CATALOG_PID" "$GW_PID"; do
  [[ $(cat "/proc/$p/comm") == bazaar ]] || { echo "bench: pid $p is not a bazaar server" >&2; exit 1; }
done

cat >"$WORK/nginx.conf" <<EOF
worker_processes $CORES;
pid $WORK/nginx.pid;
error_log $WORK/nginx-error.log warn;
daemon on;
events { worker_connections 4096; }
http {
  access_log off;
  upstream catalog {
    server 127.0.0.1:$CATALOG_PORT;
    keepalive 128;
  }
  server {
    listen 127.0.0.1:$NGINX_PORT;
    location /api/v1/ {
      proxy_pass http://catalog/;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host \$host;
      proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
      proxy_set_header X-Forwarded-Proto \$scheme;
    }
  }
}
EOF
nginx -c "$WORK/nginx.conf" -p "$WORK" -e "$WORK/nginx-error.log"
wait_http "http://127.0.0.1:$NGINX_PORT/api/v1/products?limit=1" nginx

GW="http://127.0.0.1:$GW_PORT"
TOKEN=$(curl -sf -X POST "$GW/api/v1/auth/login" -H 'content-type: application/json' \
  -d '{"email":"admin@bench.local","password":"bench-admin-pw"}' \
  | python3 -c 'import json,sys; print(json.load(sys.stdin)["access_token"])')
ID=$(curl -sf "http://127.0.0.1:$CATALOG_PORT/products?limit=1" | python3 -c 'import json,sys; print(json.load(sys.stdin)["items"][0]["id"])')
curl -sf -H "authorization: Bearer $TOKEN" "$GW/api/v1/products/$ID" >/dev/null \
  || { echo "bench: the gateway does not serve the product" >&2; tail -5 "$WORK/gateway.log" >&2; exit 1; }

DIRECT="http://127.0.0.1:$CATALOG_PORT/products/$ID"
NGINX="http://127.0.0.1:$NGINX_PORT/api/v1/products/$ID"
GATEWAY="$GW/api/v1/products/$ID"

# wrk's latency as milliseconds.
ms() { awk -v v="$1" 'BEGIN { n = v + 0; if (v ~ /us$/) n /= 1000; else if (v ~ /ms$/) n += 0; else if (v ~ /s$/) n *= 1000; printf "%.3f", n }'; }

declare -A RPS P50 P99 PROXY_CPU UP_CPU
# CPU time (user + system, clock ticks) of the given processes.
TICK=$(getconf CLK_TCK)
ticks() { local t=0 p; for p in "$@"; do t=$((t + $(awk '{ print $14 + $15 }' "/proc/$p/stat"))); done; echo "$t"; }
proxy_pids() { case $1 in direct) ;; nginx) pgrep -P "$(cat "$WORK/nginx.pid")" ;; gateway) echo "$GW_PID" ;; base) echo "$BASE_PID" ;; esac; }
median() { tr ' ' '\n' | sed '/^$/d' | sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
run() { # label url [wrk args...]; appends this run's figures to the label's lists
  local label=$1 url=$2; shift 2
  local proxy; proxy=$(proxy_pids "${label%% *}" | tr '\n' ' ')
  local p0 u0; p0=$(ticks $proxy); u0=$(ticks "$CATALOG_PID")
  local out; out=$(wrk "$@" --latency -H "authorization: Bearer $TOKEN" "$url")
  local p1 u1; p1=$(ticks $proxy); u1=$(ticks "$CATALOG_PID")
  local n; n=$(awk '/requests in/ { print $1 }' <<<"$out")
  PROXY_CPU[$label]+=" $(awk -v t=$((p1 - p0)) -v n="$n" -v hz="$TICK" 'BEGIN { printf "%.1f", t * 1e6 / hz / n }')"
  UP_CPU[$label]+=" $(awk -v t=$((u1 - u0)) -v n="$n" -v hz="$TICK" 'BEGIN { printf "%.1f", t * 1e6 / hz / n }')"
  local bad; bad=$(awk '/Non-2xx/ {print $NF}' <<<"$out")
  [[ -z $bad ]] || { echo "bench: $label had $bad non-2xx answers" >&2; exit 1; }
  RPS[$label]+=" $(awk '/^Requests\/sec/ {print $2}' <<<"$out")"
  P50[$label]+=" $(ms "$(awk '$1=="50%" {print $2}' <<<"$out")")"
  P99[$label]+=" $(ms "$(awk '$1=="99%" {print $2}' <<<"$out")")"
}
report() { # label
  local l=$1
  RPS[$l]=$(median <<<"${RPS[$l]}"); P50[$l]=$(median <<<"${P50[$l]}"); P99[$l]=$(median <<<"${P99[$l]}")
  printf '%-26s %10s req/s   p50 %8s ms   p99 %8s ms   CPU/request: proxy %5s µs, upstream %5s µs\n' \
    "$l" "${RPS[$l]}" "${P50[$l]}" "${P99[$l]}" "$(median <<<"${PROXY_CPU[$l]}")" "$(median <<<"${UP_CPU[$l]}")"
}
url_of() { case $1 in direct) echo "$DIRECT" ;; nginx) echo "$NGINX" ;; gateway) echo "$GATEWAY" ;; base) echo "http://127.0.0.1:$BASE_PORT/api/v1/products/$ID" ;; esac; }
reversed() { tr ' ' '\n' <<<"$1" | tac | tr '\n' ' '; }

echo "== throughput: wrk -t2 -c$CONNECTIONS -d$DURATION, GET one product, median of $ROUNDS rounds ($CORES cores shared by everything)"
for target in $TARGETS; do
  wrk -t2 -c"$CONNECTIONS" -d2s "$(url_of $target)" -H "authorization: Bearer $TOKEN" >/dev/null # warm-up
done
last() { awk '{ print $NF }' <<<"$1"; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
PAIRED=""
for round in $(seq 1 "$ROUNDS"); do
  # The order alternates, so a drift in the machine's speed during a
  # round does not favour whichever always runs first.
  order=$TARGETS; (( round % 2 == 0 )) && order=$(reversed "$TARGETS")
  for target in $order; do
    run "$target" "$(url_of $target)" -t2 -c"$CONNECTIONS" -d"$DURATION"
  done
  PAIRED+=" $(ratio "$(last "${RPS[gateway]}")" "$(last "${RPS[nginx]}")")"
  echo "round $round: direct $(last "${RPS[direct]}")  nginx $(last "${RPS[nginx]}")  gateway $(last "${RPS[gateway]}") req/s"
done
for target in $TARGETS; do report "$target"; done
AHEAD=$(tr ' ' '\n' <<<"$PAIRED" | awk '$1 >= 1 { n++ } END { print n + 0 }')
echo "gateway/nginx   $(ratio "${RPS[gateway]}" "${RPS[nginx]}")   (median of the rounds' own ratios: $(median <<<"$PAIRED"); at least 1.00 in $AHEAD of $ROUNDS rounds; each:$PAIRED)"
echo "gateway/direct  $(ratio "${RPS[gateway]}" "${RPS[direct]}")"
[[ -z ${BASE_BIN:-} ]] || echo "gateway/base    $(ratio "${RPS[gateway]}" "${RPS[base]}")   proxy CPU/request: gateway $(median <<<"${PROXY_CPU[gateway]}") µs, base $(median <<<"${PROXY_CPU[base]}") µs"

# Paced: 10 connections, each waiting 5–15 ms (10 on average, drawn at
# random) between requests: ~1,000/s. With a fixed 10 ms wait the
# connections stay in step and send bursts of 10 at once, which measures
# how a proxy queues a burst rather than its latency at a steady rate.
cat >"$WORK/pace.lua" <<'LUA'
math.randomseed(os.time())
function delay() return math.random(5, 15) end
LUA
echo "== latency at ~1,000 requests/s: wrk -t1 -c10, 5-15 ms (random) between requests per connection, median of $ROUNDS rounds"
for round in $(seq 1 "$ROUNDS"); do
  order=$TARGETS; (( round % 2 == 0 )) && order=$(reversed "$TARGETS")
  for target in $order; do
    run "$target @1k/s" "$(url_of $target)" -t1 -c10 -d"$DURATION" -s "$WORK/pace.lua"
  done
done
for target in $TARGETS; do report "$target @1k/s"; done
added() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", a - b }'; }
echo "p50 added at ~1k/s: gateway $(added "${P50[gateway @1k/s]}" "${P50[direct @1k/s]}") ms, nginx $(added "${P50[nginx @1k/s]}" "${P50[direct @1k/s]}") ms"
echo "p99 added at ~1k/s: gateway $(added "${P99[gateway @1k/s]}" "${P99[direct @1k/s]}") ms, nginx $(added "${P99[nginx @1k/s]}" "${P99[direct @1k/s]}") ms"
[[ -z ${BASE_BIN:-} ]] || echo "p99 added at ~1k/s: base $(added "${P99[base @1k/s]}" "${P99[direct @1k/s]}") ms"
