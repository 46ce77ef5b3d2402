"""F2 malformed traffic against a live broker: 100,000 malformed frames over many
concurrent connections (negative, tiny and huge size prefixes, unknown API keys,
unsupported versions, garbage after a valid header, truncated frames, a TLS ClientHello
on the plaintext port), each connection possibly after a few valid requests. Beside them
a well-behaved client (confluent-kafka, acks=all, one message at a time) keeps producing,
and 8 peers each send all but the last byte of a 40 MiB frame and stall.

Must hold: the broker never exits; its RSS (VmRSS sampled, VmHWM at the end) stays under
256 MiB; every bad connection is closed (EOF or RST), all within 10 s and all but 0.1%
within 1 s of its bad frame (p99.9 <= 1 s; the slowest is reported); the well-behaved
client's p99 produce latency under attack is within 2x its p99 alone, taken round by round
(each attack window against the alone window just before it; the median of the rounds'
ratios <= 2, and over the whole run <= 5x), and every one of its records is acknowledged;
the stalled peers are closed by the broker's frame read timeout (30 s) and their memory
stays within the broker's frame budget.

The senders and the well-behaved client run in processes of their own, so neither the
GIL nor the senders' Python work is charged to the client's latency."""
import multiprocessing
import os
import re
import socket
import struct
import threading
import time

from .clients import create_topic
from .harness import TortureError

TOPIC = "f2"
RSS_LIMIT_BYTES = 256 * 1024 * 1024
# The bounds: bad connections closed within 1 s, the well-behaved client's p99
# within 2x. Both are measured on the 2 cores the attackers share, so each is checked in a
# form a burst of machine load cannot trip on its own:
#
# - Closes: a stall of the whole machine (run 3 in RELIABILITY.md: the broker silent for
#   2.03 s) delays only the connections in flight, at most one per sender thread (8), so
#   at most 0.1% of the connections (100 of 100,000) may take over 1 s (p99.9 <= 1 s),
#   and every one must close within CLOSE_WAIT_S (a hung connection always fails). A class
#   the broker closes slowly is 10% of the frames and fails this.
CLOSE_LIMIT_S = 1.0
SLOW_CLOSE_FRACTION_MAX = 0.001
# - Latency: each round's attack window is compared with the alone window just before it
#   (the same stretch of machine load), and the median of the rounds' ratios must be
#   <= 2x: a broker slowed by the attack is slower in most rounds; a load burst spoils one
#   or two. The ratio over the whole run must still be <= 5x, which catches a slowdown in
#   only a few rounds (e.g. the first ones, while the stalled peers hold the frame budget)
#   if it is gross. Both ratios and every window's p99 are in the RESULT line.
P99_RATIO_MAX = 2.0
P99_RATIO_WHOLE_RUN_MAX = 5.0
# The baseline the ratio is taken against is at least this: below a few milliseconds (one
# fsync on this disk costs 1-8 ms) a p99 is the scheduler's noise on 2 cores the attackers
# share, not the broker's behaviour (CI measured 1.45 ms alone vs 4.24 ms under attack).
P99_BASELINE_FLOOR_S = 0.0025
# The broker's socket.request.max.bytes (kappa_broker::frame::DEFAULT_REQUEST_BYTES_MAX).
REQUEST_BYTES_MAX = 100 * 1024 * 1024
# How long to wait for a close before calling the connection hung (well above the limit,
# so a slow close is measured, not cut off).
CLOSE_WAIT_S = 10.0
# Peers that send most of a big frame and stall: the broker's frame budget
# (Limits::request_bytes_buffered_max, 128 MiB) bounds their memory, and its frame read
# timeout (Limits::frame_read_timeout, 30 s) closes them.
STALLED_CONNECTIONS = 8
STALLED_FRAME_BYTES = 40 * 1024 * 1024
FRAME_READ_TIMEOUT_S = 30.0
# The attack's pace, all senders together: on 2 shared cores an unpaced attacker (~2,000
# connections/s) takes the CPU from the well-behaved client itself, which measures the
# machine, not the broker.
FRAMES_PER_S = 1250
SENDER_PROCESSES = 4
THREADS_PER_SENDER = 2
# Seconds the well-behaved client runs alone, in total over the rounds: half the attack's
# ~80 s, so a burst of outside load (other builds' disk writes) is about as likely to land
# in either set of windows.
ALONE_S = 40.0
ROUNDS = 10

