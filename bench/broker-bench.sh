#!/usr/bin/env bash
# Kafka-protocol benchmark of `kappa serve` with librdkafka clients, beside the log-level
# figures from the same run so protocol overhead is visible.
#   produce: kcat -P (librdkafka 2.0.2, acks=all, default linger/batching) of N records
#   consume: kcat -C from the beginning to the end of the topic
#   latency: confluent-kafka, acks=all, linger 0, fixed rate (bench/ack_latency.py)
# Usage: bench/broker-bench.sh [records=1000000]   (needs kcat and `pip install confluent-kafka`)
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-1000000}
PORT=${PORT:-29092}
DATA=${DATA_DIR:-/var/tmp/kappa-broker-bench}
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/kappa-target}"
cargo build --release -q -p kappa -p kappa-log --bin kappa --example log_bench
BIN="$CARGO_TARGET_DIR/release/kappa"
rm -rf "$DATA" && mkdir -p "$DATA"
"$BIN" serve --data-dir "$DATA/kappa" --kafka-listen 127.0.0.1:$PORT --http-listen 127.0.0.1:0 2>"$DATA/server.log" &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null; rm -rf "$DATA"' EXIT
until kcat -b 127.0.0.1:$PORT -L >/dev/null 2>&1; do sleep 0.1; done

echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB, $(uname -r), load $(cut -d' ' -f1-3 /proc/loadavg)"
for size in 100 1024; do
    python3 -c "import sys; v=b'x'*$size; sys.stdout.buffer.write(b''.join(b'k%d:' % (i % 1000) + v + b'\n' for i in range($N)))" > "$DATA/in-$size"
    topic="bench-$size"
    kcat -b 127.0.0.1:$PORT -L -t "$topic" >/dev/null 2>&1 || true
    t0=$(date +%s.%N)
    kcat -b 127.0.0.1:$PORT -P -t "$topic" -K: -X acks=all -l "$DATA/in-$size"
    t1=$(date +%s.%N)
    count=$(kcat -b 127.0.0.1:$PORT -C -t "$topic" -o beginning -e -q -f '.' | wc -c)
    t2=$(date +%s.%N)
    python3 - "$N" "$size" "$t0" "$t1" "$t2" "$count" <<'PY'
import sys
n, size, t0, t1, t2, count = int(sys.argv[1]), int(sys.argv[2]), *map(float, sys.argv[3:6]), int(sys.argv[6])
assert count == n, f"consumed {count} of {n}"
p, c = t1 - t0, t2 - t1
print(f"kcat produce {size:>5} B x {n}: {n/p:>10,.0f} rec/s {n*size/p/1e6:>7.1f} MB/s   consume: {n/c:>10,.0f} rec/s {n*size/c/1e6:>7.1f} MB/s")
PY
done
for rate in 1000 5000; do
    python3 bench/ack_latency.py 127.0.0.1:$PORT latency 1000 1 1024 >/dev/null
    python3 bench/ack_latency.py 127.0.0.1:$PORT latency $rate 5 1024
done
echo "log level, same machine, same run:"
"$CARGO_TARGET_DIR/release/examples/log_bench" --dir "$DATA/log" --runs 1 --seconds 2 --only append,read 2>/dev/null | grep -E '^\|' 
