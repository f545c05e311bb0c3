#!/usr/bin/env bash
# bench/ring.sh: requests per second through ring -> disk process -> backend,
# for a null backend and a raw aio file, at depths 1, 8 and 32, beside fio
# (libaio, O_DIRECT) on the same file: fio is the limit, the ratio is ours/fio.
#
#   bash bench/ring.sh [SECONDS_PER_POINT] [FILE_SIZE] [REPEATS]
#
# Each point is measured REPEATS times (default 2), ours and fio alternating,
# and the best of each is kept: on a shared machine the best run is the one
# least disturbed by other load. The load average is printed with the table.
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
repeats=${3:-2}
depths=(1 8 32)

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

exercise() { # MINOR DEPTH READ_PCT
  "$blktap" exercise "$1" --seconds "$seconds" --depth "$2" --min-bytes 4K --max-bytes 4K \
    --read-pct "$3" --flush-pct 0 --discard-pct 0 --no-verify --aligned --json --run-dir "$work/run" |
    json_field requestsPerSecond
}

fio_iops() { # DEPTH RW
  fio --name=b --filename="$image" --rw="$2" --bs=4k --direct=1 --ioengine=libaio \
    --iodepth="$1" --runtime="$seconds" --time_based --output-format=json 2>/dev/null |
    python3 -c "import json,sys; j=json.load(sys.stdin)['jobs'][0]; print(int(j['read']['iops']+j['write']['iops']))"
}

max() { if [ "${1%.*}" -gt "${2%.*}" ]; then echo "${1%.*}"; else echo "${2%.*}"; fi; }

echo "# $(nproc) CPUs, load average: $(cut -d' ' -f1-3 /proc/loadavg); ${seconds}s per run, best of $repeats"
printf "%-10s %5s %12s %12s %12s %10s\n" pattern depth null_rps aio_rps fio_iops aio/fio
for pattern in randread:100 randwrite:0; do
  rw=${pattern%%:*}
  pct=${pattern##*:}
  for depth in "${depths[@]}"; do
    null_rps=0 aio_rps=0 fio=0
    for _ in $(seq "$repeats"); do
      null_rps=$(max "$null_rps" "$(exercise "$null_minor" "$depth" "$pct")")
      aio_rps=$(max "$aio_rps" "$(exercise "$aio_minor" "$depth" "$pct")")
      fio=$(max "$fio" "$(fio_iops "$depth" "$rw")")
    done
    ratio=$(python3 -c "print(f'{$aio_rps/$fio:.2f}')")
    printf "%-10s %5d %12d %12d %12d %10s\n" "$rw" "$depth" "$null_rps" "$aio_rps" "$fio" "$ratio"
  done
done
