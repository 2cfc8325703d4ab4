# Shared by the bench scripts: build the binary, and run the services as
# separate `bazaar serve` processes on RabbitMQ (a vhost of their own) and
# PostgreSQL (schemas of their own), cleaned up on exit. Source it.

PROFILE=${PROFILE:-release}
AMQP=${BAZAAR_TEST_AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}
DB=${BAZAAR_TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}
PREFIX="b$(date +%s)${RANDOM}_"
SERVICES=(auth users inventory payments notifications orders catalog gateway)
declare -A PORT PID
WORK=$(mktemp -d)
VHOST=""
EXTRA_PIDS=()

# BIN=path: that binary as it is (to compare builds); else this tree, built.
if [[ -z ${BIN:-} ]]; then
  if [[ $PROFILE == release ]]; then cargo build --release -q -p bazaar; else cargo build -q -p bazaar; fi
  BIN=${CARGO_TARGET_DIR:-target}/$PROFILE/bazaar
fi
# LOAD_BIN=path: the `bazaar load` to drive the system with (default
# BIN), so that builds compared are offered the same load.
LOAD_BIN=${LOAD_BIN:-$BIN}

# CPU time (user + system, clock ticks) the given processes have spent.
TICK=$(getconf CLK_TCK)
ticks() { local t=0 p; for p in "$@"; do t=$((t + $(awk '{ print $14 + $15 }' "/proc/$p/stat"))); done; echo "$t"; }

export BAZAAR_ADMIN_EMAIL=admin@bench.local BAZAAR_ADMIN_PASSWORD=bench-admin-pw
export BAZAAR_ARGON2_MEMORY_KIB=1024 BAZAAR_ARGON2_ITERATIONS=1
export BAZAAR_LOG_FORMAT=json RUST_LOG=${RUST_LOG:-warn}

