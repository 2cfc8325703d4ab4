#!/usr/bin/env bash
# Stops the Compose system that up.sh started and removes its containers
# (volumes too, with --volumes).
set -euo pipefail
cd "$(dirname "$0")"
export CONTAINERS_CONF=${CONTAINERS_CONF:-$HOME/.config/bazaar-containers.conf}
VENV=${COMPOSE_VENV:-$HOME/.cache/bazaar-compose-venv}
args=()
[[ ${1:-} == --volumes ]] && args+=(-v)
BAZAAR_IMAGE=${BAZAAR_IMAGE:-unused} "$VENV/bin/podman-compose" --podman-args="--runtime runc" \
  -f compose.yaml -f compose.local.yaml down "${args[@]}" >/dev/null 2>&1
echo "compose: down" >&2
