"""T4 offset commits under kill -9: consumers commit ever-growing offsets (synchronous
OffsetCommit, several partitions per request) while the broker is SIGKILLed and
restarted; a separate client reads the committed offsets back after every restart and
between commits. A committed offset must never go backwards: never below a commit the
broker acknowledged before the read, never below an earlier read."""
import threading
import time

from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition

from .checker import OffsetWatch
from .clients import FAST_RECONNECT, committed_offsets, create_topic, log_conf

TOPIC = "t4"
PARTITIONS = 3
GROUPS = ["t4-a", "t4-b"]


def run(r):
    cycles = r.tier(500, 5000)
    kills = max(1, cycles // 25)
    broker = r.broker()
    broker.start()
    bootstrap = broker.bootstrap()
    create_topic(bootstrap, TOPIC, PARTITIONS)
    records = cycles * 4 + 100
    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20, **log_conf(r.logger)})
    for i in range(records * PARTITIONS):
        p.produce(TOPIC, value=b"x", partition=i % PARTITIONS)
        if i % 10000 == 0:
            p.poll(0)
    if p.flush(60):
        raise AssertionError("could not fill the topic")

    committers = {
        g: Consumer({"bootstrap.servers": bootstrap, "group.id": g, "enable.auto.commit": False, **FAST_RECONNECT,
                     **log_conf(r.logger)})
        for g in GROUPS
    }
    watches = {(g, pt): OffsetWatch(f"{g}/{TOPIC}/{pt}") for g in GROUPS for pt in range(PARTITIONS)}
    next_offset = {key: 0 for key in watches}
    kill_at = set(r.rng.sample(range(1, cycles), kills))
    stats = {"commits_acked": 0, "commits_failed": 0, "partition_errors": 0, "reads": 0, "kills": 0}

    def read_back():
        for g in GROUPS:
            floors = {pt: watches[(g, pt)].acked_max for pt in range(PARTITIONS)}
            got = committed_offsets(bootstrap, g, [(TOPIC, pt) for pt in range(PARTITIONS)])
            for pt in range(PARTITIONS):
                watches[(g, pt)].read(got[(TOPIC, pt)], r.anomalies, acked_before_read=floors[pt])
        stats["reads"] += 1

    for cycle in range(cycles):
        g = GROUPS[cycle % len(GROUPS)]
        # One to three partitions per request, each moving forward 0-8 offsets.
        parts = sorted(r.rng.sample(range(PARTITIONS), r.rng.randint(1, PARTITIONS)))
        offsets = []
        for pt in parts:
            next_offset[(g, pt)] += r.rng.randint(0, 8)
            offsets.append(TopicPartition(TOPIC, pt, next_offset[(g, pt)]))
        if cycle in kill_at:
            # Kill while this commit is in flight (or just before / after it), and restart:
            # the commit call may block until the broker is back.
            delay, down = r.rng.uniform(0, 0.01), r.rng.choice([0, 0.01, 0.05])

            def killer():
                time.sleep(delay)
                broker.kill9()
                time.sleep(down)
                broker.start()
            t = threading.Thread(target=killer)
            t.start()
        else:
            t = None
        try:
            result = committers[g].commit(offsets=offsets, asynchronous=False)
            errs = [x for x in result if x.error is not None]
            if errs:
                stats["partition_errors"] += len(errs)
            for x in result:
                if x.error is None:
                    watches[(g, x.partition)].acked(x.offset)
            stats["commits_acked"] += 1
        except KafkaException:
            stats["commits_failed"] += 1
        if t is not None:
            t.join()
            stats["kills"] += 1
            read_back()
        elif cycle % 10 == 0:
            read_back()
    read_back()
    for c in committers.values():
        c.close()
    final = {f"{g}/{pt}": w.read_max for (g, pt), w in watches.items()}
    unclean, _, _ = broker.recoveries()
    r.stats.update(commit_cycles=cycles, **stats, unclean_recoveries=unclean, final_committed=final)
    if stats["commits_acked"] < cycles // 2:
        raise AssertionError(f"only {stats['commits_acked']} of {cycles} commits acknowledged")
    for (g, pt), w in watches.items():
        if w.read_max < w.acked_max:
            raise AssertionError(f"{g}/{pt}: final committed {w.read_max} below acknowledged {w.acked_max}")
