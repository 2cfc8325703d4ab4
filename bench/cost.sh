#!/usr/bin/env bash
# What a confirmed order costs in serve mode: every service its own
# `bazaar serve` process on RabbitMQ (a vhost of its own) and PostgreSQL
# (schemas of their own), under `bazaar load` at RATE for LOAD_SECONDS.
# Prints, per process, the CPU it spent per confirmed order (user +
# system from /proc, over the load and its drain: `bazaar load` waits
# for every order's outcome) and its RSS idle and after the load (and of
# it, the process's own: RssAnon; the rest is the binary's shared pages;
# and its PSS, its own plus its share of the binary's pages); then
# PostgreSQL's and RabbitMQ's CPU per order (their server processes;
# a backend that exits during the run is not counted), the total; and
# per order: statements, transactions committed, rows written, WAL
# records and syncs, messages published and consumed (the services' own
# counters); the statements run most, per order; and each process's own
# memory through the load, with the CPU per order of each stretch, to
# see that both level off (LOAD_SECONDS=600 for the ten-minute run);
# and whether the binary's code is laid out as crates/bazaar/link-order.txt
# lists it (the idle RSS depends on it: tools/link-order.sh).
#
# PostgreSQL is a server of the run's own (bench/lib.sh), with
# pg_stat_statements loaded to count statements; it needs PostgreSQL's
# server binaries (installed with the machine's server).
#
# Env: RATE (orders/s, default 200; an order costs less CPU the higher the
# rate: README), LOAD_SECONDS (default 20), PROFILE
# (default release), ARRIVALS (`bazaar load --arrivals`: poisson, the
# default, even or bursts), BIN and LOAD_BIN (bench/lib.sh). The machine is
# shared: compare runs made one after the other, interleaved, and the
# CPU figures rather than the rates.
set -euo pipefail
cd "$(dirname "$0")/.."
RATE=${RATE:-200}
LOAD_SECONDS=${LOAD_SECONDS:-20}
source bench/lib.sh
private_postgres

rss_kib() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }
# Of that, the process's own memory (RssAnon): the rest is the binary's
# pages, shared by every process that runs it.
anon_kib() { awk '/^RssAnon:/ { print $2 }' "/proc/$1/status"; }
# Its share of the pages it shares with others (PSS): its own, plus the
# binary's pages divided among the processes that run it.
pss_kib() { awk '/^Pss:/ { print $2 }' "/proc/$1/smaps_rollup"; }
mib() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }
# Every process of a server: PostgreSQL's postmaster and backends,
# RabbitMQ's Erlang VM (and its helpers).
pg_pids() { private_postgres_pids; }
mq_pids() { pgrep -f 'beam.smp|erl_child_setup|inet_gethost|epmd' || true; }
# CPU ticks of a set of pids, as "pid ticks" lines (gone ones left out).
ticks_of() { local p; for p in "$@"; do [[ -r /proc/$p/stat ]] && echo "$p $(awk '{ print $14 + $15 }' "/proc/$p/stat" 2>/dev/null || echo 0)"; done; }
# Ticks spent since a snapshot ("pid ticks" lines): a pid new since then
# counts from 0.
spent() { # snapshot-file pids...
  local snap=$1; shift
  ticks_of "$@" | awk -v snap="$snap" '
    BEGIN { while ((getline line < snap) > 0) { split(line, f, " "); before[f[1]] = f[2] } }
    { t += $2 - ($1 in before ? before[$1] : 0) } END { print t + 0 }'
}
pg_stats() { # statements, transactions, rows written, WAL records, WAL syncs
  psql_db -F ' ' -c "SELECT (SELECT coalesce(sum(calls), 0) FROM pg_stat_statements),
    (SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()),
    (SELECT coalesce(sum(n_tup_ins + n_tup_upd + n_tup_del), 0) FROM pg_stat_user_tables WHERE schemaname LIKE '${PREFIX//_/\\_}%'),
    (SELECT wal_records FROM pg_stat_wal), (SELECT wal_sync FROM pg_stat_wal)"
}
bus_counts() { # published consumed, summed over every service
  local s
  for s in "${SERVICES[@]}"; do curl -sf "http://127.0.0.1:${PORT[$s]}/metrics" || true; done |
    awk '/^bus_published_total/ { p += $NF } /^bus_consumed_total/ { c += $NF } END { printf "%d %d\n", p, c }'
}

serve_system
sleep 3
declare -A IDLE IDLE_ANON IDLE_PSS
for s in "${SERVICES[@]}"; do
  IDLE[$s]=$(rss_kib "${PID[$s]}") IDLE_ANON[$s]=$(anon_kib "${PID[$s]}") IDLE_PSS[$s]=$(pss_kib "${PID[$s]}")
done
# Warm up: stock set, connections made, statements prepared.
"$LOAD_BIN" load --gateway "$GW" --seconds 2 --rate 50 --stock 100000000 >/dev/null 2>&1 || true

declare -A BEFORE
for s in "${SERVICES[@]}"; do BEFORE[$s]=$(ticks "${PID[$s]}"); done
# shellcheck disable=SC2046
ticks_of $(pg_pids) >"$WORK/pg.snap"
# shellcheck disable=SC2046
ticks_of $(mq_pids) >"$WORK/mq.snap"
psql_db -c 'SELECT pg_stat_statements_reset()' >/dev/null
read -r st0 tx0 rows0 wal0 sync0 < <(pg_stats)
read -r pub0 con0 < <(bus_counts)

