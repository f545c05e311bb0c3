#!/usr/bin/env bash
# bench/alloc.sh — allocating-write throughput of the image formats, in
# process (bench/raw_load.ts: blktap's driver stack, no front end): every
# run writes into a fresh, empty image, so almost every write allocates;
# the final flush is inside the measured time. The raw file (aio) is the
# limit, measured in the same run.
#
# With BASE=/path/to/another/checkout, each run is made on this tree and on
# BASE back to back, and the report gives this tree's throughput as a ratio
# of BASE's (before/after a change, on the same machine at the same time).
#
#   usage: bench/alloc.sh [FORMAT...]   (default: raw qcow qcow-backed vmdk)
#   env:   REPS=3 SECONDS_PER_RUN=8 SIZE=16G WORK=/tmp/bench-alloc BASE=
#          OUT=bench/results/alloc-<date>.txt
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
DENO=${DENO:-$repo/.toolchain/node_modules/@deno/linux-x64-glibc/deno}
REPS=${REPS:-3}
SECONDS_PER_RUN=${SECONDS_PER_RUN:-8}
SIZE=${SIZE:-16G}
WORK=${WORK:-/tmp/bench-alloc}
BASE=${BASE:-}
FORMATS=("$@")
((${#FORMATS[@]})) || FORMATS=(raw qcow qcow-backed vmdk)
TREES=("$repo")
[[ -n $BASE ]] && TREES+=("$BASE")
mkdir -p "$WORK" "$repo/bench/results"
OUT=${OUT:-$repo/bench/results/alloc-$(date -u +%Y%m%dT%H%M%SZ).txt}
size_mib=$(($(numfmt --from=iec "$SIZE") / 1048576))

fresh() { # TREE FORMAT -> prints the TYPE:PATH of a new empty image
  local blktap=("$DENO" run --quiet --allow-all "$1/main.ts")
  rm -f "$WORK"/img.* "$WORK"/base.raw
  case $2 in
    raw) truncate -s "$SIZE" "$WORK/img.raw" && echo "aio:$WORK/img.raw" ;;
    qcow) "${blktap[@]}" qcow-create "$size_mib" "$WORK/img.qcow" >/dev/null && echo "qcow:$WORK/img.qcow" ;;
    qcow-backed)
      truncate -s "$SIZE" "$WORK/base.raw"
      "${blktap[@]}" qcow-create "$size_mib" "$WORK/img.qcow" "$WORK/base.raw" >/dev/null
      echo "qcow:$WORK/img.qcow" ;;
    vmdk) qemu-img create -q -f vmdk "$WORK/img.vmdk" "$SIZE" && echo "vmdk:$WORK/img.vmdk" ;;
    *) echo "unknown format $2" >&2; exit 2 ;;
  esac
}

{
  echo "# bench/alloc.sh $(date -u +%FT%TZ) $(git -C "$repo" rev-parse --short HEAD)${BASE:+ vs $BASE} load: $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "# in-process writes into a fresh ${SIZE} image, ${SECONDS_PER_RUN} s per run, final flush included"
} | tee "$OUT"
declare -A sum
for rep in $(seq "$REPS"); do
  for load in "randwrite 4096 32" "write 1048576 8"; do
    read -r rw bs depth <<<"$load"
    for fmt in "${FORMATS[@]}"; do
      for t in "${!TREES[@]}"; do
        tree=${TREES[$t]}
        image=$(fresh "$tree" "$fmt")
        line=$(timeout 300 "$DENO" run --quiet --allow-all "$tree/bench/raw_load.ts" --image "$image" \
          --rw "$rw" --bs "$bs" --depth "$depth" --seconds "$SECONDS_PER_RUN")
        mbps=$(sed -E 's/.*MBps=([0-9.]+).*/\1/' <<<"$line")
        sum["$t $rw $fmt"]=$(awk -v a="${sum["$t $rw $fmt"]:-0}" -v b="$mbps" 'BEGIN { print a + b }')
        echo "rep $rep $rw bs=$bs depth=$depth $fmt $([[ $t == 0 ]] && echo this || echo base) $line" | tee -a "$OUT"
      done
    done
  done
done
rm -f "$WORK"/img.* "$WORK"/base.raw
echo "# mean MB/s; ratio against raw in the same runs${BASE:+; ratio of this tree to BASE}" | tee -a "$OUT"
for rw in randwrite write; do
  for fmt in "${FORMATS[@]}"; do
    for t in "${!TREES[@]}"; do
      mean=$(awk -v s="${sum["$t $rw $fmt"]}" -v n="$REPS" 'BEGIN { printf "%.1f", s / n }')
      raw=${sum["$t $rw raw"]:-}
      vs_raw=$([[ -n $raw ]] && awk -v s="${sum["$t $rw $fmt"]}" -v r="$raw" 'BEGIN { printf "%.2f", s / r }' || echo "-")
      extra=""
      if [[ $t == 0 && -n $BASE ]]; then
        extra=" vs_base=$(awk -v a="${sum["0 $rw $fmt"]}" -v b="${sum["1 $rw $fmt"]}" 'BEGIN { printf "%.2f", a / b }')"
      fi
      echo "$rw $fmt $([[ $t == 0 ]] && echo this || echo base) MBps=$mean ratio_vs_raw=$vs_raw$extra" | tee -a "$OUT"
    done
  done
done
