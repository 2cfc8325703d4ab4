# etcd for the benches: BAZAAR_TEST_ETCD_URL when set, else one of our own
# on free loopback ports with its data in $WORK (the caller's temporary
# folder; the caller kills $ETCD_PID on exit). `use_etcd` sets ETCD.
# Source it.

use_etcd() {
  if [[ -n ${BAZAAR_TEST_ETCD_URL:-} ]]; then ETCD=$BAZAAR_TEST_ETCD_URL; return; fi
  command -v etcd >/dev/null || { echo "bench: etcd is missing (apt-get install etcd-server)" >&2; exit 1; }
  local c p
  c=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  p=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  etcd --data-dir "$WORK/etcd" --logger zap --log-level error \
    --listen-client-urls "http://127.0.0.1:$c" --advertise-client-urls "http://127.0.0.1:$c" \
    --listen-peer-urls "http://127.0.0.1:$p" --initial-advertise-peer-urls "http://127.0.0.1:$p" \
    --initial-cluster "default=http://127.0.0.1:$p" >"$WORK/etcd.log" 2>&1 &
  ETCD_PID=$!
  ETCD="http://127.0.0.1:$c"
  for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/127.0.0.1/$c") 2>/dev/null && return 0; sleep 0.1; done
  echo "bench: etcd did not start" >&2; exit 1
}
