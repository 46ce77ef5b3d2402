#!/usr/bin/env python3
"""Multi-partition HTTP produce requests, and a check that each is all-or-nothing.

produce: threads POST requests to /v1/topics/<topic>/records, each with 2-6 records whose
keys spread them over several partitions, every record carrying the headers
`request` (a unique id) and `count` (records in the request). Each acknowledged request id
is appended to --acked (flushed before the next request). Exits at the first connection
error (the server was killed) or after --requests requests per thread.

check: reads the topic with a read_committed confluent-kafka consumer and fails unless
every request it sees is complete (all `count` records, each once) and every acknowledged
request is there. Prints a JSON summary.
"""

import argparse
import http.client
import json
import os
import random
import sys
import threading
from collections import defaultdict


def produce(args):
    host, port = args.http.rsplit(":", 1)
    acked = open(args.acked, "a", buffering=1)
    lock = threading.Lock()

    def worker(thread):
        rng = random.Random(f"{args.id_prefix}-{thread}")
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        for n in range(args.requests):
            request_id = f"{args.id_prefix}-{thread}-{n}"
            count = rng.randint(2, 6)
            records = [
                {
                    "key": f"{request_id}-{i}",
                    "value": {"request": request_id, "i": i},
                    "headers": {"request": request_id, "count": str(count)},
                }
                for i in range(count)
            ]
            body = json.dumps({"records": records})
            try:
                conn.request("POST", f"/v1/topics/{args.topic}/records", body, {"content-type": "application/json"})
                response = conn.getresponse()
                payload = response.read()
            except (OSError, http.client.HTTPException):
                return  # the server is gone: the outcome of this request is unknown
            if response.status != 200:
                print(f"request {request_id}: HTTP {response.status}: {payload[:300]!r}", file=sys.stderr)
                continue
            partitions = {o["partition"] for o in json.loads(payload)["offsets"]}
            with lock:
                acked.write(f"{request_id} {count} {len(partitions)}\n")

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(args.threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def check(args):
    from confluent_kafka import Consumer, KafkaError, TopicPartition

    consumer = Consumer(
        {
            "bootstrap.servers": args.bootstrap,
            "group.id": "http-atomic-check",
            "isolation.level": "read_committed",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "auto.offset.reset": "earliest",
        }
    )
    metadata = consumer.list_topics(args.topic, timeout=30)
    partitions = sorted(metadata.topics[args.topic].partitions)
    consumer.assign([TopicPartition(args.topic, p, 0) for p in partitions])
    at_end = set()
    seen = defaultdict(list)  # request id -> [(partition, key)]
    counts = {}
    while len(at_end) < len(partitions):
        message = consumer.poll(30)
        if message is None:
            sys.exit(f"no message or end of partition within 30 s; at end: {sorted(at_end)}")
        if message.error():
            if message.error().code() == KafkaError._PARTITION_EOF:
                at_end.add(message.partition())
                continue
            sys.exit(f"consumer error: {message.error()}")
        at_end.discard(message.partition())
        headers = {k: v.decode() for k, v in (message.headers() or [])}
        request_id = headers["request"]
        seen[request_id].append((message.partition(), message.key().decode()))
        counts[request_id] = int(headers["count"])
    consumer.close()

    problems = []
    for request_id, records in seen.items():
        keys = [key for _, key in records]
        if len(keys) != len(set(keys)):
            problems.append(f"request {request_id}: a record appears twice: {sorted(keys)}")
        if len(set(keys)) != counts[request_id]:
            problems.append(
                f"request {request_id}: torn — {len(set(keys))} of {counts[request_id]} records visible: {records}"
            )
    acked = [line.split() for line in open(args.acked) if line.strip()]
    for request_id, count, _ in acked:
        if request_id not in seen:
            problems.append(f"request {request_id}: acknowledged but missing")
    multi = sum(1 for _, _, partitions in acked if int(partitions) > 1)
    summary = {
        "requests_seen": len(seen),
        "requests_acknowledged": len(acked),
        "acknowledged_multi_partition": multi,
        "unacknowledged_seen": len(seen) - len({r for r, _, _ in acked} & set(seen)),
        "problems": len(problems),
    }
    print(json.dumps(summary))
    if problems:
        print("\n".join(problems[:50]), file=sys.stderr)
        sys.exit(1)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("produce")
    p.add_argument("--http", required=True, help="host:port of kappa's HTTP API")
    p.add_argument("--topic", required=True)
    p.add_argument("--acked", required=True, help="file that acknowledged request ids are appended to")
    p.add_argument("--id-prefix", required=True, help="makes request ids unique across runs")
    p.add_argument("--threads", type=int, default=4)
    p.add_argument("--requests", type=int, default=1_000_000)
    c = sub.add_parser("check")
    c.add_argument("--bootstrap", required=True)
    c.add_argument("--topic", required=True)
    c.add_argument("--acked", required=True)
    args = parser.parse_args()
    produce(args) if args.command == "produce" else check(args)


if __name__ == "__main__":
    main()
