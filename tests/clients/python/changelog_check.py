#!/usr/bin/env python3
"""Reads every partition of a work-mode view changelog (read_committed) and checks it.

  changelog_check.py --bootstrap HOST:PORT --topic __kappa.view.<name>.v<N> --input channels

Prints JSON: {"state": {view key: value}, "positions": {partition: last marker position},
"markers": n, "errors": [...]}. Errors: a step marker whose position does not advance, or
whose events_applied does not advance by exactly the offsets it covers (a step applied
twice, or input skipped) — valid while the input topic has contiguous offsets (no
compaction, no transaction markers), as in the scale-out test.
"""
import argparse
import json
import sys
import time

from confluent_kafka import Consumer, KafkaError, TopicPartition

MARKER = b"\xffkappa.step"
INTERNAL = 0xFE


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--input", required=True)
    parser.add_argument("--timeout", type=float, default=120)
    args = parser.parse_args()
    consumer = Consumer({"bootstrap.servers": args.bootstrap, "group.id": "changelog-check",
                         "isolation.level": "read_committed", "enable.auto.commit": False,
                         "enable.partition.eof": True, "auto.offset.reset": "earliest"})
    partitions = sorted(consumer.list_topics(args.topic, timeout=30).topics[args.topic].partitions)
    consumer.assign([TopicPartition(args.topic, p, 0) for p in partitions])
    state, errors, last, markers = {}, [], {}, 0
    done = set()
    deadline = time.time() + args.timeout
    while len(done) < len(partitions):
        if time.time() > deadline:
            sys.exit(f"changelog {args.topic}: partitions {set(partitions) - done} not read to the end in time")
        message = consumer.poll(0.5)
        if message is None:
            continue
        if message.error():
            if message.error().code() == KafkaError._PARTITION_EOF:
                done.add(message.partition())
                continue
            sys.exit(f"changelog read: {message.error()}")
        key, p = message.key(), message.partition()
        if key == MARKER:
            markers += 1
            marker = json.loads(message.value())
            position = marker["positions"].get(f"{args.input}/{p}")
            applied = marker["events_applied"]
            if position is None:
                errors.append(f"partition {p} offset {message.offset()}: marker without {args.input}/{p}")
                continue
            prev_position, prev_applied = last.get(p, (0, 0))
            if position <= prev_position:
                errors.append(f"partition {p} offset {message.offset()}: position {position} does not advance past {prev_position}")
            elif applied - prev_applied != position - prev_position:
                errors.append(f"partition {p} offset {message.offset()}: {applied - prev_applied} events applied for "
                              f"{position - prev_position} input offsets ({prev_position}..{position})")
            last[p] = (position, applied)
        elif key[0] != INTERNAL:
            if message.value() is None:
                state.pop(key.decode(), None)
            else:
                state[key.decode()] = json.loads(message.value())
    consumer.close()
    print(json.dumps({"state": state, "positions": {p: v[0] for p, v in last.items()}, "markers": markers,
                      "errors": errors}))


if __name__ == "__main__":
    main()
