#!/usr/bin/env bash
# Runs the README's "One service per process" block as written (with the
# freshly built `bazaar` first on PATH), then checks out through the
# gateway it started: register, log in, POST /orders, wait for CONFIRMED.
# Needs RabbitMQ and PostgreSQL on their default ports, and curl and jq.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN_DIR=${BIN_DIR:-${CARGO_TARGET_DIR:-target}/debug}
export PATH="$BIN_DIR:$PATH"
command -v bazaar >/dev/null || { echo "readme: no bazaar binary in $BIN_DIR" >&2; exit 1; }

block=$(awk '/^## One service per process/{f=1} f&&/^```sh/{g=1;next} g&&/^```/{exit} g' README.md)
[ -n "$block" ] || { echo "readme: the block was not found" >&2; exit 1; }
log=$(mktemp)
# Its own process group, so that every service it started stops with it.
setsid bash -c "$block" >"$log" 2>&1 &
group=$!
stop() { kill -TERM -- "-$group" 2>/dev/null || true; sleep 2; kill -KILL -- "-$group" 2>/dev/null || true; }
trap stop EXIT

API=http://127.0.0.1:8080/api/v1
for _ in $(seq 1 120); do
  curl -sf "$API/products?limit=1" >/dev/null && curl -sf http://127.0.0.1:7005/ready >/dev/null && break
  sleep 1
done
curl -sf http://127.0.0.1:7005/ready >/dev/null || { echo "readme: orders never became ready" >&2; tail -50 "$log"; exit 1; }
email="readme-$(date +%s%N)@example.com"
curl -sf -X POST "$API/auth/register" -H 'content-type: application/json' \
  -d "{\"email\":\"$email\",\"password\":\"correct-horse\",\"name\":\"Ann\"}" >/dev/null
TOKEN=$(curl -sf -X POST "$API/auth/login" -H 'content-type: application/json' \
  -d "{\"email\":\"$email\",\"password\":\"correct-horse\"}" | jq -r .access_token)
# users made a profile from the registration; a change to it is answered.
for _ in $(seq 1 30); do
  curl -sf "$API/users/me" -H "authorization: Bearer $TOKEN" >/dev/null && break
  sleep 1
done
name=$(curl -sf -X PATCH "$API/users/me" -H "authorization: Bearer $TOKEN" \
  -H 'content-type: application/json' -d '{"name":"Ann Lee"}' | jq -r .name)
[ "$name" = "Ann Lee" ] || { echo "readme: PATCH /users/me answered name=$name" >&2; tail -50 "$log"; exit 1; }
P=$(curl -sf "$API/products?limit=1" | jq -r '.items[0].id')
if [ "$P" = null ]; then
  echo "readme: the catalog is empty" >&2; exit 1
fi
code=$(curl -s -o /tmp/readme-order.json -w '%{http_code}' -X POST "$API/orders" \
  -H "authorization: Bearer $TOKEN" -H 'content-type: application/json' \
  -d "{\"items\":[{\"product_id\":\"$P\",\"quantity\":1}]}")
[ "$code" = 201 ] || { echo "readme: checkout answered $code: $(cat /tmp/readme-order.json)" >&2; tail -50 "$log"; exit 1; }
id=$(jq -r .id /tmp/readme-order.json)
for _ in $(seq 1 60); do
  status=$(curl -sf "$API/orders/$id" -H "authorization: Bearer $TOKEN" | jq -r .status)
  [ "$status" != PENDING ] && break
  sleep 1
done
echo "readme: order $id is $status"
[ "$status" = CONFIRMED ]
