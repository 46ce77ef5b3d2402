#!/usr/bin/env python3
"""End-to-end checks of kappa with confluent-kafka (bundled modern librdkafka).

Usage: confluent_e2e.py BOOTSTRAP CASE [ARGS...]

Each case asserts itself, prints one JSON line with what it saw and exits non-zero
with a clear message on failure.
"""
import json
import os
import sys
import threading
import time
import uuid

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import (
    AdminClient,
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
    NewTopic,
)

BOOTSTRAP = sys.argv[1]
CASE = sys.argv[2]
ARGS = sys.argv[3:]


class WorkerFailure(Exception):
    """fail() in a thread other than the main one: sys.exit() there would end only that
    thread, so the failure is raised for the thread to hand to the main one."""


def fail(msg):
    if threading.current_thread() is not threading.main_thread():
        raise WorkerFailure(msg)
    print(f"FAIL [{CASE}]: {msg}", file=sys.stderr)
    sys.exit(1)


def check(cond, msg):
    if not cond:
        fail(msg)


_ADMIN = None


def admin():
    # One long-lived client: futures fail with _DESTROY if their client is garbage collected.
    global _ADMIN
    if _ADMIN is None:
        _ADMIN = AdminClient({"bootstrap.servers": BOOTSTRAP})
    return _ADMIN


def create_topic(name, partitions=1, config=None):
    futures = admin().create_topics([NewTopic(name, num_partitions=partitions, replication_factor=1, config=config or {})])
    futures[name].result(timeout=15)


def producer(**extra):
    conf = {"bootstrap.servers": BOOTSTRAP, "linger.ms": 5}
    conf.update(extra)
    return Producer(conf)


def consumer(group=None, **extra):
    conf = {
        "bootstrap.servers": BOOTSTRAP,
        "group.id": group or f"g-{uuid.uuid4().hex[:8]}",
        "auto.offset.reset": "earliest",
        "enable.auto.commit": False,
        "enable.partition.eof": True,
    }
    conf.update(extra)
    return Consumer(conf)


def produce_all(p, topic, records):
    """records: iterable of dicts with key/value/headers/partition/timestamp."""
    errors = []

    def on_delivery(err, msg):
        if err is not None:
            errors.append(str(err))

    for r in records:
        kwargs = {k: v for k, v in r.items() if v is not None}
        p.produce(topic, on_delivery=on_delivery, **kwargs)
        p.poll(0)
    remaining = p.flush(30)
    check(remaining == 0, f"{remaining} records not delivered within 30 s")
    check(not errors, f"delivery errors: {errors[:5]}")


def read_assigned(c, partitions, timeout=30):
    """Reads until EOF on every partition in `partitions` (set of ints)."""
    out = []
    eof = set()
    deadline = time.time() + timeout
    while eof != set(partitions):
        check(time.time() < deadline, f"timed out reading; got {len(out)} records, eof on {sorted(eof)}")
        m = c.poll(0.5)
        if m is None:
            continue
        if m.error():
            if m.error().code() == KafkaError._PARTITION_EOF:
                eof.add(m.partition())
                continue
            fail(f"consume error: {m.error()}")
        eof.discard(m.partition())
        out.append(m)
    return out


def read_topic(topic, partitions=1, **extra):
    c = consumer(**extra)
    c.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
    try:
        return read_assigned(c, set(range(partitions)))
    finally:
        c.close()


def hdrs(m):
    return [(k, v.decode() if v is not None else None) for k, v in (m.headers() or [])]


# ---------------------------------------------------------------------------


def case_metadata():
    topic = f"meta-{uuid.uuid4().hex[:6]}"
    create_topic(topic, partitions=3)
    md = admin().list_topics(timeout=10)
    check(len(md.brokers) == 1, f"expected one broker, got {md.brokers}")
    broker = list(md.brokers.values())[0]
    check(f"{broker.host}:{broker.port}" == BOOTSTRAP, f"advertised {broker.host}:{broker.port} != {BOOTSTRAP}")
    check(topic in md.topics, f"{topic} missing from metadata: {list(md.topics)}")
    parts = md.topics[topic].partitions
    check(sorted(parts) == [0, 1, 2], f"partitions {sorted(parts)}")
    for p in parts.values():
        check(p.leader == broker.id, f"partition {p.id} leader {p.leader} not broker {broker.id}")
    one = admin().list_topics(topic=topic, timeout=10)
    check(list(one.topics) == [topic], f"single-topic metadata returned {list(one.topics)}")
    print(json.dumps({"broker": broker.id, "topic": topic, "partitions": len(parts)}))


