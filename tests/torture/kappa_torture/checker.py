"""The anomaly checker: compares everything the clients were told (acknowledgements with
offsets, transaction outcomes, committed offsets) with everything that can be read back,
and counts anomalies per class. Any nonzero count fails the run."""
from collections import defaultdict

# Every class the checker knows, in report order.
CLASSES = [
    "lost_acknowledged_write",      # acked (partition, offset, value) missing after recovery
    "two_values_at_one_offset",     # the log (or two acks) put different values at one offset
    "duplicate",                    # one produced value stored more than once
    "non_monotonic_offsets",        # offsets going backwards in a read, or a producer's order broken
    "phantom_record",               # a value nobody produced (corruption)
    "aborted_read",                 # G1a: read_committed saw a record of an aborted transaction
    "torn_transaction",             # read_committed saw part of a transaction
    "lost_committed_write",         # a record of a transaction the client saw commit is missing
    "pre_committed_read",           # read_committed saw a record before its transaction committed
    "committed_offset_regression",  # a committed offset went backwards
    "corrupt_batch",                # a read failed its CRC or record decoding
    "ack_after_io_error",           # acknowledged although every fsync/write since it was sent failed
    "stale_end_txn_applied",        # a delayed EndTxn was accepted while the next transaction was open
]


class Anomalies:
    """Counts per class, with the first few examples of each."""

    EXAMPLES = 5

    def __init__(self):
        self.counts = {c: 0 for c in CLASSES}
        self.examples = defaultdict(list)

    def add(self, cls, example, n=1):
        assert cls in self.counts, cls
        self.counts[cls] += n
        if len(self.examples[cls]) < self.EXAMPLES:
            self.examples[cls].append(example)

    def merge(self, other):
        for cls, n in other.counts.items():
            self.counts[cls] += n
            for e in other.examples[cls]:
                if len(self.examples[cls]) < self.EXAMPLES:
                    self.examples[cls].append(e)

    def total(self):
        return sum(self.counts.values())

    def report(self):
        lines = ["anomalies:"]
        for cls in CLASSES:
            lines.append(f"  {cls:30} {self.counts[cls]}")
            for e in self.examples.get(cls, []):
                lines.append(f"      e.g. {e}")
        return "\n".join(lines)


class Sent:
    """One record a producer handed to its client."""

    __slots__ = ("producer", "tp", "seq", "status", "offset", "error", "sent_at", "done_at")

    def __init__(self, producer, tp, seq, sent_at=None):
        self.producer = producer
        self.tp = tp
        self.seq = seq          # per-producer send order
        self.status = "pending"  # pending | acked | failed
        self.offset = None
        self.error = None
        self.sent_at = sent_at  # monotonic time it was handed to the client
        self.done_at = None     # monotonic time its delivery report was served


def check_readback_shape(readback, anomalies):
    """Offsets within each partition's read strictly increase."""
    for tp, records in readback.items():
        prev = -1
        for offset, value in records:
            if offset <= prev:
                anomalies.add("non_monotonic_offsets", f"{tp}: offset {offset} read after {prev}")
            prev = offset


def check_produce(sent, readback, anomalies=None, idempotent_order=True):
    """`sent`: value -> Sent; `readback`: tp -> [(offset, value)] read from the log start
    (read_uncommitted). Acked records must be at their acked offset with their value;
    nothing may appear twice; nothing unknown may appear; with `idempotent_order` each
    producer's records keep their send order within a partition.

    Failed (or never-confirmed) records are indeterminate: the broker may have stored
    them before the client gave up, so they may appear — but at most once."""
    a = anomalies or Anomalies()
    check_readback_shape(readback, a)

    at_offset = {}        # (tp, offset) -> value read
    where = defaultdict(list)  # value -> [(tp, offset)]
    for tp, records in readback.items():
        for offset, value in records:
            if (tp, offset) in at_offset and at_offset[(tp, offset)] != value:
                a.add("two_values_at_one_offset", f"{tp}@{offset}: read {at_offset[(tp, offset)]!r} and {value!r}")
            at_offset[(tp, offset)] = value
            where[value].append((tp, offset))

    acked_at = {}
    for value, s in sent.items():
        if s.status != "acked":
            continue
        key = (s.tp, s.offset)
        if key in acked_at and acked_at[key] != value:
            a.add("two_values_at_one_offset", f"{s.tp}@{s.offset} acked for {acked_at[key]!r} and {value!r}")
        acked_at[key] = value
        read = at_offset.get(key)
        if read is None:
            a.add("lost_acknowledged_write", f"{value!r} acked at {s.tp}@{s.offset}, not in the log")
        elif read != value:
            a.add("two_values_at_one_offset", f"{value!r} acked at {s.tp}@{s.offset}, log has {read!r}")

    for value, places in where.items():
        s = sent.get(value)
        if len(places) > 1:
            told = f"client told: {s.status} {s.offset if s.status == 'acked' else s.error}" if s else "never produced"
            a.add("duplicate", f"{value!r} stored {len(places)} times: {places[:4]} ({told})")
        if s is None:
            a.add("phantom_record", f"{value!r} at {places[0]} was never produced")
        elif places[0][0] != s.tp:
            a.add("phantom_record", f"{value!r} produced to {s.tp}, found at {places[0]}")

    if idempotent_order:
        # Within one producer and partition, log order must equal send order.
        per = defaultdict(list)
        for value, places in where.items():
            s = sent.get(value)
            if s is not None:
                per[(s.producer, s.tp)].append((places[0][1], s.seq, value))
        for (producer, tp), items in per.items():
            items.sort()
            prev_seq = -1
            for offset, seq, value in items:
                if seq < prev_seq:
                    a.add("non_monotonic_offsets", f"producer {producer} {tp}: {value!r} (send #{seq}) stored at {offset} after send #{prev_seq}")
                prev_seq = max(prev_seq, seq)
    return a


