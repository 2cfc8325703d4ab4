#!/usr/bin/env bash
# The browser test: a fresh `bazaar up`, a short `bazaar load` through it
# (its orders CONFIRMED, its HTML report written), then
# tests/browser/dashboard.mjs in Debian's headless Chromium
# (playwright-core, pinned in tests/browser/package-lock.json): the
# dashboard loads with no console error, shows every service, and shows
# one of the load's orders as a timeline and a trace; the load report
# opens with no network. Chromium and Node's packages are installed when
# missing. Screenshots go to OUT (default ~/.cache/bazaar-artefacts/browser).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN_DIR=${BIN_DIR:-${CARGO_TARGET_DIR:-target}/debug}
OUT=${OUT:-$HOME/.cache/bazaar-artefacts/browser}
if [[ ! -x /usr/bin/chromium ]]; then
  echo "browser: installing Chromium"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
command -v node >/dev/null || { echo "browser: node is missing" >&2; exit 1; }
(cd tests/browser && npm ci --no-audit --no-fund --silent)
WORK=$(mktemp -d)
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
GW="http://127.0.0.1:$PORT"
BAZAAR_ADMIN_PASSWORD=browser-admin "$BIN_DIR/bazaar" up --port "$PORT" --data-dir "$WORK/data" >"$WORK/up.log" 2>&1 &
UP=$!
trap 'kill $UP 2>/dev/null || true; wait $UP 2>/dev/null || true; rm -rf "$WORK"' EXIT
for _ in $(seq 1 100); do curl -sf "$GW/ready" >/dev/null && break; sleep 0.1; done
curl -sf "$GW/ready" >/dev/null || { echo "browser: the system did not start" >&2; tail -20 "$WORK/up.log" >&2; exit 1; }
BAZAAR_ADMIN_EMAIL=admin@bazaar.local BAZAAR_ADMIN_PASSWORD=browser-admin "$BIN_DIR/bazaar" load --gateway "$GW" --seconds 3 --rate 20 \
  --shoppers 4 --products 4 --stock 1000 --settle 30 --ids "$WORK/ids" --report "$WORK/report.html" >"$WORK/load.log" 2>&1 ||
  { echo "browser: bazaar load failed" >&2; grep -v "^  " "$WORK/load.log" | tail -20 >&2; exit 1; }
ORDER_ID=$(head -n1 "$WORK/ids")
[[ -n $ORDER_ID ]] || { echo "browser: the load placed no order" >&2; exit 1; }
rm -rf "$OUT" && mkdir -p "$OUT"
cp "$WORK/report.html" "$OUT/load-report.html"
GATEWAY=$GW ORDER_ID=$ORDER_ID REPORT="$OUT/load-report.html" OUT=$OUT node tests/browser/dashboard.mjs
if grep -q '"level":"ERROR"' "$WORK/up.log"; then
  echo "browser: the system logged errors:" >&2
  grep '"level":"ERROR"' "$WORK/up.log" | head -20 >&2
  exit 1
fi
