"""D4 short writes: the broker runs under libfiu with `pwrite`/`pwritev` reduced at random
(a write call stores only part of what it was given, as a full disk or a signal can
cause), over at least 10,000 produce requests. Now and then a burst of EIO on them
lands between the pieces of a batch, leaving a torn batch on disk and the directory
poisoned; the broker is then killed (-9) and restarted, and recovery must cut the torn
tail. No corrupt batch may ever be served (librdkafka checks every batch's CRC), every
acknowledged record must be there once, and nothing may be acknowledged after the
failure."""
import time

from .checker import check_no_ack_in
from .clients import create_topic
from .harness import TortureError
from .workload import ProduceWorkload

TOPIC = "d4"
PARTITIONS = 3
EIO = 5
# Only pwrite and pwritev: every file write of kappa's RealFs is one of them (write_all_at,
# and a segment append written from the request's own buffers). Reducing plain write()
# would also hit tokio's eventfd wake-ups, where a short write is EINVAL and tokio panics:
# an artefact of the injection, not a disk fault.
WRITES = ["posix/io/rw/pwrite", "posix/io/rw/pwritev"]
REDUCE = [f"{w}/reduce" for w in WRITES]


def run(r):
    requests_target = r.tier(10_000, 200_000)
    bursts_every = r.tier(1_000, 5_000) if r.scale is None else max(500, requests_target // 10)
    reduce_p = 0.3
    broker = r.broker()
    fiu_start = [f"enable_random name={p},probability={reduce_p}" for p in REDUCE]
    broker.start(fiu_commands=fiu_start)
    create_topic(broker.bootstrap(), TOPIC, PARTITIONS)
    # Small batches (many produce requests); no client-side timeouts (see d3.py).
    w = ProduceWorkload(r, broker.bootstrap(), TOPIC, PARTITIONS, producers=3, rate_per_producer=700,
                        conf={"message.timeout.ms": 120000},
                        confs=[{"linger.ms": 0}, {"linger.ms": 1, "batch.num.messages": 5},
                               {"linger.ms": 3, "compression.type": "gzip"}])
    w.start()
    windows = []
    bursts = 0
    next_burst = bursts_every
    while True:
        w.wait_progress(w.acked())
        done = w.produce_requests()
        if done >= requests_target:
            break
        if done < next_burst:
            time.sleep(0.05)
            continue
        next_burst += bursts_every
        # An EIO burst: some pwrite calls fail outright, mid-batch after a reduced one.
        poisoned_before = broker.log_count("log directory poisoned")
        for write in WRITES:
            broker.fiu_ctrl(f"enable_random name={write},failinfo={EIO},probability=0.3")
        deadline = time.monotonic() + 30
        while broker.log_count("log directory poisoned") == poisoned_before:
            if time.monotonic() > deadline:
                raise TortureError("no write failed within 30 s of enabling EIO on pwrite and pwritev")
            time.sleep(0.005)
        # Only some pwrite calls fail, so records written before the first failure are
        # rightly acknowledged: the window starts once the poisoning is seen.
        fault_at = time.monotonic()
        for write in WRITES:
            broker.fiu_ctrl(f"disable name={write}")
        time.sleep(r.rng.uniform(0.05, 0.3))
        windows.append((fault_at, time.monotonic()))
        broker.kill9()
        broker.start(fiu_commands=fiu_start)
        bursts += 1
        r.say(f"{done} produce requests, {bursts} EIO bursts, {w.acked()} records acknowledged")
    pending = w.stop(flush_timeout=120)
    with w.lock:
        sent = dict(w.sent)
    check_no_ack_in(sent, windows, r.anomalies)
    w.check(r.anomalies)
    unclean, truncating, truncated = broker.recoveries()
    r.stats.update(produce_requests=w.produce_requests(), eio_bursts=bursts, write_reduce_probability=reduce_p,
                   **w.counts(), pending_after_flush=pending, unclean_recoveries=unclean,
                   recoveries_truncating_a_torn_tail=truncating, bytes_truncated=truncated,
                   client_errors=w.client_errors())
    if pending:
        raise AssertionError(f"{pending} records neither acknowledged nor failed")
