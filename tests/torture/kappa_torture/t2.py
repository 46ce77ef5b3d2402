"""T2 delayed EndTxn: a proxy between a transactional producer and the broker holds the
EndTxn of transaction A (and cuts the client's connection, so librdkafka sends EndTxn
again on a new one and A ends normally). Once the producer's next transaction B has
begun and written records, the held EndTxn of A is finally delivered on its old
connection. EndTxn before v5 does not say which transaction it ends, so a broker that
applied it would commit or abort B. 200 cases over every commit/abort combination:
the straggler must be refused, and read_committed readers (a live one and a final read)
must see no aborted read, no torn transaction, no lost committed write and no record
before its transaction's commit was requested."""
import struct
import threading
import time

from confluent_kafka import KafkaException, Producer

from .checker import Txn, check_txns
from .clients import FAST_RECONNECT, create_topic, log_conf, read_partitions
from .proxy import CUT, END_TXN, FORWARD, Proxy
from .t1 import LiveReader, retrying

TOPIC = "t2"
PARTITIONS = 3
CALL_TIMEOUT = 30


def end_txn_error(req, frame):
    """The error code of an EndTxn response (v0-2: header v0, throttle_time_ms, error)."""
    body = 8 if req.api_version < 3 else 9  # size + correlation id (+ tagged fields)
    (code,) = struct.unpack(">h", frame[body + 4:body + 6])
    return code


def run(r):
    cases = r.tier(200, 2000)
    broker = r.broker(behind_proxy=True)
    broker.start()
    lock = threading.Lock()
    state = {"armed": False, "held": None, "stale_response": None}
    stale_codes = {}

    def on_request(conn, req):
        if req.api_key == END_TXN:
            with lock:
                if state["armed"]:
                    state["armed"] = False
                    state["held"] = conn
                    return CUT
        return FORWARD

    def on_released(conn, req, frame):
        with lock:
            state["stale_response"] = end_txn_error(req, frame)

    proxy = Proxy(("127.0.0.1", broker.port), broker.upstream(), on_request=on_request, on_released_response=on_released)
    try:
        bootstrap = broker.bootstrap()
        create_topic(bootstrap, TOPIC, PARTITIONS)
        live = LiveReader(r, bootstrap, topic=TOPIC, partitions=PARTITIONS)
        live.start()
        def new_producer():
            np = Producer({"bootstrap.servers": bootstrap, "transactional.id": "t2-producer", "linger.ms": 0,
                           "transaction.timeout.ms": 60000, **FAST_RECONNECT,
                           # the broker stays up: reconnect at once after each cut
                           "reconnect.backoff.ms": 5, "reconnect.backoff.max.ms": 20, **log_conf(r.logger)})
            retrying(lambda: np.init_transactions(CALL_TIMEOUT))
            return np

        producer = [new_producer()]
        recreated = [0]
        txns = {}
        next_id = [0]

        def begin(intent):
            t = Txn(next_id[0], intent)
            next_id[0] += 1
            txns[t.txn_id] = t
            producer[0].begin_transaction()
            return t

        def send(t, n):
            for j in range(n):
                tp = (TOPIC, r.rng.randrange(PARTITIONS))
                value = f"{t.txn_id}-{len(t.records)}".encode()
                t.records.append((tp, value))
                producer[0].produce(TOPIC, value=value, partition=tp[1])
            if producer[0].flush(CALL_TIMEOUT):
                raise AssertionError(f"txn {t.txn_id}: records not delivered within {CALL_TIMEOUT} s")

        def end(t):
            if t.intent == "commit":
                t.commit_called_at = time.monotonic()
                retrying(lambda: producer[0].commit_transaction(CALL_TIMEOUT))
                t.outcome = "committed"
            else:
                retrying(lambda: producer[0].abort_transaction(CALL_TIMEOUT))
                t.outcome = "aborted"

        combos = {}
        for case in range(cases):
            a_intent = "commit" if case % 2 == 0 else "abort"
            b_intent = "commit" if (case // 2) % 2 == 0 else "abort"
            # A: its first EndTxn is held by the proxy; librdkafka's retry ends it.
            a = begin(a_intent)
            send(a, r.rng.randint(1, 3))
            with lock:
                state.update(armed=True, held=None, stale_response=None)
            end(a)
            with lock:
                held, state["armed"] = state["held"], False
            if held is None:
                raise AssertionError(f"case {case}: the proxy never saw transaction {a.txn_id}'s EndTxn")
            # B begins and writes; then A's straggler arrives on its old connection.
            b = begin(b_intent)
            send(b, r.rng.randint(1, 3))
            held.release()
            deadline = time.monotonic() + 10
            while state["stale_response"] is None:
                if time.monotonic() > deadline:
                    raise AssertionError(f"case {case}: no response to the delayed EndTxn within 10 s")
                time.sleep(0.002)
            code = state["stale_response"]
            stale_codes[code] = stale_codes.get(code, 0) + 1
            if code == 0:
                r.anomalies.add("stale_end_txn_applied",
                                f"case {case}: txn {a.txn_id}'s delayed EndTxn({a_intent}) was accepted while txn {b.txn_id} was open")
            held.close_upstream()
            try:
                send(b, r.rng.randint(1, 3))
                end(b)
            except KafkaException as e:
                # The straggler disturbed B. Abort it if the client still can; otherwise a
                # new producer (same transactional id) fences this one and ends B. Either
                # way B cannot have committed unless its commit was requested.
                aborted = False
                if e.args[0].txn_requires_abort():
                    try:
                        retrying(lambda: producer[0].abort_transaction(CALL_TIMEOUT))
                        aborted = True
                    except KafkaException:
                        pass
                if not aborted:
                    producer[0] = new_producer()
                    recreated[0] += 1
                b.outcome = "aborted" if aborted or b.commit_called_at is None else "unknown"
                r.note(f"case {case}: transaction {b.txn_id} failed in the client ({e.args[0].name()}), outcome {b.outcome}")
            key = f"{a_intent}->{b_intent}"
            combos[key] = combos.get(key, 0) + 1
            if case % 50 == 49:
                r.say(f"case {case + 1}/{cases}: delayed EndTxn answered {stale_codes}")
        # Let the live reader catch up, then read everything back.
        deadline = time.monotonic() + 60
        want = {v for t in txns.values() if t.outcome == "committed" for _, v in t.records}
        while not want.issubset(live.seen_at.keys()) and time.monotonic() < deadline:
            time.sleep(0.1)
        live.stop()
        readback = read_partitions(bootstrap, [(TOPIC, i) for i in range(PARTITIONS)], isolation="read_committed",
                                   logger=r.logger)
        check_txns(txns, readback, seen_at=live.seen_at, anomalies=r.anomalies)
        r.stats.update(cases=cases, combos=combos, transactions=len(txns),
                       committed=sum(t.outcome == "committed" for t in txns.values()),
                       aborted=sum(t.outcome == "aborted" for t in txns.values()),
                       delayed_end_txn_error_codes={str(k): v for k, v in stale_codes.items()},
                       producers_recreated=recreated[0],
                       records_visible=sum(len(v) for v in readback.values()), proxy=proxy.stats)
    finally:
        proxy.stop()
