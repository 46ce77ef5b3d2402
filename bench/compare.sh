#!/usr/bin/env bash
# kappa side by side with NATS JetStream and Redis Streams on this machine, in one run
# (issue 7). Installs what it needs (Debian packages), builds kappa and bench/peer-client,
# then for each of RUNS rounds runs every system in a rotated order, each on a fresh data
# directory, with the same lean client (bench/peer-client) over loopback:
#   W1 produce N x 1 KiB (durable ack, pipelined)   W2 produce N x 100 B
#   W1-deep (Kafka protocol only) W1 with DEEP_WINDOW requests in flight (acks=all producers
#       that are not idempotent may pipeline more than 5: librdkafka's default is 1000000)
#   W3 read the W1 messages from the start           W4 ack latency: one at a time, and at RATE/s
#   W5 server CPU seconds per 1M messages (/proc/<pid>/stat utime+stime around each workload)
# and, in the same rounds, the physical limits: fio fdatasync at the producers' write sizes,
# fio buffered writes, iperf3 over loopback. Prints medians [min-max] and ratios at the end.
#
#   RUNS=3 bench/compare.sh                      # ~20 min here
#   SYSTEMS="kappa-fsync redis-always" RUNS=1 N=100000 bench/compare.sh   # a quick look
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS=${RUNS:-3}
N=${N:-1000000}
CAP_SECONDS=${CAP_SECONDS:-30}          # a produce workload stops after this long (slow configs)
LAT_SECONDS=${LAT_SECONDS:-5}           # each W4 run
RATE=${RATE:-5000}                      # W4 fixed rate, msgs/s
BATCH_BYTES=${BATCH_BYTES:-262144}      # kappa: record-batch bytes per produce request
FETCH_BYTES=${FETCH_BYTES:-1048576}     # kappa fetch max; NATS pull / Redis XRANGE page = this / size
FIO_SECONDS=${FIO_SECONDS:-5}
KAPPA_RELAXED=${KAPPA_RELAXED:-interval:1000}
DEEP_WINDOW=${DEEP_WINDOW:-256}        # W1-deep: Kafka produce requests in flight (64 MiB of 256 KiB batches)
SYSTEMS=${SYSTEMS:-"kappa-fsync kappa-relaxed nats-default redis-always redis-everysec"}
DATA=${DATA_DIR:-/var/tmp/kappa-compare}
OUT=${OUT:-bench/results/compare-$(date -u +%Y-%m-%d-%H%M).txt}
PORT=${PORT:-29190}

install_tools() {
    local missing=()
    command -v nats-server >/dev/null || missing+=(nats-server)
    command -v redis-server >/dev/null || missing+=(redis-server)
    command -v fio >/dev/null || missing+=(fio)
    command -v iperf3 >/dev/null || missing+=(iperf3)
    if ((${#missing[@]})); then
        apt-get update -q
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
    fi
}

install_tools
export CARGO_INCREMENTAL=${CARGO_INCREMENTAL:-0}
cargo build --release -q -p kappa --bin kappa -p peer-client --bin peer-client
TARGET=${CARGO_TARGET_DIR:-target}
mkdir -p "$(dirname "$OUT")"
rm -rf "$DATA" && mkdir -p "$DATA"
# Copies, so a rebuild while this runs cannot change the binaries halfway.
cp "$TARGET/release/kappa" "$TARGET/release/peer-client" "$DATA/"
KAPPA="$DATA/kappa"
CLIENT="$DATA/peer-client"
# KAPPA_BASE=path/to/an/older/kappa adds base-fsync and base-relaxed: before/after in the same rounds.
if [[ -n ${KAPPA_BASE:-} ]]; then
    cp "$KAPPA_BASE" "$DATA/kappa-base"
    SYSTEMS="$SYSTEMS base-fsync base-relaxed"
fi
SERVER=
cleanup() { [[ -n $SERVER ]] && kill "$SERVER" 2>/dev/null; wait 2>/dev/null; rm -rf "$DATA"; }
trap cleanup EXIT

log() { echo "$*" | tee -a "$OUT" >&2; }
load() { cut -d' ' -f1-3 /proc/loadavg; }

wait_port() { # port
    for _ in $(seq 1 300); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.1
    done
    echo "nothing listening on $1" >&2
    return 1
}

# Starts $1 on a fresh data directory; sets SERVER (pid) and PROTO.
start_server() {
    local system=$1 dir="$DATA/$1"
    rm -rf "$dir" && mkdir -p "$dir"
    case $system in
    kappa-fsync | kappa-relaxed | base-fsync | base-relaxed)
        local sync=fsync bin=$KAPPA
        [[ $system == *-relaxed ]] && sync=$KAPPA_RELAXED
        [[ $system == base-* ]] && bin="$DATA/kappa-base"
        "$bin" serve --data-dir "$dir" --kafka-listen "127.0.0.1:$PORT" --http-listen 127.0.0.1:0 \
            --sync "$sync" 2>"$dir.log" &
        PROTO=kafka
        ;;
    nats-default)
        # JetStream file storage with the server's own sync (2.9: fsync every 2 min); pings
        # off for the run so the client need not answer them.
        printf 'listen: 127.0.0.1:%s\nping_interval: "10m"\njetstream { store_dir: "%s" }\n' "$PORT" "$dir" >"$dir.conf"
        nats-server -c "$dir.conf" 2>"$dir.log" &
        PROTO=nats
        ;;
    redis-always | redis-everysec)
        redis-server --port "$PORT" --bind 127.0.0.1 --dir "$dir" --appendonly yes \
            --appendfsync "${system#redis-}" --save '' --protected-mode no --logfile "$dir.log" &
        PROTO=redis
        ;;
    *) echo "unknown system $system" >&2; exit 2 ;;
    esac
    SERVER=$!
    wait_port "$PORT"
}

