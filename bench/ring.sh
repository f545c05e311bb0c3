#!/usr/bin/env bash
# bench/ring.sh: requests per second through ring -> disk process -> backend,
# for a null backend and a raw aio file (O_DIRECT), beside fio (libaio,
# O_DIRECT) on the same file: fio is the limit, the ratio is ours/fio
# (issue 10: at least 0.8 at depth 32, read and write).
#
#   bash bench/ring.sh [SECONDS_PER_POINT] [FILE_SIZE] [REPEATS]
#   env: DEPTHS="32" (e.g. "1 8 32"), OUT=bench/results/ring-<date>.txt
#
# Each point is measured REPEATS times (default 3), ours and fio alternating;
# the summary takes the median of the per-repetition ratios. Every line has
# the CPU time per request of ctrl (the test front end runs inside it) and of
# the disk process, their peak RSS, and the load average.
#
# The load is the test front end inside ctrl (blktap exercise --no-verify
# --aligned): 4 KiB random reads, then 4 KiB random writes, page-aligned as a
# guest issues them. Needs fio. Everything runs in a private temp folder and
# every process started here is stopped by pid on exit.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
blktap="$here/blktap"
seconds=${1:-5}
size=${2:-1G}
repeats=${3:-3}
read -r -a depths <<<"${DEPTHS:-32}"
mkdir -p "$here/bench/results"
out=${OUT:-$here/bench/results/ring-$(date -u +%Y%m%dT%H%M%SZ).txt}
# shellcheck source=bench/_procs.sh
source "$here/bench/_procs.sh"

command -v fio >/dev/null || { echo "bench/ring.sh: fio is required (skipped)" >&2; exit 77; }
[ -x "$blktap" ] || { echo "bench/ring.sh: run 'make' first" >&2; exit 1; }

work=$(mktemp -d "${TMPDIR:-/tmp}/blktap-bench-ring.XXXXXX")
shm=$(mktemp -d /dev/shm/blktap-bench-ring.XXXXXX 2>/dev/null || echo "$work/shm")
mkdir -p "$shm"
ctrl_pid=""
cleanup() {
  if [ -n "$ctrl_pid" ]; then
    # Disk processes exit when ctrl's channel closes; stop them by pid first.
    for pid in $("$blktap" list --json --run-dir "$work/run" 2>/dev/null | grep -o '"pid": [0-9]*' | grep -o '[0-9]*'); do
      kill "$pid" 2>/dev/null || true
    done
    kill "$ctrl_pid" 2>/dev/null || true
    wait "$ctrl_pid" 2>/dev/null || true
  fi
  rm -rf "$work" "$shm"
}
trap cleanup EXIT

image="$work/disk.raw"
echo "# filling $size test file" >&2
fio --name=fill --filename="$image" --rw=write --bs=1M --size="$size" --direct=1 \
  --ioengine=libaio --iodepth=8 --output=/dev/null

"$blktap" ctrl --run-dir "$work/run" --shm-dir "$shm" --log-level warn &
ctrl_pid=$!
for _ in $(seq 100); do "$blktap" list --run-dir "$work/run" >/dev/null 2>&1 && break; sleep 0.1; done
null_minor=$("$blktap" create "null:$size" --name null --run-dir "$work/run" | head -1)
aio_minor=$("$blktap" create "aio:$image" --name aio --run-dir "$work/run" | head -1)

json_field() { grep -o "\"$1\":[0-9.]*" | head -1 | cut -d: -f2; }
disk_pid() { # MINOR -> pid of its disk process
  "$blktap" list --json --run-dir "$work/run" | python3 -c "
import json, sys
for m in json.load(sys.stdin):
    if m['minor'] == int(sys.argv[1]): print(m['pid'])" "$1"
}

exercise() { # MINOR DEPTH READ_PCT -> "rps ctrl_ticks disk_ticks"
  local dpid c0 d0 rps
  dpid=$(disk_pid "$1")
  c0=$(tree_cpu_ticks "$ctrl_pid"); d0=$(tree_cpu_ticks "$dpid")
  c0=$((c0 - d0))
  rps=$("$blktap" exercise "$1" --seconds "$seconds" --depth "$2" --min-bytes 4K --max-bytes 4K \
    --read-pct "$3" --flush-pct 0 --discard-pct 0 --no-verify --aligned --json --run-dir "$work/run" |
    json_field requestsPerSecond)
  local c1 d1
  c1=$(tree_cpu_ticks "$ctrl_pid"); d1=$(tree_cpu_ticks "$dpid")
  c1=$((c1 - d1))
  echo "$rps $((c1 - c0)) $((d1 - d0))"
}

fio_iops() { # DEPTH RW
  fio --name=b --filename="$image" --rw="$2" --bs=4k --direct=1 --ioengine=libaio \
    --iodepth="$1" --runtime="$seconds" --time_based --output-format=json 2>/dev/null |
    python3 -c "import json,sys; j=json.load(sys.stdin)['jobs'][0]; print(int(j['read']['iops']+j['write']['iops']))"
}

per_req_us() { # TICKS RPS
  python3 -c "import os,sys; t,r=map(float,sys.argv[1:]); print('%.1f' % (t/os.sysconf('SC_CLK_TCK')*1e6/(r*$seconds) if r else 0))" "$1" "$2"
}

{
  echo "# bench/ring.sh $(date -u +%FT%TZ) $(uname -r) $(nproc) CPUs; load average $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "# ${seconds}s per run, $repeats repetitions, depths ${depths[*]}; io engine ${BLKTAP_IO_ENGINE:-default (io_uring, else libaio)}"
} | tee "$out"
for rep in $(seq "$repeats"); do
  for pattern in randread:100 randwrite:0; do
    rw=${pattern%%:*}
    pct=${pattern##*:}
    for depth in "${depths[@]}"; do
      read -r null_rps _ _ <<<"$(exercise "$null_minor" "$depth" "$pct")"
      read -r aio_rps ctrl_ticks disk_ticks <<<"$(exercise "$aio_minor" "$depth" "$pct")"
      fio=$(fio_iops "$depth" "$rw")
      echo "ring rep=$rep workload=$rw depth=$depth null_rps=${null_rps%.*} aio_rps=${aio_rps%.*} fio_iops=$fio" \
        "ctrl_cpu_us_per_req=$(per_req_us "$ctrl_ticks" "$aio_rps") disk_cpu_us_per_req=$(per_req_us "$disk_ticks" "$aio_rps")" \
        "rss_peak_kib=$(awk '/^VmHWM:/{print $2}' "/proc/$ctrl_pid/status")+$(awk '/^VmHWM:/{print $2}' "/proc/$(disk_pid "$aio_minor")/status")" \
        "load1=$(cut -d' ' -f1 /proc/loadavg)" | tee -a "$out"
    done
  done
done
echo "# end $(date -u +%FT%TZ) load average $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$out"
python3 "$here/bench/summary.py" ring "$out" | tee "$out.summary"
