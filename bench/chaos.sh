#!/usr/bin/env bash
# Chaos: every service as its own process on RabbitMQ and PostgreSQL;
# simulated shoppers check out for LOAD_SECONDS while services are
# `kill -9`ed in turn and RabbitMQ is restarted once. Then it waits for
# quiescence and audits the databases.
#
# MODE=distributed (the default): `bazaar up --distributed --replicas
# catalog=2` on etcd; every service is killed once and its supervisor
# brings it back, while a reader checks that no product read fails while
# a catalog replica is down. MODE=serve: `bazaar serve` processes on
# static addresses; orders, payments and inventory are killed and started
# again by this script. The last line is
#
#   audit: orders=N confirmed=C cancelled=X pending=0 lost=0 duplicate_charges=0 stock_mismatch=0
#
# and the script fails unless pending, lost, duplicate_charges and
# stock_mismatch are all 0, and every final order's outcome has its one
# notification (misnotified=0 on the detail line before it).
#
# Env: MODE, LOAD_SECONDS (default 60), SHOPPERS (default 16), RATE
# (orders/s, default 150), PROFILE (release or debug; default release),
# BAZAAR_TEST_AMQP_URL, BAZAAR_TEST_DATABASE_URL, BAZAAR_TEST_ETCD_URL
# (default: an etcd of the script's own).
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=${MODE:-distributed}
LOAD_SECONDS=${LOAD_SECONDS:-60}
SHOPPERS=${SHOPPERS:-16}
# Orders/s offered: below saturation, so the run measures recovery from
# crashes rather than the drain of an overload backlog.
RATE=${RATE:-150}
STOCK=1000000
# Some declines and some transient provider failures, so every path runs.
export BAZAAR_PAYMENTS_DECLINE_ABOVE=${BAZAAR_PAYMENTS_DECLINE_ABOVE:-5000}
export BAZAAR_PAYMENTS_FAILURE_RATE=${BAZAAR_PAYMENTS_FAILURE_RATE:-0.02}
source bench/lib.sh

crash() { # service: kill -9, then restart
  echo "chaos: kill -9 $1"
  kill -9 "${PID[$1]}"
  wait "${PID[$1]}" 2>/dev/null || true
  sleep 1
  start "$1"
  echo "chaos: $1 restarted"
}

