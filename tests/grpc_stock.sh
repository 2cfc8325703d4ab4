#!/usr/bin/env bash
# A stock gRPC client against the gateway: Python grpcio with
# grpcio-reflection (what grpcurl does, where grpcurl is not packaged)
# lists the services through the gateway's reflection, then calls
# user.UserService/GetUser from stubs that grpcio-tools makes from
# contracts' user.proto — with a token, and without one (UNAUTHENTICATED).
# The Python packages go into a virtual environment of this script's own.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN_DIR=${BIN_DIR:-${CARGO_TARGET_DIR:-target}/debug}
VENV=${GRPC_VENV:-$HOME/.cache/bazaar-grpc-venv}
if [[ ! -x $VENV/bin/python ]] || ! "$VENV/bin/python" -c 'import grpc, grpc_reflection, grpc_tools' 2>/dev/null; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q grpcio grpcio-tools grpcio-reflection
fi
WORK=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$BIN_DIR/bazaar" up --port "$port" --data-dir "$WORK/data" >"$WORK/up.log" 2>&1 &
UP=$!
trap 'kill $UP 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$WORK"' EXIT
API=http://127.0.0.1:$port/api/v1
for _ in $(seq 1 100); do curl -sf "$API/products?limit=1" >/dev/null && break; sleep 0.2; done
email="stock-$(date +%s%N)@example.com"
curl -sf -X POST "$API/auth/register" -H 'content-type: application/json' \
  -d "{\"email\":\"$email\",\"password\":\"correct-horse\",\"name\":\"Stock\"}" >/dev/null
TOKEN=$(curl -sf -X POST "$API/auth/login" -H 'content-type: application/json' \
  -d "{\"email\":\"$email\",\"password\":\"correct-horse\"}" | jq -r .access_token)
for _ in $(seq 1 50); do
  ID=$(curl -sf "$API/users/me" -H "authorization: Bearer $TOKEN" | jq -r .id) && break
  sleep 0.2
done
"$VENV/bin/python" -m grpc_tools.protoc -I crates/contracts/proto \
  --python_out="$WORK" --grpc_python_out="$WORK" crates/contracts/proto/user.proto
PYTHONPATH=$WORK "$VENV/bin/python" - "127.0.0.1:$port" "$TOKEN" "$ID" <<'PY'
import sys
import grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
import user_pb2, user_pb2_grpc

target, token, uid = sys.argv[1:4]
channel = grpc.insecure_channel(target)
services = list(ProtoReflectionDescriptorDatabase(channel).get_services())
print("reflection lists:", ", ".join(services))
assert "user.UserService" in services, services

stub = user_pb2_grpc.UserServiceStub(channel)
user = stub.GetUser(user_pb2.GetUserRequest(id=uid), metadata=[("authorization", "Bearer " + token)])
assert user.id == uid and user.name == "Stock", user
print("GetUser with a token:", user.email)
try:
    stub.GetUser(user_pb2.GetUserRequest(id=uid))
    raise SystemExit("GetUser without a token was answered")
except grpc.RpcError as e:
    assert e.code() == grpc.StatusCode.UNAUTHENTICATED, e
    print("GetUser without a token:", e.code().name)
PY
