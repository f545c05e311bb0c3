#!/usr/bin/env bash
# bench/nbd.sh — blktap's NBD server vs qemu-nbd (--cache=none --aio=native,
# and writeback) vs nbdkit's file plugin (cache=none, and default), same image
# file, same client (fio's nbd engine, through the shared nbd-load.sh), servers
# alternated within each repetition, server and client pinned to different
# cores. Reuses the shared harness (../shared/bench: lib.sh, nbd-load.sh,
# summarize.py) and adds blktap configs to its method.
#
# Measured paths: `blktap serve` (blktap-none, blktap-writeback*: the NBD front
# end serving the image's driver in-process, no ring) and `blktap ctrl`
# (blktap-ctrl-*: NBD -> ring -> disk process -> driver, the product path).
#
# qcow2 (`bench/nbd.sh qcow2` runs all of them): blktap ctrl and qemu-nbd serve
# the same qcow2 with the same cache mode. *-qcow2-*: a fully allocated qcow2
# converted from IMG (reads, overwrites in place). *-qcow2fresh-*: a new empty
# qcow2 of QCOW2_FRESH_SIZE (64G) per server start, so the write workloads
# allocate clusters (4 KiB random writes into 64 KiB clusters, 1 MiB sequential).
#
#   usage: bench/nbd.sh [CONFIG...|qcow2]   (default: every raw config below)
#   env:   REPS=3 RUNTIME=10 RAMP=2 IMG=$WORK/base.raw SIZE=2G
#          SERVER_CPUS=0 CLIENT_CPUS=1 WORK=/tmp/bench-work OUT=bench/results/nbd-<date>.txt
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
# shellcheck source=bench/_shared_harness.sh
source "$here/_shared_harness.sh"
export SERVER_CPUS=${SERVER_CPUS-0} CLIENT_CPUS=${CLIENT_CPUS-1}
# shellcheck source=/dev/null
source "$SHARED/lib.sh"
trap 'stop_all_servers' EXIT INT TERM

