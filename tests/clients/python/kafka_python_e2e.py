#!/usr/bin/env python3
"""End-to-end checks of kappa with kafka-python (pure Python client).

Usage: kafka_python_e2e.py BOOTSTRAP CASE [ARGS...]

Each case asserts itself, prints one JSON line with what it saw and exits non-zero
with a clear message on failure. Set KAFKA_PYTHON_DEBUG=1 to log the protocol.
"""
import json
import logging
import os
import sys
import threading
import time
import uuid

import kafka
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, OffsetAndMetadata, TopicPartition
from kafka.admin import ConfigResource, ConfigResourceType, NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError, UnknownTopicOrPartitionError

BOOTSTRAP = sys.argv[1]
CASE = sys.argv[2]
ARGS = sys.argv[3:]

if os.environ.get("KAFKA_PYTHON_DEBUG"):
    logging.basicConfig(level=logging.DEBUG)


def fail(msg):
    print(f"FAIL [{CASE}] (kafka-python {kafka.__version__}): {msg}", file=sys.stderr)
    sys.exit(1)


def check(cond, msg):
    if not cond:
        fail(msg)


def admin():
    return KafkaAdminClient(bootstrap_servers=BOOTSTRAP, request_timeout_ms=15000)


def create_topic(name, partitions=1, config=None):
    a = admin()
    a.create_topics([NewTopic(name, partitions, 1, topic_configs=config or {})])
    a.close()


def producer(**extra):
    conf = {"bootstrap_servers": BOOTSTRAP, "linger_ms": 5}
    conf.update(extra)
    return KafkaProducer(**conf)


def produce_all(p, topic, records):
    futures = []
    for r in records:
        futures.append(p.send(topic, **{k: v for k, v in r.items() if v is not None}))
    p.flush(30)
    for f in futures:
        f.get(timeout=30)


def read_topic(topic, partitions=1, **extra):
    """Reads every partition from offset 0 up to its end offset at call time."""
    c = KafkaConsumer(bootstrap_servers=BOOTSTRAP, enable_auto_commit=False, **extra)
    tps = [TopicPartition(topic, p) for p in range(partitions)]
    c.assign(tps)
    c.seek_to_beginning(*tps)
    ends = c.end_offsets(tps)
    out = []
    deadline = time.time() + 30
    while any(c.position(tp) < ends[tp] for tp in tps):
        check(time.time() < deadline, f"timed out reading {topic}: {len(out)} records, ends {ends}")
        for tp, msgs in c.poll(timeout_ms=500).items():
            out.extend(msgs)
    c.close()
    return out


def hdrs(m):
    return [(k, v.decode() if v is not None else None) for k, v in m.headers]


# ---------------------------------------------------------------------------


def case_metadata():
    topic = f"meta-{uuid.uuid4().hex[:6]}"
    create_topic(topic, partitions=3)
    c = KafkaConsumer(bootstrap_servers=BOOTSTRAP)
    check(topic in c.topics(), f"{topic} missing from topics(): {c.topics()}")
    parts = c.partitions_for_topic(topic)
    check(parts == {0, 1, 2}, f"partitions {parts}")
    brokers = c._client.cluster.brokers()
    check(len(brokers) == 1, f"brokers {brokers}")
    b = list(brokers)[0]
    check(f"{b.host}:{b.port}" == BOOTSTRAP, f"advertised {b.host}:{b.port} != {BOOTSTRAP}")
    c.close()
    a = admin()
    desc = a.describe_topics([topic])
    a.close()
    check(len(desc[0]["partitions"]) == 3, f"describe_topics {desc}")
    print(json.dumps({"topic": topic}))