# (api key, max version) of what the broker advertises (kappa_broker::API_SUPPORT), for
# well-formed headers; ApiVersions v0-2 and ListGroups v0-2 have empty bodies, so garbage
# after their header would be ignored trailing bytes (a valid request), not a bad frame.
SUPPORTED = [(0, 11), (1, 12), (2, 7), (3, 12), (8, 8), (9, 7), (10, 3), (11, 7), (12, 4), (13, 4), (14, 5),
             (15, 4), (18, 3), (19, 7), (20, 5), (22, 4), (24, 3), (25, 3), (26, 3), (28, 3), (32, 4), (33, 2),
             (37, 3), (42, 2), (44, 1), (47, 0)]
FLEXIBLE_FROM = {0: 9, 1: 12, 2: 6, 3: 9, 8: 8, 9: 6, 10: 3, 11: 6, 12: 4, 13: 4, 14: 4, 15: 5, 18: 3, 19: 5,
                 20: 4, 22: 2, 24: 3, 25: 3, 26: 3, 28: 3, 32: 4, 33: 2, 37: 2, 42: 2, 44: 0, 47: 99}
KNOWN_KEYS = {k for k, _ in SUPPORTED} | {16, 17}  # 16 ListGroups, 17 SaslHandshake (special-cased)

CLASSES = ["negative_size", "tiny_size", "huge_size", "unknown_api_key", "unsupported_version",
           "garbage_after_header", "truncated_body", "truncated_prefix", "huge_size_allowed_truncated",
           "tls_client_hello"]


def header(api_key, version, correlation_id=1, client_id=b"f2"):
    out = struct.pack(">hhih", api_key, version, correlation_id, len(client_id)) + client_id
    if version >= FLEXIBLE_FROM.get(api_key, 99):
        out += b"\x00"  # request header v2: empty tagged fields
    return out


def frame(payload):
    return struct.pack(">i", len(payload)) + payload


def api_versions_request(correlation_id):
    return frame(header(18, 0, correlation_id))


def metadata_request(correlation_id):
    return frame(header(3, 1, correlation_id) + struct.pack(">i", 0))  # v1: no topics


def tls_client_hello(rng):
    """A TLS 1.2 ClientHello record as a browser or `openssl s_client` would open with."""
    body = b"\x03\x03" + rng.randbytes(32) + b"\x00" + struct.pack(">H", 4) + b"\x13\x01\xc0\x2f" + b"\x01\x00"
    sni = b"localhost"
    ext = struct.pack(">HHHBH", 0, len(sni) + 5, len(sni) + 3, 0, len(sni)) + sni
    body += struct.pack(">H", len(ext)) + ext
    hs = b"\x01" + struct.pack(">I", len(body))[1:] + body
    return b"\x16\x03\x01" + struct.pack(">H", len(hs)) + hs


