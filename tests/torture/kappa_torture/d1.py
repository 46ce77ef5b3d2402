"""D1 kill -9 during produce: 4 idempotent producers (acks=all) write to a 3-partition
topic while the broker is SIGKILLed at random moments and restarted on the same data
directory. Every acknowledged record must be at its acknowledged offset afterwards, no
record may be stored twice, and each producer's records keep their order."""
import time

from .clients import create_topic
from .workload import ProduceWorkload

TOPIC = "d1"
PARTITIONS = 3

# Different batching per producer, so single records, pipelined small batches and large
# batches are all in flight when the broker dies.
CONFS = [
    {"linger.ms": 0},
    {"linger.ms": 2, "batch.num.messages": 20},
    {"linger.ms": 10},
    {"linger.ms": 5, "compression.type": "lz4"},
]


def run(r):
    cycles = r.tier(50, 500)
    broker = r.broker()
    broker.start()
    create_topic(broker.bootstrap(), TOPIC, PARTITIONS)
    w = ProduceWorkload(r, broker.bootstrap(), TOPIC, PARTITIONS, producers=4, rate_per_producer=800, confs=CONFS)
    w.start()
    for cycle in range(cycles):
        if r.rng.random() < 0.15:
            # Right after the restart: recovery, coordinators opening, clients reconnecting.
            time.sleep(r.rng.uniform(0, 0.03))
        else:
            # Mid-stream: once writes are flowing again, at a random moment.
            w.wait_progress(w.acked())
            time.sleep(r.rng.uniform(0, 0.3))
        broker.kill9()
        time.sleep(r.rng.choice([0, 0, 0.01, 0.05]))
        broker.start()
        if cycle % 10 == 9:
            r.say(f"cycle {cycle + 1}/{cycles}: {w.acked()} acknowledged")
    pending = w.stop()
    # After the last restart the broker must still take writes.
    final_acked, final_failed = w.send_and_wait(50)
    unclean, truncating, truncated = broker.recoveries()
    r.stats.update(cycles=cycles, unclean_recoveries=unclean, recoveries_truncating_a_torn_tail=truncating,
                   bytes_truncated=truncated, **w.counts(), pending_after_flush=pending,
                   final_batch_acked=final_acked, final_batch_failed=final_failed,
                   client_errors=w.client_errors(), producers_replaced=sum(p.replaced for p in w.producers))
    if pending:
        raise AssertionError(f"{pending} records neither acknowledged nor failed after the final flush")
    if final_failed:
        raise AssertionError(f"after the last restart {final_failed} of {final_acked + final_failed} records failed")
    if w.acked() < cycles * 10:
        raise AssertionError(f"only {w.acked()} records acknowledged over {cycles} cycles: the workload barely ran")
    w.check(r.anomalies)
