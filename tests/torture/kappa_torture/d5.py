"""D5 disk full: the data directory lives on a small tmpfs (mounted by the harness; needs
CAP_SYS_ADMIN). Each cycle fills the disk with a file beside the data while idempotent
producers write; a probe producer (no retries) must get an error, not an
acknowledgement; reads keep working; then the file is deleted and produce must resume
within 5 s. Some cycles restart the broker (kill -9) while the disk is full. At the end
every record was acknowledged and the log holds exactly the acknowledged records, each
once, at their acknowledged offsets.

Where mounting is impossible, ENOSPC is injected into pwrite/pwritev with libfiu instead (the
same error from the same call, without a real file system); the run says which mode it
used."""
import errno
import os
import time

from confluent_kafka import KafkaError, Producer

from .checker import Sent
from .clients import FAST_RECONNECT, create_topic, log_conf, read_partitions
from .harness import Tmpfs, TortureError
from .workload import ProduceWorkload

TOPIC = "d5"
# Every file write of kappa's RealFs is a pwrite or a pwritev.
WRITES = ["posix/io/rw/pwrite", "posix/io/rw/pwritev"]
FULL = [f"enable name={w},failinfo={errno.ENOSPC}" for w in WRITES]
PARTITIONS = 3
RESUME_WITHIN_S = 5.0
TMPFS_SIZE = "24m"
PROBE_BYTES = 256 * 1024


def fill(path):
    """Writes `path` until the file system is full; returns the bytes written."""
    written = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for chunk in (1 << 20, 1 << 16, 1 << 12, 1 << 8, 1):
            block = b"\0" * chunk
            while True:
                try:
                    n = os.write(fd, block)
                except OSError as e:
                    if e.errno == errno.ENOSPC:
                        break
                    raise
                written += n
                if n < chunk:
                    break
    finally:
        os.close(fd)
    return written


class Probe:
    """A producer that never retries: its record's fate is decided by one produce request.
    Its records are checked with the workload's (`sent`)."""

    def __init__(self, r, bootstrap, workload):
        self.w = workload
        self.p = Producer({"bootstrap.servers": bootstrap, "acks": "all", "message.send.max.retries": 0,
                           "enable.idempotence": False, "message.timeout.ms": 30000, "linger.ms": 0,
                           **FAST_RECONNECT, **log_conf(r.logger)})
        self.n = 0

    def send(self, size):
        """Produces one record of `size` bytes: (error name or None, offset)."""
        self.n += 1
        result = {}
        value = f"probe-{self.n}-".encode() + b"x" * size
        s = Sent("probe", (TOPIC, 0), self.n, sent_at=time.monotonic())
        with self.w.lock:
            self.w.sent[value] = s

        def cb(err, msg):
            s.done_at = time.monotonic()
            result["err"] = err.name() if err is not None else None
            result["offset"] = msg.offset() if err is None else None
            s.status, s.offset, s.error = ("acked", msg.offset(), None) if err is None else ("failed", None, err.name())
        self.p.produce(TOPIC, value=value, partition=0, on_delivery=cb)
        deadline = time.monotonic() + 60
        while "err" not in result:
            if time.monotonic() > deadline:
                raise TortureError("the probe got no delivery report within 60 s")
            self.p.poll(0.05)
        return result["err"], result["offset"]


def run(r):
    cycles = r.tier(20, 200)
    tmpfs = Tmpfs(os.path.join(r.workdir, "mnt"), TMPFS_SIZE)
    # TORTURE_D5_MODE=fiu forces the fallback (to check it where mounting works).
    why_not = "TORTURE_D5_MODE=fiu" if os.environ.get("TORTURE_D5_MODE") == "fiu" else tmpfs.mount()
    mode = "tmpfs" if why_not is None else "fiu-enospc"
    if why_not is not None:
        r.note(f"cannot mount a tmpfs ({why_not}): injecting ENOSPC into pwrite/pwritev with libfiu instead")
    try:
        _run(r, cycles, tmpfs, mode)
    finally:
        tmpfs.umount()


