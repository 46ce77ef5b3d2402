#!/usr/bin/env python3
"""Produces ChannelUpdated events to the channels app at a fixed rate with confluent-kafka
(librdkafka, acks=all, linger 0), each named "t-<unix ns at produce>" for live_bench
latency. Usage: live_producer.py BOOTSTRAP RATE SECONDS"""
import json
import sys
import time

from confluent_kafka import Producer

bootstrap, rate, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
producer = Producer({"bootstrap.servers": bootstrap, "acks": "all", "linger.ms": 0, "enable.idempotence": True})
interval = 1.0 / rate
start = time.monotonic()
i = 0
while time.monotonic() - start < seconds:
    due = start + i * interval
    now = time.monotonic()
    if due > now:
        time.sleep(due - now)
    key = f"lat-{i % 100}"
    value = {"channelId": key, "name": f"t-{time.time_ns()}", "ownerId": "u"}
    producer.produce("channels", key=key.encode(), value=json.dumps(value).encode(),
                     headers=[("kappa.type", b"ChannelUpdated"), ("kappa.version", b"1")])
    producer.poll(0)
    i += 1
producer.flush(30)
print(f"produced {i} in {time.monotonic() - start:.1f} s", file=sys.stderr)
