#!/bin/sh
# Runs in the VM (tests/kernel/vm_test.sh module): the blktap module driven by
# tapctl, a disk process in C, with good and deliberately misbehaving servers.
# Prints "ok - NAME" / "not ok - NAME" per check. $1: directory holding
# blktap.ko and tapctl; $2: guest_lib.sh.
set -u
dir=$1
. "$2"
tapctl=$dir/tapctl
export PATH=$dir:$PATH
img=/root/disk.img
pat=/root/pattern

field() { $tapctl status "$1" | sed -n "s/^$2=//p"; }
server_pid=""
start_server() { # MINOR MODE [AFTER]: a disk process in the background
	$tapctl serve "$1" "$img" "$2" "${3:-0}" >/root/server.out 2>&1 &
	server_pid=$!
	sleep 0.3
}
stop_server() {
	[ -n "$server_pid" ] || return 0
	kill -TERM "$server_pid" 2>/dev/null
	wait "$server_pid"
	rc=$?
	server_pid=""
	return $rc
}
region_sum() { # OFFSET_MIB COUNT_MIB from the block device
	dd if=/dev/tapdev0 bs=1M skip="$1" count="$2" iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1
}
pattern_sum() { dd if="$pat" bs=1M count="$1" 2>/dev/null | sha256sum | cut -d' ' -f1; }

dd if=/dev/zero of="$img" bs=1M count=64 2>/dev/null
dd if=/dev/urandom of="$pat" bs=1M count=8 2>/dev/null

check "insmod" insmod "$dir/blktap.ko"
check "ABI version 1" [ "$($tapctl version)" = 1 ]
minor=$($tapctl alloc 0 256 32)
check "alloc gives minor 0 and /dev/blktap0" [ "$minor" = 0 ] && [ -c /dev/blktap0 ]
check "create /dev/tapdev0 (64 MiB)" $tapctl create 0 131072 flush discard
check "tapdev0 size" [ "$(cat /sys/block/tapdev0/size)" = 131072 ]
# The queue a 1 MiB request needs whole, and no elevator by default (as loop).
q=/sys/block/tapdev0/queue
check "tapdev0 takes 1 MiB requests whole" \
	sh -c "[ \$(cat $q/max_hw_sectors_kb) = 1024 ] && [ \$(cat $q/max_segments) = 256 ]"
check "tapdev0 has no I/O scheduler by default" grep -q '\[none\]' "$q/scheduler"
check "rmmod refused while a minor exists" sh -c '! rmmod blktap 2>/dev/null'

# A good disk process: writes of 4 KiB (direct requests) and 1 MiB (indirect).
start_server 0 good
dd if="$pat" of=/dev/tapdev0 bs=1M count=8 oflag=direct 2>/dev/null
dd if="$pat" of=/dev/tapdev0 bs=4k count=256 seek=4096 oflag=direct 2>/dev/null
check "good server: 1 MiB writes read back" [ "$(region_sum 0 8)" = "$(pattern_sum 8)" ]
check "good server: 4 KiB writes read back" [ "$(region_sum 16 1)" = "$(pattern_sum 1)" ]
check "good server: the image holds the data" \
	[ "$(dd if=$img bs=1M count=8 2>/dev/null | sha256sum | cut -d' ' -f1)" = "$(pattern_sum 8)" ]
check "flush and discard reach the server" sh -c 'sync /dev/tapdev0 && blkdiscard -o 32M -l 1M /dev/tapdev0'
check "second opener gets EBUSY" sh -c "$tapctl mmap 0 0 2>&1 | grep -q 'open ring: Device or resource busy'"
check "good server stops on SIGTERM" stop_server

check "second open of /dev/blktap0 is refused" sh -c "$tapctl open2 0 | grep -q 'second open: EBUSY'"
check "mmap one page too long: EINVAL" sh -c "$tapctl mmap 0 1 | grep -q EINVAL"
check "mmap one page too short: EINVAL" sh -c "$tapctl mmap 0 -1 | grep -q EINVAL"
check "mmap of the right length works" sh -c "$tapctl mmap 0 0 | grep -q mapped"

# Each misbehaviour: the bad server is refused with its error code, the
# writer keeps waiting, a good server completes the held requests.
seek=8
for case in bad-id:2 duplicate:3 bad-op:4 bad-status:5 bad-rsp-prod:1 exit:0; do
	mode=${case%:*} code=${case#*:}
	errors_before=$(field 0 protocol_errors)
	reissued_before=$(field 0 reissued)
	start_server 0 "$mode" 1
	bad_pid=$server_pid
	# 4 MiB direct writes: four 1 MiB requests in flight at once.
	dd if="$pat" of=/dev/tapdev0 bs=4M count=2 seek=$((seek / 4)) oflag=direct 2>/dev/null &
	writer=$!
	wait "$bad_pid"
	bad_rc=$?
	server_pid=""
	if [ "$mode" = exit ]; then
		check "$mode: the server left with requests unanswered" [ "$bad_rc" = 3 ]
	else
		check "$mode: refused with EBADMSG and POLLERR" sh -c "[ $bad_rc = 3 ] && grep -q 'refused: EBADMSG' /root/server.out"
		check "$mode: status names the error ($code)" [ "$(field 0 ring_error)" = "$code" ]
		check "$mode: protocol error counted" [ "$(field 0 protocol_errors)" -gt "$errors_before" ]
	fi
	check "$mode: the writer still waits" kill -0 "$writer"
	check "$mode: requests are held" [ "$(field 0 outstanding)" -gt 0 ]
	start_server 0 good
	wait "$writer"
	check "$mode: a good server completes the held writes" [ $? = 0 ]
	check "$mode: requests were re-issued" [ "$(field 0 reissued)" -gt "$reissued_before" ]
	check "$mode: data intact" [ "$(region_sum "$seek" 8)" = "$(pattern_sum 8)" ]
	stop_server
	seek=$((seek + 8))
done
check "no I/O error in dmesg" io_error_gate

# Removal: refused while open, then the nodes disappear and rmmod works.
start_server 0 good
exec 3</dev/tapdev0
check "remove while /dev/tapdev0 is open: EBUSY" sh -c "$tapctl remove 0 | grep -q EBUSY"
exec 3<&-
check "remove after close" $tapctl remove 0
check "/dev/tapdev0 is gone" [ ! -e /dev/tapdev0 ]
check "free while the ring is open: EBUSY" sh -c "$tapctl free 0 | grep -q EBUSY"
stop_server
check "free" $tapctl free 0
check "/dev/blktap0 is gone" [ ! -e /dev/blktap0 ]
check "rmmod after the last minor" rmmod blktap

# FAIL (the supervisor gave up): held and later requests fail, nothing hangs.
insmod "$dir/blktap.ko"
$tapctl alloc 0 16 8 >/dev/null
$tapctl create 0 2048
dd if=/dev/tapdev0 of=/dev/null bs=4k count=1 iflag=direct 2>/dev/null &
reader=$!
sleep 0.3
check "a read waits while no server runs" kill -0 "$reader"
$tapctl fail 0
wait "$reader"
check "FAIL fails the held read" [ $? != 0 ]
check "later requests fail at once" sh -c '! dd if=/dev/tapdev0 of=/dev/null bs=4k count=1 iflag=direct 2>/dev/null'
gate_sees_errors() { ! io_error_gate >/dev/null; }
check "the I/O error gate sees those failures" gate_sees_errors
$tapctl remove 0 && $tapctl free 0 && rmmod blktap
check "cleanup after FAIL" [ ! -e /dev/blktap-control ]
check "dmesg gate" dmesg_gate
