#!/usr/bin/env bash
# The VM tests of the kernel front end (make test-vm): each boots Debian's
# 6.1 kernel under qemu (../shared/vm/run-in-vm.sh) with the kernel's debug
# checks on, loads kernel/blktap.ko and runs a guest script printing
# "ok - NAME" / "not ok - NAME" lines. Ends with "N passed, N failed".
#
# Usage: tests/kernel/vm_test.sh [TEST...]     (default: all; see `tests` below)
#   VM_DIR     the shared VM harness (default: ../shared/vm beside the repo, else /work/shared/vm)
#   KEEP_WORK  keep the work directory (guest console logs, images) for a look
set -uo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
here=$repo/tests/kernel
# Kernel debug checks on for every guest: a WARN ends the run.
append="slub_debug=FZPU page_poison=1 init_on_free=1 panic_on_warn=1"

passed=0 failed=0 skipped=0
work=$(mktemp -d "${TMPDIR:-/tmp}/blktap-vm.XXXXXX")
cleanup() { if [ -n "${KEEP_WORK:-}" ]; then echo "# kept $work"; else rm -rf "$work"; fi; }
trap cleanup EXIT

stage_fail() { echo "not ok - setup: $*"; echo "0 passed, 1 failed"; exit 1; }
# shellcheck source=tests/kernel/_vm_stage.sh
. "$here/_vm_stage.sh"

# Tallies the ok/not ok lines of a guest console log; a VM that did not end
# with status 0 is one more failure.
tally() { # NAME LOG STATUS
	local name=$1 log=$2 status=$3 p f
	p=$(grep -c '^ok - ' "$log")
	f=$(grep -c '^not ok - ' "$log")
	if [ "$status" != 0 ]; then
		echo "not ok - $name: the VM run ended with status $status"
		f=$((f + 1))
	fi
	if [ "$p" = 0 ] && [ "$f" = 0 ]; then
		echo "not ok - $name: no checks ran"
		f=1
	fi
	passed=$((passed + p))
	failed=$((failed + f))
	skipped=$((skipped + $(grep -c '^# SKIP' "$log")))
	echo "# $name: $p passed, $f failed"
}

# The module alone, driven by tapctl: good and misbehaving disk processes.
test_module() {
	local log=$work/module.log status=0
	bash "$vm" --timeout 240 --append "$append" --file "$work/blktap.ko:/t/blktap.ko" \
		--file "$work/tapctl:/t/tapctl" --file "$here/vm/guest_lib.sh:/t/guest_lib.sh" \
		--log "$log" "$here/vm/module.guest.sh" /t /t/guest_lib.sh >/dev/null || status=$?
	grep -E '^(not )?ok - ' "$log"
	tally module "$log" "$status"
}

# The volume the guest keeps its images on: ext4 holding a blktap-layout
# qcows, a vmdk (QEMU's monolithicSparse) and two raw files (O_DIRECT needs a
# real file system).
make_volume() {
	local vol=$work/vol
	mkdir -p "$vol"
	"$deno" run --quiet -A "$repo/main.ts" qcow-create 128 "$vol/q.qcow" >/dev/null ||
		stage_fail "qcow-create"
	"$deno" run --quiet -A "$repo/main.ts" qcow-create 64 "$vol/fq.qcow" >/dev/null ||
		stage_fail "qcow-create"
	qemu-img create -q -f vmdk "$vol/fv.vmdk" 64M || stage_fail "qemu-img create -f vmdk"
	truncate -s 128M "$vol/r.raw"
	truncate -s 64M "$vol/f.raw"
	mkfs.ext4 -q -F -d "$vol" "$work/volume.img" 1G || stage_fail "mkfs.ext4 of the volume"
}

# Host side: the images the guest wrote are checked here, the VM gone:
# e2fsck of the volume and of each image's file system (qcow read by QEMU),
# and every file's checksum as the guest printed it.
verify_images() { # LOG
	local log=$1 x=$work/x tag sum path got
	mkdir -p "$x"
	check_host "host: e2fsck -fn of the volume" e2fsck -fn "$work/volume.img"
	debugfs -R "dump /q.qcow $x/q.qcow" "$work/volume.img" 2>/dev/null
	debugfs -R "dump /r.raw $x/r.img" "$work/volume.img" 2>/dev/null
	check_host "host: qemu-img reads the qcow" qemu-img convert -f qcow -O raw "$x/q.qcow" "$x/q.img"
	check_host "host: e2fsck -fn of the qcow's file system" e2fsck -fn "$x/q.img"
	check_host "host: e2fsck -fn of the raw image's file system" e2fsck -fn "$x/r.img"
	debugfs -R "dump /fv.vmdk $x/fv.vmdk" "$work/volume.img" 2>/dev/null
	check_host "host: qemu-img check of the vmdk written through SIGKILLs" qemu-img check "$x/fv.vmdk"
	local n=0 bad=0
	while read -r _ tag sum path; do
		debugfs -R "dump $path $x/file" "$x/$tag.img" 2>/dev/null
		got=$(sha256sum <"$x/file" | cut -d' ' -f1)
		n=$((n + 1))
		[ "$got" = "$sum" ] || { bad=$((bad + 1)); echo "# MISMATCH $tag $path"; }
	done < <(grep '^SUM ' "$log")
	check_host "host: $n file checksums match the guest's" [ "$bad" = 0 -a "$n" -ge 40 ]
}
host_passed=0 host_failed=0
check_host() { # NAME COMMAND...
	local name=$1
	shift
	if "$@" >"$work/host.out" 2>&1; then
		echo "ok - $name"; host_passed=$((host_passed + 1))
	else
		echo "not ok - $name"; tail -n 5 "$work/host.out"; host_failed=$((host_failed + 1))
	fi
}

# ctrl and the disk processes (Deno in the guest) serving kernel minors:
# file systems, SIGKILL under fio and buffered writes, pause/resume, a ctrl
# restart, destroy and rmmod; then the images are checked on the host.
test_ctrl() {
	local log=$work/ctrl.log status=0
	stage_app
	make_volume
	bash "$vm" --timeout 600 --mem 3G --append "$append" "${guest_app_args[@]}" --exe fio \
		--exe /sbin/mkfs.ext4 --exe /sbin/e2fsck --file /etc/mke2fs.conf \
		--file "$work/blktap.ko:/t/blktap.ko" --file "$work/tapctl:/t/tapctl" \
		--file "$here/vm/guest_lib.sh:/t/guest_lib.sh" --disk "$work/volume.img" \
		--log "$log" "$here/vm/ctrl.guest.sh" /t >/dev/null || status=$?
	grep -E '^(not )?ok - |^# ' "$log"
	host_passed=0 host_failed=0
	verify_images "$log"
	passed=$((passed + host_passed))
	failed=$((failed + host_failed))
	tally ctrl "$log" "$status"
}

tests=(module ctrl)
[ $# -eq 0 ] || tests=("$@")
stage_module
for t in "${tests[@]}"; do
	start=$(date +%s)
	"test_$t"
	echo "# $t took $(($(date +%s) - start)) s"
done
[ "$skipped" = 0 ] || echo "# $skipped skipped (see the # SKIP lines)"
echo "$passed passed, $failed failed"
[ "$failed" = 0 ]
