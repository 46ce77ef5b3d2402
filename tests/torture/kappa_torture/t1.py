"""T1 transactions under crashes: a transactional producer runs consume-transform-produce
shaped transactions (1-4 sends over 3 partitions plus an offset commit of the "input"
position, 30% aborted on purpose) while the broker is SIGKILLed and restarted. A live
read_committed consumer watches throughout; afterwards everything is read back
read_committed. 0 aborted reads, 0 torn transactions, 0 lost committed writes, 0
pre-committed reads, and the committed input offset always equals the end of the last
committed transaction (offsets and records commit atomically)."""
import threading
import time

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Producer, TopicPartition

from .checker import OffsetWatch, Txn, check_txns
from .clients import FAST_RECONNECT, log_conf, committed_offsets, create_topic, read_partitions

OUT = "t1-out"
IN = "t1-in"
PARTITIONS = 3
GROUP = "t1-group"
TXN_ID = "t1-producer"
CALL_TIMEOUT = 30


class LiveReader(threading.Thread):
    """A read_committed consumer over the output partitions for the whole run, recording
    when it first saw each value."""

    def __init__(self, r, bootstrap, topic=None, partitions=PARTITIONS):
        super().__init__(daemon=True, name="live-reader")
        topic = topic or OUT
        self.seen_at = {}
        self.reread = 0
        self.stopping = threading.Event()
        self.error = None
        conf = {
            "bootstrap.servers": bootstrap, "group.id": f"{topic}-live-reader", "enable.auto.commit": False,
            "isolation.level": "read_committed", "auto.offset.reset": "earliest", "check.crcs": True,
            **log_conf(r.logger), "fetch.wait.max.ms": 50, **FAST_RECONNECT,
        }
        self.consumer = Consumer(conf)
        self.consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(partitions)])

    def run(self):
        try:
            while not self.stopping.is_set():
                m = self.consumer.poll(0.1)
                if m is None or m.error():
                    continue
                now = time.monotonic()
                if m.value() in self.seen_at:
                    self.reread += 1
                else:
                    self.seen_at[m.value()] = now
        except BaseException as e:
            self.error = e
        finally:
            self.consumer.close()

    def stop(self):
        self.stopping.set()
        self.join(30)


class Killer(threading.Thread):
    """Kills the broker (kill -9) and restarts it whenever the transaction count reaches
    the next scheduled point, after a random delay, so kills land in every phase."""

    def __init__(self, r, broker, schedule, progress, watch, anomalies):
        super().__init__(daemon=True, name="killer")
        self.r = r
        self.broker = broker
        self.schedule = list(schedule)
        self.progress = progress
        self.watch = watch
        self.anomalies = anomalies
        self.kills = 0
        self.stopping = threading.Event()
        self.error = None
        self.rng = __import__("random").Random(f"{r.seed}-killer")

    def run(self):
        try:
            for at in self.schedule:
                while self.progress[0] < at and not self.stopping.is_set():
                    time.sleep(0.002)
                if self.stopping.is_set():
                    return
                time.sleep(self.rng.uniform(0, 0.04))
                self.broker.kill9()
                time.sleep(self.rng.choice([0, 0.01, 0.05]))
                self.broker.start()
                self.kills += 1
                floor = self.watch.acked_max
                got = committed_offsets(self.broker.bootstrap(), GROUP, [(IN, 0)])[(IN, 0)]
                self.watch.read(got, self.anomalies, acked_before_read=floor)
        except BaseException as e:
            self.error = e

    def stop(self):
        self.stopping.set()
        self.join(60)


def new_producer(r, bootstrap):
    p = Producer({
        "bootstrap.servers": bootstrap, "transactional.id": TXN_ID, "transaction.timeout.ms": 20000,
        "message.timeout.ms": 20000, **log_conf(r.logger), "linger.ms": 1, **FAST_RECONNECT,
    })
    deadline = time.monotonic() + 120
    while True:
        try:
            p.init_transactions(CALL_TIMEOUT)
            return p
        except KafkaException as e:
            err = e.args[0]
            if time.monotonic() > deadline or err.fatal():
                raise
            time.sleep(0.1)  # retriable (coordinator loading, broker restarting)


def retrying(fn, deadline_s=CALL_TIMEOUT * 3):
    """Calls fn until it returns or fails with a non-retriable error."""
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            return fn()
        except KafkaException as e:
            err = e.args[0]
            if not err.retriable() or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


# How many transactions the killer may fall behind its schedule: after each restart it reads
# the committed offsets, and on a fast machine the transactions ran on meanwhile until the
# run ended with kills still due ("only 15 of 20 kills happened" in CI, 2026-11-27).
KILL_LAG_TXNS_MAX = 25


def wait_for_killer(killer, schedule, i):
    """Holds the transactions while the killer is more than KILL_LAG_TXNS_MAX behind."""
    due = sum(1 for at in schedule if at < i - KILL_LAG_TXNS_MAX)
    deadline = time.monotonic() + 120
    while killer.kills < due and killer.is_alive() and time.monotonic() < deadline:
        time.sleep(0.005)


