"""Real Kafka clients (confluent-kafka / librdkafka) with their results recorded for the
checker: every produce with its acknowledgement (offset) or error, read-back of whole
partitions, committed offsets."""
import json
import logging
import os
import threading
import time
import uuid

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, NewTopic

from .checker import Sent
from .harness import TortureError

# Reconnect quickly after a kill -9 so cycles are short; librdkafka's defaults back off to 10 s.
#
# And no re-bootstrap when the (only) broker is down: librdkafka >= 2.10 then
# decommissions the broker, and requests bound to a coordinator can hang forever, ignoring
# their timeouts: a transactional producer whose cached group coordinator was
# decommissioned hangs in send_offsets_to_transaction() (librdkafka issues #5511, #5456),
# and a synchronous Consumer.commit() whose OffsetCommit retry was queued on the
# decommissioned coordinator never returns. Both seen here with confluent-kafka 2.16.1
# after a kill -9 and restart; neither happens with the strategy "none".
FAST_RECONNECT = {
    "metadata.recovery.strategy": "none",
    "reconnect.backoff.ms": 10,
    "reconnect.backoff.max.ms": 200,
    "retry.backoff.ms": 20,
    "retry.backoff.max.ms": 200,
    "topic.metadata.refresh.interval.ms": 5000,
}

_loggers = {}


def log_conf(logger):
    """Client config for logging: librdkafka's lines go to `logger` (a file, served when
    the client polls); with TORTURE_RDDEBUG=<contexts> they go live to stderr instead,
    with librdkafka debug contexts on (e.g. eos,protocol,broker)."""
    debug = os.environ.get("TORTURE_RDDEBUG")
    if debug:
        return {"debug": debug}
    return {"logger": logger} if logger is not None else {}


def client_logger(path):
    """librdkafka's log lines go to a file (not the test output), one logger per run."""
    if path not in _loggers:
        log = logging.getLogger(f"rdkafka-{len(_loggers)}")
        log.propagate = False
        h = logging.FileHandler(path)
        h.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        log.addHandler(h)
        log.setLevel(logging.DEBUG)
        _loggers[path] = log
    return _loggers[path]


def create_topic(bootstrap, name, partitions, config=None):
    admin = AdminClient({"bootstrap.servers": bootstrap})
    futures = admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=1, config=config or {})])
    futures[name].result(timeout=30)