def case_produce_consume():
    topic = f"keyed-{uuid.uuid4().hex[:6]}"
    create_topic(topic, partitions=3)
    keys = [f"channel-{i}" for i in range(5)]
    recs = []
    for seq in range(40):
        for k in keys:
            recs.append({"key": k.encode(), "value": f"{k}:{seq}".encode(),
                         "headers": [("eventType", b"ChannelUpdated"), ("seq", str(seq).encode())]})
    produce_all(producer(), topic, recs)
    msgs = read_topic(topic, 3)
    check(len(msgs) == len(recs), f"consumed {len(msgs)} of {len(recs)}")
    per_key, parts = {}, {}
    for m in msgs:
        k = m.key.decode()
        per_key.setdefault(k, []).append(m.value.decode())
        parts.setdefault(k, set()).add(m.partition)
        seq = m.value.decode().split(":")[1]
        check(hdrs(m) == [("eventType", "ChannelUpdated"), ("seq", seq)], f"headers {hdrs(m)}")
    for k in keys:
        check(len(parts[k]) == 1, f"key {k} spread over {parts[k]}")
        check(per_key[k] == [f"{k}:{s}" for s in range(40)], f"key {k} out of order")
    print(json.dumps({"records": len(msgs)}))


def case_compression():
    result = {}
    for codec in [None, "gzip", "snappy", "lz4", "zstd"]:
        name = codec or "none"
        topic = f"codec-{name}-{uuid.uuid4().hex[:6]}"
        create_topic(topic)
        recs = [{"key": f"k{i % 7}".encode(), "value": (f"value-{i}-" + "x" * (i % 50)).encode(),
                 "headers": [("i", str(i).encode())]} for i in range(500)]
        produce_all(producer(compression_type=codec, linger_ms=50), topic, recs)
        msgs = read_topic(topic)
        got = [(m.key, m.value, hdrs(m)) for m in msgs]
        want = [(r["key"], r["value"], [("i", r["headers"][0][1].decode())]) for r in recs]
        check(got == want, f"{name}: consumed records differ (got {len(got)})")
        result[name] = len(msgs)
    print(json.dumps(result))


def case_idempotent():
    topic = f"idem-{uuid.uuid4().hex[:6]}"
    create_topic(topic, partitions=2)
    p = producer(enable_idempotence=True, acks="all")
    produce_all(p, topic, [{"key": f"k{i % 10}".encode(), "value": str(i).encode()} for i in range(2000)])
    check(p._transaction_manager is not None and p._transaction_manager.producer_id_and_epoch.producer_id >= 0,
          "idempotent producer got no producer id")
    p.close()
    msgs = read_topic(topic, 2)
    values = sorted(int(m.value) for m in msgs)
    check(values == list(range(2000)), f"got {len(values)} records, {len(set(values))} distinct")
    print(json.dumps({"records": len(values)}))


