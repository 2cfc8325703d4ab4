#!/usr/bin/env bash
# The container image, here under podman: deploy/image.sh builds it (BIN=
# a binary already built, else a release build), then `bazaar up` runs in
# it on the host's network: /ready answers, the catalog lists, the process
# is not root, and the image's own health check passes. Prints the image's
# size and the time from `podman run` to a 200 from /ready.
set -euo pipefail
cd "$(dirname "$0")/.."
export CONTAINERS_CONF=${CONTAINERS_CONF:-$HOME/.config/bazaar-containers.conf}
TAG=$(bash deploy/image.sh | tail -n1)
podman() { command podman --runtime runc "$@"; }
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
NAME=bazaar-image-test-$$
cleanup() { podman rm -f "$NAME" >/dev/null 2>&1 || true; }
trap cleanup EXIT

start=$(date +%s%N)
podman run -d --name "$NAME" --network host -e BAZAAR_GATEWAY_PORT="$PORT" "$TAG" up --port "$PORT" >/dev/null
for _ in $(seq 1 300); do
  curl -sf "http://127.0.0.1:$PORT/ready" >/dev/null && break
  sleep 0.05
done
ready_ms=$(( ($(date +%s%N) - start) / 1000000 ))
curl -sf "http://127.0.0.1:$PORT/ready" >/dev/null || { podman logs "$NAME" | tail -20; echo "image: not ready" >&2; exit 1; }

name=$(curl -sf "http://127.0.0.1:$PORT/api/v1/products?limit=1" | python3 -c 'import json,sys; print(json.load(sys.stdin)["items"][0]["name"])')
[[ -n $name ]] || { echo "image: no products" >&2; exit 1; }
uid=$(podman exec "$NAME" id -u)
[[ $uid != 0 ]] || { echo "image: runs as root" >&2; exit 1; }
podman healthcheck run "$NAME" >/dev/null 2>&1 || { echo "image: health check failed" >&2; exit 1; }
# The probe it runs can fail: nothing answers on port 1.
if podman exec "$NAME" bazaar probe http://127.0.0.1:1/health 2>/dev/null; then
  echo "image: the probe passed with nothing to ask" >&2; exit 1
fi
podman stop -t 15 "$NAME" >/dev/null
size=$(podman image inspect --format '{{.Size}}' "$TAG")
echo "image: $TAG, $((size / 1000000)) MB; podman run -> /ready 200 in ${ready_ms} ms; uid $uid; health check healthy"
