#!/usr/bin/env python3
"""The Grafana dashboards of deploy/grafana, checked without Grafana.

Always: each dashboard is well-formed (unique panel ids, every panel on
the provisioned Prometheus data source, every query non-empty).

With a Prometheus URL (tests/compose.sh gives the Compose system's):
every query runs there without error (`$__rate_interval` as 1m,
`$service` as orders), and the panels named in NEEDS_DATA return series,
so the dashboards show the system's own metrics, not names that exist
nowhere.

Usage: tests/dashboards.py [PROMETHEUS_URL]
"""

import glob
import json
import os
import sys
import urllib.parse
import urllib.request

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
NEEDS_DATA = {
    "Bazaar — system": [
        "Requests per second by route",
        "Requests per second by service",
        "Outcomes per second",
        "Checkout to outcome p50 / p99",
        "Published per second by routing key",
        "Consumed per second by queue",
        "Outbox backlog",
        "Calls per second by target and outcome",
        "Resident memory by process",
        "Database connections in use",
    ],
    "Bazaar — one service": [
        "Requests per second by route",
        "Consumed, retried, dead-lettered by queue",
        "Database connections",
    ],
}


def queries(dashboard):
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            yield panel, target["expr"]


def check_shape(path, dashboard):
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), f"{path}: panel ids repeat"
    assert dashboard.get("uid"), f"{path}: no uid"
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "prometheus", f"{path}: {panel['title']}"
        assert panel["targets"], f"{path}: {panel['title']} has no query"
        for target in panel["targets"]:
            assert target["expr"].strip(), f"{path}: {panel['title']} has an empty query"


def run(prometheus, expr):
    expr = expr.replace("$__rate_interval", "1m").replace("$service", "orders")
    url = f"{prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(url, timeout=10) as res:
            body = json.load(res)
    except urllib.error.HTTPError as e:
        body = json.load(e)
    if body.get("status") != "success":
        raise AssertionError(f"{expr}: {body.get('error')}")
    return body["data"]["result"]


def main():
    prometheus = sys.argv[1] if len(sys.argv) > 1 else None
    paths = sorted(glob.glob(os.path.join(ROOT, "deploy/grafana/dashboards/*.json")))
    assert paths, "no dashboards"
    total = with_data = 0
    for path in paths:
        with open(path, encoding="utf-8") as f:
            dashboard = json.load(f)
        check_shape(path, dashboard)
        if not prometheus:
            continue
        empty = set()
        titled = {}
        for panel, expr in queries(dashboard):
            total += 1
            result = run(prometheus, expr)
            with_data += bool(result)
            titled.setdefault(panel["title"], []).append(bool(result))
        for title in NEEDS_DATA.get(dashboard["title"], []):
            assert title in titled, f"{dashboard['title']}: no panel {title!r}"
            if not any(titled[title]):
                empty.add(title)
        assert not empty, f"{dashboard['title']}: no data in {sorted(empty)}"
    if prometheus:
        print(f"dashboards: {len(paths)} dashboards, {total} queries run, {with_data} with data")
    else:
        print(f"dashboards: {len(paths)} dashboards well-formed")


if __name__ == "__main__":
    main()