def run(r):
    n_txns = r.tier(1000, 20000)
    n_kills = r.tier(20, 400) if r.scale is None else max(1, n_txns // 50)
    broker = r.broker()
    broker.start()
    bootstrap = broker.bootstrap()
    create_topic(bootstrap, OUT, PARTITIONS)
    create_topic(bootstrap, IN, 1)
    # The "input" the transactions pretend to consume: enough records for every offset.
    seed_p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20, **log_conf(r.logger)})
    for i in range(n_txns * 4 + 10):
        seed_p.produce(IN, value=f"in-{i}".encode(), partition=0)
        if i % 10000 == 0:
            seed_p.poll(0)
    if seed_p.flush(60):
        raise AssertionError("could not write the input topic")

    group_md = Consumer({"bootstrap.servers": bootstrap, "group.id": GROUP, **log_conf(r.logger)}).consumer_group_metadata()
    txns = {}
    watch = OffsetWatch(f"{GROUP}/{IN}/0")
    progress = [0]
    # Kill points end early enough that the killer, held at most KILL_LAG_TXNS_MAX
    # transactions behind (wait_for_killer), makes every kill before the run ends.
    points = range(5, max(6, n_txns - KILL_LAG_TXNS_MAX - 5))
    schedule = sorted(r.rng.sample(points, min(n_kills, len(points))))
    live = LiveReader(r, bootstrap)
    live.start()
    killer = Killer(r, broker, schedule, progress, watch, r.anomalies)
    killer.start()

    producer = new_producer(r, bootstrap)
    pos = 0  # end of the last committed transaction's input
    counts = {"committed": 0, "aborted_on_purpose": 0, "aborted_after_error": 0, "unknown_resolved_committed": 0,
              "unknown_resolved_aborted": 0, "producers_recreated": 0}
    next_id = 0
    client_errors = {}
    for i in range(n_txns):
        progress[0] = i
        wait_for_killer(killer, schedule, i)
        intent = "abort" if r.rng.random() < 0.3 else "commit"
        t = Txn(next_id, intent)
        txns[next_id] = t
        next_id += 1
        k = r.rng.randint(1, 4)
        try:
            producer.begin_transaction()
            for j in range(k):
                tp = (OUT, r.rng.randrange(PARTITIONS))
                value = f"{t.txn_id}-{j}".encode()
                t.records.append((tp, value))
                producer.produce(OUT, value=value, partition=tp[1])
            producer.poll(0)
            retrying(lambda: producer.send_offsets_to_transaction([TopicPartition(IN, 0, pos + k)], group_md, CALL_TIMEOUT))
            t.offsets = pos + k
            if intent == "commit":
                t.commit_called_at = time.monotonic()
                retrying(lambda: producer.commit_transaction(CALL_TIMEOUT))
                t.outcome = "committed"
                pos += k
                watch.acked(pos)
                counts["committed"] += 1
            else:
                retrying(lambda: producer.abort_transaction(CALL_TIMEOUT))
                t.outcome = "aborted"
                counts["aborted_on_purpose"] += 1
            continue
        except KafkaException as e:
            err = e.args[0]
            client_errors[err.name()] = client_errors.get(err.name(), 0) + 1
            if err.txn_requires_abort():
                try:
                    retrying(lambda: producer.abort_transaction(CALL_TIMEOUT))
                    t.outcome = "aborted"
                    counts["aborted_after_error"] += 1
                    continue
                except KafkaException:
                    pass
        # The producer is unusable (fatal, fenced or out of retries): replace it. A
        # transaction whose commit was never requested cannot have committed; one whose
        # commit was in flight is resolved from the committed input offset.
        try:
            producer.purge()
        except KafkaException:
            pass
        producer = new_producer(r, bootstrap)  # fences the old epoch, ends its transaction
        counts["producers_recreated"] += 1
        committed = committed_offsets(bootstrap, GROUP, [(IN, 0)])[(IN, 0)]
        if t.commit_called_at is None:
            t.outcome = "aborted"
            counts["aborted_after_error"] += 1
            expect = {pos}
        else:
            expect = {pos, pos + k}
            if committed == pos + k:
                t.outcome = "committed"
                pos += k
                watch.acked(pos)
                counts["unknown_resolved_committed"] += 1
            elif committed == pos:
                t.outcome = "aborted"
                counts["unknown_resolved_aborted"] += 1
        committed = max(committed, -1)
        if committed not in expect:
            cls = "committed_offset_regression" if committed < pos else "aborted_read"
            r.anomalies.add(cls, f"after txn {t.txn_id}: committed input offset {committed}, expected one of {sorted(expect)}")
    progress[0] = n_txns
    killer.stop()
    producer.flush(30)

    # Final state: the committed offset is exactly the end of the last committed transaction.
    committed = committed_offsets(bootstrap, GROUP, [(IN, 0)])[(IN, 0)]
    watch.read(committed, r.anomalies)
    if committed != pos:
        cls = "committed_offset_regression" if committed < pos else "aborted_read"
        r.anomalies.add(cls, f"final committed input offset {committed}, last committed transaction ended at {pos}")
    # Let the live reader catch up with the end, then stop it.
    deadline = time.monotonic() + 60
    want = {v for t in txns.values() if t.outcome == "committed" for _, v in t.records}
    while not want.issubset(live.seen_at.keys()) and time.monotonic() < deadline:
        time.sleep(0.1)
    live.stop()
    readback = read_partitions(bootstrap, [(OUT, p) for p in range(PARTITIONS)], isolation="read_committed", logger=r.logger)
    check_txns(txns, readback, seen_at=live.seen_at, anomalies=r.anomalies)
    if killer.error:
        raise killer.error
    if live.error:
        raise live.error
    unclean, truncating, truncated = broker.recoveries()
    r.stats.update(transactions=n_txns, kill9=killer.kills, **counts, records_visible=sum(len(v) for v in readback.values()),
                   live_reader_seen=len(live.seen_at), live_reader_rereads=live.reread, final_committed_offset=committed,
                   offset_reads=watch.reads, client_errors=client_errors, unclean_recoveries=unclean, recoveries_truncating=truncating)
    if killer.kills < len(schedule):
        raise AssertionError(f"only {killer.kills} of {len(schedule)} kills happened")
