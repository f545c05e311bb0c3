#!/usr/bin/env bash
# bench/alloc.sh — allocating-write throughput of the image formats, in
# process (bench/raw_load.ts: blktap's driver stack, no front end): every
# run writes into a fresh, empty image, so almost every write allocates.
# The raw file (aio) is measured in the same run as the limit; qcow, qcow
# over a backing file and vmdk are reported as ratios against it.
#
#   usage: bench/alloc.sh [FORMAT...]   (default: raw qcow qcow-backed vmdk)
#   env:   REPS=3 SECONDS_PER_RUN=8 SIZE=16G WORK=/tmp/bench-alloc
#          OUT=bench/results/alloc-<date>.txt
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
DENO=${DENO:-$repo/.toolchain/node_modules/@deno/linux-x64-glibc/deno}
REPS=${REPS:-3}
SECONDS_PER_RUN=${SECONDS_PER_RUN:-8}
SIZE=${SIZE:-16G}
WORK=${WORK:-/tmp/bench-alloc}
FORMATS=("$@")
((${#FORMATS[@]})) || FORMATS=(raw qcow qcow-backed vmdk)
mkdir -p "$WORK" "$repo/bench/results"
OUT=${OUT:-$repo/bench/results/alloc-$(date -u +%Y%m%dT%H%M%SZ).txt}
blktap() { "$DENO" run --quiet --allow-all "$repo/main.ts" "$@"; }
size_mib=$(($(numfmt --from=iec "$SIZE") / 1048576))

fresh() { # FORMAT -> prints the TYPE:PATH of a new empty image
  rm -f "$WORK"/img.* "$WORK"/base.raw
  case $1 in
    raw) truncate -s "$SIZE" "$WORK/img.raw" && echo "aio:$WORK/img.raw" ;;
    qcow) blktap qcow-create "$size_mib" "$WORK/img.qcow" >/dev/null && echo "qcow:$WORK/img.qcow" ;;
    qcow-backed)
      truncate -s "$SIZE" "$WORK/base.raw"
      blktap qcow-create "$size_mib" "$WORK/img.qcow" "$WORK/base.raw" >/dev/null
      echo "qcow:$WORK/img.qcow" ;;
    vmdk) qemu-img create -q -f vmdk "$WORK/img.vmdk" "$SIZE" && echo "vmdk:$WORK/img.vmdk" ;;
    *) echo "unknown format $1" >&2; exit 2 ;;
  esac
}

{
  echo "# bench/alloc.sh $(date -u +%FT%TZ) $(git -C "$repo" rev-parse --short HEAD) load: $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "# in-process writes into a fresh ${SIZE} image, ${SECONDS_PER_RUN} s per run, final flush included"
} | tee "$OUT"
declare -A sum
for rep in $(seq "$REPS"); do
  for load in "randwrite 4096 32" "write 1048576 8"; do
    read -r rw bs depth <<<"$load"
    for fmt in "${FORMATS[@]}"; do
      image=$(fresh "$fmt")
      line=$(timeout 300 "$DENO" run --quiet --allow-all "$here/raw_load.ts" --image "$image" \
        --rw "$rw" --bs "$bs" --depth "$depth" --seconds "$SECONDS_PER_RUN")
      mbps=$(sed -E 's/.*MBps=([0-9.]+).*/\1/' <<<"$line")
      sum["$rw $fmt"]=$(awk -v a="${sum["$rw $fmt"]:-0}" -v b="$mbps" 'BEGIN { print a + b }')
      echo "rep $rep $rw bs=$bs depth=$depth $fmt $line" | tee -a "$OUT"
    done
  done
done
rm -f "$WORK"/img.* "$WORK"/base.raw
echo "# mean MB/s, and ratio against raw in the same runs" | tee -a "$OUT"
for rw in randwrite write; do
  raw=${sum["$rw raw"]:-}
  for fmt in "${FORMATS[@]}"; do
    mean=$(awk -v s="${sum["$rw $fmt"]}" -v n="$REPS" 'BEGIN { printf "%.1f", s / n }')
    ratio=$([[ -n $raw ]] && awk -v s="${sum["$rw $fmt"]}" -v r="$raw" 'BEGIN { printf "%.2f", s / r }' || echo "-")
    echo "$rw $fmt MBps=$mean ratio_vs_raw=$ratio" | tee -a "$OUT"
  done
done