class TrackedProducer:
    """An idempotent (or plain) producer recording every send in `sent` (value -> Sent).
    A fatal client error (e.g. the broker lost the producer's state) is survived by
    replacing the client: its unconfirmed records stay `failed` (indeterminate)."""

    def __init__(self, name, bootstrap, sent, lock, conf=None, logger=None):
        self.name = name
        self.bootstrap = bootstrap
        self.sent = sent
        self.lock = lock
        self.conf = dict(conf or {})
        self.logger = logger
        self.seq = 0
        self.acked = 0
        self.failed = 0
        self.errors = {}
        self.fatal = None
        self.replaced = 0
        self.produce_requests_by_client = 0  # from librdkafka statistics, per client instance
        self.produce_requests_done = 0       # of replaced clients
        self.producer = self._new()

    def _new(self):
        conf = {
            "bootstrap.servers": self.bootstrap,
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 2,
            "message.timeout.ms": 60000,
            "error_cb": self._on_error,
            "stats_cb": self._on_stats,
            "statistics.interval.ms": 500,
            **FAST_RECONNECT,
            **self.conf,
        }
        conf.update(log_conf(self.logger))
        return Producer(conf)

    def _on_error(self, err):
        if err.fatal():
            self.fatal = err

    def _on_stats(self, text):
        stats = json.loads(text)
        self.produce_requests_by_client = sum(b.get("req", {}).get("Produce", 0) for b in stats.get("brokers", {}).values())

    def produce_requests(self):
        """Produce requests sent so far (librdkafka statistics, up to 0.5 s old)."""
        return self.produce_requests_done + self.produce_requests_by_client

    def _delivered(self, s):
        def cb(err, msg):
            s.done_at = time.monotonic()
            if err is None:
                s.status = "acked"
                s.offset = msg.offset()
                self.acked += 1
            else:
                s.status = "failed"
                s.error = err.name()
                self.failed += 1
                self.errors[err.name()] = self.errors.get(err.name(), 0) + 1
        return cb

    def send(self, topic, partition, value, key=None):
        """Hands one record to the client; returns False if its queue is full."""
        s = Sent(self.name, (topic, partition), self.seq, sent_at=time.monotonic())
        try:
            self.producer.produce(topic, value=value, key=key, partition=partition, on_delivery=self._delivered(s))
        except BufferError:
            return False
        with self.lock:
            self.sent[value] = s
        self.seq += 1
        return True

    def poll(self, timeout=0):
        self.producer.poll(timeout)
        if self.fatal is not None:
            self.replace()

    def replace(self):
        """Drops a client that hit a fatal error; its unconfirmed records fail."""
        old, self.fatal = self.producer, None
        old.purge()
        old.flush(10)
        self.replaced += 1
        self.produce_requests_done += self.produce_requests_by_client
        self.produce_requests_by_client = 0
        self.producer = self._new()

    def flush(self, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            left = self.producer.flush(min(1.0, max(0.0, deadline - time.monotonic())))
            if self.fatal is not None:
                self.replace()
                continue
            if left == 0:
                return 0
        return len(self.producer)


def read_partitions(bootstrap, tps, isolation="read_uncommitted", timeout=120, logger=None, corrupt=None, tail=None):
    """Reads every record of each (topic, partition) from its log start (or, with `tail`,
    from `tail` offsets before its end) to its end: {tp: [(offset, value)]}. Errors other
    than end-of-partition are returned in `corrupt` (a list) when given, else raised."""
    conf = {
        "bootstrap.servers": bootstrap,
        "group.id": f"torture-reader-{uuid.uuid4().hex[:8]}",
        "enable.auto.commit": False,
        "enable.partition.eof": True,
        "auto.offset.reset": "earliest",
        "isolation.level": isolation,
        "check.crcs": True,
        **FAST_RECONNECT,
    }
    conf.update(log_conf(logger))
    c = Consumer(conf)
    try:
        starts = {}
        for t, p in tps:
            starts[(t, p)] = OFFSET_BEGINNING
            if tail is not None:
                lo, hi = c.get_watermark_offsets(TopicPartition(t, p), timeout=10)
                starts[(t, p)] = max(lo, hi - tail)
        c.assign([TopicPartition(t, p, starts[(t, p)]) for t, p in tps])
        out = {tp: [] for tp in tps}
        eof = set()
        deadline = time.monotonic() + timeout
        while len(eof) < len(tps):
            if time.monotonic() > deadline:
                raise TortureError(f"read-back did not reach the end of {sorted(set(tps) - eof)} within {timeout} s")
            m = c.poll(0.5)
            if m is None:
                continue
            if m.error():
                if m.error().code() == KafkaError._PARTITION_EOF:
                    eof.add((m.topic(), m.partition()))
                    continue
                if corrupt is not None:
                    corrupt.append(f"{m.topic()}/{m.partition()}: {m.error()}")
                    if len(corrupt) > 1000:
                        raise TortureError(f"read-back keeps failing: {m.error()}")
                    continue
                raise TortureError(f"read-back error: {m.error()}")
            tp = (m.topic(), m.partition())
            eof.discard(tp)
            out[tp].append((m.offset(), m.value()))
        # The end we reached must be the partition's end.
        for tp in tps:
            lo, hi = c.get_watermark_offsets(TopicPartition(*tp), timeout=10)
            if isolation == "read_uncommitted" and out[tp] and out[tp][-1][0] >= hi:
                raise TortureError(f"{tp}: read offset {out[tp][-1][0]} at or past high watermark {hi}")
        return out
    finally:
        c.close()


def committed_offsets(bootstrap, group, tps, timeout=30):
    """The group's committed offsets for `tps` as the broker reports them: {tp: offset}."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False, **FAST_RECONNECT})
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                got = c.committed([TopicPartition(t, p) for t, p in tps], timeout=10)
                return {(x.topic, x.partition): x.offset for x in got}
            except KafkaException:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
    finally:
        c.close()


class Stopwatch:
    def __init__(self):
        self.t0 = time.monotonic()

    def elapsed(self):
        return time.monotonic() - self.t0


class Ticker(threading.Thread):
    """Runs fn() repeatedly in a daemon thread until stopped."""

    def __init__(self, fn):
        super().__init__(daemon=True)
        self.fn = fn
        self.stopping = threading.Event()
        self.error = None

    def run(self):
        try:
            while not self.stopping.is_set():
                self.fn()
        except BaseException as e:  # reported by the scenario
            self.error = e

    def stop(self):
        self.stopping.set()
        self.join(60)
        if self.error is not None:
            raise self.error
