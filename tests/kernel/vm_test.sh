#!/usr/bin/env bash
# The VM tests of the kernel front end (make test-vm): each boots Debian's
# 6.1 kernel under qemu (../shared/vm/run-in-vm.sh) with the kernel's debug
# checks on, loads kernel/blktap.ko and runs a guest script printing
# "ok - NAME" / "not ok - NAME" lines. Ends with "N passed, N failed".
#
# Usage: tests/kernel/vm_test.sh [TEST...]     (default: all; see `tests` below)
#   VM_DIR   the shared VM harness (default: ../shared/vm beside the repo, else /work/shared/vm)
set -uo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
here=$repo/tests/kernel
vm_dir=${VM_DIR:-}
for d in "$vm_dir" "$repo/../shared/vm" /work/shared/vm; do
	if [ -n "$d" ] && [ -f "$d/run-in-vm.sh" ]; then vm_dir=$(cd "$d" && pwd); break; fi
done
vm=$vm_dir/run-in-vm.sh
# Kernel debug checks on for every guest: a WARN ends the run.
append="slub_debug=FZPU page_poison=1 init_on_free=1 panic_on_warn=1"

passed=0 failed=0
work=$(mktemp -d "${TMPDIR:-/tmp}/blktap-vm.XXXXXX")
cleanup() { rm -rf "$work"; }
trap cleanup EXIT

fail_setup() { echo "not ok - setup: $*"; echo "0 passed, 1 failed"; exit 1; }
[ -f "$vm" ] || fail_setup "no VM harness (run-in-vm.sh) found; set VM_DIR"
kver=$(bash "$vm" --print-kver) || fail_setup "no guest kernel (run make deps)"
[ -f "/lib/modules/$kver/build/Makefile" ] || fail_setup "no headers for $kver (run make deps)"

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
	echo "# $name: $p passed, $f failed"
}

build() {
	make -s -C "$repo" kernel KVER="$kver" >"$work/build.log" 2>&1 || { cat "$work/build.log"; fail_setup "module build"; }
	gcc -static -O2 -Wall -Wextra -Werror -o "$work/tapctl" "$here/tapctl.c" || fail_setup "tapctl build"
	cp "$repo/kernel/blktap.ko" "$work/"
}

# The module alone, driven by tapctl: good and misbehaving disk processes.
test_module() {
	local log=$work/module.log status=0
	bash "$vm" --timeout 240 --append "$append" --file "$work/blktap.ko:/t/blktap.ko" \
		--file "$work/tapctl:/t/tapctl" --file "$here/vm/gate.sh:/t/gate.sh" \
		--log "$log" "$here/vm/module.guest.sh" /t /t/gate.sh >/dev/null || status=$?
	grep -E '^(not )?ok - ' "$log"
	tally module "$log" "$status"
}

tests=(module)
[ $# -eq 0 ] || tests=("$@")
build
for t in "${tests[@]}"; do
	start=$(date +%s)
	"test_$t"
	echo "# $t took $(($(date +%s) - start)) s"
done
echo "$passed passed, $failed failed"
[ "$failed" = 0 ]