def case_group():
    topic = f"grp-{uuid.uuid4().hex[:6]}"
    partitions = 6
    create_topic(topic, partitions=partitions)
    group = f"grp-{uuid.uuid4().hex[:6]}"
    seen, assignments, stops, threads = [], {}, {}, {}
    lock = threading.Lock()
    errors = []

    def member(name):
        try:
            c = KafkaConsumer(bootstrap_servers=BOOTSTRAP, group_id=group, enable_auto_commit=False,
                              auto_offset_reset="earliest", session_timeout_ms=10000, heartbeat_interval_ms=300)

            class Listener(kafka.ConsumerRebalanceListener):
                def on_partitions_revoked(self, revoked):
                    pass

                def on_partitions_assigned(self, assigned):
                    with lock:
                        assignments.setdefault(name, []).append(sorted(tp.partition for tp in assigned))

            c.subscribe([topic], listener=Listener())
            while not stops[name].is_set():
                batch = c.poll(timeout_ms=200)
                for tp, msgs in batch.items():
                    for m in msgs:
                        with lock:
                            seen.append((name, m.partition, m.offset, m.value.decode()))
                    c.commit({tp: OffsetAndMetadata(msgs[-1].offset + 1, "", -1)})
            c.close()
        except Exception as e:  # surfaced by the main thread
            errors.append(f"{name}: {e!r}")

    def start(name):
        stops[name] = threading.Event()
        threads[name] = threading.Thread(target=member, args=(name,), daemon=True)
        threads[name].start()

    p = producer()
    total = 0

    def produce_batch(n):
        nonlocal total
        produce_all(p, topic, [{"key": f"k{(total + i) % 17}".encode(), "value": str(total + i).encode()} for i in range(n)])
        total += n

    def wait(cond, what, timeout=40):
        deadline = time.time() + timeout
        while time.time() < deadline:
            check(not errors, f"member failed: {errors}")
            with lock:
                if cond():
                    return
            time.sleep(0.1)
        fail(f"timed out waiting for {what}; consumed {len(seen)}, assignments {assignments}")

    start("a")
    wait(lambda: assignments.get("a"), "a assigned")
    produce_batch(150)
    wait(lambda: len(seen) >= 150, "150 consumed")
    start("b")
    produce_batch(150)
    wait(lambda: assignments.get("b"), "b assigned")
    start("c")
    produce_batch(150)
    wait(lambda: assignments.get("c"), "c assigned")
    wait(lambda: len(seen) >= 450, "450 consumed")
    stops["a"].set()
    threads["a"].join(30)
    produce_batch(150)
    wait(lambda: len(seen) >= 600, "600 consumed")
    time.sleep(1)
    # Snapshot before b and c stop: their own leaving rebalances the group again.
    with lock:
        final = {n: a[-1] for n, a in assignments.items()}
    for n in ["b", "c"]:
        stops[n].set()
        threads[n].join(30)
    check(not errors, f"member failed: {errors}")
    values = sorted(int(v) for _, _, _, v in seen)
    check(len(values) == len(set(values)), f"{len(values) - len(set(values))} records consumed twice")
    check(values == list(range(total)), f"lost records: {len(set(values))} of {total}")
    check(len(final["b"]) + len(final["c"]) == partitions, f"after a left, b+c should own all: {assignments}")
    print(json.dumps({"consumed": len(values), "assignments": assignments}))


def case_commit_before_restart():
    topic, group = ARGS[0], ARGS[1]
    create_topic(topic, partitions=2)
    produce_all(producer(), topic, [{"key": f"k{i}".encode(), "value": str(i).encode()} for i in range(100)])
    c = KafkaConsumer(bootstrap_servers=BOOTSTRAP, group_id=group, enable_auto_commit=False)
    tps = [TopicPartition(topic, 0), TopicPartition(topic, 1)]
    ends = c.end_offsets(tps)
    c.commit({tps[0]: OffsetAndMetadata(10, "meta-p0", -1), tps[1]: OffsetAndMetadata(ends[tps[1]], "", -1)})
    c.close()
    print(json.dumps({"p0": 10, "p1": ends[tps[1]], "n0": ends[tps[0]]}))


def case_commit_after_restart():
    topic, group, p0, p1 = ARGS[0], ARGS[1], int(ARGS[2]), int(ARGS[3])
    c = KafkaConsumer(bootstrap_servers=BOOTSTRAP, group_id=group, enable_auto_commit=False, auto_offset_reset="earliest")
    tps = [TopicPartition(topic, 0), TopicPartition(topic, 1)]
    got = {tp.partition: c.committed(tp) for tp in tps}
    check(got == {0: p0, 1: p1}, f"committed offsets after restart {got}")
    a = admin()
    offs = a.list_group_offsets(group)[group]
    a.close()
    check(offs[tps[0]].metadata == "meta-p0", f"commit metadata {offs[tps[0]]}")
    c.subscribe([topic])
    ends = None
    msgs = []
    deadline = time.time() + 30
    while True:
        check(time.time() < deadline, f"timed out resuming; {len(msgs)} records")
        for tp, ms in c.poll(timeout_ms=500).items():
            msgs.extend(ms)
        if c.assignment():
            ends = ends or c.end_offsets(list(c.assignment()))
            if all(c.position(tp) >= ends[tp] for tp in c.assignment()):
                break
    c.close()
    check(all(m.partition == 0 for m in msgs), "partition 1 was fully committed, nothing to re-read")
    check(msgs and msgs[0].offset == p0, f"resumed at {msgs[0].offset if msgs else None}, want {p0}")
    print(json.dumps({"resumed": len(msgs)}))


