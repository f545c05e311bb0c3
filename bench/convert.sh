#!/usr/bin/env bash
# bench/convert.sh — image conversion against qemu-img, same source, same
# method: a seeded 2 GiB raw image (~30% random data, ~12% written zeros,
# ~58% holes; ../shared/bench/mksparse.py), page cache warmed, the tools
# alternated within every repetition, wall time per run, output size as
# `du` counts it, and each output checked identical to the source with
# `qemu-img compare`.
#
# Section img2qcow: `blktap img2qcow` vs `qemu-img convert -O qcow` and
# `-O qcow2`. Goals: img2qcow at least as fast as -O qcow (issue 3, must),
# no larger on disk than -O qcow, and at most the time of `qemu-img convert
# -O qcow2` followed by `sync` of its output (issue 10: the same durability,
# since img2qcow ends with fdatasync while qemu-img convert does not sync
# the data it wrote — strace: its fdatasync calls total under 1 ms). The
# plain qcow2 time is page-cache speed. blktap-img2qcow-direct is `-t none`.
#
# Section pairs (issue 11): `blktap convert` vs `qemu-img convert` followed
# by `sync -d` of its output (the same durability: blktap convert
# fdatasyncs before it exits), for raw->qcow2, qcow2->raw, raw->vhd,
# vhd->qcow2 (and vhd->raw, raw->vmdk for reference). Each pair's source is
# made once by qemu-img from the raw image. Goal: ratio <= 1.0 (the median
# of per-repetition ratios; the ratio of medians is printed too). Pairs
# with a format this blktap cannot create are reported as skipped.
#
#   usage: bench/convert.sh [SRC.raw]
#   env:   REPS=5 WORK=/var/tmp/blktap-bench.<checkout> BLKTAP=./blktap CLIENT_CPUS=
#          SKIP_QCOW=1 (leave out the slow qemu-img -O qcow, ~11 s a run)
#          SECTIONS="img2qcow pairs" PAIRS="raw:qcow2 qcow2:raw raw:vhd vhd:qcow2 ..."
#          OUT=bench/results/convert-<date>.txt
#          BASE=/path/to/another/checkout (pairs: its blktap convert runs beside this
#          tree's in every repetition; prints its ratio to qemu and this tree / BASE)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
# shellcheck source=bench/_shared_harness.sh
source "$here/_shared_harness.sh"
# shellcheck source=/dev/null
source "$SHARED/lib.sh"

SRC=${1:-$WORK/sparse.raw}
REPS=${REPS:-5}
SECTIONS=${SECTIONS:-img2qcow pairs}
PAIRS=${PAIRS:-raw:qcow2 qcow2:raw raw:vhd vhd:qcow2 vhd:raw raw:vmdk}
BLKTAP=${BLKTAP:-$repo/blktap}
BASE=${BASE:-}
[[ -z $BASE || -x $BASE/blktap ]] || { echo "BASE=$BASE has no ./blktap (make there first)" >&2; exit 2; }
OUT=${OUT:-$repo/bench/results/convert-$(date -u +%Y%m%dT%H%M%S).txt}
mkdir -p "$(dirname "$OUT")"
[[ -x $BLKTAP ]] || { echo "build ./blktap first (make)" >&2; exit 2; }

if [[ ! -s $SRC ]]; then
  timeout 600 python3 "$SHARED/mksparse.py" "$SRC" 2048 0.30 0.10 42 >&2
fi
echo "# src $SRC: $(stat -c %s "$SRC") bytes, $(du -B1 "$SRC" | cut -f1) allocated" >&2
timeout 300 cat "$SRC" >/dev/null # warm page cache: measure the converters, not disk reads

median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.6f", b - a }'; }
divide() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.4f", a / b }'; }

section_img2qcow() {
  local -A CMD=(
    [blktap-img2qcow]="$BLKTAP img2qcow $WORK/conv.blktap.qcow $SRC"
    [blktap-img2qcow-direct]="$BLKTAP img2qcow -t none $WORK/conv.blktap-direct.qcow $SRC"
    [qemu-qcow]="qemu-img convert -f raw -O qcow $SRC $WORK/conv.qemu.qcow"
    [qemu-qcow2]="qemu-img convert -f raw -O qcow2 $SRC $WORK/conv.qemu.qcow2"
    [qemu-qcow2-sync]="sh -c 'qemu-img convert -f raw -O qcow2 $SRC $WORK/conv.qemu-sync.qcow2 && sync $WORK/conv.qemu-sync.qcow2'"
  )
  local -A OUTFILE=(
    [blktap-img2qcow]=$WORK/conv.blktap.qcow
    [blktap-img2qcow-direct]=$WORK/conv.blktap-direct.qcow
    [qemu-qcow]=$WORK/conv.qemu.qcow
    [qemu-qcow2]=$WORK/conv.qemu.qcow2
    [qemu-qcow2-sync]=$WORK/conv.qemu-sync.qcow2
  )
  local -A FMT=([blktap-img2qcow]=qcow [blktap-img2qcow-direct]=qcow [qemu-qcow]=qcow [qemu-qcow2]=qcow2
    [qemu-qcow2-sync]=qcow2)
  local -a ORDER=(blktap-img2qcow blktap-img2qcow-direct qemu-qcow2 qemu-qcow2-sync)
  [[ ${SKIP_QCOW:-0} == 1 ]] || ORDER+=(qemu-qcow)
  local -A TIMES
  local rep name t0 t1 out same med b q q2s
  for ((rep = 0; rep < REPS; rep++)); do
    for name in "${ORDER[@]}"; do
      rm -f "${OUTFILE[$name]}"
      sync
      t0=$EPOCHREALTIME
      pin_client timeout 300 bash -c "${CMD[$name]}" >/dev/null
      t1=$EPOCHREALTIME
      TIMES[$name]+="$(elapsed "$t0" "$t1") "
    done
  done
  for name in "${ORDER[@]}"; do
    out=${OUTFILE[$name]}
    same=differ
    timeout 300 qemu-img compare -q -f raw -F "${FMT[$name]}" "$SRC" "$out" && same=identical
    med=$(echo "${TIMES[$name]}" | median)
    echo "convert tool=$name median_s=$med runs=\"${TIMES[$name]% }\" out_bytes_alloc=$(du -B1 "$out" | cut -f1) compare=$same"
  done
  b=$(echo "${TIMES[blktap-img2qcow]}" | median)
  q2s=$(echo "${TIMES[qemu-qcow2-sync]}" | median)
  echo "ratio blktap/qemu-qcow2-sync=$(divide "$b" "$q2s") (goal <= 1)"
  if [[ -n ${TIMES[qemu-qcow]:-} ]]; then
    q=$(echo "${TIMES[qemu-qcow]}" | median)
    echo "ratio blktap/qemu-qcow=$(divide "$b" "$q") (must be <= 1)"
  fi
}

