#!/usr/bin/env bash
# Writes crates/bazaar/link-order.txt: the functions that `bazaar serve`
# processes run, for the linker to lay out first and side by side
# (crates/bazaar/build.rs hands the file to it in release builds).
#
# Why: every service runs the same 20 MB binary, and a process maps the
# binary's code in 64 KiB steps around each function it runs. Laid out
# by the compiler, the 3-5 MiB of code a service runs is spread over the
# whole binary, so each process mapped 13-16 MiB of it. Laid out in this
# order (functions run by every service first, then those run by fewer,
# grouped by service), a process maps 4-6 MiB. The code is the same; only
# its place in the file changes.
#
# How: every service as its own `bazaar serve` process on RabbitMQ and
# PostgreSQL (bench/lib.sh), each under valgrind's callgrind, which
# records every function a process runs; a light `bazaar load` (sign-ups,
# log-ins, checkouts through the whole saga); then each process stopped
# with SIGTERM. Takes about a minute.
#
# Run it again after updating rustc or a dependency, after changing the
# `bazaar` crate, or after moving much code: a function's name carries a
# hash of the toolchain and of the crate's dependencies (and a generic
# one built in the `bazaar` crate, of that crate's code: an edit to
# load.rs renamed 63), and the linker skips names the binary no longer
# has (the layout then falls back to the compiler's, for those).
# bench/cost.sh prints how many of the listed names the binary has.
#
# Needs valgrind (Debian `valgrind`) and the servers bench/lib.sh uses.
# Env: BIN (a release binary to trace; default: this tree, built).
#
# `tools/link-order.sh --check BINARY` only says whether BINARY's code is
# laid out as the file lists it: how many of the listed functions it has,
# and how many of those come before the one listed ahead of them (0: laid
# out in that order).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=crates/bazaar/link-order.txt
if [[ ${1:-} == --check ]]; then
  [[ -n ${2:-} ]] || { echo "usage: tools/link-order.sh [--check BINARY]" >&2; exit 2; }
  nm --defined-only "$2" | awk '
    NR == FNR { if ($2 ~ /^[tT]$/) at[$3] = $1 ""; next }
    /^#/ || !NF { next }
    { listed++ }
    ($1 in at) { found++; if (at[$1] < last) out++; last = at[$1] }
    END { printf "link order: %d of the %d functions listed are in the binary, %d of them out of order\n", found, listed, out }
  ' - "$OUT"
  exit
fi
command -v valgrind >/dev/null || {
  echo "link-order: needs valgrind (apt-get install valgrind)" >&2
  exit 1
}
source bench/lib.sh
TRACED=$(realpath "$BIN")
TRACES=$WORK/callgrind
mkdir -p "$TRACES"
# The services run under callgrind, one trace per process, named after
# the service (`bazaar serve <service> …`); the load runs as it is.
cat >"$WORK/under-callgrind" <<EOF
#!/bin/sh
exec valgrind -q --tool=callgrind --demangle=no --compress-strings=no --compress-pos=no \\
  --callgrind-out-file="$TRACES/\$2.%p" "$TRACED" "\$@"
EOF
chmod +x "$WORK/under-callgrind"
BIN=$WORK/under-callgrind START_TIMEOUT=120 serve_system
"$LOAD_BIN" load --gateway "$GW" --seconds 10 --rate 5 --stock 100000 2>/dev/null | grep '^load:' ||
  { echo "link-order: the load failed" >&2; exit 1; }
# callgrind writes a trace when its process exits.
for s in "${SERVICES[@]}"; do kill "${PID[$s]}"; done
for s in "${SERVICES[@]}"; do wait "${PID[$s]}" || true; done

# "service function" for each function of the binary a process ran.
for f in "$TRACES"/*; do
  s=$(basename "$f"); s=${s%%.*}
  awk -v bin="$TRACED" -v s="$s" '
    /^ob=/ { ob = substr($0, 4) }
    /^fn=/ && ob == bin { print s, substr($0, 4) }' "$f" | sort -u
done >"$WORK/ran"
[[ $(cut -d' ' -f1 "$WORK/ran" | sort -u | wc -l) -eq ${#SERVICES[@]} ]] ||
  { echo "link-order: not every service left a trace" >&2; exit 1; }
# Only the binary's own functions (callgrind names some it cannot see by
# address), each with the services that ran it: run by the most first,
# then grouped by the same set of services.
nm --defined-only "$TRACED" | awk '$2 ~ /^[tT]$/ { print $3 }' | sort -u >"$WORK/functions"
{
  echo "# The functions \`bazaar serve\` processes run, most shared first: the"
  echo "# layout of the release binary's code (crates/bazaar/build.rs)."
  echo "# Written by tools/link-order.sh; run it again after a rustc or dependency update."
  awk 'NR == FNR { known[$1] = 1; next }
       ($2 in known) { n[$2]++; set[$2] = set[$2] "," $1 }
       END { for (f in n) print n[f], set[f], f }' "$WORK/functions" "$WORK/ran" |
    sort -k1,1nr -k2,2 -k3,3 | cut -d' ' -f3
} >"$OUT"
echo "link-order: $(grep -vc '^#' "$OUT") functions written to $OUT"