def _run(r, cycles, tmpfs, mode):
    data = os.path.join(tmpfs.path, "data") if mode == "tmpfs" else None
    broker = r.broker(data_dir=data)
    fiu = [] if mode == "fiu-enospc" else None
    broker.start(fiu_commands=fiu)
    create_topic(broker.bootstrap(), TOPIC, PARTITIONS)
    w = ProduceWorkload(r, broker.bootstrap(), TOPIC, PARTITIONS, producers=3, rate_per_producer=300,
                        conf={"message.timeout.ms": 300000},
                        confs=[{"linger.ms": 0}, {"linger.ms": 5}, {"linger.ms": 2, "batch.num.messages": 20}])
    w.start()
    probe = Probe(r, broker.bootstrap(), w)
    filler = os.path.join(tmpfs.path, "filler") if mode == "tmpfs" else None
    resume_s = []
    stats = {"probe_errors_while_full": {}, "restarts_while_full": 0, "filled_bytes_max": 0, "records_read_while_full": 0}
    for cycle in range(cycles):
        w.wait_progress(w.acked())
        time.sleep(r.rng.uniform(0, 0.2))
        # Disk full.
        if mode == "tmpfs":
            stats["filled_bytes_max"] = max(stats["filled_bytes_max"], fill(filler))
        else:
            broker.fiu_ctrl(*FULL)
        err, offset = probe.send(PROBE_BYTES)
        if err is None:
            raise AssertionError(f"cycle {cycle}: a {PROBE_BYTES}-byte record was acknowledged (offset {offset}) on a full disk")
        stats["probe_errors_while_full"][err] = stats["probe_errors_while_full"].get(err, 0) + 1
        # Reads keep working.
        got = read_partitions(broker.bootstrap(), [(TOPIC, p) for p in range(PARTITIONS)], logger=r.logger, timeout=30, tail=2000)
        stats["records_read_while_full"] += sum(len(v) for v in got.values())
        time.sleep(r.rng.uniform(0.1, 0.5))
        if r.rng.random() < 0.25:
            # A crash while the disk is full: recovery must cope without room.
            broker.kill9()
            still_full = None if fiu is None else FULL
            broker.start(fiu_commands=still_full)
            stats["restarts_while_full"] += 1
        # Space freed: produce must resume within 5 s.
        before = w.acked()
        if mode == "tmpfs":
            os.unlink(filler)
        else:
            broker.fiu_ctrl(*(f"disable name={w}" for w in WRITES))
        freed_at = time.monotonic()
        deadline = freed_at + 60
        while w.acked() <= before:
            if time.monotonic() > deadline:
                raise AssertionError(f"cycle {cycle}: no record acknowledged within 60 s of freeing space")
            time.sleep(0.005)
        resumed = time.monotonic() - freed_at
        resume_s.append(resumed)
        err, _ = probe.send(PROBE_BYTES)
        if err is not None:
            raise AssertionError(f"cycle {cycle}: after freeing space the probe still failed with {err}")
        if cycle % 5 == 4:
            r.say(f"cycle {cycle + 1}/{cycles}: {w.acked()} acknowledged, resumed after {resumed:.2f} s")
    pending = w.stop(flush_timeout=120)
    readback = w.check(r.anomalies)
    with w.lock:
        workload = [s for s in w.sent.values() if s.producer != "probe"]
    counts = {"records_sent": len(workload), "acked": sum(s.status == "acked" for s in workload),
              "failed": sum(s.status == "failed" for s in workload), "probes": probe.n}
    in_log = sum(1 for records in readback.values() for _, v in records if not v.startswith(b"probe-"))
    r.stats.update(mode=mode, cycles=cycles, **counts, pending_after_flush=pending, records_in_log=in_log,
                   resume_s_max=round(max(resume_s), 3), resume_s_median=round(sorted(resume_s)[len(resume_s) // 2], 3),
                   **stats, client_errors=w.client_errors())
    if pending or counts["failed"]:
        raise AssertionError(f"{pending} records pending and {counts['failed']} failed: every record should end acknowledged")
    if in_log != counts["acked"]:
        raise AssertionError(f"the log holds {in_log} workload records, {counts['acked']} were acknowledged")
    slow = [round(s, 2) for s in resume_s if s > RESUME_WITHIN_S]
    if slow:
        raise AssertionError(f"produce resumed more than {RESUME_WITHIN_S} s after space was freed in {len(slow)} cycles: {slow}")