def case_produce_consume():
    topic = f"keyed-{uuid.uuid4().hex[:6]}"
    create_topic(topic, partitions=3)
    keys = [f"channel-{i}" for i in range(5)]
    records = []
    for seq in range(40):
        for k in keys:
            records.append(
                {
                    "key": k.encode(),
                    "value": f"{k}:{seq}".encode(),
                    "headers": [("eventType", b"ChannelUpdated"), ("seq", str(seq).encode()), ("dup", b"1"), ("dup", b"2")],
                }
            )
    produce_all(producer(), topic, records)
    msgs = read_topic(topic, partitions=3)
    check(len(msgs) == len(records), f"consumed {len(msgs)} of {len(records)}")
    per_key = {}
    key_partition = {}
    for m in msgs:
        k = m.key().decode()
        key_partition.setdefault(k, set()).add(m.partition())
        per_key.setdefault(k, []).append(m.value().decode())
        h = hdrs(m)
        seq = m.value().decode().split(":")[1]
        want = [("eventType", "ChannelUpdated"), ("seq", seq), ("dup", "1"), ("dup", "2")]
        check(h == want, f"headers {h} != {want}")
    for k in keys:
        check(len(key_partition[k]) == 1, f"key {k} spread over partitions {key_partition[k]}")
        check(per_key[k] == [f"{k}:{s}" for s in range(40)], f"key {k} out of order: {per_key[k][:10]}...")
    used = set().union(*key_partition.values())
    print(json.dumps({"records": len(msgs), "partitions_used": sorted(used)}))


def case_compression():
    result = {}
    for codec in ["none", "gzip", "snappy", "lz4", "zstd"]:
        topic = f"codec-{codec}-{uuid.uuid4().hex[:6]}"
        create_topic(topic)
        recs = [
            {"key": f"k{i % 7}".encode(), "value": (f"value-{i}-" + "x" * (i % 50)).encode(), "headers": [("i", str(i).encode())]}
            for i in range(500)
        ]
        produce_all(producer(**{"compression.type": codec, "linger.ms": 50}), topic, recs)
        msgs = read_topic(topic)
        got = [(m.key(), m.value(), hdrs(m)) for m in msgs]
        want = [(r["key"], r["value"], [("i", r["headers"][0][1].decode())]) for r in recs]
        check(got == want, f"{codec}: consumed records differ (got {len(got)}, first diff at "
              f"{next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)})")
        result[codec] = len(msgs)
    print(json.dumps(result))


def case_idempotent():
    topic = f"idem-{uuid.uuid4().hex[:6]}"
    create_topic(topic, partitions=2)
    p = producer(**{"enable.idempotence": True, "acks": "all", "max.in.flight.requests.per.connection": 5})
    recs = [{"key": f"k{i % 10}".encode(), "value": str(i).encode()} for i in range(2000)]
    produce_all(p, topic, recs)
    msgs = read_topic(topic, partitions=2)
    values = sorted(int(m.value()) for m in msgs)
    check(values == list(range(2000)), f"got {len(values)} records, {len(set(values))} distinct")
    per_key = {}
    for m in msgs:
        per_key.setdefault(m.key(), []).append(int(m.value()))
    for k, vs in per_key.items():
        check(vs == sorted(vs), f"key {k} out of order")
    print(json.dumps({"records": len(values)}))


