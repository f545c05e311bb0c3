#!/bin/sh
# Runs in the VM for bench/kernel.sh: fio on /dev/tapdevN (blktap aio raw and
# qcow, served by Deno disk processes; and the raw file served by tapctl, a
# synchronous C server: the module's own cost) and on loop devices over the
# same raw file (direct I/O and buffered), alternated within each
# repetition. Prints "RESULT REP CONFIG WORKLOAD IOPS MBPS" lines.
#   $1: directory with blktap.ko and tapctl; env: DENO, APP, REPS, RUNTIME, REGION_MIB
set -u
dir=$1
run_dir=/run/blktap
blktap() { "$DENO" run --quiet --no-prompt --cached-only -A "$APP/main.ts" "$@"; }
insmod "$dir/blktap.ko" || exit 1
mkdir -p /img && mount -t ext4 /dev/vda /img || exit 1
"$DENO" run --quiet --no-prompt --cached-only -A "$APP/main.ts" ctrl --run-dir "$run_dir" \
	--no-nbd --log-level warn >/root/ctrl.log 2>&1 &
for _ in $(seq 600); do [ -S "$run_dir/ctrl.sock" ] && break; sleep 0.2; done
raw_dev=$(blktap create --kernel aio:/img/r.raw | sed -n 2p)
qcow_dev=$(blktap create --kernel qcow:/img/q.qcow | sed -n 2p)
# The same images through the page cache (--cache writeback): the analog of
# the buffered loop device, as O_DIRECT tap is of the direct-I/O one.
raw_wb_dev=$(blktap create --kernel --cache writeback aio:/img/rw.raw | sed -n 2p)
qcow_wb_dev=$(blktap create --kernel --cache writeback qcow:/img/qw.qcow | sed -n 2p)
c_minor=$("$dir/tapctl" alloc 0 256 32)
"$dir/tapctl" create "$c_minor" $((REGION_MIB * 2048)) flush
TAPCTL_DIRECT=1 "$dir/tapctl" serve "$c_minor" /img/r.raw good >/dev/null 2>&1 &
c_server=$!
c_dev=/dev/tapdev$c_minor
loop_dio=$(/sbin/losetup --direct-io=on -f --show /img/r.raw)
loop_buf=$(/sbin/losetup -f --show /img/r.raw)
echo "# devices: raw $raw_dev, qcow $qcow_dev, raw writeback $raw_wb_dev, qcow writeback $qcow_wb_dev, C server $c_dev, loop (direct I/O) $loop_dio, loop (buffered) $loop_buf"
for d in $raw_dev $loop_dio; do
	q=/sys/block/${d#/dev/}/queue
	echo "# queue ${d#/dev/}: max_hw_sectors_kb $(cat $q/max_hw_sectors_kb) max_sectors_kb $(cat $q/max_sectors_kb)" \
		"max_segments $(cat $q/max_segments) max_segment_size $(cat $q/max_segment_size)" \
		"nr_requests $(cat $q/nr_requests) hw_queues $(ls /sys/block/${d#/dev/}/mq | wc -l)"
done
# Allocate the qcows' clusters: reads of holes would measure nothing.
for d in "$qcow_dev" "$qcow_wb_dev"; do
	fio --name=fill --filename="$d" --rw=write --bs=1M --iodepth=8 --direct=1 \
		--ioengine=libaio --size="${REGION_MIB}M" >/dev/null 2>&1
done

# Requests the device saw, their mean size, and context switches and
# interrupts of the whole guest per request: "IOS KIB_PER_IO CSW_PER_IO INTR_PER_IO".
counters() { # DEVICE -> "IOS SECTORS CTXT INTR"
	awk '{ printf "%d %d ", $1 + $5, $3 + $7 }' "/sys/block/${1#/dev/}/stat"
	awk '$1 == "ctxt" { c = $2 } $1 == "intr" { i = $2 } END { print c, i }' /proc/stat
}
per_io() { # BEFORE AFTER
	echo "$1 $2" | awk '{ n = $5 - $1; if (n < 1) n = 1
		printf "%d %.1f %.2f %.2f\n", n, ($6 - $2) / 2 / n, ($7 - $3) / n, ($8 - $4) / n }'
}
measure() { # CONFIG DEVICE RW BS DEPTH -> "IOPS MBPS", and a STAT line on stderr
	sync
	echo 3 >/proc/sys/vm/drop_caches
	before=$(counters "$2")
	fio --name=b --filename="$2" --rw="$3" --bs="$4" --iodepth="$5" --direct=1 --ioengine=libaio \
		--size="${REGION_MIB}M" --runtime="$RUNTIME" --time_based --ramp_time=1 \
		--output-format=terse --terse-version=3 2>/dev/null |
		awk -F';' -v rw="$3" '{ r = (rw ~ /read/) ? 0 : 41;
			printf "%s %.1f\n", $(8 + r), $(7 + r) * 1.024 / 1000 }'
	echo "STAT $rep $1 $3-$4-qd$5 $(per_io "$before" "$(counters "$2")")" >&2
}
for rep in $(seq "$REPS"); do
	for w in "randread 4k 32" "randwrite 4k 32" "read 1M 8" "write 1M 8"; do
		set -- $w
		for c in "loop-dio $loop_dio" "loop-buffered $loop_buf" "tap-raw $raw_dev" \
			"tap-raw-wb $raw_wb_dev" "tap-qcow $qcow_dev" "tap-qcow-wb $qcow_wb_dev" "tap-c $c_dev"; do
			case " ${CONFIGS:-all} " in *" all "* | *" ${c%% *} "*) ;; *) continue ;; esac
			echo "RESULT $rep ${c%% *} $1-$2-qd$3 $(measure ${c%% *} ${c#* } "$1" "$2" "$3" 2>>/root/stat.log)"
		done
	done
done
cat /root/stat.log
/sbin/losetup -d "$loop_dio" "$loop_buf"
kill "$c_server"
