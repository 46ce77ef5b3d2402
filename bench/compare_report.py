#!/usr/bin/env python3
"""Summarizes bench/compare.sh raw output: medians [min-max] per system and workload, the
physical limits, and the ratios against issue 7's targets. Usage: compare_report.py RAW.txt"""
import statistics
import sys
from collections import defaultdict


def parse(path):
    rows = []
    for line in open(path):
        if not line.startswith("label="):
            continue
        fields = dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
        fields["workload_id"] = line.split("=", 1)[1].split()[0]  # W1, W3, W4-one, fio-..., iperf3
        rows.append(fields)
    return rows


def number(x):
    try:
        return float(x)
    except ValueError:  # e.g. "failed"
        return None


def stats(values):
    v = [n for n in map(number, values) if n is not None]
    return (statistics.median(v), min(v), max(v)) if v else None


def fmt(s, digits=1):
    if s is None:
        return "n/a"
    m, lo, hi = s
    return f"{m:,.{digits}f} [{lo:,.{digits}f}-{hi:,.{digits}f}]"


def main(path):
    rows = parse(path)
    groups = defaultdict(list)
    for r in rows:
        groups[(r.get("system_config", r["system"]), r["workload_id"])].append(r)

    def get(system, workload, key):
        vals = [r[key] for r in groups.get((system, workload), []) if key in r]
        return stats(vals) if vals else None

    def med(system, workload, key):
        s = get(system, workload, key)
        return s[0] if s else None

    systems = sorted({k[0] for k in groups if not k[0].startswith(("fio", "iperf"))})
    print("## Throughput and CPU: median [min-max] over rounds\n")
    print("| system | workload | msgs/s | MB/s | server CPU s per 1M msgs | client CPU s | runs |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for s in systems:
        for w in ("W1", "W1-deep", "W2", "W3"):
            if (s, w) not in groups:
                continue
            print(f"| {s} | {w} | {fmt(get(s, w, 'msgs_per_s'), 0)} | {fmt(get(s, w, 'mb_per_s'))} | "
                  f"{fmt(get(s, w, 'server_cpu_s_per_1m'), 2)} | {fmt(get(s, w, 'client_cpu_s'), 2)} | "
                  f"{len(groups[(s, w)])} |")
    print("\n## W4 ack latency (1 KiB), µs, median [min-max] of the runs' percentiles\n")
    print("| system | mode | p50 µs | p99 µs | max µs | msgs/s |")
    print("|---|---|---:|---:|---:|---:|")
    for s in systems:
        for w in ("W4-one", "W4-rate"):
            if (s, w) in groups:
                print(f"| {s} | {w} | {fmt(get(s, w, 'p50_us'))} | {fmt(get(s, w, 'p99_us'))} | "
                      f"{fmt(get(s, w, 'max_us'), 0)} | {fmt(get(s, w, 'msgs_per_s'), 0)} |")
    print("\n## Physical limits, same rounds (MB/s)\n")
    limits = sorted({k for k in groups if k[0] in ("fio", "iperf3")})
    for k in limits:
        print(f"- {k[1]}: {fmt(get(k[0], k[1], 'mb_per_s'))}")

    def ratio(a, b, target, better="higher"):
        if a is None or b is None or b == 0:
            return "n/a"
        x = a / b
        ok = x >= target if better == "higher" else x <= target
        return f"{x:.2f} (target {'≥' if better == 'higher' else '≤'} {target}: {'met' if ok else 'MISSED'})"

    fio_batch = med("fio", "fio-fdatasync-batch", "mb_per_s")
    fio_buf = med("fio", "fio-buffered-1m", "mb_per_s")
    fio_16m = med("fio", "fio-fdatasync-16m", "mb_per_s")
    print("\n## Ratios against issue 7's targets (medians)\n")
    print(f"- W1 kappa-fsync / redis-always (msgs/s): {ratio(med('kappa-fsync', 'W1', 'msgs_per_s'), med('redis-always', 'W1', 'msgs_per_s'), 10)}")
    print(f"- W1 kappa-fsync / fio fdatasync at the batch size (MB/s): {ratio(med('kappa-fsync', 'W1', 'mb_per_s'), fio_batch, 0.8)}")
    print(f"- W1 kappa-fsync / fio buffered (MB/s): {ratio(med('kappa-fsync', 'W1', 'mb_per_s'), fio_buf, 0.5)}")
    print(f"- W1 kappa-relaxed / fio buffered (MB/s): {ratio(med('kappa-relaxed', 'W1', 'mb_per_s'), fio_buf, 0.5)}")
    for s in ("kappa-fsync", "base-fsync"):
        deep = med(s, "W1-deep", "mb_per_s")
        print(f"- W1-deep {s} / fio buffered (MB/s): {ratio(deep, fio_buf, 0.5)}")
        print(f"- W1-deep {s} / fio fdatasync at 16 MiB (MB/s, the disk's durable rate): {ratio(deep, fio_16m, 0.8)}")
    for w in ("W1", "W2"):
        print(f"- {w} kappa-relaxed / nats-default (msgs/s): {ratio(med('kappa-relaxed', w, 'msgs_per_s'), med('nats-default', w, 'msgs_per_s'), 1.5)}")
        print(f"- {w} kappa-fsync / nats-default (msgs/s, for reference): {ratio(med('kappa-fsync', w, 'msgs_per_s'), med('nats-default', w, 'msgs_per_s'), 1.5)}")
    for s in ("kappa-fsync", "kappa-relaxed"):
        print(f"- W3 {s} / nats-default (msgs/s): {ratio(med(s, 'W3', 'msgs_per_s'), med('nats-default', 'W3', 'msgs_per_s'), 2)}")
        w3 = med(s, "W3", "mb_per_s")
        print(f"- W3 {s} 1 MiB fetches: {w3 and w3 / 1000:.2f} GB/s (target ≥ 1 GB/s: {'met' if w3 and w3 >= 1000 else 'MISSED'})")
    for w in ("W1", "W2", "W3"):
        for s in ("kappa-fsync", "kappa-relaxed"):
            print(f"- W5 {w} server CPU per msg, {s} / nats-default: {ratio(med(s, w, 'server_cpu_s_per_1m'), med('nats-default', w, 'server_cpu_s_per_1m'), 0.5, 'lower')}")
    p50, p99 = med("kappa-relaxed", "W4-one", "p50_us"), med("kappa-relaxed", "W4-one", "p99_us")
    if p50 is not None:
        print(f"- W4 kappa-relaxed one at a time: p50 {p50:.1f} µs (target ≤ 50: {'met' if p50 <= 50 else 'MISSED'}), "
              f"p99 {p99:.1f} µs (target ≤ 150: {'met' if p99 <= 150 else 'MISSED'})")


if __name__ == "__main__":
    main(sys.argv[1])