def check_no_ack_in(sent, windows, anomalies):
    """`windows`: [(fault_at, restart_at)] during which every fsync (or write) of the
    broker failed or the directory was poisoned. A record handed to the client after
    `fault_at` and acknowledged before `restart_at` was acknowledged without being
    durable."""
    for value, s in sent.items():
        if s.status != "acked" or s.sent_at is None or s.done_at is None:
            continue
        for fault_at, restart_at in windows:
            if fault_at < s.sent_at and s.done_at < restart_at:
                anomalies.add("ack_after_io_error", f"{value!r} sent {s.sent_at - fault_at:.3f} s after the fault, acknowledged at {s.tp}@{s.offset} before the restart")
                break


class Txn:
    """One transaction attempt: what it wrote and what the client was told."""

    __slots__ = ("txn_id", "intent", "outcome", "records", "commit_called_at", "offsets")

    def __init__(self, txn_id, intent):
        self.txn_id = txn_id
        self.intent = intent        # commit | abort
        self.outcome = "unknown"    # committed | aborted | unknown
        self.records = []           # [(tp, value)] handed to the producer
        self.commit_called_at = None  # monotonic time commit_transaction was first called
        self.offsets = None         # the consumer offsets it sent (tp -> offset), if any


def check_txns(txns, readback, seen_at=None, anomalies=None):
    """`txns`: txn_id -> Txn. `readback`: tp -> [(offset, value)] read read_committed from
    the log start after the run. `seen_at`: value -> monotonic time a live read_committed
    consumer first saw it during the run.

    - aborted_read: a record of a transaction the client saw abort was visible (in the
      final read or to the live reader);
    - torn_transaction: some but not all of a transaction's records are visible;
    - lost_committed_write: a record is missing of a transaction the client saw commit,
      or of one whose records a read_committed reader already saw;
    - pre_committed_read: the live reader saw a record before its commit was requested;
    - duplicate / phantom_record / non_monotonic_offsets as for plain produce."""
    a = anomalies or Anomalies()
    seen_at = seen_at or {}
    check_readback_shape(readback, a)
    owner = {}
    for t in txns.values():
        for tp, value in t.records:
            owner[value] = (t, tp)
    visible = defaultdict(list)
    for tp, records in readback.items():
        for offset, value in records:
            visible[value].append((tp, offset))
    for value, places in visible.items():
        if len(places) > 1:
            a.add("duplicate", f"{value!r} visible {len(places)} times: {places[:4]}")
        if value not in owner:
            a.add("phantom_record", f"{value!r} at {places[0]} belongs to no transaction")
            continue
        t, tp = owner[value]
        if places[0][0] != tp:
            a.add("phantom_record", f"{value!r} sent to {tp}, visible at {places[0]}")
        if t.outcome == "aborted":
            a.add("aborted_read", f"txn {t.txn_id} aborted, yet {value!r} is visible at {places[0]}")
    for value, when in seen_at.items():
        if value not in owner:
            if value not in visible:
                a.add("phantom_record", f"live reader saw {value!r}, which belongs to no transaction")
            continue
        t, _ = owner[value]
        if t.outcome == "aborted" and value not in visible:
            a.add("aborted_read", f"txn {t.txn_id} aborted, yet the live reader saw {value!r}")
        if t.commit_called_at is None or when < t.commit_called_at:
            a.add("pre_committed_read", f"{value!r} of txn {t.txn_id} seen before its commit was requested")
    for t in txns.values():
        if not t.records:
            continue
        shown = [v for _, v in t.records if v in visible]
        if shown and len(shown) != len(t.records):
            a.add("torn_transaction", f"txn {t.txn_id} ({t.outcome}): {len(shown)} of {len(t.records)} records visible")
        exposed = any(v in seen_at for _, v in t.records)
        if t.outcome == "committed" or (exposed and t.outcome != "aborted"):
            missing = [v for _, v in t.records if v not in visible]
            if missing and (not shown or t.outcome == "committed"):
                why = "committed" if t.outcome == "committed" else "seen by a read_committed reader"
                a.add("lost_committed_write", f"txn {t.txn_id} {why}, {len(missing)} records missing, e.g. {missing[0]!r}",
                      n=len(missing))
    return a


class OffsetWatch:
    """Committed offsets over time for one (group, tp): every commit the broker
    acknowledged and every value read back. A value read must never be below a
    commit acknowledged before the read started, nor below an earlier read."""

    def __init__(self, name):
        self.name = name
        self.acked_max = -1        # highest offset whose commit was acknowledged
        self.read_max = -1         # highest value read so far
        self.reads = 0
        self.commits = 0

    def acked(self, offset):
        self.commits += 1
        self.acked_max = max(self.acked_max, offset)

    def read(self, offset, anomalies, acked_before_read=None):
        """`acked_before_read`: acked_max captured before the read was sent (commits
        acknowledged after that may or may not be included)."""
        self.reads += 1
        offset = max(offset, -1)  # -1001 (OFFSET_INVALID): nothing committed yet
        floor_acked = self.acked_max if acked_before_read is None else acked_before_read
        if offset < floor_acked:
            anomalies.add("committed_offset_regression", f"{self.name}: read {offset} after commit of {floor_acked} was acknowledged")
        if offset < self.read_max:
            anomalies.add("committed_offset_regression", f"{self.name}: read {offset} after reading {self.read_max}")
        self.read_max = max(self.read_max, offset)