stop_server() {
    kill "$SERVER" && wait "$SERVER" 2>/dev/null || true
    SERVER=
    rm -rf "${DATA:?}/$1"
}

client() { # label system workload args...
    local label=$1 system=$2 workload=$3
    shift 3
    local line
    line=$("$CLIENT" "$PROTO" "$workload" --addr "127.0.0.1:$PORT" --server-pid "$SERVER" \
        --label "$label" "$@")
    log "$line system_config=$system load=$(load | tr ' ' ,)"
    echo "$line"
}

field() { sed -n "s/.* $1=\([^ ]*\).*/\1/p" <<<"$2"; }

run_system() { # round system
    local r=$1 s=$2 w1
    start_server "$s"
    w1=$(client "W1 r$r" "$s" produce --topic w1 --size 1024 --count "$N" --batch-bytes "$BATCH_BYTES" --seconds "$CAP_SECONDS")
    client "W3 r$r" "$s" read --topic w1 --size 1024 --count "$(field msgs "$w1")" --fetch-bytes "$FETCH_BYTES" >/dev/null
    client "W2 r$r" "$s" produce --topic w2 --size 100 --count "$N" --batch-bytes "$BATCH_BYTES" --seconds "$CAP_SECONDS" >/dev/null
    client "W4-one r$r" "$s" latency --topic w4 --size 1024 --count 100000000 --seconds "$LAT_SECONDS" >/dev/null
    client "W4-rate r$r" "$s" latency --topic w4 --size 1024 --count 100000000 --rate "$RATE" --window 100000 \
        --seconds "$LAT_SECONDS" >/dev/null
    # Last, so W4 does not run while a relaxed server writes back one more GB.
    if [[ $PROTO == kafka ]]; then
        client "W1-deep r$r" "$s" produce --topic w1deep --size 1024 --count "$N" --batch-bytes "$BATCH_BYTES" \
            --window "$DEEP_WINDOW" --seconds "$CAP_SECONDS" >/dev/null
    fi
    stop_server "$s"
}

fio_run() { # label bs fdatasync
    local f="$DATA/fio.dat" mbps
    rm -f "$f"
    mbps=$(fio --name="$1" --filename="$f" --rw=write --bs="$2" --ioengine=psync --fdatasync="$3" --size=8g \
        --fallocate=none --time_based --runtime="$FIO_SECONDS" --output-format=json |
        python3 -c 'import json,sys; print(json.load(sys.stdin)["jobs"][0]["write"]["bw_bytes"]/1e6)')
    rm -f "$f"
    log "label=$1 system=fio workload=$1 bs=$2 fdatasync=$3 mb_per_s=$mbps load=$(load | tr ' ' ,)"
}

iperf_run() { # label
    local gbps
    # No port probe here: iperf3 counts any connection as a test client.
    iperf3 -s -p $((PORT + 1)) >/dev/null 2>&1 &
    local server=$!
    sleep 1
    gbps=$(iperf3 -c 127.0.0.1 -p $((PORT + 1)) -t "$FIO_SECONDS" -J |
        python3 -c 'import json,sys; print(json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/8e6)') || gbps=failed
    kill "$server" 2>/dev/null
    wait "$server" 2>/dev/null || true
    log "label=$1 system=iperf3 workload=loopback-tcp mb_per_s=$gbps load=$(load | tr ' ' ,)"
}

: >"$OUT"
log "# bench/compare.sh $(date -u +%FT%TZ) RUNS=$RUNS N=$N BATCH_BYTES=$BATCH_BYTES FETCH_BYTES=$FETCH_BYTES RATE=$RATE LAT_SECONDS=$LAT_SECONDS CAP_SECONDS=$CAP_SECONDS KAPPA_RELAXED=$KAPPA_RELAXED DEEP_WINDOW=$DEEP_WINDOW"
log "# machine: $(nproc) cpus, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(free -g | awk '/Mem:/{print $2}') GiB, kernel $(uname -r)"
log "# disk: $(df -hT "$DATA" | tail -1 | tr -s ' ')"
log "# versions: $(nats-server --version), $(redis-server --version | cut -d' ' -f1-3), $(fio --version), $(iperf3 --version | head -1 | cut -d' ' -f1-2), kappa $(git rev-parse --short HEAD)"
read -ra systems <<<"$SYSTEMS"
for r in $(seq 1 "$RUNS"); do
    log "# round $r, load $(load)"
    # Rotate the order each round so no system always runs first (or after the same one).
    k=$(((r - 1) % ${#systems[@]}))
    for s in "${systems[@]:k}" "${systems[@]:0:k}"; do
        run_system "$r" "$s"
    done
    fio_run "fio-fdatasync-batch r$r" "$BATCH_BYTES" 1
    fio_run "fio-fdatasync-1k r$r" 1k 1
    fio_run "fio-fdatasync-16m r$r" 16m 1
    fio_run "fio-buffered-1m r$r" 1m 0
    iperf_run "iperf3 r$r"
done
log "# end, load $(load)"
python3 bench/compare_report.py "$OUT" | tee "${OUT%.txt}-summary.txt"
