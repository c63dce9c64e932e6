#!/usr/bin/env bash
# Profiles one process of the benchmark stack while a phase of scripts/bench.sh
# runs at its maximum (by hand, never in CI):
#
#   scripts/profile.sh track1            # the gateway during usage/track, 1 event
#   scripts/profile.sh consume worker    # the worker during credits/consume
#
# perf samples the process for PROFILE_SECONDS (8) from the 4th second of the
# phase's closed loop (cpu-clock; call graphs by DWARF unwinding, since the
# release build keeps debug info but no frame pointers). Writes
# target/bench/profile-PHASE-PROCESS.{data,txt}: the flat profile (self time)
# and the inclusive one (children), the lists the docs' "where the time goes"
# come from. `perf script -i …data | inferno-flamegraph > f.svg` draws it.
set -euo pipefail
cd "$(dirname "$0")/.."
PHASE=${1:?usage: scripts/profile.sh PHASE [gateway|worker]}
PROC=${2:-gateway}
SECS=${PROFILE_SECONDS:-8}
command -v perf >/dev/null || { echo "profile: perf is not installed (apt install linux-perf)" >&2; exit 1; }
mkdir -p target/bench
OUT="target/bench/profile-$PHASE-$PROC"
BENCH_PHASES=$PHASE BENCH_SECONDS=$((SECS + 6)) scripts/bench.sh >"$OUT.bench.log" 2>&1 &
BENCH=$!
for _ in $(seq 3000); do
  pgrep -f "loadgen.*--scenario $PHASE" >/dev/null && break
  kill -0 "$BENCH" 2>/dev/null || { echo "profile: the bench ended early, see $OUT.bench.log" >&2; exit 1; }
  sleep 0.2
done
sleep 3
case $PROC in
  gateway) PID=$(pgrep -f "release/gateway$" | head -1) ;;
  worker) PID=$(pgrep -f "release/worker run" | head -1) ;;
  *) echo "profile: gateway or worker" >&2; exit 2 ;;
esac
perf record -F 499 --call-graph dwarf,16384 -p "$PID" -o "$OUT.data" -- sleep "$SECS" >/dev/null 2>&1
wait "$BENCH" || true
report() { perf report -i "$OUT.data" "$@" --sort symbol --stdio -g none 2>/dev/null | grep '%' | cut -c1-200 || true; }
set +o pipefail # head closes perf report's pipe early
{
  echo "# $PROC during the $PHASE closed loop: self time"
  report --no-children | head -60
  echo
  echo "# inclusive time (children) of the project's and its clients' functions"
  report --children | grep -E "\] (gateway|worker|common)::|PipelineSink|\] lapin::|\] sqlx|Dispatcher<D,Bs,I,T>::poll_(read|write|flush)" | head -60
} >"$OUT.txt"
echo "profile: $OUT.txt (raw: $OUT.data)"
