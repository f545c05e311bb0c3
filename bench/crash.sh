#!/usr/bin/env bash
# bench/crash.sh — the crash simulator at scale: POINTS crash points per
# layout of FORMAT (every write I/O of seeded workloads; see
# tests/_helpers/crash_sim.ts), spread over JOBS worker processes.
#
#   usage: bench/crash.sh [FORMAT] [POINTS]
#          FORMAT: qcow, qcow2, vmdk or vhd (all layouts of the format), or
#          one layout: qcow-blktap qcow-backed qcow-qemu qcow2-v3 qcow2-small
#          qcow2-v2 qcow2-backed vmdk-preallocated vmdk-on-demand vhd-dynamic
#          vhd-dynamic-small vhd-diff-raw vhd-diff-vhd vhd-fixed (default:
#          qcow); POINTS per layout (default 1000000)
#   env:   JOBS=$(nproc) SEED=1 QEMU_EVERY=50 (qemu-img check/compare on every
#          n-th point; 1 for all of them) OUT=bench/results/crash-<date>.txt
# Exit 1 at the first violation, with the seed that replays it.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
DENO=${DENO:-$repo/.toolchain/node_modules/@deno/linux-x64-glibc/deno}
FORMAT=${1:-qcow}
POINTS=${2:-1000000}
JOBS=${JOBS:-$(nproc)}
SEED=${SEED:-1}
QEMU_EVERY=${QEMU_EVERY:-50}
mkdir -p "$repo/bench/results"
OUT=${OUT:-$repo/bench/results/crash-$(date -u +%Y%m%dT%H%M%SZ).txt}
case $FORMAT in
  qcow) LAYOUTS=(qcow-blktap qcow-backed qcow-qemu) ;;
  qcow2) LAYOUTS=(qcow2-v3 qcow2-small qcow2-v2 qcow2-backed) ;;
  vmdk) LAYOUTS=(vmdk-preallocated vmdk-on-demand) ;;
  vhd) LAYOUTS=(vhd-dynamic-small vhd-diff-raw vhd-diff-vhd vhd-dynamic vhd-fixed) ;;
  *) LAYOUTS=("$FORMAT") ;;
esac
echo "# bench/crash.sh $FORMAT $POINTS points per layout, $JOBS jobs, seeds from $SEED, qemu every $QEMU_EVERY; load $(cut -d' ' -f1-3 /proc/loadavg)" | tee "$OUT"
status=0
for layout in "${LAYOUTS[@]}"; do
  started=$(date +%s)
  per_job=$(((POINTS + JOBS - 1) / JOBS))
  pids=()
  for job in $(seq 0 $((JOBS - 1))); do
    # Seeds of job j: SEED + j * 1000000 upwards (disjoint, replayable).
    "$DENO" run --quiet --allow-all "$here/crash_run.ts" --format "$layout" --points "$per_job" \
      --seed $((SEED + job * 1000000)) --qemu-every "$QEMU_EVERY" >>"$OUT.$layout.$job" &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid" || status=1; done
  seconds=$(($(date +%s) - started))
  points=$(cat "$OUT.$layout".* | python3 -c 'import sys, json; print(sum(json.loads(l)["points"] for l in sys.stdin if l.startswith("{")))')
  qemu=$(cat "$OUT.$layout".* | python3 -c 'import sys, json; print(sum(json.loads(l)["qemuChecked"] for l in sys.stdin if l.startswith("{")))')
  cat "$OUT.$layout".* >>"$OUT" && rm -f "$OUT.$layout".*
  echo "$layout: $points crash points, $qemu by QEMU, ${seconds} s ($(awk -v p="$points" -v s="$seconds" 'BEGIN { printf "%.0f", p / (s > 0 ? s : 1) }') points/s)$([[ $status == 0 ]] || echo ", FAILED")" | tee -a "$OUT"
done
exit $status