def case_group():
    """3 members join one by one and the first leaves; every record is consumed exactly once."""
    topic = f"grp-{uuid.uuid4().hex[:6]}"
    partitions = 6
    create_topic(topic, partitions=partitions)
    group = f"grp-{uuid.uuid4().hex[:6]}"
    seen = []  # (member, partition, offset, value)
    lock = threading.Lock()
    assignments = {}
    stops = {}

    strategy = ARGS[0] if ARGS else "range,roundrobin"
    owned = {}
    # What ended a member thread early (a failed check, a consume error, an exception): the
    # main thread checks this while it waits and at the end.
    worker_errors = []

    def check_workers():
        with lock:
            errors = list(worker_errors)
        check(not errors, f"member threads failed: {errors}")

    def member(name):
        try:
            run_member(name)
        except BaseException as e:
            with lock:
                worker_errors.append(f"{name}: {e}" if isinstance(e, WorkerFailure) else f"{name}: {e!r}")

    def run_member(name):
        # Offsets consumed but not yet committed. With the cooperative protocol a member keeps
        # consuming while the group rebalances, so a commit can race a JoinGroup completing and
        # get ILLEGAL_GENERATION / REBALANCE_IN_PROGRESS (as on Apache Kafka); it is retried,
        # and committed at the latest when the partition is revoked.
        pending = {}

        def commit_pending(c, only=None):
            offsets = [TopicPartition(topic, p, o) for p, o in pending.items() if only is None or p in only]
            if not offsets:
                return
            try:
                c.commit(offsets=offsets, asynchronous=False)
            except KafkaException as e:
                if e.args[0].code() not in (KafkaError.ILLEGAL_GENERATION, KafkaError.REBALANCE_IN_PROGRESS):
                    raise
                return
            for tp in offsets:
                if pending.get(tp.partition) == tp.offset:
                    del pending[tp.partition]

        # Eager assignors hand over the full assignment; cooperative ones only the change.
        def on_assign(c, parts):
            with lock:
                if strategy != "cooperative-sticky":
                    owned[name] = set()
                owned[name] = owned.get(name, set()) | {p.partition for p in parts}
                assignments.setdefault(name, []).append(sorted(owned[name]))
            if strategy == "cooperative-sticky":
                c.incremental_assign(parts)

        def on_revoke(c, parts):
            revoked = {p.partition for p in parts}
            commit_pending(c, revoked)
            check(not (revoked & set(pending)), f"{name}: could not commit revoked partitions {pending}")
            with lock:
                owned[name] = owned.get(name, set()) - revoked
                assignments.setdefault(name, []).append(sorted(owned[name]))
            if strategy == "cooperative-sticky":
                c.incremental_unassign(parts)

        debug = {"debug": "cgrp"} if os.environ.get("RDDEBUG") else {}
        c = consumer(group, **{"enable.partition.eof": False, "session.timeout.ms": 10000, "heartbeat.interval.ms": 300,
                               "partition.assignment.strategy": strategy, **debug})
        c.subscribe([topic], on_assign=on_assign, on_revoke=on_revoke)
        while not stops[name].is_set():
            commit_pending(c)
            m = c.poll(0.2)
            if m is None:
                continue
            if m.error():
                fail(f"{name}: {m.error()}")
            with lock:
                seen.append((name, m.partition(), m.offset(), m.value().decode()))
            pending[m.partition()] = m.offset() + 1
            commit_pending(c)
        commit_pending(c)
        c.close()

    threads = {}

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

    def wait_consumed(n, timeout=30):
        deadline = time.time() + timeout
        while time.time() < deadline:
            check_workers()
            with lock:
                if len(seen) >= n:
                    return
            time.sleep(0.1)
        check_workers()
        fail(f"only {len(seen)} of {n} consumed; assignments {assignments}")

    def wait_assigned(name, timeout=30):
        deadline = time.time() + timeout
        while time.time() < deadline:
            check_workers()
            with lock:
                if assignments.get(name):
                    return
            time.sleep(0.1)
        check_workers()
        fail(f"{name} never got an assignment: {assignments}")

    def stop(name):
        stops[name].set()
        threads[name].join(30)
        check_workers()
        check(not threads[name].is_alive(), f"member {name} did not stop within 30 s")

    start("a")
    wait_assigned("a")
    produce_batch(150)
    wait_consumed(150)
    start("b")
    produce_batch(150)
    wait_assigned("b")
    start("c")
    produce_batch(150)
    wait_assigned("c")
    wait_consumed(450)
    stop("a")
    produce_batch(150)
    wait_consumed(600)
    time.sleep(1)
    # Snapshot before b and c stop: their own leaving rebalances the group again.
    with lock:
        final = {n: a[-1] for n, a in assignments.items()}
    for n in ["b", "c"]:
        stop(n)
    values = sorted(int(v) for _, _, _, v in seen)
    dups = len(values) - len(set(values))
    check(dups == 0, f"{dups} records consumed twice")
    check(values == list(range(total)), f"lost records: consumed {len(set(values))} of {total}")
    members = {m for m, _, _, _ in seen}
    check(members >= {"a", "b", "c"} or members >= {"b", "c"}, f"records consumed only by {members}")
    check(len(final["b"]) + len(final["c"]) == partitions, f"after a left, b+c should own all partitions: {assignments}")
    print(json.dumps({"consumed": len(values), "assignments": assignments}))


def case_commit_before_restart():
    topic, group = ARGS[0], ARGS[1]
    create_topic(topic, partitions=2)
    produce_all(producer(), topic, [{"key": f"k{i}".encode(), "value": str(i).encode()} for i in range(100)])
    c = consumer(group)
    c.assign([TopicPartition(topic, 0, 0), TopicPartition(topic, 1, 0)])
    msgs = read_assigned(c, {0, 1})
    check(len(msgs) == 100, f"read {len(msgs)} of 100")
    # Commit part way: offset 10 on partition 0 and the end on partition 1.
    ends = {p: max(m.offset() for m in msgs if m.partition() == p) + 1 for p in (0, 1)}
    c.commit(offsets=[TopicPartition(topic, 0, 10, "meta-p0"), TopicPartition(topic, 1, ends[1])], asynchronous=False)
    c.close()
    print(json.dumps({"p0": 10, "p1": ends[1]}))