REPS=${REPS:-3}
export RUNTIME=${RUNTIME:-10} RAMP=${RAMP:-2}
IMG=${IMG:-$WORK/base.raw}
SIZE=${SIZE:-2G}
SOCK=$WORK/nbd.sock
DENO=${DENO:-$repo/.toolchain/node_modules/@deno/linux-x64-glibc/deno}
mkdir -p "$repo/bench/results"
OUT=${OUT:-$repo/bench/results/nbd-$(date -u +%Y%m%dT%H%M%SZ).txt}
CONFIGS=("$@")
((${#CONFIGS[@]})) || CONFIGS=(blktap-none blktap-ctrl-none qemu-nbd-none-native nbdkit-file-none
  blktap-writeback blktap-writeback-aio blktap-ctrl-writeback qemu-nbd-writeback nbdkit-file-default)
if [[ ${CONFIGS[*]} == qcow2 ]]; then
  CONFIGS=(blktap-ctrl-qcow2-none qemu-nbd-qcow2-none-native blktap-ctrl-qcow2fresh-none
    qemu-nbd-qcow2fresh-none-native blktap-ctrl-qcow2-writeback qemu-nbd-qcow2-writeback
    blktap-ctrl-qcow2fresh-writeback qemu-nbd-qcow2fresh-writeback)
fi
QCOW2_FULL=$WORK/full.qcow2
QCOW2_FRESH=$WORK/fresh.qcow2
QCOW2_FRESH_SIZE=${QCOW2_FRESH_SIZE:-64G}
for tool in fio nbdinfo qemu-nbd nbdkit taskset; do
  command -v "$tool" >/dev/null || { echo "missing $tool (make deps)" >&2; exit 2; }
done

if [[ ! -s $IMG ]]; then
  echo "# creating $IMG ($SIZE, random data, fully allocated)" >&2
  timeout 600 dd if=/dev/urandom of="$IMG" bs=1M count=$(($(numfmt --from=iec "$SIZE") / 1048576)) status=none
  sync
fi

# The sources through deno (always current); BLKTAP_EXE=/path/to/blktap to measure a build.
if [[ -n ${BLKTAP_EXE:-} ]]; then BLKTAP=("$BLKTAP_EXE"); else BLKTAP=("$DENO" run --quiet --allow-all "$repo/main.ts"); fi

CTRL_RUN=$WORK/blktap-ctrl-run
start_ctrl() { # CONFIG CACHE [TYPE:PATH]: ctrl (ring + disk process) serving the image as export "bench"
  rm -rf "$CTRL_RUN"; mkdir -p "$CTRL_RUN"
  start_server "$1" "$CTRL_RUN/nbd.sock" "${BLKTAP[@]}" ctrl --run-dir "$CTRL_RUN" --shm-dir "$CTRL_RUN" --log-level warn
  timeout 60 "${BLKTAP[@]}" create "${3:-aio:$IMG}" --name bench --cache "$2" --run-dir "$CTRL_RUN" >/dev/null
  CFG_SOCK=$CTRL_RUN/nbd.sock CFG_EXPORT=bench
}

qcow2_image() { # CONFIG -> the qcow2 this config serves (a fresh one for *qcow2fresh*)
  if [[ $1 == *qcow2fresh* ]]; then
    rm -f "$QCOW2_FRESH"; qemu-img create -q -f qcow2 "$QCOW2_FRESH" "$QCOW2_FRESH_SIZE"; echo "$QCOW2_FRESH"
  else
    echo "$QCOW2_FULL"
  fi
}

start_cfg() { # CONFIG -> sets SERVER_PID, CFG_SOCK, CFG_EXPORT
  CFG_SOCK=$SOCK CFG_EXPORT=""
  case $1 in
    # The product path: NBD -> ring -> disk process -> aio driver (server_cpu_pct counts ctrl only).
    blktap-ctrl-none)     start_ctrl "$1" none ;;
    blktap-ctrl-writeback) start_ctrl "$1" writeback ;;
    blktap-none)          start_server "$1" "$SOCK" "${BLKTAP[@]}" serve "aio:$IMG" --socket "$SOCK" --cache none ;;
    # ffi/aio.ts may block the JavaScript thread up to BLKTAP_AIO_SPIN_US (default 50) in
    # io_getevents; in-process, that stalls the socket side. This config turns it off.
    blktap-none-nospin)   start_server "$1" "$SOCK" env BLKTAP_AIO_SPIN_US=0 "${BLKTAP[@]}" serve "aio:$IMG" --socket "$SOCK" --cache none ;;
    # Page cache: the sync engine (pread/pwrite hit the cache in microseconds; libaio on a
    # buffered file submits synchronously and reaps through a thread, the slower choice).
    blktap-writeback)     start_server "$1" "$SOCK" "${BLKTAP[@]}" serve "sync:$IMG" --socket "$SOCK" --cache writeback ;;
    blktap-writeback-aio) start_server "$1" "$SOCK" "${BLKTAP[@]}" serve "aio:$IMG" --socket "$SOCK" --cache writeback ;;
    qemu-nbd-none-native) start_server "$1" "$SOCK" qemu-nbd -f raw --cache=none --aio=native -t -e 8 -k "$SOCK" "$IMG" ;;
    qemu-nbd-writeback)   start_server "$1" "$SOCK" qemu-nbd -f raw -t -e 8 -k "$SOCK" "$IMG" ;;
    nbdkit-file-none)     start_server "$1" "$SOCK" nbdkit -f -U "$SOCK" file "$IMG" cache=none ;;
    nbdkit-file-default)  start_server "$1" "$SOCK" nbdkit -f -U "$SOCK" file "$IMG" ;;
    blktap-ctrl-qcow2*-none)      start_ctrl "$1" none "qcow2:$(qcow2_image "$1")" ;;
    blktap-ctrl-qcow2*-writeback) start_ctrl "$1" writeback "qcow2:$(qcow2_image "$1")" ;;
    qemu-nbd-qcow2*-none-native)  start_server "$1" "$SOCK" qemu-nbd -f qcow2 --cache=none --aio=native -t -e 8 -k "$SOCK" "$(qcow2_image "$1")" ;;
    qemu-nbd-qcow2*-writeback)    start_server "$1" "$SOCK" qemu-nbd -f qcow2 -t -e 8 -k "$SOCK" "$(qcow2_image "$1")" ;;
    *) echo "unknown config $1" >&2; return 1 ;;
  esac
}

if [[ ${CONFIGS[*]} == *qcow2* && ! -s $QCOW2_FULL ]]; then
  echo "# converting $IMG to $QCOW2_FULL (fully allocated qcow2)" >&2
  timeout 600 qemu-img convert -O qcow2 "$IMG" "$QCOW2_FULL"
fi

