#!/usr/bin/env bash
# Runs kappa-log's benchmark and fio on the same disk and prints kappa / fio ratios.
#
#   bench/log-vs-fio.sh            # RUNS=3 SECONDS_PER=2 RECOVERY_MIB=1024 DATA_DIR=/var/tmp/kappa-bench
#
# Needs fio (apt-get install -y fio) and python3. Data goes under $DATA_DIR (keep it on the
# same file system as the repository's target disk) and is removed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS=${RUNS:-3}
SECONDS_PER=${SECONDS_PER:-2}
RECOVERY_MIB=${RECOVERY_MIB:-1024}
INTERVAL_MS=${INTERVAL_MS:-100}
DATA_DIR=${DATA_DIR:-/var/tmp/kappa-bench}
OUT=${OUT:-$(mktemp -d /tmp/kappa-bench-out.XXXXXX)}
mkdir -p "$DATA_DIR" "$OUT"
trap 'rm -rf "$DATA_DIR"' EXIT

echo "# machine: $(nproc) cpus, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), kernel $(uname -r)"
echo "# disk: $(df -hT "$DATA_DIR" | tail -1)"
echo "# load at start: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "# results in $OUT"

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/kappa-target}"
cargo build --release -p kappa-log --example log_bench
"$CARGO_TARGET_DIR/release/examples/log_bench" --dir "$DATA_DIR/kappa" --runs "$RUNS" --seconds "$SECONDS_PER" \
    --recovery-mib "$RECOVERY_MIB" --interval-ms "$INTERVAL_MS" --tsv "$OUT/kappa.tsv" | tee "$OUT/kappa.md"

# fio: sequential appends into a fresh file, one writer, psync, at each write size.
#   fdatasync=1: an fdatasync after every write (what a durable append pays);
#   buffered: no syncs at all (page cache + writeback), 1 MiB writes.
fio_run() { # name bs fdatasync
    local name=$1 bs=$2 sync=$3 i
    for i in $(seq 1 "$RUNS"); do
        rm -f "$DATA_DIR/fio.dat"
        fio --name="$name" --filename="$DATA_DIR/fio.dat" --rw=write --bs="$bs" --ioengine=psync \
            --fdatasync="$sync" --size=8g --fallocate=none --time_based --runtime="$SECONDS_PER" \
            --output-format=json --output="$OUT/fio-$name-$i.json" >/dev/null
        echo "$name $bs $sync $i $(cut -d' ' -f1 /proc/loadavg)" >>"$OUT/fio-runs.txt"
    done
}
# Write sizes: kappa's batch sizes, plus the bytes each fdatasync covered under group commit
# with 8 appenders (from kappa's own counters).
sizes=$(awk -F'\t' '$1=="append" && $2=="every-append" {print $6; if ($3==8) print int($11)}' "$OUT/kappa.tsv" | sort -n | uniq)
for bs in $sizes; do fio_run "fdatasync-$bs" "$bs" 1; done
fio_run buffered-1m 1m 0
rm -f "$DATA_DIR/fio.dat"

python3 - "$OUT" "$RUNS" <<'PY'
import json, glob, statistics, sys, os
out, runs = sys.argv[1], int(sys.argv[2])
def fio_bw(name):
    vals = []
    for f in sorted(glob.glob(f"{out}/fio-{name}-*.json")):
        j = json.load(open(f))
        vals.append(j["jobs"][0]["write"]["bw_bytes"] / 1e6)
    return statistics.median(vals), min(vals), max(vals)
rows = [l.rstrip("\n").split("\t") for l in open(f"{out}/kappa.tsv")]
print("\n## kappa durable appends vs fio fdatasync (sequential appends, 1 writer, MB/s median [min-max])\n")
print("| threads | record B | batch recs | write size B | kappa MB/s | fio fdatasync MB/s @ batch size | ratio | B per kappa fdatasync | fio MB/s @ that size | ratio |")
print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
for r in rows:
    if r[0] != "append" or r[1] != "every-append":
        continue
    threads, rec, recs, bs = r[2], r[3], r[4], r[5]
    k, klo, khi = float(r[7]), float(r[8]), float(r[9])
    f, flo, fhi = fio_bw(f"fdatasync-{bs}")
    per_sync = int(float(r[10]))
    g = fio_bw(f"fdatasync-{per_sync}") if os.path.exists(f"{out}/fio-fdatasync-{per_sync}-1.json") else (float("nan"),)*3
    print(f"| {threads} | {rec} | {recs} | {bs} | {k:.2f} [{klo:.2f}-{khi:.2f}] | {f:.2f} [{flo:.2f}-{fhi:.2f}] | {k/f:.2f} | {per_sync} | {g[0]:.2f} | {k/g[0]:.2f} |")
b = fio_bw("buffered-1m")
print(f"\nfio buffered sequential write, 1 MiB: {b[0]:.0f} MB/s [{b[1]:.0f}-{b[2]:.0f}]")
for r in rows:
    if r[0] == "append" and r[1].startswith("interval") and r[2] == "1" and r[3] == "1024" and r[4] == "1000":
        print(f"kappa {r[1]} 1 thread, 1 KiB x 1000: {float(r[7]):.0f} MB/s = {float(r[7])/b[0]:.2f} of fio buffered")
    if r[0] == "read":
        print(f"kappa sequential read from page cache: {float(r[1]):.2f} GB/s [{float(r[2]):.2f}-{float(r[3]):.2f}] = {float(r[1])/1.0:.2f} of the 1 GB/s target")
    if r[0] == "recovery":
        print(f"kappa recovery {r[1]}: {float(r[2]):.1f} ms [{float(r[3]):.1f}-{float(r[4]):.1f}], scanned {int(r[5])/2**20:.0f} MiB")
    if r[0] == "crc":
        d, i = float(r[4]), float(r[5])
        print(f"crc32c {r[1]} B x {r[2]}: {float(r[3]):.3f} us = {100*float(r[3])/d:.2f}% of a durable append, {100*float(r[3])/i:.2f}% of an interval-policy append")
PY
echo "# fio runs (name bs fdatasync run load1):"; cat "$OUT/fio-runs.txt"
echo "# load at end: $(cut -d' ' -f1-3 /proc/loadavg)"
