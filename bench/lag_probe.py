#!/usr/bin/env python3
"""Live lag of work mode, end to end: a `ChannelUpdated` event per new channel `lag-<i>` at
RATE events/s for SECONDS (confluent-kafka, linger 0), while an SSE prefix subscription
(`channel_page`, prefix `lag-`) is held on one worker; per event, the time from just before
produce() to its change arriving on the subscription. That covers the owner's step and
transaction, the read replica of the subscribed worker (which may not own the partition)
and SSE. Prints one JSON line: events, received, p50/p99/max in ms.

  lag_probe.py --bootstrap HOST:PORT --http HOST:PORT [--rate 1000] [--seconds 10]
"""
import argparse
import json
import socket
import threading
import time

from confluent_kafka import Producer


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--http", required=True)
    parser.add_argument("--rate", type=int, default=1000)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--run", default=str(int(time.time())))
    args = parser.parse_args()
    host, port = args.http.split(":")
    sock = socket.create_connection((host, int(port)))
    # HTTP/1.0: a close-delimited body, no chunk framing between the lines.
    sock.sendall(f"GET /v1/views/channel_page/watch?prefix=lag-{args.run}- HTTP/1.0\r\n"
                 f"Host: {args.http}\r\nAccept: text/event-stream\r\n\r\n".encode())
    stream = sock.makefile("rb")
    sent, lags, snapshot = {}, [], threading.Event()
    lock = threading.Lock()

    def read():
        event = None
        for raw in stream:
            line = raw.decode().rstrip("\r\n")
            if line.startswith("event: "):
                event = line[7:]
                if event == "snapshot":
                    snapshot.set()
            elif line.startswith("data: ") and event == "change":
                now = time.time()
                value = json.loads(line[6:]).get("value") or {}
                with lock:
                    started = sent.pop(value.get("name"), None)
                if started is not None:
                    lags.append(now - started)

    threading.Thread(target=read, daemon=True).start()
    snapshot.wait(30)
    producer = Producer({"bootstrap.servers": args.bootstrap, "linger.ms": 0, "acks": "all",
                         "enable.idempotence": True})
    total = args.rate * args.seconds
    begin = time.time()
    for i in range(total):
        due = begin + i / args.rate
        delay = due - time.time()
        if delay > 0:
            time.sleep(delay)
        name = f"n{i}"
        channel = f"lag-{args.run}-{i}"
        value = json.dumps({"channelId": channel, "name": name, "ownerId": "u0"}).encode()
        with lock:
            sent[name] = time.time()
        producer.produce("channels", key=channel.encode(), value=value,
                         headers=[("kappa.type", b"ChannelUpdated"), ("kappa.version", b"1")])
        producer.poll(0)
    producer.flush(30)
    deadline = time.time() + 30
    while time.time() < deadline and len(lags) < total:
        time.sleep(0.1)
    lags.sort()
    pick = lambda q: round(lags[min(len(lags) - 1, int(q * len(lags)))] * 1000, 1) if lags else None
    print(json.dumps({"events": total, "received": len(lags), "rate": args.rate, "p50_ms": pick(0.50),
                      "p99_ms": pick(0.99), "max_ms": round(lags[-1] * 1000, 1) if lags else None}))


if __name__ == "__main__":
    main()
