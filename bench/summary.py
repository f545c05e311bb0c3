#!/usr/bin/env python3
"""Issue 10's summary: every goal cell as a ratio measured in one run, the goal beside it.

usage: summary.py nbd FILE | ring FILE | convert FILE | all NBD RING CONVERT

Ratios are medians of per-repetition ratios (each repetition measures both
sides back to back), from the MB/s (nbd) or requests/s (ring) columns; a
cell whose two sides were not measured in the same file prints "-".
"""
import statistics as st
import sys
from collections import defaultdict

WORKLOADS = ["randread", "randwrite", "seqread", "seqwrite"]


def kv_lines(path, kind):
    for line in open(path):
        p = line.split()
        if p and p[0] == kind:
            yield dict(x.split("=", 1) for x in p[1:] if "=" in x)


def nbd_values(path):
    """(label, workload) -> {rep: kv}"""
    v = defaultdict(dict)
    for kv in kv_lines(path, "nbd-load"):
        if "MBps" in kv:
            v[(kv["label"], kv["workload"])][kv["rep"]] = kv
    return v


def ratio(v, ours, theirs, w, field="MBps"):
    a, b = v.get((ours, w), {}), v.get((theirs, w), {})
    r = [float(a[k][field]) / float(b[k][field]) for k in a if k in b and float(b[k][field]) > 0]
    return st.median(r) if r else None


def median_field(v, label, w, field):
    xs = [float(kv[field]) for kv in v.get((label, w), {}).values() if field in kv]
    return st.median(xs) if xs else None


def cell(r, goal):
    if r is None:
        return "%8s %7s %4s" % ("-", ">=%.1f" % goal if goal else "report", "")
    met = "" if goal is None else ("yes" if r >= goal else "NO")
    return "%7.2fx %7s %4s" % (r, ">=%.1f" % goal if goal else "report", met)


NBD_GOALS = [
    # (title, ours, theirs, workloads, goal or None)
    ("ctrl O_DIRECT raw / qemu-nbd none,native", "blktap-ctrl-none", "qemu-nbd-none-native", WORKLOADS, 1.0),
    ("ctrl O_DIRECT raw / nbdkit file cache=none", "blktap-ctrl-none", "nbdkit-file-none", WORKLOADS, None),
    ("ctrl O_DIRECT qcow / qemu-nbd qcow none,native", "blktap-ctrl-qcow-none", "qemu-nbd-qcow-none-native", WORKLOADS, 1.0),
    ("ctrl O_DIRECT qcow2 / qemu-nbd qcow2 none,native", "blktap-ctrl-qcow2-none", "qemu-nbd-qcow2-none-native", WORKLOADS, 1.0),
    ("ctrl O_DIRECT new qcow2 (allocating) / qemu-nbd", "blktap-ctrl-qcow2fresh-none", "qemu-nbd-qcow2fresh-none-native", WORKLOADS, 1.0),
    ("ctrl writeback qcow2 / qemu-nbd qcow2 writeback", "blktap-ctrl-qcow2-writeback", "qemu-nbd-qcow2-writeback", WORKLOADS, 1.0),
    ("ctrl writeback new qcow2 / qemu-nbd writeback", "blktap-ctrl-qcow2fresh-writeback", "qemu-nbd-qcow2fresh-writeback", WORKLOADS, 1.0),
    ("ctrl writeback / nbdkit file (page cache)", "blktap-ctrl-writeback", "nbdkit-file-default", WORKLOADS, 1.0),
    ("ctrl writeback / qemu-nbd writeback", "blktap-ctrl-writeback", "qemu-nbd-writeback", WORKLOADS, 1.0),
    ("ctrl O_DIRECT raw / fio on the bare file", "blktap-ctrl-none", "fio-direct", ["seqread", "seqwrite"], 0.9),
    # serve: at or above 1.0 where it was (bench/results/nbd-20261127T0217Z: randwrite, seqread,
    # seqwrite vs qemu-nbd; randwrite vs nbdkit cache=none); the rest is reported.
    ("serve O_DIRECT / qemu-nbd none,native", "blktap-none", "qemu-nbd-none-native", WORKLOADS, None),
    ("serve O_DIRECT / nbdkit file cache=none", "blktap-none", "nbdkit-file-none", WORKLOADS, None),
    ("serve writeback / nbdkit file (page cache)", "blktap-writeback", "nbdkit-file-default", WORKLOADS, None),
    ("serve writeback / qemu-nbd writeback", "blktap-writeback", "qemu-nbd-writeback", WORKLOADS, None),
]
SERVE_WAS_AT_LEAST_1 = {("blktap-none", "qemu-nbd-none-native", w) for w in ["randwrite", "seqread", "seqwrite"]}
SERVE_WAS_AT_LEAST_1.add(("blktap-none", "nbdkit-file-none", "randwrite"))


