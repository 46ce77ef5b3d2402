#!/usr/bin/env python3
"""Acknowledgement latency at a fixed rate through librdkafka (confluent-kafka):
send `rate` messages per second for `seconds`, acks=all, linger 0, and report p50/p99/max
of send -> delivery-report time. Usage: ack_latency.py BOOTSTRAP TOPIC RATE SECONDS SIZE"""
import sys, time
from confluent_kafka import Producer

bootstrap, topic, rate, seconds, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
latencies = []
producer = Producer({"bootstrap.servers": bootstrap, "acks": "all", "linger.ms": 0, "enable.idempotence": False})
payload = b"x" * size

def report(err, msg, sent=None):
    if err is not None:
        raise SystemExit(f"delivery failed: {err}")

# Warm up the connection and metadata.
producer.produce(topic, payload)
producer.flush(10)

interval = 1.0 / rate
start = time.perf_counter()
total = int(rate * seconds)
for i in range(total):
    due = start + i * interval
    while True:
        now = time.perf_counter()
        if now >= due:
            break
        producer.poll(min(due - now, 0.001))
    sent = time.perf_counter()
    producer.produce(topic, payload, on_delivery=lambda err, msg, sent=sent: (report(err, msg), latencies.append(time.perf_counter() - sent)))
    producer.poll(0)
producer.flush(30)
latencies.sort()
pick = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000
print(f"rate={rate}/s size={size}B sent={total} acked={len(latencies)} p50={pick(0.50):.2f}ms p99={pick(0.99):.2f}ms max={latencies[-1]*1000:.2f}ms")
