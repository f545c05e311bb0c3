# shellcheck shell=bash
# Finds ../shared/bench (the peers' harness, read-only) and sources its lib.sh.
# Source it from a bench script after setting `repo`; sets SHARED.
SHARED=${SHARED_BENCH:-$repo/../shared/bench}
[[ -f $SHARED/lib.sh ]] || SHARED=/work/shared/bench
[[ -f $SHARED/lib.sh ]] || { echo "shared bench harness not found (set SHARED_BENCH)" >&2; exit 2; }
# Scratch files (2 GiB images) per checkout: the shared harness's default
# /tmp/bench-work is used by every checkout on the machine at once.
export WORK=${WORK:-/var/tmp/blktap-bench.$(echo "$repo" | md5sum | cut -c1-8)}