def nbd_summary(path):
    v = nbd_values(path)
    print("%-48s %-10s %8s %7s %4s" % ("goal (issue 10): ours / peer, MB/s", "workload", "ratio", "goal", "met"))
    for title, ours, theirs, ws, goal in NBD_GOALS:
        for w in ws:
            g = 1.0 if (ours, theirs, w) in SERVE_WAS_AT_LEAST_1 else goal
            r = ratio(v, ours, theirs, w)
            if r is None and not any(k[0] == ours for k in v):
                continue
            print("%-48s %-10s %s" % (title, w, cell(r, g)))
    print()
    print("CPU per request (user+system of all server processes / requests) and peak RSS (MiB)")
    print("%-28s %-10s %12s %10s %10s   %s" % ("config", "workload", "cpu_us/req", "MB/s", "IOPS", "rss_peak_MiB (main+children)"))
    labels = sorted({k[0] for k in v}, key=lambda x: (x.replace("blktap", "a"),))
    for label in labels:
        for w in WORKLOADS:
            reps = v.get((label, w), {})
            if not reps:
                continue
            cpu = median_field(v, label, w, "cpu_us_per_req")
            rss = max((kv.get("rss_peak_kib", "") for kv in reps.values()), key=len, default="")
            rss_mib = "+".join("%.0f" % (int(x) / 1024) for x in rss.split("+") if x)
            print("%-28s %-10s %12s %10.0f %10.0f   %s" % (
                label, w, "%.1f" % cpu if cpu is not None and label != "fio-direct" else "-",
                median_field(v, label, w, "MBps"), median_field(v, label, w, "iops"), rss_mib))
    print()
    print("%-28s %-10s %s" % ("ctrl CPU per request / qemu-nbd's", "workload", "ratio (lower is cheaper)"))
    for ours, theirs in [("blktap-ctrl-none", "qemu-nbd-none-native"), ("blktap-ctrl-qcow-none", "qemu-nbd-qcow-none-native"),
                         ("blktap-ctrl-qcow2-none", "qemu-nbd-qcow2-none-native"),
                         ("blktap-ctrl-qcow2fresh-none", "qemu-nbd-qcow2fresh-none-native"),
                         ("blktap-ctrl-writeback", "qemu-nbd-writeback")]:
        for w in WORKLOADS:
            a, b = median_field(v, ours, w, "cpu_us_per_req"), median_field(v, theirs, w, "cpu_us_per_req")
            if a is not None and b:
                print("%-28s %-10s %.2fx (%.1f vs %.1f us)" % (ours, w, a / b, a, b))
    base_summary(v)
    loads = [float(kv["load1"]) for reps in v.values() for kv in reps.values() if "load1" in kv]
    if loads:
        print("\nload average (1 min) during the run: median %.2f, min %.2f, max %.2f" % (st.median(loads), min(loads), max(loads)))


