#!/usr/bin/env bash
# bench/raw.sh — blktap's `aio` raw driver vs fio (libaio, O_DIRECT) on the
# same 1 GiB file: 1 MiB sequential read/write at depth 8, 4 KiB random
# read/write at depth 32. Runs alternate within each repetition; the result
# is the median of per-repetition ratios ours/fio (never a bare time).
#   usage: bench/raw.sh [FILE]        env: REPS=3 RUNTIME=10 CPUS=0
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
DENO=${DENO:-$repo/.toolchain/node_modules/@deno/linux-x64-glibc/deno}
FILE=${1:-/var/tmp/blktap-bench-raw.img}
REPS=${REPS:-3}
RUNTIME=${RUNTIME:-10}
PIN=(); [[ -n "${CPUS:-}" ]] && PIN=(taskset -c "$CPUS")
command -v fio >/dev/null || { echo "fio is not installed (make deps)" >&2; exit 2; }

if [[ ! -f $FILE ]]; then
  echo "creating $FILE (1 GiB of random data)" >&2
  head -c 1G /dev/urandom >"$FILE"
fi

fio_run() { # rw bs depth -> "iops MBps"
  "${PIN[@]}" timeout $((RUNTIME + 60)) fio --name=raw --filename="$FILE" --ioengine=libaio \
    --direct=1 --rw="$1" --bs="$2" --iodepth="$3" --runtime="$RUNTIME" --time_based \
    --output-format=json 2>/dev/null | python3 -c '
import json, sys
j = json.load(sys.stdin)["jobs"][0]
d = j["read"] if j["read"]["io_bytes"] else j["write"]
print("%.0f %.1f" % (d["iops"], d["bw_bytes"] / 1e6))'
}

ours_run() { # rw bs depth -> "iops MBps"
  "${PIN[@]}" timeout $((RUNTIME + 60)) "$DENO" run -A "$here/raw_load.ts" --image "aio:$FILE" \
    --rw "$1" --bs "$2" --depth "$3" --seconds "$RUNTIME" |
    sed -E 's/iops=([0-9.]+) MBps=([0-9.]+)/\1 \2/'
}

WORKLOADS=("read 1048576 8" "write 1048576 8" "randread 4096 32" "randwrite 4096 32")
results=$(mktemp)
trap 'rm -f "$results"' EXIT
for rep in $(seq 1 "$REPS"); do
  for w in "${WORKLOADS[@]}"; do
    read -r rw bs depth <<<"$w"
    sync
    f=$(fio_run "$rw" "$bs" "$depth")
    sync
    o=$(ours_run "$rw" "$bs" "$depth")
    echo "$rep $rw $bs $depth $f $o" | tee -a "$results" >&2
  done
done

python3 - "$results" <<'PY'
import sys, statistics
rows = {}
for line in open(sys.argv[1]):
    rep, rw, bs, depth, fi, fm, oi, om = line.split()
    rows.setdefault((rw, bs, depth), []).append((float(fi), float(fm), float(oi), float(om)))
print("| workload | fio MB/s | blktap aio MB/s | fio IOPS | blktap aio IOPS | ratio blktap/fio (median, min-max) |")
print("|---|---|---|---|---|---|")
for (rw, bs, depth), r in rows.items():
    ratios = [o / f for f, _, o, _ in r]
    print("| %s bs=%s qd=%s | %.0f | %.0f | %.0f | %.0f | %.2f (%.2f-%.2f) |" % (
        rw, bs, depth, statistics.median(x[1] for x in r), statistics.median(x[3] for x in r),
        statistics.median(x[0] for x in r), statistics.median(x[2] for x in r),
        statistics.median(ratios), min(ratios), max(ratios)))
PY
