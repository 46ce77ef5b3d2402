"""T3 lost responses: a proxy between the idempotent producers and the broker drops 20%
of produce responses (the broker stored the batch; the client never hears so and loses
its connection). The producers' retries must create 0 duplicates, every acknowledgement
must name the record's real offset, and each producer's order must hold."""
import threading

from .clients import create_topic
from .proxy import DROP_AND_CLOSE, FORWARD, PRODUCE, Proxy
from .workload import ProduceWorkload

TOPIC = "t3"
PARTITIONS = 3
DROP_RATE = 0.2


def run(r):
    records = r.tier(100_000, 1_000_000)
    broker = r.broker(behind_proxy=True)
    broker.start()
    lock = threading.Lock()
    produce_responses = [0]

    def on_response(conn, req):
        if req.api_key != PRODUCE:
            return FORWARD
        with lock:
            produce_responses[0] += 1
            drop = r.rng.random() < DROP_RATE
        return DROP_AND_CLOSE if drop else FORWARD

    proxy = Proxy(("127.0.0.1", broker.port), broker.upstream(), on_response=on_response)
    try:
        create_topic(broker.bootstrap(), TOPIC, PARTITIONS)
        producers = 2
        # Small batches: many produce requests, so many lost responses. The broker stays
        # up, so reconnect without backing off.
        w = ProduceWorkload(r, broker.bootstrap(), TOPIC, PARTITIONS, producers=producers, rate_per_producer=0,
                            conf={"reconnect.backoff.max.ms": 20},
                            confs=[{"linger.ms": 1, "batch.num.messages": 50}, {"linger.ms": 5, "batch.num.messages": 100}])
        per = records // producers
        for p in w.producers:
            for i in range(per):
                while not p.send(TOPIC, i % PARTITIONS, f"{p.name}-{p.seq}".encode()):
                    p.poll(0.05)
                if i % 1000 == 0:
                    p.poll(0)
        pending = sum(p.flush(600) for p in w.producers)
        r.stats.update(records=records, produce_responses=produce_responses[0],
                       dropped_responses=proxy.stats["dropped_responses"], connections=proxy.stats["connections"],
                       **w.counts(), pending_after_flush=pending, client_errors=w.client_errors(),
                       producers_replaced=sum(p.replaced for p in w.producers))
        r.say(f"{proxy.stats['dropped_responses']} of {produce_responses[0]} produce responses dropped")
        if pending:
            raise AssertionError(f"{pending} records neither acknowledged nor failed")
        if proxy.stats["dropped_responses"] < records // 1000:
            raise AssertionError(f"only {proxy.stats['dropped_responses']} responses dropped: the scenario did not bite")
        w.check(r.anomalies)
        c = w.counts()
        if c["failed"]:
            r.note(f"{c['failed']} records failed (indeterminate; each may appear at most once)")
    finally:
        proxy.stop()
