#!/bin/sh
# Runs in the VM (tests/kernel/vm_test.sh ctrl): blktap ctrl serving kernel
# minors. /dev/vda is an ext4 volume holding q.qcow and fq.qcow (blktap's
# qcow layout), fv.vmdk, r.raw and f.raw. Checks print "ok - NAME" / "not ok - NAME"; the checksums
# of the files written through /dev/tapdevN print as "SUM IMAGE SHA256 PATH"
# for the host to verify in the images afterwards.
#   $1: directory with blktap.ko, tapctl, guest_lib.sh
#   env: DENO (the deno binary), APP (the blktap sources).
set -u
dir=$1
. "$dir/guest_lib.sh"
tapctl=$dir/tapctl
run_dir=/run/blktap
blktap() { "$DENO" run --quiet --no-prompt --cached-only -A "$APP/main.ts" "$@"; }

check "insmod" insmod "$dir/blktap.ko"
mkdir -p /img /mnt/q /mnt/r
check "mount the image volume" mount -t ext4 /dev/vda /img

ctrl_pid=""
start_ctrl() { # $! must be ctrl itself (not a subshell) for the kills below
	"$DENO" run --quiet --no-prompt --cached-only -A "$APP/main.ts" ctrl --run-dir "$run_dir" \
		--no-nbd --log-level warn >>/root/ctrl.log 2>&1 &
	ctrl_pid=$!
	# ctrl listens once it re-attached every registered disk.
	for _ in $(seq 600); do [ -S "$run_dir/ctrl.sock" ] && return 0; sleep 0.2; done
	return 1
}
check "ctrl starts" start_ctrl

# create --kernel: the minor, then /dev/tapdevN (text), or a device field (JSON).
blktap create --kernel qcow:/img/q.qcow >/root/create_q.out 2>&1
q_dev=$(sed -n 2p /root/create_q.out)
check "create --kernel prints the minor then /dev/tapdevN" \
	sh -c "[ \"$(sed -n 1p /root/create_q.out)\" = 0 ] && [ -b \"$q_dev\" ]"
blktap create --kernel --json aio:/img/r.raw >/root/create_r.out 2>&1
r_dev=$(sed -n 's/.*"device":"\([^"]*\)".*/\1/p' /root/create_r.out)
check "create --kernel --json has the device" [ -b "$r_dev" ]
blktap create --kernel --name fio aio:/img/f.raw >/root/create_f.out 2>&1
f_dev=$(sed -n 2p /root/create_f.out)
check "a third kernel minor" [ -b "$f_dev" ]
blktap create --kernel --name fioq qcow:/img/fq.qcow >/root/create_fq.out 2>&1
fq_dev=$(sed -n 2p /root/create_fq.out)
check "a fourth kernel minor (qcow)" [ -b "$fq_dev" ]
blktap create --kernel --name fiov vmdk:/img/fv.vmdk >/root/create_fv.out 2>&1
fv_dev=$(sed -n 2p /root/create_fv.out)
check "a fifth kernel minor (vmdk)" [ -b "$fv_dev" ]
kminor() { echo "${1#/dev/tapdev}"; } # /dev/tapdevN -> the module's minor N

# ---- a file system on each: tree, checksums, e2fsck --------------------------
mkdir -p /root/data/dir/sub
dd if=/dev/urandom of=/root/data/big bs=1M count=8 2>/dev/null
dd if=/dev/urandom of=/root/data/dir/mid bs=1k count=700 2>/dev/null
i=0
while [ $i -lt 24 ]; do
	echo "small file $i $(uptime_s)" >/root/data/dir/sub/f$i
	i=$((i + 1))