def base_summary(v):
    """This tree / BASE (bench/nbd.sh's base-CONFIG), where both were measured."""
    pairs = sorted({k[0][len("base-"):] for k in v if k[0].startswith("base-")})
    if not pairs:
        return
    print()
    print("%-28s %-10s %s" % ("this tree / BASE", "workload", "ratio of MB/s (higher is faster)"))
    for label in pairs:
        for w in WORKLOADS:
            r = ratio(v, label, "base-" + label, w)
            if r is not None:
                print("%-28s %-10s %.2fx" % (label, w, r))


def ring_summary(path):
    rows = list(kv_lines(path, "ring"))
    print("%-48s %-10s %8s %7s %4s" % ("goal (issue 10): ring aio / fio, requests/s", "workload", "ratio", "goal", "met"))
    by = defaultdict(list)
    for kv in rows:
        by[(kv["workload"], kv["depth"])].append(kv)
    for (w, depth), kvs in by.items():
        r = st.median(float(k["aio_rps"]) / float(k["fio_iops"]) for k in kvs)
        goal = 0.8 if depth == "32" else None
        print("%-48s %-10s %s" % ("ring, 4 KiB, depth %s (test front end in ctrl)" % depth, w, cell(r, goal)))
    print()
    print("%-10s %5s %10s %10s %10s %14s %14s %s" % ("workload", "depth", "null_rps", "aio_rps", "fio_iops", "ctrl_us/req", "disk_us/req", "rss_peak_MiB ctrl+disk"))
    for (w, depth), kvs in by.items():
        med = lambda f: st.median(float(k[f]) for k in kvs)
        rss = max((k.get("rss_peak_kib", "") for k in kvs), key=len, default="")
        print("%-10s %5s %10.0f %10.0f %10.0f %14.1f %14.1f %s" % (
            w, depth, med("null_rps"), med("aio_rps"), med("fio_iops"), med("ctrl_cpu_us_per_req"),
            med("disk_cpu_us_per_req"), "+".join("%.0f" % (int(x) / 1024) for x in rss.split("+") if x)))
    loads = [float(k["load1"]) for k in rows if "load1" in k]
    if loads:
        print("\nload average (1 min) during the run: median %.2f, min %.2f, max %.2f" % (st.median(loads), min(loads), max(loads)))


def convert_summary(path):
    t = {kv["tool"]: kv for kv in kv_lines(path, "convert")}
    print("%-48s %-10s %8s %7s %4s" % ("goal (issues 10, 11): time ratio (lower is faster)", "", "ratio", "goal", "met"))
    if "blktap-img2qcow" in t and "qemu-qcow2-sync" in t:
        r = float(t["blktap-img2qcow"]["median_s"]) / float(t["qemu-qcow2-sync"]["median_s"])
        met = "yes" if r <= 1.0 else "NO"
        print("%-48s %-10s %7.2fx %7s %4s" % ("img2qcow / (qemu-img convert -O qcow2 + sync)", "2 GiB", r, "<=1.0", met))
    for name, kv in t.items():
        print("  %-28s median %ss" % (name, kv["median_s"]))
    # Issue 11: blktap convert per format pair (a BASE= checkout's lines are left out).
    for line in open(path):
        p = line.split()
        kv = dict(x.split("=", 1) for x in p[2:] if "=" in x)
        if p[:1] != ["pair"] or "base" in kv or "ratio_median_of_reps" not in kv:
            continue
        r = float(kv["ratio_median_of_reps"])
        title = "convert %s / (qemu-img convert + sync)" % p[1]
        print("%-48s %-10s %7.2fx %7s %4s" % (title, "2 GiB", r, "<=1.0", "yes" if r <= 1.0 else "NO"))


def main(argv):
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    mode = argv[0]
    if mode == "nbd":
        nbd_summary(argv[1])
    elif mode == "ring":
        ring_summary(argv[1])
    elif mode == "convert":
        convert_summary(argv[1])
    elif mode == "all" and len(argv) == 4:
        for f, (title, fn) in zip(argv[1:], [("nbd", nbd_summary), ("ring", ring_summary), ("convert", convert_summary)]):
            print("==== %s: %s" % (title, f))
            fn(f)
            print()
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
