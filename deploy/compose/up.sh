#!/usr/bin/env bash
# Brings deploy/compose/compose.yaml up here with podman-compose (PyPI, in
# a virtual environment of its own): builds the Bazaar image if BAZAAR_IMAGE
# is not given (deploy/image.sh; BIN=path to use a binary already built),
# and the Debian-based etcd and Prometheus images if missing; uses the
# host's RabbitMQ (a vhost `bazaar-compose`) and PostgreSQL (schemas
# `compose_*` in database `test`) through compose.local.yaml; waits until
# every container is healthy, then prints the gateway's URL as its last line.
set -euo pipefail
cd "$(dirname "$0")"
export CONTAINERS_CONF=${CONTAINERS_CONF:-$HOME/.config/bazaar-containers.conf}
VENV=${COMPOSE_VENV:-$HOME/.cache/bazaar-compose-venv}
if [[ ! -x $VENV/bin/podman-compose ]]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q podman-compose==1.6.0
fi
if [[ -z ${BAZAAR_IMAGE:-} ]]; then
  BAZAAR_IMAGE=$(bash ../image.sh | tail -n1)
fi
export BAZAAR_IMAGE
podman() { command podman --runtime runc "$@"; }
for img in etcd prometheus; do
  if ! podman image exists "localhost/bazaar-$img:debian"; then
    echo "compose: building $img from Debian's package" >&2
    podman build --pull=never --network host -q -f "debian/Dockerfile.$img" \
      -t "localhost/bazaar-$img:debian" debian >/dev/null
  fi
done
rabbitmqctl -q add_vhost bazaar-compose >/dev/null 2>&1 || true
rabbitmqctl -q set_permissions -p bazaar-compose guest '.*' '.*' '.*' >/dev/null
export BAZAAR_AMQP_URL='amqp://guest:guest@127.0.0.1:5672/bazaar-compose'
export BAZAAR_DATABASE_URL=${BAZAAR_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}
export BAZAAR_DATABASE_SCHEMA_PREFIX=${BAZAAR_DATABASE_SCHEMA_PREFIX:-compose_}
"$VENV/bin/podman-compose" --podman-args="--runtime runc" -f compose.yaml -f compose.local.yaml \
  up -d >"${COMPOSE_LOG:-/dev/null}" 2>&1

# Without systemd podman runs no health checks on its own: run them here.
containers=$(podman ps -a --filter label=io.podman.compose.project=bazaar --format '{{.Names}}')
deadline=$((SECONDS + ${COMPOSE_TIMEOUT:-180}))
while :; do
  waiting=()
  for c in $containers; do
    podman healthcheck run "$c" >/dev/null 2>&1 || waiting+=("$c")
  done
  (( ${#waiting[@]} == 0 )) && break
  if (( SECONDS > deadline )); then
    echo "compose: not healthy: ${waiting[*]}" >&2
    for c in "${waiting[@]}"; do podman logs --tail 10 "$c" >&2 2>&1 || true; done
    exit 1
  fi
  sleep 1
done
echo "compose: $(wc -w <<<"$containers") containers healthy" >&2
echo "http://127.0.0.1:8080"
