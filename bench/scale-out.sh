#!/usr/bin/env bash
# Work mode rebuild throughput with 1, 2 and 3 workers: for each count, a fresh `kappa serve`,
# EVENTS channel events produced first, then the workers started; the time until they have
# applied every event (kappa_work_events_applied_total summed = EVENTS x views). Then the
# live lag (bench/lag_probe.py: LAG_RATE events/s for LAG_SECONDS, produce -> change on an
# SSE subscription held on the first worker).
#
#   cargo build --release --features kafka -p kappa --example channels --bin kappa
#   EVENTS=300000 bench/scale-out.sh
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET="${CARGO_TARGET_DIR:-target}/release"
EVENTS="${EVENTS:-300000}"
VIEWS=channel_page,channel_stats
NVIEWS=2
work="$(mktemp -d)"
trap '[ -n "${KEEP:-}" ] || rm -rf "$work"' EXIT

metric_sum() { # name ports...
    local name=$1 total=0; shift
    for port in "$@"; do
        v=$(curl -s "http://127.0.0.1:$port/metrics" | awk -v n="$name" '$1==n {print $2}')
        total=$((total + ${v:-0}))
    done
    echo "$total"
}

echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg); events $EVENTS"
for workers in ${WORKERS:-1 2 3}; do
    rm -rf "$work/data"; kport=$((19092 + workers))
    "$TARGET/kappa" serve --data-dir "$work/data" --kafka-listen 127.0.0.1:$kport --http-listen 127.0.0.1:$((18080 + workers)) 2>"$work/serve.log" &
    serve=$!
    sleep 1
    # The topic as the application declares it (4 partitions), then the events.
    python3 - "$kport" <<'PY'
import sys
from confluent_kafka.admin import AdminClient, NewTopic
a = AdminClient({"bootstrap.servers": f"127.0.0.1:{sys.argv[1]}"})
for f in a.create_topics([NewTopic("channels", 4, 1, config={"cleanup.policy": "compact", "kappa.compaction.subkey.header": "contentId"})]).values():
    f.result()
PY
    chunk=100000
    for ((start = 0; start < EVENTS; start += chunk)); do
        python3 tests/clients/python/channels_events.py produce --bootstrap 127.0.0.1:$kport --seed 3 --start $start --count $((EVENTS - start < chunk ? EVENTS - start : chunk))
    done
    ports=(); pids=()
    t0=$(date +%s.%N)
    for ((w = 0; w < workers; w++)); do
        port=$((18180 + w)); ports+=($port)
        "$TARGET/examples/channels" work --bootstrap 127.0.0.1:$kport --group bench --http-listen 127.0.0.1:$port --views $VIEWS 2>"$work/w$w.log" &
        pids+=($!)
    done
    until [ "$(metric_sum kappa_work_events_applied_total "${ports[@]}")" -ge $((EVENTS * NVIEWS)) ]; do sleep 0.2; done
    t1=$(date +%s.%N)
    secs=$(echo "$t1 - $t0" | bc)
    echo "workers $workers: $EVENTS events x $NVIEWS views in ${secs} s = $(echo "$EVENTS / $secs" | bc) events/s; load $(cut -d' ' -f1-3 /proc/loadavg)"
    lag=$(python3 bench/lag_probe.py --bootstrap 127.0.0.1:$kport --http 127.0.0.1:${ports[0]} --rate "${LAG_RATE:-1000}" --seconds "${LAG_SECONDS:-10}")
    echo "workers $workers: live lag $lag; load $(cut -d' ' -f1-3 /proc/loadavg)"
    kill "${pids[@]}" 2>/dev/null || true
    kill $serve; wait 2>/dev/null || true
done