done
fs_test() { # TAG DEVICE MOUNTPOINT
	mkfs.ext4 -q -F "$2" &&
		mount -t ext4 "$2" "$3" &&
		cp -a /root/data/. "$3/" &&
		sync &&
		echo 3 >/proc/sys/vm/drop_caches &&
		(cd /root/data && find . -type f | sort | xargs sha256sum) >/root/sums.$1 &&
		(cd "$3" && sha256sum -c /root/sums.$1 >/dev/null)
}
check "qcow: mkfs, mount, write a tree, read it back" fs_test q "$q_dev" /mnt/q
check "raw: mkfs, mount, write a tree, read it back" fs_test r "$r_dev" /mnt/r
destroy_refused() { ! blktap destroy 1 --run-dir "$run_dir" 2>/root/destroy.err; }
check "destroy of a mounted device is refused" destroy_refused
check "  ... saying it is in use" grep -q "in use" /root/destroy.err
umount /mnt/q
check "qcow: e2fsck -fn clean" e2fsck -fn "$q_dev"

# ---- pause and resume ------------------------------------------------------
blktap pause 0 --run-dir "$run_dir"
dd if="$q_dev" of=/dev/null bs=4k count=1 skip=77 iflag=direct 2>/dev/null &
reader=$!
sleep 1
check "pause: a read waits" kill -0 "$reader"
blktap resume 0 --run-dir "$run_dir"
wait "$reader"
check "resume: the read completes" [ $? = 0 ]

# ---- SIGKILL the disk process under load -------------------------------------
disk_pid() { # CTRL_MINOR: the pid of `blktap disk --minor N`
	for p in /proc/[0-9]*; do
		case " $(tr '\0' ' ' <"$p/cmdline" 2>/dev/null)" in
		*" disk --minor $1 "*) echo "${p#/proc/}" && return 0 ;;
		esac
	done
}
# Kills ctrl minor $1's disk process $2 times, each time once the restarted
# one has opened the ring ($4: the kernel minor) again and served for a
# moment; keeps the count in $3. Gives up after 150 s.
killer() {
	n=0
	echo 0 >"$3"
	end=$(($(date +%s) + 150))
	while [ $n -lt "$2" ] && [ "$(date +%s)" -lt $end ]; do
		for _ in $(seq 300); do
			[ "$($tapctl status "$4" | sed -n 's/^ring_open=//p')" = 1 ] && break
			sleep 0.1
		done
		sleep 0.8
		pid=$(disk_pid "$1")
		[ -n "$pid" ] && kill -KILL "$pid" && n=$((n + 1))
		echo "$n" >"$3"
	done
}
field() { $tapctl status "$1" | sed -n "s/^$2=//p"; }

# fio writes random extents of mixed sizes and verifies each (crc32c) while
# the disk process is SIGKILLed 3 times: nothing may fail or read back wrong.
# Another pass (new seed) while fewer kills happened, so a fast fio still
# sees all three.
fio_kills() { # TAG CTRL_MINOR DEVICE
	km=$(kminor "$3")
	reissued_before=$(field "$km" reissued)
	killer "$2" 3 "/root/kills.fio.$1" "$km" &
	killer_pid=$!
	fio_t0=$(uptime_s)
	pass=0 fio_rc=0
	while [ "$fio_rc" = 0 ] && [ $pass -lt 4 ]; do
		fio --name=kill --filename="$3" --direct=1 --ioengine=libaio --iodepth=16 \
			--rw=randwrite --bsrange=4k-256k --size=32M --verify=crc32c --verify_fatal=1 \
			--do_verify=1 --randseed=$((7 + pass)) --output="/root/fio.$1.out" >/dev/null 2>&1
		fio_rc=$?
		pass=$((pass + 1))
		[ "$(cat "/root/kills.fio.$1")" -lt 3 ] || break
	done
	kills=$(cat "/root/kills.fio.$1")
	kill "$killer_pid" 2>/dev/null
	wait "$killer_pid" 2>/dev/null
	check "$1: fio with crc32c verify exits 0 through SIGKILLs ($pass passes, $(elapsed "$fio_t0") s)" \
		[ "$fio_rc" = 0 ]
	check "$1: the disk process was SIGKILLed 3 times while fio ran ($kills)" [ "$kills" -ge 3 ]
	check "$1: requests were re-issued to the restarted processes" \
		[ "$(field "$km" reissued)" -gt "$reissued_before" ]
	[ "$fio_rc" = 0 ] || tail -n 20 "/root/fio.$1.out"
}
fio_kills raw 2 "$f_dev"
fio_kills qcow 3 "$fq_dev"
fio_kills vmdk 4 "$fv_dev"