def case_commit_after_restart():
    topic, group, p0, p1 = ARGS[0], ARGS[1], int(ARGS[2]), int(ARGS[3])
    c = consumer(group)
    committed = c.committed([TopicPartition(topic, 0), TopicPartition(topic, 1)], timeout=15)
    got = {tp.partition: tp.offset for tp in committed}
    check(got == {0: p0, 1: p1}, f"committed offsets after restart {got} != {{0: {p0}, 1: {p1}}}")
    check(committed[0].metadata == "meta-p0", f"commit metadata {committed[0].metadata!r}")
    # A subscribing member resumes from the committed offsets.
    c.subscribe([topic])
    msgs = []
    eof = set()
    deadline = time.time() + 30
    while eof != {0, 1}:
        check(time.time() < deadline, f"timed out resuming; got {len(msgs)}")
        m = c.poll(0.5)
        if m is None:
            continue
        if m.error():
            if m.error().code() == KafkaError._PARTITION_EOF:
                eof.add(m.partition())
                continue
            fail(str(m.error()))
        msgs.append(m)
    c.close()
    check(all(m.partition() == 0 for m in msgs), "partition 1 was fully committed, nothing to re-read")
    check(msgs and msgs[0].offset() == p0, f"resumed at {msgs[0].offset() if msgs else None}, want {p0}")
    check(len(msgs) == (100 - p1) - p0, f"resumed {len(msgs)} records, want {(100 - p1) - p0}")
    print(json.dumps({"resumed": len(msgs)}))


# librdkafka's transaction calls (init, send_offsets, commit, abort) and the flush before a
# commit: a loaded 2-core CI machine once took longer than 15 s; clients_python.rs allows
# these cases 180 s in all.
TXN_TIMEOUT_S = 60


def case_transactions():
    topic = f"txn-{uuid.uuid4().hex[:6]}"
    create_topic(topic, partitions=2)
    p = producer(**{"transactional.id": f"tx-{uuid.uuid4().hex[:6]}", "linger.ms": 0})
    p.init_transactions(TXN_TIMEOUT_S)

    def txn(values, commit):
        p.begin_transaction()
        for i, v in enumerate(values):
            p.produce(topic, key=f"k{i % 4}".encode(), value=v.encode())
        check(p.flush(TXN_TIMEOUT_S) == 0, f"records not delivered within {TXN_TIMEOUT_S} s")
        if commit:
            p.commit_transaction(TXN_TIMEOUT_S)
        else:
            p.abort_transaction(TXN_TIMEOUT_S)

    txn([f"c1-{i}" for i in range(10)], True)
    txn([f"a1-{i}" for i in range(10)], False)
    txn([f"c2-{i}" for i in range(10)], True)
    txn([f"a2-{i}" for i in range(5)], False)

    # An open transaction: read_committed must not see it (nor anything after it).
    p.begin_transaction()
    for i in range(6):
        p.produce(topic, key=f"k{i % 4}".encode(), value=f"open-{i}".encode())
    check(p.flush(TXN_TIMEOUT_S) == 0, f"records not delivered within {TXN_TIMEOUT_S} s")
    plain = producer()
    produce_all(plain, topic, [{"key": f"k{i % 4}".encode(), "value": f"plain-{i}".encode()} for i in range(4)])

    committed_vals = sorted(m.value().decode() for m in read_topic(topic, 2, **{"isolation.level": "read_committed"}))
    want_committed = sorted([f"c1-{i}" for i in range(10)] + [f"c2-{i}" for i in range(10)])
    check(committed_vals == want_committed, f"read_committed during open txn saw {committed_vals}")

    uncommitted_vals = sorted(m.value().decode() for m in read_topic(topic, 2, **{"isolation.level": "read_uncommitted"}))
    want_all = sorted(
        want_committed + [f"a1-{i}" for i in range(10)] + [f"a2-{i}" for i in range(5)] + [f"open-{i}" for i in range(6)]
        + [f"plain-{i}" for i in range(4)]
    )
    check(uncommitted_vals == want_all, f"read_uncommitted saw {uncommitted_vals}")

    p.commit_transaction(TXN_TIMEOUT_S)
    committed_vals = sorted(m.value().decode() for m in read_topic(topic, 2, **{"isolation.level": "read_committed"}))
    want_committed = sorted(want_committed + [f"open-{i}" for i in range(6)] + [f"plain-{i}" for i in range(4)])
    check(committed_vals == want_committed, f"read_committed after commit saw {committed_vals}")
    print(json.dumps({"read_committed": len(committed_vals), "read_uncommitted": len(uncommitted_vals)}))


