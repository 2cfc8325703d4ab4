#!/usr/bin/env bash
# The published API contract is a valid OpenAPI document: `bazaar up`,
# then /api/openapi.json through openapi-spec-validator (PyPI, in a
# virtual environment of this script's own).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN_DIR=${BIN_DIR:-${CARGO_TARGET_DIR:-target}/debug}
VENV=${OPENAPI_VENV:-$HOME/.cache/bazaar-openapi-venv}
if [[ ! -x $VENV/bin/openapi-spec-validator ]]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q openapi-spec-validator==0.9.0
fi
WORK=$(mktemp -d)
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$BIN_DIR/bazaar" up --port "$PORT" --data-dir "$WORK/data" >"$WORK/up.log" 2>&1 &
UP=$!
trap 'kill $UP 2>/dev/null || true; wait $UP 2>/dev/null || true; rm -rf "$WORK"' EXIT
for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$PORT/ready" >/dev/null && break; sleep 0.1; done
curl -sf "http://127.0.0.1:$PORT/api/openapi.json" >"$WORK/openapi.json"
"$VENV/bin/openapi-spec-validator" "$WORK/openapi.json"
echo "openapi: $(python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(d["openapi"], len(d["paths"]), "paths")' "$WORK/openapi.json"), valid"
