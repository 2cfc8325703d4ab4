#!/usr/bin/env bash
# The mesh on etcd, through a real gateway under a steady stream of
# requests: discovery propagation (an instance registers -> the first
# request it serves), deregistration (it deregisters, as SIGTERM does
# before the drain -> the last request it is sent; and how many requests
# failed meanwhile) and configuration propagation (features.v2_products put
# in etcd -> the first answer that obeys it), each p50/max over TRIALS.
# Goals: <= 1 s, 0 failed requests, <= 1 s.
#
# Env: TRIALS (default 20), PROFILE (release or debug; default release),
# BAZAAR_TEST_ETCD_URL (default: an etcd of the script's own).
set -euo pipefail
cd "$(dirname "$0")/.."
TRIALS=${TRIALS:-20}
PROFILE=${PROFILE:-release}
WORK=$(mktemp -d)
ETCD_PID=""
cleanup() {
  if [[ -n $ETCD_PID ]]; then kill "$ETCD_PID" 2>/dev/null || true; wait "$ETCD_PID" 2>/dev/null || true; fi
  rm -rf "$WORK"
}
trap cleanup EXIT

if [[ $PROFILE == release ]]; then
  cargo build --release -q -p bazaar --example propagation
else
  cargo build -q -p bazaar --example propagation
fi
EXAMPLE=${CARGO_TARGET_DIR:-target}/$PROFILE/examples/propagation

source bench/etcd.sh
use_etcd

RUST_LOG=${RUST_LOG:-error} "$EXAMPLE" --etcd "$ETCD" --trials "$TRIALS"