restart_rabbitmq() {
  echo "chaos: restarting RabbitMQ"
  rabbitmqctl shutdown >/dev/null 2>&1 || true
  rabbitmq-server -detached
  # The node takes a moment to register before it can even be awaited.
  for _ in $(seq 1 60); do
    rabbitmqctl -q await_startup --timeout 5 >/dev/null 2>&1 && break
    sleep 1
  done
  for _ in $(seq 1 60); do (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null && break; sleep 1; done
  echo "chaos: RabbitMQ is back"
}

# Distributed: kill -9 a child; its supervisor must bring it back.
crash_child() { # service
  local old new
  old=$(child_of "$1")
  [[ -n $old ]] || { echo "chaos: no running $1 child" >&2; exit 1; }
  echo "chaos: kill -9 $1 (pid $old)"
  kill -9 "$old"
  for _ in $(seq 1 300); do
    new=$(child_of "$1")
    if [[ -n $new && $new != "$old" ]]; then echo "chaos: $1 is back (pid $new)"; return 0; fi
    sleep 0.1
  done
  echo "chaos: $1 did not come back" >&2; exit 1
}

# Reads one product, uncached, in a loop; counts the reads that fail.
read_products() { # seconds
  local id ok=0 failed=0 end=$((SECONDS + $1)) code
  id=$(curl -sf "$GW/api/v1/products?limit=1" | python3 -c 'import json,sys; print(json.load(sys.stdin)["items"][0]["id"])')
  while (( SECONDS < end )); do
    code=$(curl -s -o /dev/null -w '%{http_code}' -H 'cache-control: no-cache' "$GW/api/v1/products/$id" || true)
    if [[ $code == 200 ]]; then ok=$((ok + 1)); else failed=$((failed + 1)); fi
    sleep 0.02
  done
  echo "$ok $failed"
}

if [[ $MODE == distributed ]]; then distributed_system; else serve_system; fi

echo "chaos: ${LOAD_SECONDS}s of checkout load, $RATE orders/s from $SHOPPERS shoppers"
"$LOAD_BIN" load --gateway "$GW" --shoppers "$SHOPPERS" --seconds "$LOAD_SECONDS" --rate "$RATE" \
  --stock "$STOCK" --settle 240 --ids "$WORK/ids" >"$WORK/load.out" 2>"$WORK/load.err" &
LOAD=$!
EXTRA_PIDS+=("$LOAD")

if [[ $MODE == distributed ]]; then
  # Every service once (the gateway last), then the broker.
  STEP=$(( LOAD_SECONDS / 10 )); (( STEP > 0 )) || STEP=1
  sleep "$STEP"
  read_products 8 >"$WORK/reads" &
  READER=$!
  sleep 1; crash_child catalog
  wait "$READER"
  read -r reads_ok reads_failed <"$WORK/reads"
  echo "chaos: product reads while a catalog replica was down: ok=$reads_ok failed=$reads_failed"
  for s in orders payments inventory auth users notifications gateway; do sleep "$STEP"; crash_child "$s"; done
  sleep "$STEP"; restart_rabbitmq
else
  STEP=$(( LOAD_SECONDS / 5 ))
  sleep "$STEP"; crash orders
  sleep "$STEP"; crash payments
  sleep "$STEP"; crash inventory
  sleep "$STEP"; restart_rabbitmq
fi

if ! wait "$LOAD"; then
  echo "chaos: the load reported a problem" >&2
fi
cat "$WORK/load.out"

# Quiescence: no saga in flight, every outbox drained, nothing held.
quiet() {
  local pending outbox reserved
  pending=$(psql_db -c "SELECT count(*) FROM \"${PREFIX}orders\".orders WHERE status = 'PENDING'")
  outbox=0
  for s in auth catalog orders inventory payments notifications; do
    outbox=$(( outbox + $(psql_db -c "SELECT count(*) FROM \"$PREFIX$s\".outbox") ))
  done
  reserved=$(psql_db -c "SELECT coalesce(sum(reserved), 0) FROM \"${PREFIX}inventory\".stock")
  [[ $pending == 0 && $outbox == 0 && $reserved == 0 ]]
}
for _ in $(seq 1 120); do quiet && break; sleep 1; done
sleep 2

# The ids the shoppers were given, to find any the database does not have.
psql_db >/dev/null <<SQL
CREATE TABLE "${PREFIX}orders".accepted (id TEXT PRIMARY KEY);
\copy "${PREFIX}orders".accepted FROM '$WORK/ids'
SQL

O="\"${PREFIX}orders\"" I="\"${PREFIX}inventory\"" P="\"${PREFIX}payments\""
read -r orders confirmed cancelled pending <<<"$(psql_db -F ' ' -c "
  SELECT count(*), count(*) FILTER (WHERE status = 'CONFIRMED'),
         count(*) FILTER (WHERE status = 'CANCELLED'), count(*) FILTER (WHERE status = 'PENDING')
  FROM $O.orders")"
lost=$(psql_db -c "SELECT count(*) FROM $O.accepted a LEFT JOIN $O.orders o ON o.id = a.id WHERE o.id IS NULL")
# Money taken for an order that is not confirmed (charged twice, or charged
# and then cancelled without a refund), or a confirmed order never charged
# exactly its total.
duplicate_charges=$(psql_db -c "
  SELECT (SELECT count(*) FROM $P.payments p JOIN $O.orders o ON o.id = p.order_id
          WHERE p.status = 'CHARGED' AND o.status <> 'CONFIRMED')
       + (SELECT count(*) FROM $O.orders o LEFT JOIN $P.payments p ON p.order_id = o.id
          WHERE o.status = 'CONFIRMED' AND (p.status IS DISTINCT FROM 'CHARGED' OR p.amount <> o.total))")
# Per product: every unit is available, held, or sold; nothing is held at
# rest; and inventory's sold units are exactly the confirmed orders' lines.
stock_mismatch=$(psql_db -c "
  WITH committed AS (
    SELECT l.product_id, sum(l.quantity) AS units FROM $I.reservation_lines l
    JOIN $I.reservations r ON r.order_id = l.order_id WHERE r.status = 'COMMITTED' GROUP BY l.product_id),
  held AS (
    SELECT l.product_id, sum(l.quantity) AS units FROM $I.reservation_lines l
    JOIN $I.reservations r ON r.order_id = l.order_id WHERE r.status = 'RESERVED' GROUP BY l.product_id),
  sold AS (
    SELECT i.product_id, sum(i.quantity) AS units FROM $O.order_items i
    JOIN $O.orders o ON o.id = i.order_id WHERE o.status = 'CONFIRMED' GROUP BY i.product_id)
  SELECT count(*) FROM $I.stock s
  LEFT JOIN committed c ON c.product_id = s.product_id
  LEFT JOIN held h ON h.product_id = s.product_id
  LEFT JOIN sold d ON d.product_id = s.product_id
  WHERE s.available + s.reserved + coalesce(c.units, 0) <> $STOCK
     OR s.reserved <> 0 OR coalesce(h.units, 0) <> 0
     OR coalesce(c.units, 0) <> coalesce(d.units, 0)")
# Every order's outcome notified, as that outcome, however often its
# event was delivered (notifications are keyed by outcome and order).
N="\"${PREFIX}notifications\""
misnotified=$(psql_db -c "
  SELECT (SELECT count(*) FROM $O.orders o WHERE o.status <> 'PENDING' AND NOT EXISTS (
            SELECT 1 FROM $N.notifications n WHERE n.id = 'order.' || lower(o.status) || ':' || o.id))
       + (SELECT count(*) FROM $N.notifications n JOIN $O.orders o
          ON n.id IN ('order.confirmed:' || o.id, 'order.cancelled:' || o.id)
          WHERE n.id <> 'order.' || lower(o.status) || ':' || o.id)")
charged=$(psql_db -c "SELECT count(*) FROM $P.payments WHERE status = 'CHARGED'")
reasons=$(psql_db -F '=' -c "SELECT cancel_reason, count(*) FROM $O.orders WHERE status = 'CANCELLED' GROUP BY 1 ORDER BY 1" | tr '\n' ' ')
dead=$("$BIN" dlq list 2>/dev/null | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))' || echo "?")
echo "audit detail: charged=$charged cancelled_by_reason: ${reasons:-none} dead_letters=$dead misnotified=$misnotified"
echo "audit: orders=$orders confirmed=$confirmed cancelled=$cancelled pending=$pending lost=$lost duplicate_charges=$duplicate_charges stock_mismatch=$stock_mismatch"
if [[ $MODE == distributed ]]; then
  # The supervisor killed outright: its children stop too (they asked the
  # kernel for SIGTERM when it dies), none is left serving as an orphan.
  mapfile -t CHILDREN < <(pgrep -P "$SUP" || true)
  kill -9 "$SUP"
  orphans=${#CHILDREN[@]}
  for _ in $(seq 1 150); do
    orphans=0
    for c in "${CHILDREN[@]}"; do kill -0 "$c" 2>/dev/null && orphans=$((orphans + 1)); done
    (( orphans == 0 )) && break
    sleep 0.1
  done
  echo "chaos: supervisor killed with -9: ${#CHILDREN[@]} children, $orphans still running after it"
  (( ${#CHILDREN[@]} > 0 && orphans == 0 )) || { echo "chaos: orphans left behind" >&2; exit 1; }
fi
if [[ $MODE == distributed && ( $reads_ok == 0 || $reads_failed != 0 ) ]]; then
  echo "chaos: product reads failed while a catalog replica was down" >&2
  exit 1
fi
[[ $misnotified == 0 ]] || { echo "chaos: $misnotified order outcomes not notified, or notified as the other outcome" >&2; exit 1; }
[[ $orders -gt 0 && $pending == 0 && $lost == 0 && $duplicate_charges == 0 && $stock_mismatch == 0 ]]