# Each process's own memory (RssAnon, MiB) through the load, every
# tenth of it: it should level off, not grow. And the CPU of every
# process (Bazaar's, PostgreSQL's, RabbitMQ's) per order confirmed in
# that tenth: it should stay level too.
every=$(( LOAD_SECONDS >= 20 ? LOAD_SECONDS / 10 : 2 ))
confirmed_so_far() {
  curl -sf "http://127.0.0.1:${PORT[orders]}/metrics" | awk '/^saga_confirmed_total/ { n += $NF } END { printf "%d\n", n }' || echo 0
}
every_pid() { echo "${PID[@]}"; pg_pids; mq_pids; }
(
  t=0
  # shellcheck disable=SC2046
  ticks_of $(every_pid) >"$WORK/interval.snap"
  c0=$(confirmed_so_far)
  while sleep "$every"; do
    t=$((t + every))
    # shellcheck disable=SC2046
    spent_now=$(spent "$WORK/interval.snap" $(every_pid))
    # shellcheck disable=SC2046
    ticks_of $(every_pid) >"$WORK/interval.snap"
    c1=$(confirmed_so_far)
    # A row at once: the sampler is stopped at any moment.
    row=$t
    for s in "${SERVICES[@]}"; do row+=" $(mib "$(anon_kib "${PID[$s]}")")"; done
    row+=" $(awk -v t="$spent_now" -v hz="$TICK" -v n=$((c1 - c0)) 'BEGIN { if (n > 0) printf "%.2f", t * 1000 / hz / n; else print "-" }')"
    echo "$row"
    c0=$c1
  done
) >"$WORK/memory" &
SAMPLER=$!
line=$("$LOAD_BIN" load --gateway "$GW" --seconds "$LOAD_SECONDS" --rate "$RATE" ${ARRIVALS:+--arrivals "$ARRIVALS"} 2>/dev/null | grep '^load:')
kill "$SAMPLER" 2>/dev/null || true

declare -A AFTER
for s in "${SERVICES[@]}"; do AFTER[$s]=$(ticks "${PID[$s]}"); done
# shellcheck disable=SC2046
pg=$(spent "$WORK/pg.snap" $(pg_pids))
# shellcheck disable=SC2046
mq=$(spent "$WORK/mq.snap" $(mq_pids))
read -r st1 tx1 rows1 wal1 sync1 < <(pg_stats)
read -r pub1 con1 < <(bus_counts)
n=$(sed -n 's/.* confirmed=\([0-9]*\).*/\1/p' <<<"$line")

echo "$line"
[[ ${n:-0} -gt 0 ]] || { echo "cost: no order confirmed" >&2; exit 1; }
per() { awk -v t="$1" -v hz="$TICK" -v n="$n" 'BEGIN { printf "%.3f", t * 1000 / hz / n }'; }
printf '%-14s %12s %10s %10s %10s %10s %10s %10s\n' process cpu_ms/order idle_MiB anon_MiB pss_MiB after_MiB anon_MiB pss_MiB
bazaar=0
for s in "${SERVICES[@]}"; do
  t=$((AFTER[$s] - BEFORE[$s]))
  bazaar=$((bazaar + t))
  printf '%-14s %12s %10s %10s %10s %10s %10s %10s\n' "$s" "$(per "$t")" \
    "$(mib "${IDLE[$s]}")" "$(mib "${IDLE_ANON[$s]}")" "$(mib "${IDLE_PSS[$s]}")" \
    "$(mib "$(rss_kib "${PID[$s]}")")" "$(mib "$(anon_kib "${PID[$s]}")")" "$(mib "$(pss_kib "${PID[$s]}")")"
done
printf '%-14s %12s\n' "bazaar (all)" "$(per "$bazaar")" postgresql "$(per "$pg")" rabbitmq "$(per "$mq")" \
  total "$(per $((bazaar + pg + mq)))"
echo "own memory (RssAnon, MiB) during the load, every ${every} s, and the CPU of all processes per order confirmed in those ${every} s:"
printf '%14s' s "${SERVICES[@]}" cpu_ms/order; echo
awk '{ for (i = 1; i <= NF; i++) printf "%14s", $i; print "" }' "$WORK/memory"
awk -v n="$n" -v st=$((st1 - st0)) -v tx=$((tx1 - tx0)) -v rows=$((rows1 - rows0)) -v wal=$((wal1 - wal0)) \
  -v sync=$((sync1 - sync0)) -v pub=$((pub1 - pub0)) -v con=$((con1 - con0)) 'BEGIN {
  printf "per order: statements=%.1f transactions=%.1f rows_written=%.1f wal_records=%.1f wal_syncs=%.2f published=%.1f consumed=%.1f\n",
    st / n, tx / n, rows / n, wal / n, sync / n, pub / n, con / n }'
echo "statements run most (per order, and its first 90 characters):"
psql_db -F ' ' -c "SELECT round(calls::numeric / $n, 2), left(regexp_replace(query, '\s+', ' ', 'g'), 90)
  FROM pg_stat_statements ORDER BY calls DESC LIMIT 15" | sed 's/^/  /'
# The layout of the binary's code, which its idle RSS depends on.
bash tools/link-order.sh --check "$BIN"
