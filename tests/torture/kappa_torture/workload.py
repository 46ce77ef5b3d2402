"""The produce workload shared by the crash and fault scenarios: N tracked idempotent
producers, each in its own thread, writing unique values to a multi-partition topic."""
import random
import threading
import time

from .checker import check_produce
from .clients import TrackedProducer, read_partitions


class ProduceWorkload:
    def __init__(self, run, bootstrap, topic, partitions, producers=4, rate_per_producer=1000, conf=None, confs=None):
        self.run = run
        self.bootstrap = bootstrap
        self.topic = topic
        self.partitions = partitions
        self.sent = {}
        self.lock = threading.Lock()
        self.rate = rate_per_producer
        self.producers = []
        for i in range(producers):
            c = dict(conf or {})
            if confs:
                c.update(confs[i % len(confs)])
            self.producers.append(TrackedProducer(f"p{i}", bootstrap, self.sent, self.lock, conf=c, logger=run.logger))
        self.threads = []
        self.stopping = threading.Event()
        self.paused = threading.Event()
        self.errors = []

    def start(self):
        for i, p in enumerate(self.producers):
            rng = random.Random(f"{self.run.seed}-{p.name}")
            t = threading.Thread(target=self._loop, args=(p, rng), daemon=True, name=p.name)
            t.start()
            self.threads.append(t)

    def _loop(self, p, rng):
        try:
            interval = 1.0 / self.rate if self.rate else 0
            next_at = time.monotonic()
            while not self.stopping.is_set():
                if self.paused.is_set():
                    p.poll(0.05)
                    continue
                value = f"{p.name}-{p.seq}".encode()
                if not p.send(self.topic, rng.randrange(self.partitions), value):
                    p.poll(0.05)  # queue full: wait for deliveries
                    continue
                p.poll(0)
                if interval:
                    next_at += interval
                    delay = next_at - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                    elif delay < -1:
                        next_at = time.monotonic()
        except BaseException as e:
            self.errors.append(e)

    def acked(self):
        return sum(p.acked for p in self.producers)

    def produce_requests(self):
        return sum(p.produce_requests() for p in self.producers)

    def wait_progress(self, since, timeout=30):
        """Waits until more than `since` records are acknowledged (the broker is taking
        writes again); fails after `timeout` seconds without one."""
        deadline = time.monotonic() + timeout
        while self.acked() <= since:
            if self.errors:
                raise self.errors[0]
            if time.monotonic() > deadline:
                raise AssertionError(f"no record acknowledged within {timeout} s after the restart ({since} before)")
            time.sleep(0.005)
        return self.acked()

    def stop(self, flush_timeout=120):
        """Stops sending and waits for every record's outcome; returns records still pending."""
        self.stopping.set()
        for t in self.threads:
            t.join(30)
        if self.errors:
            raise self.errors[0]
        return sum(p.flush(flush_timeout) for p in self.producers)

    def send_and_wait(self, n_per_producer, timeout=60):
        """Sends n records from each producer and waits: (acked, failed) among them."""
        start = {p.name: p.seq for p in self.producers}
        for p in self.producers:
            rng = random.Random(f"{self.run.seed}-{p.name}-final")
            for _ in range(n_per_producer):
                while not p.send(self.topic, rng.randrange(self.partitions), f"{p.name}-{p.seq}".encode()):
                    p.poll(0.05)
                p.poll(0)
        for p in self.producers:
            p.flush(timeout)
        acked = failed = 0
        with self.lock:
            for s in self.sent.values():
                if s.seq >= start[s.producer]:
                    acked += s.status == "acked"
                    failed += s.status != "acked"
        return acked, failed

    def counts(self):
        with self.lock:
            statuses = [s.status for s in self.sent.values()]
        return {
            "records_sent": len(statuses),
            "acked": statuses.count("acked"),
            "failed": statuses.count("failed"),
            "pending": statuses.count("pending"),
        }

    def client_errors(self):
        out = {}
        for p in self.producers:
            for k, v in p.errors.items():
                out[k] = out.get(k, 0) + v
        return out

    def check(self, anomalies, readback=None, corrupt=None):
        """Reads the topic back and runs the produce checker into `anomalies`."""
        tps = [(self.topic, i) for i in range(self.partitions)]
        corrupt = [] if corrupt is None else corrupt
        if readback is None:
            readback = read_partitions(self.bootstrap, tps, logger=self.run.logger, corrupt=corrupt)
        for c in corrupt:
            anomalies.add("corrupt_batch", c)
        with self.lock:
            sent = dict(self.sent)
        check_produce(sent, readback, anomalies)
        return readback
