#!/usr/bin/env bash
# bench/kernel.sh - the kernel front end against the loop device, inside a
# VM (../shared/vm, Debian's 6.1 under qemu TCG): fio on /dev/tapdevN (blktap
# aio raw and qcow, each served by a Deno disk process) and on loop devices
# over the same raw file (direct I/O, and buffered as in 2006), alternated
# within each repetition: 4 KiB random read/write at depth 32, 1 MiB
# sequential read/write at depth 8. tap-c is the same raw file served by
# tests/kernel/tapctl.c (synchronous C, O_DIRECT): what the module and ring
# cost without the Deno disk process. Prints the median of per-repetition
# ratios against loop; under emulation absolute numbers mean nothing.
# tap-raw-wb and tap-qcow-wb are the same images with --cache writeback (the
# guest's page cache): the analog of the buffered loop device, as O_DIRECT
# tap is of the direct-I/O one. STAT lines: requests the device saw, their
# mean KiB, and the guest's context switches and interrupts per request.
#   usage: bench/kernel.sh        env: REPS=3 RUNTIME=8 REGION_MIB=256
#   CONFIGS="loop-dio tap-raw ..." runs only those (default all).
#   BLKTAP_DISK_WAIT_US, when set, goes to the guest's disk processes.
#   SMP=1: the guest's vCPUs (TCG runs one host thread per vCPU; 2 is the
#   smallest machine where a disk process and the program using its device
#   do not take turns on one CPU).
set -uo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
REPS=${REPS:-3} RUNTIME=${RUNTIME:-8} REGION_MIB=${REGION_MIB:-256} CONFIGS=${CONFIGS:-all} SMP=${SMP:-1}
work=$(mktemp -d "${TMPDIR:-/tmp}/blktap-bench-kernel.XXXXXX")
trap 'rm -rf "$work"' EXIT
stage_fail() { echo "bench/kernel.sh: $*" >&2; exit 2; }
# shellcheck source=tests/kernel/_vm_stage.sh
. "$repo/tests/kernel/_vm_stage.sh"
command -v fio >/dev/null || stage_fail "fio is not installed (make deps)"
stage_module
stage_app

vol=$work/vol
mkdir -p "$vol"
head -c "${REGION_MIB}M" /dev/urandom >"$vol/r.raw"
cp "$vol/r.raw" "$vol/rw.raw"
for q in q qw; do
	"$deno" run --quiet -A "$repo/main.ts" qcow-create "$REGION_MIB" "$vol/$q.qcow" >/dev/null ||
		stage_fail "qcow-create"
done
mkfs.ext4 -q -F -d "$vol" "$work/volume.img" $((REGION_MIB * 4 + 256))M || stage_fail "mkfs.ext4"

disk_env=()
[ -z "${BLKTAP_DISK_WAIT_US:-}" ] || disk_env=(--env BLKTAP_DISK_WAIT_US="$BLKTAP_DISK_WAIT_US")
echo "# guest: $SMP vCPU(s)"
bash "$vm" --timeout 3600 "${disk_env[@]}" --smp "$SMP" --mem 3G --module loop "${guest_app_args[@]}" --exe fio \
	--exe /sbin/losetup --file "$work/blktap.ko:/t/blktap.ko" --file "$work/tapctl:/t/tapctl" \
	--disk "$work/volume.img" \
	--env REPS="$REPS" --env RUNTIME="$RUNTIME" --env REGION_MIB="$REGION_MIB" --env CONFIGS="$CONFIGS" \
	--log "$work/console.log" "$repo/bench/kernel.guest.sh" /t >/dev/null ||
	stage_fail "the guest run failed (status $?): $(tail -n 20 "$work/console.log")"
grep -E '^# (devices|queue)' "$work/console.log"
grep '^RESULT ' "$work/console.log" | tee "$work/results" | awk 'NF != 6 { print "# incomplete: " $0 }'
python3 -c '
import statistics, sys
runs = {}
for line in sys.stdin:
    if len(line.split()) != 6:
        continue
    _, rep, config, workload, iops, mbps = line.split()
    runs.setdefault(workload, {}).setdefault(rep, {})[config] = (float(iops), float(mbps))
print("| workload | config | IOPS (median) | MB/s (median) | ratio to loop-dio | ratio to loop-buffered |")
print("|---|---|---|---|---|---|")
for workload, reps in runs.items():
    for config in ("loop-dio", "loop-buffered", "tap-raw", "tap-raw-wb", "tap-qcow", "tap-qcow-wb", "tap-c"):
        rows = [r for r in reps.values() if config in r]
        if not rows:
            continue
        iops = statistics.median(r[config][0] for r in rows)
        mbps = statistics.median(r[config][1] for r in rows)
        dio, buf = (statistics.median([r[config][0] / r[ref][0] for r in rows if r.get(ref, (0,))[0]] or [0])
                    for ref in ("loop-dio", "loop-buffered"))
        print(f"| {workload} | {config} | {iops:.0f} | {mbps:.1f} | {dio:.2f} | {buf:.2f} |")
# Like with like: O_DIRECT tap against the direct-I/O loop device, tap over
# the page cache (--cache writeback) against the buffered one.
pairs = (("tap-raw", "loop-dio"), ("tap-raw-wb", "loop-buffered"),
         ("tap-qcow", "loop-dio"), ("tap-qcow-wb", "loop-buffered"))
print()
print("| workload | " + " | ".join(f"{a}/{b}" for a, b in pairs) + " |")
print("|---" * (len(pairs) + 1) + "|")
for workload, reps in runs.items():
    cells = []
    for a, b in pairs:
        ratios = [r[a][0] / r[b][0] for r in reps.values() if a in r and r.get(b, (0,))[0]]
        cells.append(f"{statistics.median(ratios):.2f}" if ratios else "-")
    print(f"| {workload} | " + " | ".join(cells) + " |")
' <"$work/results"
echo
echo "| workload | config | requests (median) | KiB/request | context switches/request | interrupts/request |"
echo "|---|---|---|---|---|---|"
grep '^STAT ' "$work/console.log" | python3 -c '
import statistics, sys
rows = {}
for line in sys.stdin:
    f = line.split()
    if len(f) != 8:
        continue
    rows.setdefault((f[3], f[2]), []).append([float(x) for x in f[4:]])
for (workload, config), v in rows.items():
    m = [statistics.median(c) for c in zip(*v)]
    print(f"| {workload} | {config} | {m[0]:.0f} | {m[1]:.1f} | {m[2]:.2f} | {m[3]:.2f} |")
'