def case_consume_transform_produce():
    src = f"ctp-in-{uuid.uuid4().hex[:6]}"
    dst = f"ctp-out-{uuid.uuid4().hex[:6]}"
    create_topic(src, partitions=2)
    create_topic(dst, partitions=2)
    produce_all(producer(), src, [{"key": f"k{i % 5}".encode(), "value": str(i).encode()} for i in range(200)])
    group = f"ctp-{uuid.uuid4().hex[:6]}"
    c = consumer(group, **{"isolation.level": "read_committed", "enable.partition.eof": False})
    c.subscribe([src])
    p = producer(**{"transactional.id": f"ctp-{uuid.uuid4().hex[:6]}", "linger.ms": 0})
    p.init_transactions(TXN_TIMEOUT_S)
    done = 0
    aborted_once = False
    deadline = time.time() + 2 * TXN_TIMEOUT_S
    while done < 200:
        check(time.time() < deadline, f"transformed only {done} of 200")
        msgs = c.consume(50, 1.0)
        msgs = [m for m in msgs if not m.error()]
        if not msgs:
            continue
        p.begin_transaction()
        for m in msgs:
            p.produce(dst, key=m.key(), value=f"x{int(m.value()) * 2}".encode())
        p.send_offsets_to_transaction(c.position(c.assignment()), c.consumer_group_metadata(), TXN_TIMEOUT_S)
        if not aborted_once:
            # Abort the first batch and rewind: its outputs and offsets must vanish.
            p.abort_transaction(TXN_TIMEOUT_S)
            aborted_once = True
            committed = c.committed(c.assignment(), timeout=10)
            for tp in committed:
                c.seek(TopicPartition(tp.topic, tp.partition, tp.offset if tp.offset >= 0 else 0))
            continue
        p.commit_transaction(TXN_TIMEOUT_S)
        done += len(msgs)
    positions = {tp.partition: tp.offset for tp in c.position(c.assignment())}
    c.close()
    check2 = consumer(group)
    committed = {tp.partition: tp.offset for tp in check2.committed([TopicPartition(src, 0), TopicPartition(src, 1)], timeout=10)}
    check2.close()
    check(committed == positions, f"committed {committed} != positions {positions}")
    out = sorted(int(m.value().decode()[1:]) for m in read_topic(dst, 2, **{"isolation.level": "read_committed"}))
    check(out == [2 * i for i in range(200)], f"output has {len(out)} records, {len(set(out))} distinct")
    print(json.dumps({"output": len(out), "committed": committed}))


def case_offsets_for_times():
    topic = f"times-{uuid.uuid4().hex[:6]}"
    create_topic(topic)
    base = 1_700_000_000_000
    recs = [{"key": b"k", "value": str(i).encode(), "timestamp": base + i * 1000} for i in range(10)]
    produce_all(producer(), topic, recs)
    c = consumer()
    res = c.offsets_for_times([TopicPartition(topic, 0, base + 3500)], timeout=10)
    check(res[0].offset == 4, f"offset for ts base+3.5s = {res[0].offset}, want 4")
    res = c.offsets_for_times([TopicPartition(topic, 0, base)], timeout=10)
    check(res[0].offset == 0, f"offset for first ts = {res[0].offset}, want 0")
    res = c.offsets_for_times([TopicPartition(topic, 0, base + 60_000)], timeout=10)
    check(res[0].offset == -1, f"offset for a ts after the last = {res[0].offset}, want -1 (end)")
    lo, hi = c.get_watermark_offsets(TopicPartition(topic, 0), timeout=10)
    check((lo, hi) == (0, 10), f"watermarks {(lo, hi)}")
    msgs = read_topic(topic)
    check([m.timestamp()[1] for m in msgs] == [r["timestamp"] for r in recs], "timestamps not preserved")
    c.close()
    print(json.dumps({"ok": True}))


def wait_compacted(topic, expect_fn, timeout=30):
    """Re-reads the topic from the start until expect_fn(msgs) returns None (ok) or time runs out."""
    deadline = time.time() + timeout
    why = None
    while time.time() < deadline:
        msgs = read_topic(topic)
        why = expect_fn(msgs)
        if why is None:
            return msgs
        time.sleep(0.5)
    fail(f"not compacted within {timeout} s: {why}")


def compaction_config(extra=None):
    cfg = {"cleanup.policy": "compact", "segment.bytes": "1024", "min.cleanable.dirty.ratio": "0.01",
           "delete.retention.ms": "86400000"}
    cfg.update(extra or {})
    return cfg


def case_compaction():
    topic = f"compact-{uuid.uuid4().hex[:6]}"
    create_topic(topic, config=compaction_config())
    recs = []
    for rnd in range(15):
        for k in range(6):
            recs.append({"key": f"key-{k}".encode(), "value": f"v{rnd}-{k}-".encode() + b"p" * 40})
    # Fillers with unique keys push the interesting records into closed segments.
    fillers = [{"key": f"filler-{i}".encode(), "value": b"f" * 60} for i in range(40)]
    produce_all(producer(**{"linger.ms": 0, "batch.num.messages": 1}), topic, recs + fillers)
    offset_of = {}
    for i, r in enumerate(recs):
        offset_of[r["key"]] = i  # latest offset per key

    def expect(msgs):
        interesting = [m for m in msgs if m.key().startswith(b"key-")]
        got = {(m.key(), m.offset(), m.value()) for m in interesting}
        want = {(k, o, recs[o]["value"]) for k, o in offset_of.items()}
        if len(interesting) != len(want) or got != want:
            return f"{len(interesting)} key-* records remain, want {len(want)} (latest only)"
        fill = [m.key() for m in msgs if m.key().startswith(b"filler-")]
        if fill != [f["key"] for f in fillers]:
            return f"fillers changed: {len(fill)}"
        offsets = [m.offset() for m in msgs]
        if offsets != sorted(offsets):
            return "offsets not increasing"
        return None

    msgs = wait_compacted(topic, expect)
    print(json.dumps({"remaining": len(msgs), "produced": len(recs) + len(fillers)}))