{
  echo "# bench/nbd.sh $(date -u +%FT%TZ) $(uname -r) $(nproc) cpus; image $IMG ($(stat -c %s "$IMG") bytes)"
  echo "#   qcow2: *-qcow2-* serve $QCOW2_FULL (allocated), *-qcow2fresh-* a new empty $QCOW2_FRESH_SIZE qcow2 per start"
  echo "# blktap path measured: blktap serve (NBD front end + in-process driver, no ring): ${BLKTAP[*]}"
  echo "#   blktap-none = aio engine, O_DIRECT; blktap-writeback = sync engine, page cache; blktap-writeback-aio = aio engine, page cache"
  echo "#   blktap-ctrl-* = blktap ctrl: NBD -> ring -> disk process -> aio driver (the product path)"
  echo "# method: shared nbd-load.sh (fio nbd engine), RUNTIME=$RUNTIME RAMP=$RAMP REPS=$REPS, server cpus $SERVER_CPUS, client cpus $CLIENT_CPUS"
} | tee "$OUT"

for rep in $(seq 1 "$REPS"); do
  for cfg in "${CONFIGS[@]}"; do
    sync; timeout 120 cat "$IMG" >/dev/null   # same (warm) page-cache state before every server
    [[ $cfg == *qcow2-* && -s $QCOW2_FULL ]] && timeout 120 cat "$QCOW2_FULL" >/dev/null
    start_cfg "$cfg"; pid=$SERVER_PID
    SERVER_PID=$(server_child "$pid") LABEL=$cfg TOOLS=fio REPS=1 "$SHARED/nbd-load.sh" "$CFG_SOCK" "$CFG_EXPORT" |
      sed "s/ rep=1 / rep=$rep /" | tee -a "$OUT"
    stop_server "$pid"
  done
done

echo | tee -a "$OUT"
python3 "$SHARED/summarize.py" "$OUT" | tee -a "$OUT.summary"
# blktap against each peer and the best peer of the same cache mode: medians of per-repetition ratios.
python3 - "$OUT" <<'PY' | tee -a "$OUT.summary"
import statistics as st, sys
from collections import defaultdict
v = defaultdict(dict)   # (label, workload) -> rep -> MBps
for line in open(sys.argv[1]):
    p = line.split()
    if not p or p[0] != "nbd-load":
        continue
    kv = dict(x.split("=", 1) for x in p[1:] if "=" in x)
    if "MBps" in kv:
        v[(kv["label"], kv["workload"])][kv["rep"]] = float(kv["MBps"])
modes = {"none": (["blktap-none", "blktap-none-nospin", "blktap-ctrl-none"], ["qemu-nbd-none-native", "nbdkit-file-none"]),
         "writeback": (["blktap-writeback", "blktap-writeback-aio", "blktap-ctrl-writeback"], ["qemu-nbd-writeback", "nbdkit-file-default"])}
# qcow2: blktap ctrl against qemu-nbd serving the same kind of qcow2 with the same cache mode.
for kind in ["qcow2", "qcow2fresh"]:
    modes[kind + "-none"] = (["blktap-ctrl-%s-none" % kind], ["qemu-nbd-%s-none-native" % kind])
    modes[kind + "-writeback"] = (["blktap-ctrl-%s-writeback" % kind], ["qemu-nbd-%s-writeback" % kind])
print("\nblktap / peer, median of per-repetition ratios (MB/s; IOPS ratio is the same)")
print("%-32s %-10s %12s %12s %12s" % ("blktap config", "workload", "vs qemu-nbd", "vs nbdkit", "vs best"))
for mode, (ours_labels, peers) in modes.items():
    for label in ours_labels:
        for w in ["randread", "randwrite", "seqread", "seqwrite"]:
            ours = v.get((label, w), {})
            if not ours:
                continue
            cols = []
            for peer in peers:
                theirs = v.get((peer, w), {})
                r = [ours[k] / theirs[k] for k in ours if k in theirs and theirs[k] > 0]
                cols.append("%.2fx" % st.median(r) if r else "-")
            cols += ["-"] * (2 - len(peers))  # qcow2 modes: qemu-nbd is the only peer
            best = [ours[k] / max(v.get((p, w), {}).get(k, 0) for p in peers)
                    for k in ours if all(k in v.get((p, w), {}) for p in peers)]
            cols.append("%.2fx" % st.median(best) if best else "-")
            print("%-32s %-10s %12s %12s %12s" % (label, w, *cols))
PY
echo "raw lines: $OUT; summary: $OUT.summary"