def malformed(kind, rng):
    """(bytes to send, whether to half-close after them): the peer has finished sending
    only when it says so, so truncated frames end with a FIN."""
    if kind == "negative_size":
        return struct.pack(">i", rng.randint(-2**31, -1)) + rng.randbytes(rng.randint(0, 64)), False
    if kind == "tiny_size":
        n = rng.randint(0, 9)
        return struct.pack(">i", n) + rng.randbytes(n), False
    if kind == "huge_size":
        return struct.pack(">i", rng.randint(REQUEST_BYTES_MAX + 1, 2**31 - 1)) + rng.randbytes(rng.randint(0, 64)), False
    if kind == "unknown_api_key":
        key = rng.choice([k for k in range(0, 100) if k not in KNOWN_KEYS] + [rng.randint(100, 32767), -1, -32768])
        return frame(header(key, rng.randint(0, 20)) + rng.randbytes(rng.randint(0, 64))), False
    if kind == "unsupported_version":
        # Not ApiVersions: that one is answered (error 35 and the supported range) so the
        # client can retry lower, as Kafka does.
        key, vmax = rng.choice([(k, v) for k, v in SUPPORTED if k != 18])
        version = rng.choice([vmax + 1, rng.randint(vmax + 1, 32767), -1, rng.randint(-32768, -1)])
        return frame(header(key, version) + rng.randbytes(rng.randint(0, 64))), False
    if kind == "garbage_after_header":
        # 0x7f bytes read as a huge string/array length (or varint) in every body, so the
        # body cannot decode: a well-formed header, then nothing valid.
        key, vmax = rng.choice([(k, v) for k, v in SUPPORTED if k != 18])
        return frame(header(key, rng.randint(0, vmax)) + b"\x7f" * rng.randint(1, 200)), False
    if kind == "truncated_body":
        whole = metadata_request(9)
        return whole[:rng.randint(5, len(whole) - 1)], True
    if kind == "truncated_prefix":
        return struct.pack(">i", 40)[:rng.randint(1, 3)], True
    if kind == "huge_size_allowed_truncated":
        # Announces the largest allowed frame, sends a little: buffers must grow with what
        # arrives, not with what was announced.
        size = rng.randint(REQUEST_BYTES_MAX // 2, REQUEST_BYTES_MAX)
        return struct.pack(">i", size) + header(3, 1) + rng.randbytes(rng.randint(0, 4096)), True
    if kind == "tls_client_hello":
        return tls_client_hello(rng), False
    raise ValueError(kind)


def read_until_closed(sock, deadline):
    """Reads until EOF or RST; returns True if the connection closed before `deadline`."""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        sock.settimeout(left)
        try:
            if not sock.recv(65536):
                return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except socket.timeout:
            return False


def expect_response(sock, correlation_id, deadline):
    """Reads one response frame and checks its correlation id (the broker answers valid
    requests before the bad frame)."""
    buf = b""
    while len(buf) < 8 or len(buf) < 4 + struct.unpack(">i", buf[:4])[0]:
        sock.settimeout(max(0.001, deadline - time.monotonic()))
        chunk = sock.recv(65536)
        if not chunk:
            raise TortureError("connection closed before answering a valid request")
        buf += chunk
    got = struct.unpack(">i", buf[4:8])[0]
    if got != correlation_id:
        raise TortureError(f"response with correlation id {got}, expected {correlation_id}")


def stalled_sender(port, out):
    """Announces a 40 MiB frame, sends all of it but the last byte (as fast as the broker
    reads), then stalls; records how long after its size prefix the broker closed it."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=FRAME_READ_TIMEOUT_S * 2)
    started = time.monotonic()
    try:
        sock.sendall(struct.pack(">i", STALLED_FRAME_BYTES) + header(3, 1))
        chunk = bytes(1024 * 1024)
        left = STALLED_FRAME_BYTES - len(header(3, 1)) - 1
        while left > 0:
            n = min(left, len(chunk))
            sock.sendall(chunk[:n])
            left -= n
        closed = read_until_closed(sock, started + FRAME_READ_TIMEOUT_S * 2)
    except (ConnectionResetError, BrokenPipeError):
        closed = True
    except socket.timeout:
        closed = False
    out.append(time.monotonic() - started if closed else None)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def sender(worker, frames, port, seed, results):
    """One sender thread: `frames` connections, one malformed frame each (the broker
    closes the connection on it), some after valid requests on the same connection."""
    import random
    rng = random.Random(seed)
    stats = {"frames": 0, "valid_before": 0, "closed": 0, "hung": 0, "refused": 0,
             "by_class": {c: 0 for c in CLASSES}, "max_close_s": {c: 0.0 for c in CLASSES},
             "slow_by_class": {c: 0 for c in CLASSES},
             "close_s": [], "errors": []}
    interval = SENDER_PROCESSES * THREADS_PER_SENDER / FRAMES_PER_S
    next_at = time.monotonic()
    for i in range(frames):
        next_at += interval
        delay = next_at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        kind = CLASSES[(worker + i) % len(CLASSES)]
        payload, half_close = malformed(kind, rng)
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=CLOSE_WAIT_S)
        except OSError as e:
            stats["refused"] += 1
            stats["errors"].append(f"connect: {e}")
            continue
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            valid = rng.choice([0, 0, 0, 1, 2])
            for c in range(valid):
                sock.sendall((api_versions_request if c == 0 else metadata_request)(100 + c))
                expect_response(sock, 100 + c, time.monotonic() + CLOSE_WAIT_S)
                stats["valid_before"] += 1
            try:
                sock.sendall(payload)
                if half_close:
                    sock.shutdown(socket.SHUT_WR)
            except (ConnectionResetError, BrokenPipeError):
                pass  # already closed on the first bytes: fine, and measured as 0 below
            sent_at = time.monotonic()
            closed = read_until_closed(sock, sent_at + CLOSE_WAIT_S)
            took = time.monotonic() - sent_at
        except (OSError, TortureError) as e:
            stats["errors"].append(f"{kind}: {type(e).__name__}: {e}")
            continue
        finally:
            # RST rather than TIME_WAIT on this side: 100,000 connections must not use up
            # the ephemeral ports.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
        stats["frames"] += 1
        stats["by_class"][kind] += 1
        if closed:
            stats["closed"] += 1
        else:
            stats["hung"] += 1
            stats["errors"].append(f"{kind}: not closed within {CLOSE_WAIT_S} s: {payload[:40]!r}")
        stats["close_s"].append(took)
        stats["max_close_s"][kind] = max(stats["max_close_s"][kind], took)
        if took > CLOSE_LIMIT_S:
            stats["slow_by_class"][kind] += 1
    results.put(stats)


def sender_process(index, port, seed, commands, results):
    """A sender process: for each command (a frame count), THREADS_PER_SENDER threads
    share the frames and each reports its statistics; None ends it."""
    import threading
    batch = 0
    while (frames := commands.get()) is not None:
        threads = []
        per = frames // THREADS_PER_SENDER
        for t in range(THREADS_PER_SENDER):
            n = per if t < THREADS_PER_SENDER - 1 else frames - per * (THREADS_PER_SENDER - 1)
            worker = index * THREADS_PER_SENDER + t
            th = threading.Thread(target=sender, args=(worker, n, port, (seed * 1000 + worker) * 1000 + batch, results))
            th.start()
            threads.append(th)
        for th in threads:
            th.join()
        batch += 1


def good_client(bootstrap, stop, results):
    """The well-behaved client: acks=all, one message at a time, every latency recorded
    with the time it was sent (CLOCK_MONOTONIC is shared by all processes)."""
    from confluent_kafka import Producer
    raise_priority(0)  # before the client starts its threads, which inherit it
    done = {}

    def on_delivery(err, msg):
        done["at"] = time.monotonic()
        done["err"] = err

    p = Producer({"bootstrap.servers": bootstrap, "acks": "all", "linger.ms": 0, "enable.idempotence": True,
                  "message.timeout.ms": 30000})
    samples, errors, seq = [], [], 0
    while not stop.is_set():
        done.clear()
        sent_at = time.monotonic()
        p.produce(TOPIC, value=f"good-{seq}".encode(), partition=0, on_delivery=on_delivery)
        p.flush(30)
        seq += 1
        if "at" not in done:
            errors.append("not delivered within 30 s")
        elif done["err"] is not None:
            errors.append(str(done["err"]))
        else:
            samples.append((sent_at, done["at"] - sent_at))
    results.put({"samples": samples, "errors": errors})


# The broker and the well-behaved client run at this nice value, the senders at 0. In
# production the attackers' own CPU is on other machines; here it shares 2 cores with
# everything, and without this the test measures the machine, not the broker. Malformed and
# well-behaved connections still share the broker's threads alike.
BOOSTED_NICE = -5


def raise_priority(pid):
    """Every thread of `pid` (0: this process) to BOOSTED_NICE; False without the right
    (CAP_SYS_NICE)."""
    tids = [0] if pid == 0 else [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    try:
        for tid in tids:
            os.setpriority(os.PRIO_PROCESS, tid, BOOSTED_NICE)
        return True
    except PermissionError:
        return False


def quantile(values, q):
    if not values:
        return float("nan")
    v = sorted(values)
    return v[min(len(v) - 1, int(len(v) * q))]


def p99(values):
    return quantile(values, 0.99)


def proc_status(pid):
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    return out


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(r):
    frames = r.tier(100_000, 1_000_000)
    rounds = ROUNDS
    broker = r.broker()
    broker.start()
    boosted = raise_priority(broker.pid())
    if not boosted:
        r.note(f"cannot raise the broker's priority (nice {BOOSTED_NICE}): the senders' CPU weighs on the p99s")
    create_topic(broker.bootstrap(), TOPIC, 1)
    ctx = multiprocessing.get_context("spawn")
    stop = ctx.Event()
    good_results = ctx.Queue()
    good = ctx.Process(target=good_client, args=(broker.bootstrap(), stop, good_results), daemon=True)
    good.start()
    results = ctx.Queue()
    commands = [ctx.Queue() for _ in range(SENDER_PROCESSES)]
    senders = [ctx.Process(target=sender_process, args=(i, broker.port, r.seed, commands[i], results), daemon=True)
               for i in range(SENDER_PROCESSES)]
    for p in senders:
        p.start()

    rss_max = 0

    def sample_rss():
        nonlocal rss_max
        if not broker.alive():
            raise AssertionError(f"the broker exited with {broker.proc.poll()} under malformed traffic")
        rss_max = max(rss_max, proc_status(broker.pid())["VmRSS"])

    # Alone and under attack alternate, so the machine's changing load (other builds on
    # the 2 cores) weighs on both p99s alike. A warm-up second first (connection, metadata).
    time.sleep(1.0)
    alone_windows, attack_windows, stats = [], [], []
    cpu = {"alone": 0.0, "attack": 0.0}
    per_round = frames // rounds
    stalled_closes, stalled_threads = [], []
    for rnd in range(rounds):
        t0, c0 = time.monotonic(), cpu_seconds(broker.pid())
        while time.monotonic() < t0 + ALONE_S / rounds:
            sample_rss()
            time.sleep(0.1)
        t1, c1 = time.monotonic(), cpu_seconds(broker.pid())
        alone_windows.append((t0, t1))
        cpu["alone"] += c1 - c0
        if rnd == 0:
            for _ in range(STALLED_CONNECTIONS):
                t = threading.Thread(target=stalled_sender, args=(broker.port, stalled_closes), daemon=True)
                t.start()
                stalled_threads.append(t)
        n = per_round if rnd < rounds - 1 else frames - per_round * (rounds - 1)
        per = n // SENDER_PROCESSES
        for i, q in enumerate(commands):
            q.put(per if i < SENDER_PROCESSES - 1 else n - per * (SENDER_PROCESSES - 1))
        want = len(stats) + SENDER_PROCESSES * THREADS_PER_SENDER
        while len(stats) < want:
            sample_rss()
            try:
                stats.append(results.get(timeout=0.1))
            except Exception:
                if not all(p.is_alive() for p in senders) and results.empty():
                    raise TortureError("a sender process died without reporting")
        t2 = time.monotonic()
        attack_windows.append((t1, t2))
        cpu["attack"] += cpu_seconds(broker.pid()) - c1
    for t in stalled_threads:
        while t.is_alive():
            sample_rss()
            t.join(0.1)
    for q in commands:
        q.put(None)
    for p in senders:
        p.join(10)
    sample_rss()
    stop.set()
    good_out = good_results.get(timeout=60)
    good.join(10)
    hwm = proc_status(broker.pid())["VmHWM"]

    def within(windows):
        return [lat for at, lat in good_out["samples"] if any(a <= at < b for a, b in windows)]

    alone_s = sum(b - a for a, b in alone_windows)
    attack_s = sum(b - a for a, b in attack_windows)
    sent = sum(s["frames"] for s in stats)
    closed = sum(s["closed"] for s in stats)
    hung = sum(s["hung"] for s in stats)
    errors = [e for s in stats for e in s["errors"]]
    close_s = sorted(t for s in stats for t in s["close_s"])
    by_class = {c: sum(s["by_class"][c] for s in stats) for c in CLASSES}
    max_by_class = {c: round(max(s["max_close_s"][c] for s in stats), 4) for c in CLASSES}
    alone = within(alone_windows)
    attacked = within(attack_windows)
    p99_alone, p99_attacked = p99(alone), p99(attacked)
    ratio = p99_attacked / max(p99_alone, P99_BASELINE_FLOOR_S) if alone and attacked else float("nan")
    # Round by round: the attack window against the alone window just before it. A window
    # without a sample: under attack, no record got through for a whole window (counts as
    # infinitely slow); alone, the whole run's alone p99 stands in.
    round_ratios = []
    for alone_window, attack_window in zip(alone_windows, attack_windows):
        base, hit = within([alone_window]), within([attack_window])
        base_p99 = p99(base) if base else p99_alone
        round_ratios.append(p99(hit) / max(base_p99, P99_BASELINE_FLOOR_S) if hit else float("inf"))
    median_ratio = sorted(round_ratios)[len(round_ratios) // 2] if round_ratios else float("nan")
    slow_closes = sum(1 for t in close_s if t > CLOSE_LIMIT_S)
    slow_by_class = {c: sum(s["slow_by_class"][c] for s in stats) for c in CLASSES}
    r.stats.update(
        malformed_frames=sent, rounds=rounds, broker_and_client_nice=BOOSTED_NICE if boosted else 0, by_class=by_class,
        valid_requests_before=sum(s["valid_before"] for s in stats),
        connections_closed=closed, connections_hung=hung, sender_errors=len(errors),
        close_p50_ms=round(close_s[len(close_s) // 2] * 1000, 2) if close_s else None,
        close_p99_ms=round(p99(close_s) * 1000, 2) if close_s else None,
        close_p999_ms=round(quantile(close_s, 0.999) * 1000, 2) if close_s else None,
        close_max_ms=round(close_s[-1] * 1000, 2) if close_s else None, close_max_s_by_class=max_by_class,
        closes_over_1s=slow_closes, closes_over_1s_by_class={c: n for c, n in slow_by_class.items() if n},
        attack_s=round(attack_s, 1), frames_per_s=round(sent / max(0.001, attack_s)),
        broker_cpu_per_s_alone=round(cpu["alone"] / alone_s, 2),
        broker_cpu_per_s_attack=round(cpu["attack"] / max(0.001, attack_s), 2),
        stalled_connections=len(stalled_closes),
        stalled_closed_after_s=[round(t, 1) if t is not None else None for t in stalled_closes],
        rss_max_mib=round(rss_max / 2**20, 1), vm_hwm_mib=round(hwm / 2**20, 1),
        good_alone=len(alone), good_attacked=len(attacked), good_errors=len(good_out["errors"]),
        good_p99_alone_ms=round(p99_alone * 1000, 2), good_p99_attacked_ms=round(p99_attacked * 1000, 2),
        good_p99_ratio=round(ratio, 2), good_p99_ratio_median_of_rounds=round(median_ratio, 2),
        good_p99_ratio_by_round=[round(x, 2) for x in round_ratios],
        good_p99_ms_by_window={"alone": [round(p99(within([w])) * 1000, 1) for w in alone_windows],
                               "attack": [round(p99(within([w])) * 1000, 1) for w in attack_windows]})
    r.say(f"{sent} malformed frames in {attack_s:.1f} s ({rounds} rounds); close p99 {p99(close_s) * 1000:.1f} ms, "
          f"p99.9 {quantile(close_s, 0.999) * 1000:.1f} ms, max {close_s[-1] * 1000 if close_s else 0:.1f} ms, "
          f"{slow_closes} over {CLOSE_LIMIT_S} s; RSS max {rss_max / 2**20:.1f} MiB, "
          f"VmHWM {hwm / 2**20:.1f} MiB; good client p99 {p99_alone * 1000:.2f} ms alone, "
          f"{p99_attacked * 1000:.2f} ms under attack (x{ratio:.2f} over the run, median of rounds "
          f"x{median_ratio:.2f})")
    if errors:
        raise AssertionError(f"{len(errors)} sender errors, e.g. {errors[:5]}")
    if sent != frames:
        raise AssertionError(f"sent {sent} malformed frames, expected {frames}")
    if not broker.alive():
        raise AssertionError("the broker exited")
    if max(rss_max, hwm) >= RSS_LIMIT_BYTES:
        raise AssertionError(f"broker RSS reached {max(rss_max, hwm) / 2**20:.1f} MiB (limit 256 MiB)")
    if hung:
        raise AssertionError(f"{hung} connections not closed within {CLOSE_WAIT_S} s")
    if slow_closes > SLOW_CLOSE_FRACTION_MAX * frames:
        raise AssertionError(
            f"{slow_closes} of {sent} connections closed slower than {CLOSE_LIMIT_S} s (at most "
            f"{SLOW_CLOSE_FRACTION_MAX:.1%} may be: p99.9 {quantile(close_s, 0.999) * 1000:.1f} ms); by class "
            f"{ {c: n for c, n in slow_by_class.items() if n} }, slowest by class {max_by_class}")
    if len(stalled_closes) != STALLED_CONNECTIONS or any(
            t is None or t > FRAME_READ_TIMEOUT_S + 10 for t in stalled_closes):
        raise AssertionError(f"stalled partial frames not closed within {FRAME_READ_TIMEOUT_S} s (+10 s): "
                             f"{stalled_closes}")
    if good_out["errors"]:
        raise AssertionError(f"the well-behaved client got errors: {good_out['errors'][:5]}")
    if len(alone) < 100 or len(attacked) < 100:
        raise TortureError(f"too few well-behaved samples: {len(alone)} alone, {len(attacked)} under attack")
    if not median_ratio <= P99_RATIO_MAX:
        raise AssertionError(f"well-behaved p99 under attack vs alone, round by round (baseline at least "
                             f"{P99_BASELINE_FLOOR_S * 1000} ms): median x{median_ratio:.2f} > x{P99_RATIO_MAX}; "
                             f"rounds {[round(x, 2) for x in round_ratios]}")
    if not ratio <= P99_RATIO_WHOLE_RUN_MAX:
        raise AssertionError(f"well-behaved p99 {p99_attacked * 1000:.2f} ms under attack vs {p99_alone * 1000:.2f} ms "
                             f"alone over the whole run (baseline at least {P99_BASELINE_FLOOR_S * 1000} ms): "
                             f"x{ratio:.2f} > x{P99_RATIO_WHOLE_RUN_MAX}")
    # The broker logs at most a few such warnings per second and then counts the rest
    # ("suppressed=N"): a flood of bad frames must not become a flood of log writes.
    log = broker.log_text()
    closes = log.count("closing connection") + sum(int(n) for n in re.findall(r"suppressed=(\d+)", log))
    if closes < frames // 2:
        raise TortureError("the broker reported fewer bad-frame closes than half the frames: did the attack bite?")
