#!/usr/bin/env bash
# bench/nbd.sh — blktap's NBD paths vs qemu-nbd and nbdkit (and fio on the
# bare file), same image file, same client (fio's nbd engine), servers
# alternated within each repetition (in reverse order on even ones).
# Issue 10's table: ratios, not times.
#
# Configs (label: what serves):
#   O_DIRECT, raw image
#     blktap-ctrl-none      blktap ctrl: NBD -> ring -> disk process (the product path)
#     blktap-none           blktap serve: NBD + in-process driver, no ring
#     qemu-nbd-none-native  qemu-nbd --cache=none --aio=native
#     nbdkit-file-none      nbdkit file cache=none (no O_DIRECT: fadvise, reads hit the page cache)
#     fio-direct            fio libaio O_DIRECT on the bare file (the limit)
#   O_DIRECT, qcow (v1) image converted from the raw one
#     blktap-ctrl-qcow-none qemu-nbd-qcow-none-native
#   qcow2 (O_DIRECT, and page cache with -writeback): the same image under both servers
#     blktap-ctrl-qcow2-none       qemu-nbd-qcow2-none-native   converted from the raw one
#     blktap-ctrl-qcow2fresh-none  qemu-nbd-qcow2fresh-none-native   a new empty qcow2 of
#       QCOW2_FRESH_SIZE (64G) per server start: the writes allocate clusters (4 KiB random
#       into 64 KiB clusters; 1 MiB sequential); its reads read holes
#     blktap-ctrl-qcow2-writeback  qemu-nbd-qcow2-writeback  (and the same with qcow2fresh)
#   page cache (writeback), raw image
#     blktap-ctrl-writeback blktap-writeback (serve)  qemu-nbd-writeback  nbdkit-file-default
#
# Every line carries, besides fio's numbers: cpu_us_per_req (user+system of
# all server processes — ctrl and its disk processes together — over the
# measured seconds, divided by the requests fio counted), rss_peak_kib of
# each server process (VmHWM: the peak since it started, read after the
# workload), and the load average.
#
#   usage: bench/nbd.sh [CONFIG...]   (default: every config above)
#   env:   ONLY_WORKLOADS="randwrite seqwrite" (a subset of randread randwrite seqread seqwrite)
#          REPS=3 RUNTIME=8 RAMP=2 IMG=$WORK/base.raw QCOW=$WORK/base.qcow SIZE=2G
#          QCOW2=$WORK/base.qcow2 QCOW2_FRESH_SIZE=64G
#          SERVER_CPUS= CLIENT_CPUS= (taskset lists; default: no pinning, so ctrl and
#          its disk process may use both cores, as qemu-nbd's threads may)
#          WORK=/var/tmp/blktap-bench.<checkout> OUT=bench/results/nbd-<date>.txt BLKTAP_EXE=
#          BASE=/path/to/another/checkout: a config named base-CONFIG runs CONFIG on BASE's
#          sources, so a change is measured against its base in the same run (the summary
#          prints this tree / BASE per cell)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
# shellcheck source=bench/_shared_harness.sh
source "$here/_shared_harness.sh"
export SERVER_CPUS=${SERVER_CPUS-} CLIENT_CPUS=${CLIENT_CPUS-}
# shellcheck source=/dev/null
source "$SHARED/lib.sh"
# shellcheck source=bench/_procs.sh
source "$here/_procs.sh"
trap 'stop_all_servers' EXIT INT TERM

