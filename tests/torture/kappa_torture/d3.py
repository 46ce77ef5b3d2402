"""D3 fsync failure: the broker runs under libfiu (`fiu-run -x`); at a random moment
while idempotent producers write, every fdatasync/fsync starts failing with EIO
(`fiu-ctrl`). From then on nothing may be acknowledged by that broker process, not even
after the failure point is switched off again (the directory stays poisoned until
restart); reads keep working; after a restart (kill -9 or SIGTERM) the broker takes
writes again and every acknowledged record is there, once."""
import time

from .checker import check_no_ack_in
from .clients import create_topic, read_partitions
from .harness import TortureError
from .workload import ProduceWorkload

TOPIC = "d3"
PARTITIONS = 3
EIO = 5
SYNC_POINTS = ["posix/io/sync/fdatasync", "posix/io/sync/fsync"]


def wait_log(broker, needle, count, timeout):
    deadline = time.monotonic() + timeout
    while broker.log_count(needle) < count:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def run(r):
    cycles = r.tier(10, 100)
    broker = r.broker()
    broker.start(fiu_commands=[])
    create_topic(broker.bootstrap(), TOPIC, PARTITIONS)
    # Records must not time out in the client while the broker is poisoned or restarting:
    # after a timeout librdkafka drains and bumps the idempotent epoch, and re-sends the
    # records still queued for retry under the new epoch with new sequence numbers, so one
    # that had been written (but not acknowledged) before the fault is stored twice. That
    # is librdkafka's documented trade-off (option "6d" in its test
    # 0094-idempotence_msg_timeout.c), not the broker's doing; with a 4 s timeout this
    # scenario sees tens of such duplicates per run. See tests/torture/README.md.
    w = ProduceWorkload(r, broker.bootstrap(), TOPIC, PARTITIONS, producers=3, rate_per_producer=500,
                        conf={"message.timeout.ms": 120000},
                        confs=[{"linger.ms": 0}, {"linger.ms": 5}, {"linger.ms": 2, "batch.num.messages": 10}])
    w.start()
    windows = []
    stops = {"kill9": 0, "sigterm": 0, "sigterm_exit_codes": {}}
    reads_while_poisoned = 0
    for cycle in range(cycles):
        w.wait_progress(w.acked())
        time.sleep(r.rng.uniform(0, 0.3))
        broker.fiu_ctrl(*[f"enable name={p},failinfo={EIO}" for p in SYNC_POINTS])
        fault_at = time.monotonic()
        poisoned = cycle + 1
        if not wait_log(broker, "log directory poisoned", poisoned, 30):
            raise TortureError("the broker never reported a poisoned directory after fsync started failing")
        time.sleep(r.rng.uniform(0.1, 0.5))
        # The cause goes away; the poisoning must not.
        broker.fiu_ctrl(*[f"disable name={p}" for p in SYNC_POINTS])
        time.sleep(r.rng.uniform(0.2, 0.6))
        # Reads keep working on the poisoned broker.
        got = read_partitions(broker.bootstrap(), [(TOPIC, p) for p in range(PARTITIONS)], logger=r.logger, timeout=30, tail=2000)
        reads_while_poisoned += sum(len(v) for v in got.values())
        restart_at = time.monotonic()
        windows.append((fault_at, restart_at))
        if r.rng.random() < 0.5:
            broker.kill9()
            stops["kill9"] += 1
        else:
            code = broker.stop()
            stops["sigterm"] += 1
            stops["sigterm_exit_codes"][str(code)] = stops["sigterm_exit_codes"].get(str(code), 0) + 1
        broker.start(fiu_commands=[])
        if cycle % 5 == 4:
            r.say(f"cycle {cycle + 1}/{cycles}: {w.acked()} acknowledged")
    pending = w.stop(flush_timeout=60)
    final_acked, final_failed = w.send_and_wait(50)
    with w.lock:
        sent = dict(w.sent)
    check_no_ack_in(sent, windows, r.anomalies)
    w.check(r.anomalies)
    unclean, truncating, truncated = broker.recoveries()
    r.stats.update(cycles=cycles, **stops, **w.counts(), pending_after_flush=pending,
                   records_read_while_poisoned=reads_while_poisoned, final_batch_acked=final_acked,
                   final_batch_failed=final_failed, unclean_recoveries=unclean, recoveries_truncating=truncating,
                   client_errors=w.client_errors())
    if pending:
        raise AssertionError(f"{pending} records neither acknowledged nor failed")
    if final_failed:
        raise AssertionError(f"after the last restart {final_failed} records failed: the broker did not recover")