def case_transactions():
    topic = f"txn-{uuid.uuid4().hex[:6]}"
    create_topic(topic, partitions=2)
    p = producer(transactional_id=f"tx-{uuid.uuid4().hex[:6]}", linger_ms=0)
    p.init_transactions()

    def txn(values, commit):
        p.begin_transaction()
        for i, v in enumerate(values):
            p.send(topic, key=f"k{i % 4}".encode(), value=v.encode())
        p.flush()
        p.commit_transaction() if commit else p.abort_transaction()

    txn([f"c1-{i}" for i in range(10)], True)
    txn([f"a1-{i}" for i in range(10)], False)
    txn([f"c2-{i}" for i in range(10)], True)
    want_c = sorted([f"c1-{i}" for i in range(10)] + [f"c2-{i}" for i in range(10)])
    want_all = sorted(want_c + [f"a1-{i}" for i in range(10)])

    tps = [TopicPartition(topic, 0), TopicPartition(topic, 1)]

    def high_watermarks():
        c = KafkaConsumer(bootstrap_servers=BOOTSTRAP, enable_auto_commit=False, isolation_level="read_uncommitted")
        ends = c.end_offsets(tps)
        c.close()
        return ends

    def consume(isolation, open_txn=False):
        """Every value `isolation` reads from the start, up to a known end with a 30 s
        deadline (not until the consumer falls quiet for a while, which a slow answer also
        does): the high watermark, which read_committed reaches too once no transaction is
        open (aborted records and markers move its position on); while one is open,
        read_committed's end is the last stable offset, which must then be below the high
        watermark."""
        hwm = high_watermarks()
        c = KafkaConsumer(bootstrap_servers=BOOTSTRAP, enable_auto_commit=False, isolation_level=isolation)
        c.assign(tps)
        c.seek_to_beginning(*tps)
        ends = hwm
        if open_txn and isolation == "read_committed":
            ends = c.end_offsets(tps)  # ListOffsets under read_committed: the LSO
            check(all(ends[tp] <= hwm[tp] for tp in tps) and sum(ends.values()) < sum(hwm.values()),
                  f"the open transaction does not hold back the last stable offsets {ends} (high watermarks {hwm})")
        vals = []
        deadline = time.time() + 30
        while any(c.position(tp) < ends[tp] for tp in tps):
            check(time.time() < deadline, f"{isolation}: timed out reading to {ends}: "
                  f"at {[c.position(tp) for tp in tps]}, {len(vals)} records")
            for _, msgs in c.poll(timeout_ms=500).items():
                vals.extend(m.value.decode() for m in msgs)
        if open_txn and isolation == "read_committed":
            # Nothing past the last stable offset is served: one more fetch, which may only
            # come back empty.
            for _, msgs in c.poll(timeout_ms=1000).items():
                vals.extend(m.value.decode() for m in msgs)
        c.close()
        return sorted(vals)

    got = consume("read_committed")
    check(got == want_c, f"read_committed saw {got}")
    got = consume("read_uncommitted")
    check(got == want_all, f"read_uncommitted saw {got}")

    # An open transaction hides itself and every later record from read_committed.
    p.begin_transaction()
    for i in range(4):
        p.send(topic, key=f"k{i}".encode(), value=f"open-{i}".encode())
    p.flush()
    plain = producer()
    produce_all(plain, topic, [{"key": f"k{i}".encode(), "value": f"plain-{i}".encode()} for i in range(4)])
    got = consume("read_committed", open_txn=True)
    check(got == want_c, f"read_committed during an open transaction saw {got}")
    later = sorted([f"open-{i}" for i in range(4)] + [f"plain-{i}" for i in range(4)])
    got = consume("read_uncommitted", open_txn=True)
    check(got == sorted(want_all + later), f"read_uncommitted during an open transaction saw {got}")
    p.commit_transaction()
    got = consume("read_committed")
    check(got == sorted(want_c + later), f"read_committed after commit saw {got}")
    plain.close()
    p.close()
    print(json.dumps({"read_committed": len(want_c), "read_uncommitted": len(want_all)}))