REPS=${REPS:-3}
RUNTIME=${RUNTIME:-8} RAMP=${RAMP:-2}
IMG=${IMG:-$WORK/base.raw}
QCOW=${QCOW:-$WORK/base.qcow}
QCOW2=${QCOW2:-$WORK/base.qcow2}
QCOW2_FRESH=$WORK/fresh.qcow2
QCOW2_FRESH_SIZE=${QCOW2_FRESH_SIZE:-64G}
SIZE=${SIZE:-2G}
SOCK=$WORK/nbd.sock
DENO=${DENO:-$repo/.toolchain/node_modules/@deno/linux-x64-glibc/deno}
mkdir -p "$repo/bench/results"
OUT=${OUT:-$repo/bench/results/nbd-$(date -u +%Y%m%dT%H%M%SZ).txt}
CONFIGS=("$@")
((${#CONFIGS[@]})) || CONFIGS=(blktap-ctrl-none blktap-none qemu-nbd-none-native nbdkit-file-none fio-direct
  blktap-ctrl-qcow-none qemu-nbd-qcow-none-native
  blktap-ctrl-qcow2-none qemu-nbd-qcow2-none-native blktap-ctrl-qcow2fresh-none qemu-nbd-qcow2fresh-none-native
  blktap-ctrl-writeback blktap-writeback qemu-nbd-writeback nbdkit-file-default)
for tool in fio nbdinfo qemu-nbd qemu-img nbdkit; do
  command -v "$tool" >/dev/null || { echo "missing $tool (make deps)" >&2; exit 2; }
done

if [[ ! -s $IMG ]]; then
  echo "# creating $IMG ($SIZE, random data, fully allocated)" >&2
  timeout 600 dd if=/dev/urandom of="$IMG" bs=1M count=$(($(numfmt --from=iec "$SIZE") / 1048576)) status=none
  sync
fi
if [[ " ${CONFIGS[*]} " == *qcow2-* && ! -s $QCOW2 ]]; then
  echo "# creating $QCOW2 (qcow2, every cluster allocated, from $IMG)" >&2
  timeout 900 qemu-img convert -f raw -O qcow2 "$IMG" "$QCOW2"
  sync
fi
if [[ " ${CONFIGS[*]} " == *qcow-* && ! -s $QCOW ]]; then
  echo "# creating $QCOW (qcow v1, every cluster allocated, from $IMG)" >&2
  timeout 900 qemu-img convert -f raw -O qcow "$IMG" "$QCOW"
  sync
fi

# The sources through deno (always current); BLKTAP_EXE=/path/to/blktap to measure a build.
if [[ -n ${BLKTAP_EXE:-} ]]; then BLKTAP=("$BLKTAP_EXE"); else BLKTAP=("$DENO" run --quiet --allow-all "$repo/main.ts"); fi

CTRL_RUN=$WORK/blktap-ctrl-run
start_ctrl() { # CONFIG SPEC CACHE: ctrl (ring + disk process) serving SPEC as export "bench"
  rm -rf "$CTRL_RUN"; mkdir -m 700 -p "$CTRL_RUN" # ctrl refuses a run dir others can reach
  start_server "$1" "$CTRL_RUN/nbd.sock" "${RUN_BLKTAP[@]}" ctrl --run-dir "$CTRL_RUN" --shm-dir "$CTRL_RUN" --log-level warn
  timeout 60 "${RUN_BLKTAP[@]}" create "$2" --name bench --cache "$3" --run-dir "$CTRL_RUN" >/dev/null
  CFG_SOCK=$CTRL_RUN/nbd.sock CFG_EXPORT=bench
}

qcow2_image() { # CONFIG -> the qcow2 it serves: a new empty one for *qcow2fresh*
  if [[ $1 == *qcow2fresh* ]]; then
    rm -f "$QCOW2_FRESH"
    qemu-img create -q -f qcow2 "$QCOW2_FRESH" "$QCOW2_FRESH_SIZE"
    echo "$QCOW2_FRESH"
  else
    echo "$QCOW2"
  fi
}

start_cfg() { # CONFIG -> sets SERVER_PID (0 for fio-direct), CFG_SOCK, CFG_EXPORT
  CFG_SOCK=$SOCK CFG_EXPORT=""
  local cfg=$1
  RUN_BLKTAP=("${BLKTAP[@]}")
  if [[ $cfg == base-* ]]; then
    [[ -f ${BASE:-}/main.ts ]] || { echo "$cfg: BASE=${BASE:-} is not a checkout" >&2; return 1; }
    RUN_BLKTAP=("$DENO" run --quiet --allow-all "$BASE/main.ts")
    cfg=${cfg#base-}
  fi
  case $cfg in
    fio-direct) SERVER_PID=0 ;;
    blktap-ctrl-none)      start_ctrl "$1" "aio:$IMG" none ;;
    blktap-ctrl-qcow-none) start_ctrl "$1" "qcow:$QCOW" none ;;
    blktap-ctrl-writeback) start_ctrl "$1" "aio:$IMG" writeback ;;
    blktap-ctrl-qcow2*-none)      start_ctrl "$1" "qcow2:$(qcow2_image "$1")" none ;;
    blktap-ctrl-qcow2*-writeback) start_ctrl "$1" "qcow2:$(qcow2_image "$1")" writeback ;;
    qemu-nbd-qcow2*-none-native)  start_server "$1" "$SOCK" qemu-nbd -f qcow2 --cache=none --aio=native -t -e 8 -k "$SOCK" "$(qcow2_image "$1")" ;;
    qemu-nbd-qcow2*-writeback)    start_server "$1" "$SOCK" qemu-nbd -f qcow2 -t -e 8 -k "$SOCK" "$(qcow2_image "$1")" ;;
    blktap-none)          start_server "$1" "$SOCK" "${RUN_BLKTAP[@]}" serve "aio:$IMG" --socket "$SOCK" --cache none ;;
    # Page cache: the sync engine (pread/pwrite on the JavaScript thread).
    blktap-writeback)     start_server "$1" "$SOCK" "${RUN_BLKTAP[@]}" serve "sync:$IMG" --socket "$SOCK" --cache writeback ;;
    qemu-nbd-none-native) start_server "$1" "$SOCK" qemu-nbd -f raw --cache=none --aio=native -t -e 8 -k "$SOCK" "$IMG" ;;
    qemu-nbd-qcow-none-native) start_server "$1" "$SOCK" qemu-nbd -f qcow --cache=none --aio=native -t -e 8 -k "$SOCK" "$QCOW" ;;
    qemu-nbd-writeback)   start_server "$1" "$SOCK" qemu-nbd -f raw -t -e 8 -k "$SOCK" "$IMG" ;;
    nbdkit-file-none)     start_server "$1" "$SOCK" nbdkit -f -U "$SOCK" file "$IMG" cache=none ;;
    nbdkit-file-default)  start_server "$1" "$SOCK" nbdkit -f -U "$SOCK" file "$IMG" ;;
    *) echo "unknown config $1" >&2; return 1 ;;
  esac
}