def case_subkey_compaction():
    topic = f"subkey-{uuid.uuid4().hex[:6]}"
    create_topic(topic, config=compaction_config({"kappa.compaction.subkey.header": "contentId"}))
    recs = []
    for rnd in range(8):
        for ch in range(2):
            for content in range(4):
                recs.append({
                    "key": f"channel-{ch}".encode(),
                    "value": f"r{rnd}-c{ch}-{content}-".encode() + b"p" * 30,
                    "headers": [("eventType", b"ChannelContentMutated"), ("contentId", f"item-{content}".encode())],
                })
    # Channel events without a sub-key compact per key.
    for rnd in range(5):
        recs.append({"key": b"channel-0", "value": f"meta-{rnd}".encode() + b"m" * 30, "headers": [("eventType", b"ChannelUpdated")]})
    # A tombstone with a sub-key deletes that item; one without deletes the whole channel.
    recs.append({"key": b"channel-1", "value": None, "headers": [("contentId", b"item-2")]})
    for content in range(3):
        recs.append({"key": b"channel-2", "value": f"doomed-{content}".encode() + b"d" * 30,
                     "headers": [("contentId", f"item-{content}".encode())]})
    recs.append({"key": b"channel-2", "value": None, "headers": [("eventType", b"ChannelDeleted")]})
    fillers = [{"key": f"filler-{i}".encode(), "value": b"f" * 60} for i in range(40)]
    produce_all(producer(**{"linger.ms": 0, "batch.num.messages": 1}), topic, recs + fillers)

    def subkey(headers):
        for k, v in headers or []:
            if k == "contentId":
                return v if isinstance(v, bytes) else v.encode()
        return None

    latest = {}
    for i, r in enumerate(recs):
        sk = subkey(r.get("headers"))
        if r["value"] is None and sk is None:
            latest = {ks: o for ks, o in latest.items() if ks[0] != r["key"]}
        latest[(r["key"], sk)] = i

    def expect(msgs):
        interesting = [m for m in msgs if m.key().startswith(b"channel-")]
        got = {(m.key(), subkey(m.headers()), m.offset(), m.value()) for m in interesting}
        want = {(k, s, o, recs[o]["value"]) for (k, s), o in latest.items()}
        if len(interesting) != len(want) or got != want:
            return (f"{len(interesting)} channel records remain, want {len(want)} (latest per key+contentId); "
                    f"extra {sorted(got - want, key=str)[:5]}, missing {sorted(want - got, key=str)[:5]}")
        return None

    msgs = wait_compacted(topic, expect)
    print(json.dumps({"remaining": len(msgs), "produced": len(recs) + len(fillers)}))