# Buffered writes on the mounted raw file system while its disk process dies.
buffered_kills() { # MINOR-OF-CTRL DEVICE MOUNTPOINT TAG
	mkdir -p "$3/k"
	killer "$1" 3 /root/kills.$4 "$(kminor "$2")" &
	kp=$!
	i=0
	while { kill -0 "$kp" 2>/dev/null || [ $i -lt 4 ]; } && [ $i -lt 60 ]; do
		dd if=/root/data/big of="$3/k/f$i" bs=1M count=1 skip=$((i % 8)) 2>/dev/null
		sync
		i=$((i + 1))
	done
	wait "$kp"
	(cd "$3" && find k -type f | sort | while read -r f; do
		n=${f#k/f}
		dd if=/root/data/big bs=1M count=1 skip=$((n % 8)) 2>/dev/null | sha256sum | sed "s|-|./$f|"
	done) >/root/sums.$4.k
	echo 3 >/proc/sys/vm/drop_caches
	(cd "$3" && sha256sum -c /root/sums.$4.k >/dev/null) && [ "$(cat /root/kills.$4)" -ge 3 ]
}
check "raw: buffered writes and sync through 3 SIGKILLs, files intact" buffered_kills 1 "$r_dev" /mnt/r r
cat /root/sums.r.k >>/root/sums.r
umount /mnt/r
check "raw: e2fsck -fn clean after the SIGKILLs" e2fsck -fn "$r_dev"
mount -t ext4 "$q_dev" /mnt/q
check "qcow: buffered writes and sync through 3 SIGKILLs, files intact" buffered_kills 0 "$q_dev" /mnt/q q
cat /root/sums.q.k >>/root/sums.q
umount /mnt/q
check "qcow: e2fsck -fn clean after the SIGKILLs" e2fsck -fn "$q_dev"
check "no I/O error reached the block layer" io_error_gate
stats_reissued() { # CTRL_MINOR: `stats` counts the restarts and the module's re-issued requests
	blktap stats "$1" --json --run-dir "$run_dir" >/root/stats.json &&
		grep -q '"restarts": [3-9]' /root/stats.json && grep -q '"reissued": [1-9]' /root/stats.json
}
for m in 2 3 4; do check "stats of minor $m: restarts and re-issued requests" stats_reissued $m; done

# ---- ctrl restarts and finds its kernel minors -------------------------------
blktap destroy 2 --run-dir "$run_dir"
blktap destroy 3 --run-dir "$run_dir"
blktap destroy 4 --run-dir "$run_dir"
kill -KILL "$ctrl_pid"
wait "$ctrl_pid" 2>/dev/null
rm -f "$run_dir/ctrl.sock" # the killed ctrl's; the new one listens when ready
check "a restarted ctrl comes up" start_ctrl
check "  ... and serves its kernel minors again" \
	sh -c "dd if=$q_dev of=/dev/null bs=1M count=4 iflag=direct 2>/dev/null"
blktap list --run-dir "$run_dir" >/root/list.out 2>&1
check "  ... list shows them running" [ "$(grep -c running /root/list.out)" = 2 ]

# ---- destroy, rmmod ----------------------------------------------------------
check "rmmod is refused while minors exist" sh -c '! rmmod blktap 2>/dev/null'
for m in 0 1; do blktap destroy "$m" --run-dir "$run_dir"; done
check "destroy removes the block and ring devices" \
	sh -c "! ls /dev/tapdev* /dev/blktap[0-9]* 2>/dev/null"
kill -TERM "$ctrl_pid"
wait "$ctrl_pid" 2>/dev/null
check "rmmod after destroy" rmmod blktap
check "dmesg gate" dmesg_gate
for tag in q r; do sed "s|^\([0-9a-f]*\)  \./|SUM $tag \1 /|" /root/sums.$tag; done
umount /img
