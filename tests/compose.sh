#!/usr/bin/env bash
# The Compose system here: deploy/compose/up.sh (the image around BIN when
# given), then the README's walk-through through each gateway replica,
# Prometheus scraping every service, and deploy/compose/down.sh. Uses the
# host's RabbitMQ and PostgreSQL (schemas of this run's own, dropped after).
set -euo pipefail
cd "$(dirname "$0")/.."
export BAZAAR_DATABASE_SCHEMA_PREFIX="compose$(date +%s)_"
DB=${BAZAAR_TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}
export BAZAAR_DATABASE_URL=$DB
cleanup() {
  bash deploy/compose/down.sh || true
  for s in auth users catalog orders inventory payments notifications; do
    psql "$DB" -qc "DROP SCHEMA IF EXISTS \"$BAZAAR_DATABASE_SCHEMA_PREFIX$s\" CASCADE" >/dev/null 2>&1 || true
  done
}
trap cleanup EXIT
start=$SECONDS
URL=$(bash deploy/compose/up.sh | tail -n1)
echo "compose: up and healthy in $((SECONDS - start)) s at $URL"
GATEWAY=$URL bash tests/walkthrough.sh
GATEWAY=http://127.0.0.1:8081 bash tests/walkthrough.sh
for _ in $(seq 1 30); do
  up=$(curl -sf 'http://127.0.0.1:9090/api/v1/query?query=up' | jq '[.data.result[] | select(.value[1] == "1")] | length')
  (( up == 9 )) && break
  sleep 1
done
(( up == 9 )) || { echo "compose: Prometheus scrapes $up of 9 services" >&2; exit 1; }
echo "compose: Prometheus scrapes all 9 services"
rules=$(curl -sf 'http://127.0.0.1:9090/api/v1/rules' | jq '[.data.groups[].rules[]] | length')
(( rules == 7 )) || { echo "compose: Prometheus loaded $rules of 7 alerting rules" >&2; exit 1; }
echo "compose: Prometheus loaded the 7 alerting rules"
# The Grafana dashboards' queries, against this Prometheus (Grafana itself
# cannot run here: no image, no Debian package). Two scrapes after the
# walk-through, so that rates have samples.
sleep 11
python3 tests/dashboards.py http://127.0.0.1:9090

# The backup of docs/operations.md, as written there: dump this system's
# schemas, restore them into an empty database, and find the same orders.
restored="restore_${BAZAAR_DATABASE_SCHEMA_PREFIX%_}"
dump=$(mktemp)
pg_dump "$DB" --format=custom --schema="${BAZAAR_DATABASE_SCHEMA_PREFIX}*" --file="$dump"
createdb -h 127.0.0.1 -U postgres "$restored"
pg_restore --dbname="${DB%/*}/$restored" --no-owner "$dump"
count() { psql "$1" -qAt -c "SELECT count(*) FROM \"${BAZAAR_DATABASE_SCHEMA_PREFIX}orders\".orders"; }
before=$(count "$DB"); after=$(count "${DB%/*}/$restored")
dropdb -h 127.0.0.1 -U postgres "$restored"; rm -f "$dump"
[[ $before -gt 0 && $before == "$after" ]] || { echo "compose: backup restored $after of $before orders" >&2; exit 1; }
echo "compose: backup and restore: $after orders"
