#!/usr/bin/env bash
# Runs the README's "Walk-through: buying" block as written against a
# running system (GATEWAY, default http://127.0.0.1:8080), with every curl
# made to fail on an HTTP error, then waits for the order to be CONFIRMED.
# Each run registers a new address (the block's is made unique).
set -euo pipefail
cd "$(dirname "$0")/.."
GATEWAY=${GATEWAY:-http://127.0.0.1:8080}
block=$(awk '/^## Walk-through: buying/{f=1} f&&/^```sh/{g=1;next} g&&/^```/{exit} g' README.md)
[ -n "$block" ] || { echo "walkthrough: the block was not found" >&2; exit 1; }
email="ann-$(date +%s%N)@example.com"
block=${block//ann@example.com/$email}
block=${block//http:\/\/127.0.0.1:8080/$GATEWAY}
block=${block//cart-42/cart-$RANDOM$RANDOM}
out=$(mktemp)
trap 'rm -f "$out"' EXIT
# Every curl fails on a 4xx or 5xx; the block stops at the first.
if ! bash -c "set -euo pipefail; curl() { command curl -sS --fail-with-body \"\$@\"; }; $block" >"$out" 2>&1; then
  tail -20 "$out" >&2
  echo "walkthrough: a step failed" >&2
  exit 1
fi
API=$GATEWAY/api/v1
TOKEN=$(curl -sf -X POST "$API/auth/login" -H 'content-type: application/json' \
  -d "{\"email\":\"$email\",\"password\":\"correct-horse\"}" | jq -r .access_token)
for _ in $(seq 1 60); do
  confirmed=$(curl -sf "$API/orders" -H "authorization: Bearer $TOKEN" | jq '[.items[] | select(.status == "CONFIRMED")] | length')
  (( confirmed >= 2 )) && break
  sleep 0.5
done
(( confirmed >= 2 )) || { echo "walkthrough: orders not CONFIRMED" >&2; exit 1; }
echo "walkthrough: every step answered, $confirmed orders CONFIRMED"
