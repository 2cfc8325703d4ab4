# Shared by bench/gateway.sh and bench/gateway_instructions.sh; source it
# with WORK set. Defines free_port and wait_http, picks the ports of one
# auth and one catalog instance, exports their environment, and writes
# the gateway's configuration to $WORK/gateway.toml: GET /products
# routed to catalog with the token checked and a rate limit on every
# request, cache and access log off.

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_http() { # url name
  for _ in $(seq 1 600); do curl -s -o /dev/null "$1" && return 0; sleep 0.1; done
  echo "bench: $2 did not come up at $1" >&2; exit 1
}

AUTH_PORT=$(free_port); CATALOG_PORT=$(free_port)
export BAZAAR_DATA_DIR=$WORK/data BAZAAR_REGISTRY=static RUST_LOG=${RUST_LOG:-warn} BAZAAR_LOG_FORMAT=json
export BAZAAR_SERVICES__AUTH=http://127.0.0.1:$AUTH_PORT BAZAAR_SERVICES__CATALOG=http://127.0.0.1:$CATALOG_PORT
export BAZAAR_ADMIN_EMAIL=admin@bench.local BAZAAR_ADMIN_PASSWORD=bench-admin-pw
export BAZAAR_ARGON2_MEMORY_KIB=1024 BAZAAR_ARGON2_ITERATIONS=1

cat >"$WORK/gateway.toml" <<EOF
[gateway]
access_log = false

[[gateway.routes]]
prefix = "/products"
methods = ["GET"]
service = "catalog"
auth = true
cache_ttl_secs = 0
rate_limit = { requests = 1000000000, per_secs = 1, key = "user" }
EOF