def case_consume_transform_produce():
    src, dst = f"ctp-in-{uuid.uuid4().hex[:6]}", f"ctp-out-{uuid.uuid4().hex[:6]}"
    create_topic(src, 2)
    create_topic(dst, 2)
    produce_all(producer(), src, [{"key": f"k{i % 5}".encode(), "value": str(i).encode()} for i in range(200)])
    group = f"ctp-{uuid.uuid4().hex[:6]}"
    c = KafkaConsumer(bootstrap_servers=BOOTSTRAP, group_id=group, enable_auto_commit=False,
                      auto_offset_reset="earliest", isolation_level="read_committed")
    c.subscribe([src])
    p = producer(transactional_id=f"ctp-{uuid.uuid4().hex[:6]}", linger_ms=0)
    p.init_transactions()
    done = 0
    aborted_once = False
    deadline = time.time() + 60
    while done < 200:
        check(time.time() < deadline, f"transformed only {done} of 200")
        batch = c.poll(timeout_ms=1000, max_records=50)
        if not batch:
            continue
        p.begin_transaction()
        offsets = {}
        for tp, msgs in batch.items():
            for m in msgs:
                p.send(dst, key=m.key, value=f"x{int(m.value) * 2}".encode())
            offsets[tp] = OffsetAndMetadata(msgs[-1].offset + 1, "", -1)
            done += len(msgs)
        p.send_offsets_to_transaction(offsets, c.group_metadata())
        if not aborted_once:
            # Abort the first batch and rewind: its outputs and offsets must vanish.
            p.abort_transaction()
            aborted_once = True
            done = 0
            for tp in c.assignment():
                committed = c.committed(tp)
                c.seek(tp, committed if committed is not None else 0)
            continue
        p.commit_transaction()
    c.close()
    p.close()
    a = admin()
    committed = {tp.partition: om.offset for tp, om in a.list_group_offsets(group)[group].items()}
    a.close()
    check(sum(committed.values()) == 200, f"committed offsets {committed}")
    out = sorted(int(m.value.decode()[1:]) for m in read_topic(dst, 2, isolation_level="read_committed"))
    check(out == [2 * i for i in range(200)], f"output has {len(out)} records")
    print(json.dumps({"output": len(out), "committed": committed}))


def case_offsets_for_times():
    topic = f"times-{uuid.uuid4().hex[:6]}"
    create_topic(topic)
    base = 1_700_000_000_000
    produce_all(producer(), topic, [{"key": b"k", "value": str(i).encode(), "timestamp_ms": base + i * 1000} for i in range(10)])
    c = KafkaConsumer(bootstrap_servers=BOOTSTRAP)
    tp = TopicPartition(topic, 0)
    r = c.offsets_for_times({tp: base + 3500})[tp]
    check(r is not None and r.offset == 4 and r.timestamp == base + 4000, f"offsets_for_times(base+3.5s) = {r}")
    r = c.offsets_for_times({tp: base})[tp]
    check(r is not None and r.offset == 0, f"offsets_for_times(base) = {r}")
    r = c.offsets_for_times({tp: base + 60_000})[tp]
    check(r is None, f"offsets_for_times(after last) = {r}, want None")
    check(c.beginning_offsets([tp])[tp] == 0 and c.end_offsets([tp])[tp] == 10, "beginning/end offsets")
    c.close()
    msgs = read_topic(topic)
    check([m.timestamp for m in msgs] == [base + i * 1000 for i in range(10)], "timestamps not preserved")
    print(json.dumps({"ok": True}))


