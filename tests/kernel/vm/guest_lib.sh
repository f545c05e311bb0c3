# Sourced by the guest scripts of tests/kernel/vm/: checks printed as
# "ok - NAME" / "not ok - NAME" (tests/kernel/vm_test.sh counts them), and
# the dmesg gates.
ok() { echo "ok - $*"; }
notok() { echo "not ok - $*"; }
uptime_s() { cut -d' ' -f1 /proc/uptime; }
check() { # NAME COMMAND...: one check, with the guest time it took
	name=$1
	shift
	check_t0=$(uptime_s)
	if "$@"; then ok "$name ($(elapsed "$check_t0") s)"; else notok "$name ($(elapsed "$check_t0") s)"; fi
}
elapsed() { awk -v a="$1" -v b="$(uptime_s)" 'BEGIN { printf "%.1f", b - a }'; }

# A kernel complaint of any kind fails the run: BUG/WARNING/oops reports,
# slub_debug's poison and redzone checks, list corruption, hung tasks.
dmesg_gate_pattern='BUG:|BUG [a-z_-]+|kernel BUG|WARNING:|Oops|general protection|Call Trace|list_add corruption|list_del corruption|corrupted|Poison overwritten|Redzone|Padding overwritten|Object already free|Freepointer|blocked for more than|soft lockup|hard LOCKUP|rcu_sched self-detected|stall'
dmesg_gate() {
	if dmesg | grep -E "$dmesg_gate_pattern"; then return 1; fi
	return 0
}
# No request failed on its way to the block layer's users.
io_error_gate() {
	if dmesg | grep -iE 'I/O error|critical|blk_update_request|Buffer I/O'; then return 1; fi
	return 0
}
