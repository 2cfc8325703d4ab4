#!/usr/bin/env bash
# Where a serve-mode checkout's time goes, from its trace: every service
# as its own `bazaar serve` process on RabbitMQ and PostgreSQL, RATE
# orders/s for LOAD_SECONDS, then the traces of SAMPLE of those orders
# from the gateway's dashboard API, each cut into hops on the saga's
# path, with the median and p90 of each:
#
#   checkout                the gateway's POST /orders span (answer sent)
#   <msg>: outbox wait      the producing span's end -> its publish span's start
#   <msg>: publish+confirm  the publish span (until the broker confirms)
#   <msg>: delivery         publish start -> the consume span's start
#   <msg>: handle           the consume span
#   total                   the gateway's span start -> the CONFIRMED step's end
#
# Env: RATE (default 200), LOAD_SECONDS (default 10), SAMPLE (default 100),
# PROFILE, BIN, LOAD_BIN (bench/lib.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
RATE=${RATE:-200}
LOAD_SECONDS=${LOAD_SECONDS:-10}
SAMPLE=${SAMPLE:-100}
source bench/lib.sh
# The traces of orders from the whole run must still be there at its end:
# as many spans as the 4 MiB per process hold.
export BAZAAR_TRACE_KEEP_SPANS=${BAZAAR_TRACE_KEEP_SPANS:-20000}
serve_system
"$LOAD_BIN" load --gateway "$GW" --seconds "$LOAD_SECONDS" --rate "$RATE" --stock 100000000 \
  --ids "$WORK/ids" 2>/dev/null | grep '^load:'
python3 - "$GW" "$WORK/ids" "$SAMPLE" <<'PY'
import json, statistics, sys, urllib.request
gw, ids_file, sample = sys.argv[1], sys.argv[2], int(sys.argv[3])
ids = [l.strip() for l in open(ids_file) if l.strip()]
step = max(1, len(ids) // sample)
def get(path):
    with urllib.request.urlopen(gw + path, timeout=10) as r:
        return json.load(r)
# (The first two of the older saga, step by step, are skipped when absent.)
HOPS = ["order.created", "inventory.reserve", "inventory.reserved", "payments.charge", "payment.charged"]
rows = {}
def add(name, ms):
    rows.setdefault(name, []).append(ms)
for order_id in ids[::step][:sample]:
    try:
        tl = get(f"/_dashboard/api/orders/{order_id}/timeline")
        spans = get(f"/_dashboard/api/traces/{tl['trace_ids'][0]}")["spans"]
    except Exception:
        continue
    by_id = {s["span_id"]: s for s in spans}
    end = lambda s: s["start_us"] + s["duration_us"]
    find = lambda pred: next((s for s in spans if pred(s)), None)
    gw_span = find(lambda s: s["service"] == "gateway" and s["kind"] == "server")
    done = find(lambda s: s["name"].endswith("→ CONFIRMED"))
    if not gw_span or not done:
        continue
    add("checkout (answer sent)", gw_span["duration_us"] / 1000)
    for m in HOPS:
        pub = find(lambda s: s["name"] == f"publish {m}")
        con = find(lambda s: s["name"] == f"consume {m}")
        if not pub or not con:
            continue
        producer = by_id.get(pub["parent_span_id"])
        if producer:
            add(f"{m}: outbox wait", max(0, pub["start_us"] - end(producer)) / 1000)
        add(f"{m}: publish+confirm", pub["duration_us"] / 1000)
        add(f"{m}: delivery", max(0, con["start_us"] - pub["start_us"]) / 1000)
        add(f"{m}: handle", con["duration_us"] / 1000)
    add("total (to CONFIRMED)", (end(done) - gw_span["start_us"]) / 1000)
n = len(rows.get("total (to CONFIRMED)", []))
print(f"breakdown of {n} serve-mode checkouts at the offered rate (ms):")
print(f"  {'hop':42} {'p50':>7} {'p90':>7}")
for name, v in rows.items():
    v = sorted(v)
    p90 = v[min(len(v) - 1, int(len(v) * 0.9))]
    print(f"  {name:42} {statistics.median(v):7.2f} {p90:7.2f}")
PY