def case_admin():
    a = admin()
    topic = f"adm-{uuid.uuid4().hex[:6]}"
    a.create_topics([NewTopic(topic, 2, 1, config={"retention.ms": "3600000"})])[topic].result(15)
    # Creating it again is a clear error.
    try:
        a.create_topics([NewTopic(topic, 2, 1)])[topic].result(15)
        fail("creating an existing topic succeeded")
    except KafkaException as e:
        check(e.args[0].code() == KafkaError.TOPIC_ALREADY_EXISTS, f"duplicate create: {e}")
    # Bad config values are rejected with a message naming the config.
    bad = f"adm-bad-{uuid.uuid4().hex[:6]}"
    try:
        a.create_topics([NewTopic(bad, 1, 1, config={"retention.ms": "forever"})])[bad].result(15)
        fail("bad retention.ms accepted at create")
    except KafkaException as e:
        err = e.args[0]
        check(err.code() == KafkaError.INVALID_CONFIG, f"bad create config: {err}")
        check("retention.ms" in err.str(), f"error does not name the config: {err.str()!r}")
    check(bad not in a.list_topics(timeout=10).topics, "a rejected topic was created")

    res = ConfigResource(ConfigResource.Type.TOPIC, topic)
    desc = a.describe_configs([res])[res].result(15)
    check(desc["retention.ms"].value == "3600000", f"retention.ms described as {desc['retention.ms'].value}")
    check("cleanup.policy" in desc, f"describe lacks cleanup.policy: {sorted(desc)}")

    inc = ConfigResource(ConfigResource.Type.TOPIC, topic, incremental_configs=[
        ConfigEntry("retention.ms", "7200000", incremental_operation=AlterConfigOpType.SET),
        ConfigEntry("cleanup.policy", "compact", incremental_operation=AlterConfigOpType.SET),
    ])
    a.incremental_alter_configs([inc])[inc].result(15)
    desc = a.describe_configs([res])[res].result(15)
    check(desc["retention.ms"].value == "7200000", f"after alter retention.ms = {desc['retention.ms'].value}")
    check(desc["cleanup.policy"].value == "compact", f"after alter cleanup.policy = {desc['cleanup.policy'].value}")

    badinc = ConfigResource(ConfigResource.Type.TOPIC, topic, incremental_configs=[
        ConfigEntry("cleanup.policy", "sometimes", incremental_operation=AlterConfigOpType.SET),
    ])
    try:
        a.incremental_alter_configs([badinc])[badinc].result(15)
        fail("bad cleanup.policy accepted")
    except KafkaException as e:
        err = e.args[0]
        check(err.code() == KafkaError.INVALID_CONFIG, f"bad alter: {err}")
        check("cleanup.policy" in err.str(), f"error does not name the config: {err.str()!r}")
    desc = a.describe_configs([res])[res].result(15)
    check(desc["cleanup.policy"].value == "compact", "a rejected alter changed the config")

    # Legacy AlterConfigs (replaces the whole set).
    legacy = ConfigResource(ConfigResource.Type.TOPIC, topic, set_config={"retention.ms": "1000000"})
    a.alter_configs([legacy])[legacy].result(15)
    desc = a.describe_configs([res])[res].result(15)
    check(desc["retention.ms"].value == "1000000", f"after alter_configs retention.ms = {desc['retention.ms'].value}")

    a.delete_topics([topic])[topic].result(15)
    deadline = time.time() + 10
    while topic in a.list_topics(timeout=10).topics:
        check(time.time() < deadline, "deleted topic still listed")
        time.sleep(0.2)
    try:
        a.delete_topics([topic])[topic].result(15)
        fail("deleting a missing topic succeeded")
    except KafkaException as e:
        check(e.args[0].code() == KafkaError.UNKNOWN_TOPIC_OR_PART, f"delete missing: {e}")
    print(json.dumps({"ok": True}))


def case_delete_records():
    """DeleteRecords moves the log start (low watermark); reads start there; an offset past
    the end and the coordinators' internal topics are refused."""
    a = admin()
    topic = f"delrec-{uuid.uuid4().hex[:6]}"
    create_topic(topic, partitions=2)
    recs = [{"key": b"k", "value": str(i).encode(), "partition": 0} for i in range(10)]
    recs += [{"key": b"k", "value": str(i).encode(), "partition": 1} for i in range(5)]
    produce_all(producer(), topic, recs)
    asked = [TopicPartition(topic, 0, 4), TopicPartition(topic, 1, -1)]
    done = a.delete_records(asked)
    lows = {tp.partition: f.result(15).low_watermark for tp, f in done.items()}
    check(lows == {0: 4, 1: 5}, f"low watermarks after delete_records: {lows}")
    c = consumer()
    for partition, want in ((0, (4, 10)), (1, (5, 5))):
        marks = c.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)
        check(tuple(marks) == want, f"partition {partition} watermarks {marks}, want {want}")
    c.close()
    c = consumer()
    c.assign([TopicPartition(topic, 0, -2)])  # OFFSET_BEGINNING: the new log start
    got = []
    deadline = time.time() + 20
    while len(got) < 6 and time.time() < deadline:
        m = c.poll(0.5)
        if m is not None and not m.error():
            got.append((m.offset(), m.value()))
    c.close()
    check(got == [(i, str(i).encode()) for i in range(4, 10)], f"read from the beginning after delete: {got}")
    for tp, code in ((TopicPartition(topic, 0, 11), KafkaError.OFFSET_OUT_OF_RANGE),
                     # Kafka's ReplicaManager: "Cannot delete records of internal topic".
                     (TopicPartition("__consumer_offsets", 0, 0), KafkaError.TOPIC_EXCEPTION)):
        try:
            a.delete_records([tp])[tp].result(15)
            fail(f"delete_records {tp} succeeded")
        except KafkaException as e:
            check(e.args[0].code() == code, f"delete_records {tp}: {e}, want {code}")
    print(json.dumps({"ok": True}))


