# shellcheck shell=bash
# Process-tree measurements for the bench scripts (source it): CPU time and
# peak RSS of a server and every process it started (ctrl and its disk
# processes), read from /proc.

# PIDs of ROOT and all its descendants, ROOT first.
tree_pids() {
  local p=$1 c
  [[ -d /proc/$p ]] || return 0
  echo "$p"
  for c in $(cat /proc/"$p"/task/*/children 2>/dev/null); do tree_pids "$c"; done
}

# utime+stime (clock ticks) of ROOT's tree; 0 for ROOT 0 (no server).
tree_cpu_ticks() {
  local total=0 p t
  [[ $1 == 0 ]] && { echo 0; return; }
  for p in $(tree_pids "$1"); do
    t=$(sed 's/^.*) //' "/proc/$p/stat" 2>/dev/null | awk '{print $12 + $13}')
    total=$((total + ${t:-0}))
  done
  echo "$total"
}

# " cpu_us_per_req=.. server_cpu_pct=.." from two tick samples, two times, IOPS and seconds.
cpu_per_request_kv() {
  local c0=$1 c1=$2 t0=$3 t1=$4 iops=$5 seconds=$6
  python3 -c '
import os, sys
c0, c1, t0, t1, iops, seconds = map(float, sys.argv[1:])
tck = os.sysconf("SC_CLK_TCK")
cpu_s = (c1 - c0) / tck
reqs = iops * seconds
print(" cpu_us_per_req=%.1f server_cpu_pct=%.0f" % (cpu_s * 1e6 / reqs if reqs else 0, 100 * cpu_s / (t1 - t0)))
' "$c0" "$c1" "$t0" "$t1" "$iops" "$seconds"
}

# " rss_peak_kib=MAIN+CHILD+..." (VmHWM of each process of ROOT's tree but
# wrappers such as timeout/taskset); nothing for ROOT 0.
tree_rss_kv() {
  [[ $1 == 0 ]] && return 0
  local p parts=() comm
  for p in $(tree_pids "$1"); do
    comm=$(cat "/proc/$p/comm" 2>/dev/null) || continue
    [[ $comm == timeout || $comm == taskset ]] && continue
    parts+=("$(awk '/^VmHWM:/{print $2}' "/proc/$p/status" 2>/dev/null)")
  done
  local IFS=+
  echo " rss_peak_kib=${parts[*]}"
}
