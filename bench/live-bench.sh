#!/usr/bin/env bash
# Live-subscription benchmarks against the channels application (release build):
# produce (confluent-kafka, acks=all) → view → WebSocket latency at 1k and 10k events/s,
# and fan-out of one change to CONNECTIONS WebSocket subscribers.
#   bench/live-bench.sh [SECONDS=10] [CONNECTIONS=10000]
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_PER="${SECONDS_PER:-10}"
CONNECTIONS="${CONNECTIONS:-10000}"
cargo build --release -p kappa --examples >/dev/null
DIR="$(mktemp -d /var/tmp/kappa-live-bench.XXXXXX)"
trap 'kill $SERVER 2>/dev/null; rm -rf "$DIR"' EXIT
./target/release/examples/channels serve --data-dir "$DIR" --kafka-listen 127.0.0.1:19092 --http-listen 127.0.0.1:18080 --http-connections-max $((CONNECTIONS + 100)) 2>"$DIR.log" &
SERVER=$!
for _ in $(seq 100); do curl -sf 127.0.0.1:18080/health >/dev/null 2>&1 && break; sleep 0.1; done
echo "machine: $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)"
for RATE in 1000 10000; do
  ./target/release/examples/live_bench latency --http 127.0.0.1:18080 --seconds $((SECONDS_PER + 3)) > "$DIR/lat.txt" &
  LAT=$!
  sleep 1
  python3 bench/live_producer.py 127.0.0.1:19092 "$RATE" "$SECONDS_PER"
  wait $LAT
  echo "latency at $RATE events/s: $(tail -1 "$DIR/lat.txt")"
done
(ulimit -n 20000; ./target/release/examples/live_bench fanout --http 127.0.0.1:18080 --connections "$CONNECTIONS" --server-pid "$SERVER")