# qemu-img's name of a format, and whether this blktap can create it.
qfmt() { case $1 in vhd) echo vpc ;; *) echo "$1" ;; esac; }
can_create() { rm -f "$WORK/probe.$1"; "$BLKTAP" create -q -f "$1" "$WORK/probe.$1" 1M >/dev/null 2>&1 && rm -f "$WORK/probe.$1"; }
src_of() { if [[ $1 == raw ]]; then echo "$SRC"; else echo "$WORK/pair-src.$1"; fi; }

# Median of per-repetition ratios and ratio of medians of tools $1 / $2 (pair in $pair).
ratios() {
  local r
  r=$(paste -d' ' <(echo "${PT[$pair.$1]}" | tr ' ' '\n' | grep -v '^$') \
    <(echo "${PT[$pair.$2]}" | tr ' ' '\n' | grep -v '^$') | awk '{ printf "%.6f ", $1 / $2 }' | median)
  echo "ratio_median_of_reps=$(divide "$r" 1) ratio_of_medians=$(divide "$(echo "${PT[$pair.$1]}" | median)" "$(echo "${PT[$pair.$2]}" | median)")"
}

section_pairs() {
  local -A PT
  local pair from to name rep out t0 t1 b q same tool
  local -a RUN=() TOOLS=(blktap qemu)
  [[ -n $BASE ]] && TOOLS+=(base)
  for pair in $PAIRS; do
    from=${pair%%:*} to=${pair##*:}
    if ! can_create "$from" || ! can_create "$to"; then
      echo "pair $from->$to skipped: blktap cannot create $(can_create "$from" && echo "$to" || echo "$from") images on this branch"
      continue
    fi
    if [[ $from != raw && ! -s $WORK/pair-src.$from ]]; then
      timeout 600 qemu-img convert -f raw -O "$(qfmt "$from")" "$SRC" "$WORK/pair-src.$from"
    fi
    RUN+=("$pair")
  done
  for ((rep = 0; rep < REPS; rep++)); do
    for pair in "${RUN[@]}"; do
      from=${pair%%:*} to=${pair##*:}
      for name in "${TOOLS[@]}"; do
        out=$WORK/conv.pair.$name.$from-$to
        rm -f "$out"
        sync
        t0=$EPOCHREALTIME
        if [[ $name != qemu ]]; then
          tool=$BLKTAP
          [[ $name == base ]] && tool=$BASE/blktap
          pin_client timeout 600 "$tool" convert -f "$from" -O "$to" "$(src_of "$from")" "$out" >/dev/null
        else
          pin_client timeout 600 qemu-img convert -f "$(qfmt "$from")" -O "$(qfmt "$to")" "$(src_of "$from")" "$out"
          pin_client timeout 600 sync -d "$out"
        fi
        t1=$EPOCHREALTIME
        PT[$pair.$name]+="$(elapsed "$t0" "$t1") "
      done
    done
  done
  for pair in "${RUN[@]}"; do
    from=${pair%%:*} to=${pair##*:}
    b=$(echo "${PT[$pair.blktap]}" | median)
    q=$(echo "${PT[$pair.qemu]}" | median)
    same=differ
    timeout 300 qemu-img compare -q -f raw -F "$(qfmt "$to")" "$SRC" "$WORK/conv.pair.blktap.$from-$to" && same=identical
    [[ -n $BASE ]] && echo "pair $from->$to base=$BASE $(ratios base qemu) $(ratios blktap base | sed 's/ratio_/tree_over_base_/g') base_runs=\"${PT[$pair.base]% }\""
    echo "pair $from->$to $(ratios blktap qemu) blktap_median_s=$b qemu_sync_median_s=$q blktap_runs=\"${PT[$pair.blktap]% }\" qemu_runs=\"${PT[$pair.qemu]% }\" du_blktap=$(du -B1 "$WORK/conv.pair.blktap.$from-$to" | cut -f1) du_qemu=$(du -B1 "$WORK/conv.pair.qemu.$from-$to" | cut -f1) compare=$same (goal ratio <= 1.0)"
  done
}

{
  echo "# bench/convert.sh $(date -u +%FT%TZ) reps=$REPS load average $(cut -d' ' -f1-3 /proc/loadavg) src=$SRC sections=\"$SECTIONS\""
  for section in $SECTIONS; do "section_$section"; done
  echo "# load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
} | tee "$OUT"
python3 "$here/summary.py" convert "$OUT" | tee "$OUT.summary"
rm -f "$WORK"/conv.* "$WORK"/pair-src.*
