"""The checker checked: hand-made histories with one known anomaly each must be counted
in exactly that class, and a clean history must count nothing. No broker involved."""
from .checker import CLASSES, Anomalies, OffsetWatch, Sent, Txn, check_no_ack_in, check_produce, check_txns

A = ("t", 0)
B = ("t", 1)


def sent(*items):
    """items: (value, tp, producer, seq, status, offset)"""
    out = {}
    for value, tp, producer, seq, status, offset in items:
        s = Sent(producer, tp, seq)
        s.status, s.offset = status, offset
        out[value] = s
    return out


def clean_produce():
    s = sent((b"a0", A, "p", 0, "acked", 0), (b"a1", A, "p", 1, "acked", 1), (b"a2", A, "p", 2, "failed", None),
             (b"b0", B, "q", 0, "acked", 0))
    rb = {A: [(0, b"a0"), (1, b"a1"), (2, b"a2")], B: [(0, b"b0")]}
    return s, rb


def txn(txn_id, intent, outcome, records, commit_at=1.0):
    t = Txn(txn_id, intent)
    t.outcome = outcome
    t.records = records
    t.commit_called_at = commit_at
    return t


def clean_txns():
    txns = {
        1: txn(1, "commit", "committed", [(A, b"1-0"), (B, b"1-1")]),
        2: txn(2, "abort", "aborted", [(A, b"2-0")]),
        3: txn(3, "commit", "unknown", [(A, b"3-0"), (B, b"3-1")]),  # unknown: all or nothing
        4: txn(4, "commit", "unknown", [(A, b"4-0")]),
    }
    rb = {A: [(0, b"1-0"), (5, b"3-0")], B: [(1, b"1-1"), (6, b"3-1")]}
    return txns, rb


def expect(name, anomalies, cls, n=1):
    want = {c: 0 for c in CLASSES}
    if cls is not None:
        want[cls] = n
    if anomalies.counts != want:
        raise AssertionError(f"selftest {name}: expected {cls}={n} only, got {anomalies.counts}")


def run(r):
    cases = 0

    s, rb = clean_produce()
    expect("clean produce", check_produce(s, rb), None)
    cases += 1

    s, rb = clean_produce()
    rb[A] = [(0, b"a0"), (2, b"a2")]
    expect("lost ack", check_produce(s, rb), "lost_acknowledged_write")
    cases += 1

    s, rb = clean_produce()
    rb[A] = [(0, b"a0"), (1, b"a2")]
    expect("wrong value at acked offset", check_produce(s, rb), "two_values_at_one_offset")  # a1 acked at 1, a2 (unacked) stored there
    cases += 1

    s, rb = clean_produce()
    rb[A].append((3, b"a1"))
    expect("duplicate", check_produce(s, rb), "duplicate")
    cases += 1

    s, rb = clean_produce()
    rb[A] = [(0, b"a0"), (1, b"a1"), (1, b"a2")]
    a = check_produce(s, rb)
    if a.counts["non_monotonic_offsets"] < 1 or a.counts["two_values_at_one_offset"] < 1:
        raise AssertionError(f"selftest offsets going backwards: {a.counts}")
    cases += 1

    s, rb = clean_produce()
    s[b"a1"].status, s[b"a1"].offset, s[b"a2"].status, s[b"a2"].offset = "failed", None, "acked", 1
    rb[A] = [(0, b"a0"), (1, b"a2"), (2, b"a1")]
    expect("producer order broken", check_produce(s, rb), "non_monotonic_offsets")
    cases += 1

    s, rb = clean_produce()
    rb[B].append((1, b"zz"))
    expect("phantom", check_produce(s, rb), "phantom_record")
    cases += 1

    txns, rb = clean_txns()
    expect("clean txns", check_txns(txns, rb), None)
    cases += 1

    txns, rb = clean_txns()
    rb[A].append((7, b"2-0"))
    expect("aborted read", check_txns(txns, rb), "aborted_read")
    cases += 1

    txns, rb = clean_txns()
    rb[B] = [(1, b"1-1")]  # 3-1 missing: txn 3 (unknown) torn
    expect("torn unknown txn", check_txns(txns, rb), "torn_transaction")
    cases += 1

    txns, rb = clean_txns()
    rb[A] = [(5, b"3-0")]
    rb[B] = [(6, b"3-1")]  # committed txn 1 entirely missing
    expect("lost committed", check_txns(txns, rb), "lost_committed_write", 2)
    cases += 1

    txns, rb = clean_txns()
    a = check_txns(txns, rb, seen_at={b"1-0": 0.5})
    expect("pre-committed read", a, "pre_committed_read")
    cases += 1

    txns, rb = clean_txns()
    a = check_txns(txns, rb, seen_at={b"2-0": 2.0})
    expect("aborted record seen live only", a, "aborted_read")
    cases += 1

    txns, rb = clean_txns()
    a = check_txns(txns, rb, seen_at={b"4-0": 2.0})  # txn 4 (unknown) exposed, then gone
    expect("exposed record lost", a, "lost_committed_write")
    cases += 1

    s, _ = clean_produce()
    for v in s.values():
        v.sent_at, v.done_at = 1.0, 1.5
    s[b"a1"].sent_at, s[b"a1"].done_at = 2.5, 3.0   # sent after the fault, acked before the restart
    s[b"a0"].sent_at, s[b"a0"].done_at = 2.5, 4.5   # acked after the restart: fine
    a = Anomalies()
    check_no_ack_in(s, [(2.0, 4.0)], a)
    expect("ack after an I/O error", a, "ack_after_io_error")
    cases += 1

    a = Anomalies()
    w = OffsetWatch("g/t/0")
    w.acked(10)
    w.read(10, a)
    w.acked(12)
    w.read(11, a)
    expect("offset below an acked commit", a, "committed_offset_regression")
    a = Anomalies()
    w = OffsetWatch("g/t/0")
    w.read(5, a, acked_before_read=-1)
    w.read(4, a, acked_before_read=-1)
    expect("offset read going backwards", a, "committed_offset_regression")
    cases += 2

    r.stats.update(cases=cases)
