#!/usr/bin/env bash
# bench/convert.sh — `blktap img2qcow` vs `qemu-img convert -O qcow` and
# `-O qcow2`, same source, same method: a seeded 2 GiB raw image (~30%
# random data, ~12% written zeros, ~58% holes; ../shared/bench/mksparse.py),
# page cache warmed, the three converters alternated within every
# repetition, wall time per run, output size as `du` counts it, and each
# output checked identical to the source with `qemu-img compare`.
#
# Goals: img2qcow at least as fast as -O qcow (issue 3, must), no larger on
# disk than -O qcow, and at most the time of `qemu-img convert -O qcow2`
# followed by `sync` of its output (issue 10: the same durability, since
# img2qcow ends with fdatasync while qemu-img convert does not sync the data
# it wrote — strace: its fdatasync calls total under 1 ms). The plain qcow2
# time is page-cache speed. blktap-img2qcow-direct is `-t none` (O_DIRECT).
#
#   usage: bench/convert.sh [SRC.raw]
#   env:   REPS=5 WORK=/var/tmp/blktap-bench.<checkout> BLKTAP=./blktap CLIENT_CPUS= SKIP_QCOW=1 (leave out
#          the slow qemu-img -O qcow, ~11 s a run)
#          OUT=bench/results/convert-<date>.txt
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
# shellcheck source=bench/_shared_harness.sh
source "$here/_shared_harness.sh"
# shellcheck source=/dev/null
source "$SHARED/lib.sh"

SRC=${1:-$WORK/sparse.raw}
REPS=${REPS:-5}
BLKTAP=${BLKTAP:-$repo/blktap}
OUT=${OUT:-$repo/bench/results/convert-$(date -u +%Y%m%dT%H%M%S).txt}
mkdir -p "$(dirname "$OUT")"
[[ -x $BLKTAP ]] || { echo "build ./blktap first (make)" >&2; exit 2; }

if [[ ! -s $SRC ]]; then
  timeout 600 python3 "$SHARED/mksparse.py" "$SRC" 2048 0.30 0.10 42 >&2
fi
echo "# src $SRC: $(stat -c %s "$SRC") bytes, $(du -B1 "$SRC" | cut -f1) allocated" >&2
timeout 300 cat "$SRC" >/dev/null # warm page cache: measure the converters, not disk reads

declare -A CMD=(
  [blktap-img2qcow]="$BLKTAP img2qcow $WORK/conv.blktap.qcow $SRC"
  [blktap-img2qcow-direct]="$BLKTAP img2qcow -t none $WORK/conv.blktap-direct.qcow $SRC"
  [qemu-qcow]="qemu-img convert -f raw -O qcow $SRC $WORK/conv.qemu.qcow"
  [qemu-qcow2]="qemu-img convert -f raw -O qcow2 $SRC $WORK/conv.qemu.qcow2"
  [qemu-qcow2-sync]="sh -c 'qemu-img convert -f raw -O qcow2 $SRC $WORK/conv.qemu-sync.qcow2 && sync $WORK/conv.qemu-sync.qcow2'"
)
declare -A OUTFILE=(
  [blktap-img2qcow]=$WORK/conv.blktap.qcow
  [blktap-img2qcow-direct]=$WORK/conv.blktap-direct.qcow
  [qemu-qcow]=$WORK/conv.qemu.qcow
  [qemu-qcow2]=$WORK/conv.qemu.qcow2
  [qemu-qcow2-sync]=$WORK/conv.qemu-sync.qcow2
)
declare -A FMT=([blktap-img2qcow]=qcow [blktap-img2qcow-direct]=qcow [qemu-qcow]=qcow [qemu-qcow2]=qcow2
  [qemu-qcow2-sync]=qcow2)
ORDER=(blktap-img2qcow blktap-img2qcow-direct qemu-qcow2 qemu-qcow2-sync)
[[ ${SKIP_QCOW:-0} == 1 ]] || ORDER+=(qemu-qcow)
declare -A TIMES

for ((rep = 0; rep < REPS; rep++)); do
  for name in "${ORDER[@]}"; do
    rm -f "${OUTFILE[$name]}"
    sync
    t0=$EPOCHREALTIME
    pin_client timeout 300 bash -c "${CMD[$name]}" >/dev/null
    t1=$EPOCHREALTIME
    TIMES[$name]+="$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.6f", b - a }') "
  done
done

median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

{
  echo "# bench/convert.sh $(date -u +%FT%TZ) reps=$REPS load average $(cut -d' ' -f1-3 /proc/loadavg) src=$SRC"
  for name in "${ORDER[@]}"; do
    out=${OUTFILE[$name]}
    same=differ
    timeout 300 qemu-img compare -q -f raw -F "${FMT[$name]}" "$SRC" "$out" && same=identical
    med=$(echo "${TIMES[$name]}" | median)
    echo "convert tool=$name median_s=$med runs=\"${TIMES[$name]% }\" out_bytes_alloc=$(du -B1 "$out" | cut -f1) compare=$same"
  done
  b=$(echo "${TIMES[blktap-img2qcow]}" | median)
  q2s=$(echo "${TIMES[qemu-qcow2-sync]}" | median)
  echo "ratio blktap/qemu-qcow2-sync=$(awk -v a="$b" -v b="$q2s" 'BEGIN { printf "%.4f", a / b }') (goal <= 1)"
  if [[ -n ${TIMES[qemu-qcow]:-} ]]; then
    q=$(echo "${TIMES[qemu-qcow]}" | median)
    echo "ratio blktap/qemu-qcow=$(awk -v a="$b" -v b="$q" 'BEGIN { printf "%.4f", a / b }') (must be <= 1)"
  fi
} | tee "$OUT"
python3 "$here/summary.py" convert "$OUT" | tee "$OUT.summary"
rm -f "$WORK"/conv.*