# name rw bs qd dir
WORKLOADS=(
  "randread  randread  4k 32 read"
  "randwrite randwrite 4k 32 write"
  "seqread   read      1M 8  read"
  "seqwrite  write     1M 8  write"
)
if [[ -n ${ONLY_WORKLOADS:-} ]]; then
  chosen=()
  for w in "${WORKLOADS[@]}"; do [[ " $ONLY_WORKLOADS " == *" ${w%% *} "* ]] && chosen+=("$w"); done
  ((${#chosen[@]})) || { echo "ONLY_WORKLOADS=$ONLY_WORKLOADS: none of randread randwrite seqread seqwrite" >&2; exit 2; }
  WORKLOADS=("${chosen[@]}")
fi

# run_workload LABEL ROOT_PID name rw bs qd dir: one fio run, CPU of the server tree after the ramp.
run_workload() {
  local label=$1 root=$2 name=$3 rw=$4 bs=$5 qd=$6 dir=$7 out fpid t0 t1 c0 c1 target
  out=$(mktemp "$WORK/fio.XXXXXX.json")
  if [[ $label == fio-direct ]]; then
    target=(--ioengine=libaio --direct=1 --filename="$IMG")
  else
    target=(--ioengine=nbd --uri="nbd+unix:///${CFG_EXPORT}?socket=${CFG_SOCK}" --filename=nbd)
  fi
  pin_client timeout $((RUNTIME + RAMP + 60)) fio --name="$name" "${target[@]}" \
    --rw="$rw" --bs="$bs" --iodepth="$qd" --size="$SIZE" --time_based --runtime="$RUNTIME" \
    --ramp_time="$RAMP" --norandommap --randrepeat=0 --output-format=json >"$out" 2>&1 &
  fpid=$!
  sleep "$RAMP"
  c0=$(tree_cpu_ticks "$root"); t0=$EPOCHREALTIME
  wait "$fpid" || echo "# fio failed: $(tail -3 "$out")" >&2
  c1=$(tree_cpu_ticks "$root"); t1=$EPOCHREALTIME
  local kv iops
  kv=$(fio_kv "$out" "$dir")
  iops=$(sed -E 's/.*iops=([0-9.]+).*/\1/' <<<"$kv")
  echo "nbd-load label=$label tool=fio rep=$rep workload=$name bs=$bs qd=$qd $kv" \
    "$(cpu_per_request_kv "$c0" "$c1" "$t0" "$t1" "$iops" "$RUNTIME")$(tree_rss_kv "$root") load1=$(load1)"
  rm -f "$out"
}

{
  echo "# bench/nbd.sh $(date -u +%FT%TZ) $(uname -r) $(nproc) cpus; load average $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "# image $IMG ($(stat -c %s "$IMG") bytes); qcow $QCOW; qcow2 $QCOW2, fresh $QCOW2_FRESH_SIZE; blktap: ${BLKTAP[*]}"
  echo "# io engine: ${BLKTAP_IO_ENGINE:-default (io_uring, else libaio)}"
  echo "# method: fio nbd engine, workloads: $(printf "%s " "${WORKLOADS[@]%% *}")RUNTIME=$RUNTIME RAMP=$RAMP REPS=$REPS, server cpus '${SERVER_CPUS}', client cpus '${CLIENT_CPUS}'"
} | tee "$OUT"

# Even repetitions run the configs in reverse: a config measured right
# after another runs faster or slower for that alone (ctrl writeback, whose
# reads never reach the code under test, came out at 0.75-0.87x of its base
# when measured before it and at 1.07-1.28x when after it: bench/results/
# nbd-chunk-ab-20261202T1455Z, nbd-ringchunk-ab-20261202T1601Z).
reversed=()
for ((i = ${#CONFIGS[@]} - 1; i >= 0; i--)); do reversed+=("${CONFIGS[i]}"); done
for rep in $(seq 1 "$REPS"); do
  order=("${CONFIGS[@]}"); ((rep % 2)) || order=("${reversed[@]}")
  for cfg in "${order[@]}"; do
    f=$IMG; [[ $cfg == *qcow-* ]] && f=$QCOW; [[ $cfg == *qcow2-* ]] && f=$QCOW2
    sync; timeout 120 cat "$f" >/dev/null # same (warm) page-cache state before every server
    start_cfg "$cfg"; pid=$SERVER_PID
    for w in "${WORKLOADS[@]}"; do
      sync
      # shellcheck disable=SC2086
      run_workload "$cfg" "$pid" $w | tee -a "$OUT"
    done
    [[ $pid == 0 ]] || stop_server "$pid"
  done
done
echo "# end $(date -u +%FT%TZ) load average $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$OUT"
python3 "$here/summary.py" nbd "$OUT" | tee "$OUT.summary"
echo "raw lines: $OUT; summary: $OUT.summary"