def compaction_config(extra=None):
    cfg = {"cleanup.policy": "compact", "segment.bytes": "1024", "min.cleanable.dirty.ratio": "0.01",
           "delete.retention.ms": "86400000"}
    cfg.update(extra or {})
    return cfg


def wait_compacted(topic, expect, timeout=30):
    deadline = time.time() + timeout
    why = None
    while time.time() < deadline:
        msgs = read_topic(topic)
        why = expect(msgs)
        if why is None:
            return msgs
        time.sleep(0.5)
    fail(f"not compacted within {timeout} s: {why}")


def case_compaction():
    topic = f"compact-{uuid.uuid4().hex[:6]}"
    create_topic(topic, config=compaction_config())
    recs = [{"key": f"key-{k}".encode(), "value": f"v{rnd}-{k}-".encode() + b"p" * 40} for rnd in range(15) for k in range(6)]
    fillers = [{"key": f"filler-{i}".encode(), "value": b"f" * 60} for i in range(40)]
    codec = ARGS[0] if ARGS else None
    if codec:
        # Batches of 10 compressed records: compaction must rewrite part of a batch
        # (recompress, fresh CRC, which kafka-python checks).
        p = producer(linger_ms=1000, batch_size=1 << 20, compression_type=codec)
        for i in range(0, len(recs + fillers), 10):
            futures = [p.send(topic, **r) for r in (recs + fillers)[i:i + 10]]
            p.flush()
            for f in futures:
                f.get(timeout=10)
    else:
        p = producer(linger_ms=0, batch_size=1)
        for r in recs + fillers:
            p.send(topic, **r).get(timeout=10)
    latest = {r["key"]: i for i, r in enumerate(recs)}

    def expect(msgs):
        got = {(m.key, m.offset, m.value) for m in msgs if m.key.startswith(b"key-")}
        want = {(k, o, recs[o]["value"]) for k, o in latest.items()}
        n = sum(1 for m in msgs if m.key.startswith(b"key-"))
        if n != len(want) or got != want:
            return f"{n} key-* records remain, want {len(want)}"
        return None

    msgs = wait_compacted(topic, expect)
    print(json.dumps({"remaining": len(msgs)}))


def case_subkey_compaction():
    topic = f"subkey-{uuid.uuid4().hex[:6]}"
    create_topic(topic, config=compaction_config({"kappa.compaction.subkey.header": "contentId"}))
    recs = []
    for rnd in range(8):
        for ch in range(2):
            for content in range(4):
                recs.append({"key": f"channel-{ch}".encode(), "value": f"r{rnd}-c{ch}-{content}-".encode() + b"p" * 30,
                             "headers": [("contentId", f"item-{content}".encode())]})
    fillers = [{"key": f"filler-{i}".encode(), "value": b"f" * 60} for i in range(40)]
    p = producer(linger_ms=0, batch_size=1)
    for r in recs + fillers:
        p.send(topic, **r).get(timeout=10)
    latest = {(r["key"], r["headers"][0][1]): i for i, r in enumerate(recs)}

    def expect(msgs):
        ch = [m for m in msgs if m.key.startswith(b"channel-")]
        got = {(m.key, dict(m.headers).get("contentId"), m.offset, m.value) for m in ch}
        want = {(k, s, o, recs[o]["value"]) for (k, s), o in latest.items()}
        if len(ch) != len(want) or got != want:
            return f"{len(ch)} channel records remain, want {len(want)}"
        return None

    msgs = wait_compacted(topic, expect)
    print(json.dumps({"remaining": len(msgs)}))