psql_db() { psql "$DB" -v ON_ERROR_STOP=1 -qAt "$@"; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

cleanup() {
  for s in "${SERVICES[@]}"; do [[ -n ${PID[$s]:-} ]] && kill "${PID[$s]}" 2>/dev/null || true; done
  for p in "${EXTRA_PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  # The supervisor stops its children before etcd goes.
  for p in "${EXTRA_PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  if [[ -n ${ETCD_PID:-} ]]; then kill "$ETCD_PID" 2>/dev/null || true; fi
  wait 2>/dev/null || true
  [[ -n ${PRIVATE_PG:-} ]] && stop_private_postgres
  if [[ -n $VHOST ]]; then
    for s in "${SERVICES[@]}"; do psql_db -c "DROP SCHEMA IF EXISTS \"$PREFIX$s\" CASCADE" >/dev/null 2>&1 || true; done
    rabbitmqctl -q delete_vhost "$VHOST" >/dev/null 2>&1 || true
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT

# A PostgreSQL server of the run's own (same version and settings as the
# machine's, with pg_stat_statements loaded, which counts statements);
# points DB at it. It goes with the run. As root, it runs as `postgres`.
private_postgres() {
  local bin as=()
  bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n1)
  PRIVATE_PG=$WORK/pg
  mkdir -p "$PRIVATE_PG"
  if [[ $(id -u) == 0 ]]; then
    as=(runuser -u postgres --)
    chmod 755 "$WORK"
    chown postgres "$PRIVATE_PG"
  fi
  PG_CTL=("${as[@]}" "$bin/pg_ctl" -D "$PRIVATE_PG/data")
  "${as[@]}" "$bin/initdb" -D "$PRIVATE_PG/data" -U postgres --auth=trust -E UTF8 >"$PRIVATE_PG/initdb.log" 2>&1 ||
    { cat "$PRIVATE_PG/initdb.log" >&2; exit 1; }
  local port; port=$(free_port)
  "${PG_CTL[@]}" -w -l "$PRIVATE_PG/log" start -o "-p $port -k $PRIVATE_PG -c listen_addresses=127.0.0.1 \
    -c autovacuum=off -c shared_buffers=128MB -c max_connections=200 \
    -c shared_preload_libraries=pg_stat_statements -c pg_stat_statements.track_utility=on" >/dev/null ||
    { cat "$PRIVATE_PG/log" >&2; exit 1; }
  DB=postgres://postgres@127.0.0.1:$port/postgres
  psql_db -c "CREATE EXTENSION pg_stat_statements" >/dev/null
}
stop_private_postgres() { "${PG_CTL[@]}" -m fast stop >/dev/null 2>&1 || true; }
# Its processes: the postmaster and its children.
private_postgres_pids() {
  local pm; pm=$(head -n1 "$PRIVATE_PG/data/postmaster.pid")
  echo "$pm"
  pgrep -P "$pm" || true
}

wait_up() { # gateway url
  for _ in $(seq 1 150); do curl -sf "$1/api/v1/products?limit=1" >/dev/null && return 0; sleep 0.2; done
  echo "bench: the system at $1 did not come up" >&2
  [[ -f $WORK/up.log ]] && tail -20 "$WORK/up.log" >&2
  exit 1
}

# `bazaar up` on a fresh data dir; sets GW.
embedded_system() {
  local port; port=$(free_port)
  "$BIN" up --port "$port" --data-dir "$WORK/data" >"$WORK/up.log" 2>&1 &
  EXTRA_PIDS+=($!)
  GW="http://127.0.0.1:$port"
  wait_up "$GW"
}

start() { # service; waits START_TIMEOUT seconds (default 15) for it
  "$BIN" serve "$1" --port "${PORT[$1]}" >>"$WORK/$1.log" 2>&1 &
  PID[$1]=$!
  for _ in $(seq 1 $((${START_TIMEOUT:-15} * 10))); do
    curl -sf "http://127.0.0.1:${PORT[$1]}/health" >/dev/null && return 0
    sleep 0.1
  done
  echo "bench: $1 did not start" >&2; tail -20 "$WORK/$1.log" >&2; exit 1
}

# Every service as its own process; sets GW.
serve_system() {
  VHOST="bazaar-$PREFIX"
  rabbitmqctl -q add_vhost "$VHOST" >/dev/null
  rabbitmqctl -q set_permissions -p "$VHOST" guest '.*' '.*' '.*' >/dev/null
  export BAZAAR_AMQP_URL="${AMQP%/*}/$VHOST" BAZAAR_DATABASE_URL=$DB BAZAAR_REGISTRY=static
  export BAZAAR_DATABASE_SCHEMA_PREFIX=$PREFIX
  for s in "${SERVICES[@]}"; do PORT[$s]=$(free_port); done
  for s in "${SERVICES[@]}"; do export "BAZAAR_SERVICES__${s^^}=http://127.0.0.1:${PORT[$s]}"; done
  for s in "${SERVICES[@]}"; do start "$s"; done
  GW="http://127.0.0.1:${PORT[gateway]}"
  wait_up "$GW"
}

source "$(dirname "${BASH_SOURCE[0]}")/etcd.sh"

# `bazaar up --distributed` (every service a supervised child) on
# RabbitMQ, PostgreSQL and etcd, with REPLICAS; sets GW and SUP.
distributed_system() {
  use_etcd
  VHOST="bazaar-$PREFIX"
  rabbitmqctl -q add_vhost "$VHOST" >/dev/null
  rabbitmqctl -q set_permissions -p "$VHOST" guest '.*' '.*' '.*' >/dev/null
  export BAZAAR_AMQP_URL="${AMQP%/*}/$VHOST" BAZAAR_DATABASE_URL=$DB BAZAAR_ETCD_ENDPOINTS=$ETCD
  export BAZAAR_DATABASE_SCHEMA_PREFIX=$PREFIX
  local port; port=$(free_port)
  "$BIN" up --distributed --port "$port" --data-dir "$WORK/dist" --replicas "${REPLICAS:-catalog=2}" \
    >"$WORK/up.log" 2>&1 &
  SUP=$!
  EXTRA_PIDS+=("$SUP")
  GW="http://127.0.0.1:$port"
  wait_up "$GW"
}

# The pid of one running child of the supervisor for a service.
child_of() { { pgrep -P "$SUP" -f "serve $1 --port" || true; } | head -n1; }
