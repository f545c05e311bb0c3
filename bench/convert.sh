#!/usr/bin/env bash
# bench/convert.sh — `blktap img2qcow` vs `qemu-img convert -O qcow` and
# `-O qcow2`, same source, same method: a seeded 2 GiB raw image (~30%
# random data, ~12% written zeros, ~58% holes; ../shared/bench/mksparse.py),
# page cache warmed, the three converters alternated within every
# repetition, wall time per run, output size as `du` counts it, and each
# output checked identical to the source with `qemu-img compare`.
#
# Goals (issue 3): img2qcow at least as fast as -O qcow (must), within 2x of
# -O qcow2 (goal), no larger on disk than -O qcow. img2qcow ends with
# fdatasync (its output is durable); qemu-img convert does not sync the data
# it wrote (strace: its fdatasync calls total under 1 ms), so the qcow2 time
# is page-cache speed. blktap-img2qcow-direct is `-t none` (O_DIRECT).
#
#   usage: bench/convert.sh [SRC.raw]
#   env:   REPS=5 WORK=/tmp/bench-work BLKTAP=./blktap CLIENT_CPUS=
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
)
declare -A OUTFILE=(
  [blktap-img2qcow]=$WORK/conv.blktap.qcow
  [blktap-img2qcow-direct]=$WORK/conv.blktap-direct.qcow
  [qemu-qcow]=$WORK/conv.qemu.qcow
  [qemu-qcow2]=$WORK/conv.qemu.qcow2
)
declare -A FMT=([blktap-img2qcow]=qcow [blktap-img2qcow-direct]=qcow [qemu-qcow]=qcow [qemu-qcow2]=qcow2)
ORDER=(blktap-img2qcow blktap-img2qcow-direct qemu-qcow qemu-qcow2)
declare -A TIMES

for ((rep = 0; rep < REPS; rep++)); do
  for name in "${ORDER[@]}"; do
    rm -f "${OUTFILE[$name]}"
    sync
    t0=$EPOCHREALTIME
    pin_client timeout 300 ${CMD[$name]} >/dev/null
    t1=$EPOCHREALTIME
    TIMES[$name]+="$(echo "$t1 - $t0" | bc -l) "
  done
done

median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

{
  echo "# bench/convert.sh $(date -u +%FT%TZ) reps=$REPS load1=$(load1) src=$SRC"
  for name in "${ORDER[@]}"; do
    out=${OUTFILE[$name]}
    same=differ
    timeout 300 qemu-img compare -q -f raw -F "${FMT[$name]}" "$SRC" "$out" && same=identical
    med=$(echo "${TIMES[$name]}" | median)
    echo "convert tool=$name median_s=$med runs=\"${TIMES[$name]% }\" out_bytes_alloc=$(du -B1 "$out" | cut -f1) compare=$same"
  done
  b=$(echo "${TIMES[blktap-img2qcow]}" | median)
  q=$(echo "${TIMES[qemu-qcow]}" | median)
  q2=$(echo "${TIMES[qemu-qcow2]}" | median)
  echo "ratio blktap/qemu-qcow=$(echo "$b / $q" | bc -l | cut -c1-6) (must be <= 1)"
  echo "ratio blktap/qemu-qcow2=$(echo "$b / $q2" | bc -l | cut -c1-6) (goal <= 2)"
  echo "du blktap=$(du -B1 "${OUTFILE[blktap-img2qcow]}" | cut -f1) qemu-qcow=$(du -B1 "${OUTFILE[qemu-qcow]}" | cut -f1) qemu-qcow2=$(du -B1 "${OUTFILE[qemu-qcow2]}" | cut -f1)"
} | tee "$OUT"
rm -f "$WORK"/conv.*