def case_admin():
    a = admin()
    topic = f"adm-{uuid.uuid4().hex[:6]}"
    a.create_topics([NewTopic(topic, 2, 1, topic_configs={"retention.ms": "3600000"})])
    try:
        a.create_topics([NewTopic(topic, 2, 1)])
        fail("creating an existing topic succeeded")
    except TopicAlreadyExistsError:
        pass
    bad = f"adm-bad-{uuid.uuid4().hex[:6]}"
    try:
        a.create_topics([NewTopic(bad, 1, 1, topic_configs={"retention.ms": "forever"})])
        fail("bad retention.ms accepted at create")
    except KafkaError as e:
        check(type(e).__name__ == "InvalidConfigurationError", f"bad create config raised {type(e).__name__}: {e}")
        check("retention.ms" in str(e), f"error does not name the config: {e}")
    check(bad not in a.list_topics(), "a rejected topic was created")

    def describe():
        res = a.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)], config_filter="all")
        return {k: v["value"] for k, v in res["topic"][topic].items()}

    d = describe()
    check(d.get("retention.ms") == "3600000", f"retention.ms described as {d.get('retention.ms')}")
    a.alter_configs([ConfigResource(ConfigResourceType.TOPIC, topic, configs={"retention.ms": "7200000", "cleanup.policy": "compact"})])
    d = describe()
    check(d.get("retention.ms") == "7200000" and d.get("cleanup.policy") == "compact", f"after alter {d}")
    try:
        # kafka-python reports per-resource errors in the result instead of raising.
        resp = a.alter_configs([ConfigResource(ConfigResourceType.TOPIC, topic, configs={"cleanup.policy": "sometimes"})])
        err = str(resp["topic"][topic])
        check("InvalidConfigurationError" in err, f"bad cleanup.policy accepted: {resp}")
        check("cleanup.policy" in err, f"error does not name the config: {err}")
    except KafkaError as e:
        check(type(e).__name__ == "InvalidConfigurationError", f"bad alter raised {type(e).__name__}: {e}")
        check("cleanup.policy" in str(e), f"error does not name the config: {e}")
    check(describe().get("cleanup.policy") == "compact", "a rejected alter changed the config")
    a.delete_topics([topic])
    deadline = time.time() + 10
    while topic in a.list_topics():
        check(time.time() < deadline, "deleted topic still listed")
        time.sleep(0.2)
    try:
        a.delete_topics([topic])
        fail("deleting a missing topic succeeded")
    except UnknownTopicOrPartitionError:
        pass
    a.close()
    print(json.dumps({"ok": True}))


def case_admin_groups():
    from kafka.admin import NewPartitions

    a = admin()
    topic = f"admg-{uuid.uuid4().hex[:6]}"
    create_topic(topic, partitions=2)
    a.create_partitions({topic: NewPartitions(4)})
    desc = a.describe_topics([topic])
    check(len(desc[0]["partitions"]) == 4, f"after create_partitions: {desc}")
    produce_all(producer(), topic, [{"key": f"k{i}".encode(), "value": b"v"} for i in range(20)])
    group = f"admg-{uuid.uuid4().hex[:6]}"
    c = KafkaConsumer(topic, bootstrap_servers=BOOTSTRAP, group_id=group, enable_auto_commit=False,
                      auto_offset_reset="earliest")
    got = 0
    deadline = time.time() + 20
    while got < 20:
        check(time.time() < deadline, f"consumed {got} of 20")
        got += sum(len(v) for v in c.poll(timeout_ms=500).values())
    c.commit()
    groups = [g[0] if isinstance(g, tuple) else g for g in a.list_groups()]
    groups = [g.get("group_id", g) if isinstance(g, dict) else g for g in groups]
    check(group in groups, f"{group} not in list_groups: {groups}")
    d = a.describe_groups([group])
    d = d[0] if isinstance(d, list) else d
    text = str(d)
    check("Stable" in text or "STABLE" in text, f"describe_groups: {text[:500]}")
    c.close()
    offs = a.list_group_offsets(group)[group]
    check(sum(om.offset for om in offs.values()) == 20, f"group offsets {offs}")
    a.delete_groups([group])
    c = KafkaConsumer(bootstrap_servers=BOOTSTRAP, group_id=group, enable_auto_commit=False)
    committed = [c.committed(TopicPartition(topic, p)) for p in range(4)]
    c.close()
    check(all(o is None for o in committed), f"offsets of a deleted group: {committed}")
    a.close()
    print(json.dumps({"ok": True}))