def case_static_membership():
    """A static member (group.instance.id) that restarts within the session timeout gets its
    own partitions back and the group keeps both instances."""
    topic = f"static-{uuid.uuid4().hex[:6]}"
    create_topic(topic, partitions=4)
    group = f"static-{uuid.uuid4().hex[:6]}"
    a_admin = admin()

    def member(instance):
        c = consumer(group, **{"group.instance.id": instance, "session.timeout.ms": 10000,
                               "enable.partition.eof": False})
        c.subscribe([topic])
        return c

    def wait_stable(consumers, want_members):
        deadline = time.time() + 30
        while time.time() < deadline:
            for c in consumers:
                c.poll(0.1)
            d = a_admin.describe_consumer_groups([group])[group].result(15)
            if str(d.state).endswith("STABLE") and len(d.members) == want_members and all(c.assignment() for c in consumers):
                return d
        fail(f"group not stable with {want_members} members")

    a, b = member("static-a"), member("static-b")
    wait_stable([a, b], 2)
    before = sorted(tp.partition for tp in b.assignment())
    b.close()  # a static member does not leave the group on close
    b = member("static-b")
    d = wait_stable([a, b], 2)
    after = sorted(tp.partition for tp in b.assignment())
    check(after == before, f"restarted static member got {after}, had {before}")
    instances = sorted(m.group_instance_id for m in d.members)
    check(instances == ["static-a", "static-b"], f"members {instances}")
    a.close()
    b.close()
    print(json.dumps({"partitions": after}))


def case_produce_acked():
    """Produces N acknowledged records (idempotent, acks=all) for a later kill -9."""
    topic, n = ARGS[0], int(ARGS[1])
    create_topic(topic, partitions=2)
    produce_all(producer(**{"enable.idempotence": True, "acks": "all"}), topic,
                [{"key": f"k{i % 10}".encode(), "value": str(i).encode()} for i in range(n)])
    print(json.dumps({"acked": n}))


def case_verify_acked():
    topic, n = ARGS[0], int(ARGS[1])
    values = sorted(int(m.value()) for m in read_topic(topic, 2))
    check(values == list(range(n)), f"after kill -9: {len(values)} records, {len(set(values))} distinct, want {n}")
    print(json.dumps({"records": len(values)}))


def case_admin_groups():
    from confluent_kafka import ConsumerGroupTopicPartitions
    from confluent_kafka.admin import NewPartitions

    a = admin()
    topic = f"admg-{uuid.uuid4().hex[:6]}"
    create_topic(topic, partitions=2)
    a.create_partitions([NewPartitions(topic, 4)])[topic].result(15)
    parts = a.list_topics(topic=topic, timeout=10).topics[topic].partitions
    check(sorted(parts) == [0, 1, 2, 3], f"after create_partitions: {sorted(parts)}")
    try:
        a.create_partitions([NewPartitions(topic, 2)])[topic].result(15)
        fail("shrinking partitions succeeded")
    except KafkaException as e:
        check(e.args[0].code() == KafkaError.INVALID_PARTITIONS, f"shrink: {e}")

    produce_all(producer(), topic, [{"key": f"k{i}".encode(), "value": b"v"} for i in range(20)])
    group = f"admg-{uuid.uuid4().hex[:6]}"
    c = consumer(group, **{"enable.partition.eof": False})
    c.subscribe([topic])
    deadline = time.time() + 20
    got = 0
    while got < 20:
        check(time.time() < deadline, f"consumed {got} of 20")
        m = c.poll(0.5)
        if m is not None and not m.error():
            got += 1
    c.commit(asynchronous=False)

    listed = {g.group_id: g for g in a.list_consumer_groups().result(15).valid}
    check(group in listed, f"{group} not in list_consumer_groups: {sorted(listed)}")
    desc = a.describe_consumer_groups([group])[group].result(15)
    check(len(desc.members) == 1, f"describe: {len(desc.members)} members")
    member_parts = sorted(tp.partition for tp in desc.members[0].assignment.topic_partitions)
    check(member_parts == [0, 1, 2, 3], f"describe: member assignment {member_parts}")
    check(str(desc.state).endswith("STABLE"), f"describe: state {desc.state}")
    try:
        a.delete_consumer_groups([group])[group].result(15)
        fail("deleting a group with members succeeded")
    except KafkaException as e:
        check(e.args[0].code() == KafkaError.NON_EMPTY_GROUP, f"delete non-empty: {e}")
    c.close()

    offs = a.list_consumer_group_offsets([ConsumerGroupTopicPartitions(group)])[group].result(15)
    check(sum(tp.offset for tp in offs.topic_partitions) == 20, f"group offsets {offs.topic_partitions}")
    a.delete_consumer_groups([group])[group].result(15)
    listed = {g.group_id for g in a.list_consumer_groups().result(15).valid}
    check(group not in listed, f"deleted group still listed")
    c = consumer(group)
    committed = c.committed([TopicPartition(topic, p) for p in range(4)], timeout=10)
    c.close()
    check(all(tp.offset < 0 for tp in committed), f"offsets of a deleted group: {committed}")
    print(json.dumps({"ok": True}))


if __name__ == "__main__":
    fn = globals().get(f"case_{CASE}")
    if fn is None:
        fail(f"unknown case {CASE}")
    fn()