def case_delete_records():
    """DeleteRecords: the low watermark moves to the requested offset; past the end is
    OffsetOutOfRange."""
    topic = f"delrec-{uuid.uuid4().hex[:6]}"
    create_topic(topic)
    produce_all(producer(), topic, [{"value": str(i).encode(), "partition": 0} for i in range(10)])
    tp = TopicPartition(topic, 0)
    a = admin()
    result = a.delete_records({tp: 6})
    check(result[tp]["low_watermark"] == 6 and result[tp]["error_code"] == 0, f"delete_records: {result}")
    c = KafkaConsumer(bootstrap_servers=BOOTSTRAP, enable_auto_commit=False)
    marks = (c.beginning_offsets([tp])[tp], c.end_offsets([tp])[tp])
    c.close()
    check(marks == (6, 10), f"beginning and end offsets after delete_records: {marks}")
    check([m.value for m in read_topic(topic)] == [str(i).encode() for i in range(6, 10)], "records before 6 are still read")
    try:
        a.delete_records({tp: 11})
        fail("delete_records past the end succeeded")
    except kafka.errors.OffsetOutOfRangeError:
        pass
    a.close()
    print(json.dumps({"ok": True}))


def case_offset_delete():
    """OffsetDelete: refused while a member is subscribed; afterwards it drops exactly the
    named partition's committed offset and keeps the others."""
    from kafka.structs import OffsetAndMetadata

    topic = f"offdel-{uuid.uuid4().hex[:6]}"
    group = f"offdel-{uuid.uuid4().hex[:6]}"
    create_topic(topic, partitions=2)
    produce_all(producer(), topic, [{"value": b"v", "partition": p} for p in (0, 1) for _ in range(5)])
    tps = [TopicPartition(topic, 0), TopicPartition(topic, 1)]
    member = KafkaConsumer(topic, bootstrap_servers=BOOTSTRAP, group_id=group, enable_auto_commit=False)
    deadline = time.time() + 30
    while not member.assignment():
        check(time.time() < deadline, "the member was never assigned partitions")
        member.poll(timeout_ms=200)
    member.commit({tps[0]: OffsetAndMetadata(3, "", -1), tps[1]: OffsetAndMetadata(4, "", -1)})
    a = admin()
    try:
        refused = a.delete_group_offsets(group, [tps[0]])
        fail(f"deleting offsets of a group with a subscribed member succeeded: {refused}")
    except kafka.errors.GroupSubscribedToTopicError:
        pass
    member.close()

    result = a.delete_group_offsets(group, [tps[0]])
    check(all(err is None or getattr(err, "errno", 0) == 0 or "NoError" in type(err).__name__ for err in result.values()),
          f"delete_group_offsets failed: {result}")
    c = KafkaConsumer(bootstrap_servers=BOOTSTRAP, group_id=group, enable_auto_commit=False)
    committed = {tp.partition: c.committed(tp) for tp in tps}
    c.close()
    a.close()
    check(committed[0] is None, f"partition 0's offset survived OffsetDelete: {committed}")
    check(committed[1] == 4, f"partition 1's offset changed: {committed}")
    print(json.dumps({"ok": True, "committed": committed}))

if __name__ == "__main__":
    fn = globals().get(f"case_{CASE}")
    if fn is None:
        fail(f"unknown case {CASE}")
    fn()
