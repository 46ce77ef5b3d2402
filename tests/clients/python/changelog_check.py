#!/usr/bin/env python3
"""Reads every partition of a work-mode view changelog (read_committed) and checks it.

  changelog_check.py --bootstrap HOST:PORT --topic __kappa.view.<name>.v<N> --input channels
  changelog_check.py ... --input __kappa.repartition.<name>.v<N> --transactional-input

Prints JSON: {"state": {view key: value}, "positions": {partition: last marker position},
"markers": n, "errors": [...]}. Errors: a step marker whose position does not advance, or
whose events_applied does not advance by exactly the offsets it covers (a step applied
twice, or input skipped) — valid while the input topic has contiguous offsets (no
compaction, no transaction markers), as in the scale-out test. With --transactional-input
(a repartition topic, written in transactions whose markers take offsets) a step may cover
more offsets than events, and instead each partition's last events_applied must equal the
number of committed records in that input partition (read here, read_committed).
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
    parser.add_argument("--transactional-input", action="store_true")
    parser.add_argument("--list-prefix", help='also print "changes": [[partition, offset, key, value], ...] '
                        'of the view keys starting with this prefix, in offset order per partition')
    args = parser.parse_args()
    consumer = Consumer({"bootstrap.servers": args.bootstrap, "group.id": "changelog-check",
                         "isolation.level": "read_committed", "enable.auto.commit": False,
                         "enable.partition.eof": True, "auto.offset.reset": "earliest"})
    partitions = sorted(consumer.list_topics(args.topic, timeout=30).topics[args.topic].partitions)
    consumer.assign([TopicPartition(args.topic, p, 0) for p in partitions])
    state, errors, last, markers, changes = {}, [], {}, 0, []
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
            elif args.transactional_input:
                if not 0 < applied - prev_applied <= position - prev_position:
                    errors.append(f"partition {p} offset {message.offset()}: {applied - prev_applied} events applied for "
                                  f"{position - prev_position} input offsets ({prev_position}..{position})")
            elif applied - prev_applied != position - prev_position:
                errors.append(f"partition {p} offset {message.offset()}: {applied - prev_applied} events applied for "
                              f"{position - prev_position} input offsets ({prev_position}..{position})")
            last[p] = (position, applied)
        elif key[0] != INTERNAL:
            if args.list_prefix is not None and key.decode().startswith(args.list_prefix):
                value = None if message.value() is None else json.loads(message.value())
                changes.append([p, message.offset(), key.decode(), value])
            if message.value() is None:
                state.pop(key.decode(), None)
            else:
                state[key.decode()] = json.loads(message.value())
    consumer.close()
    if args.transactional_input:
        counts = count_committed(args.bootstrap, args.input, args.timeout)
        for p, count in sorted(counts.items()):
            applied = last.get(p, (0, 0))[1]
            if applied != count:
                errors.append(f"partition {p}: {applied} events applied but {args.input}/{p} holds {count} committed records")
    result = {"state": state, "positions": {p: v[0] for p, v in last.items()}, "markers": markers, "errors": errors}
    if args.list_prefix is not None:
        result["changes"] = changes
    print(json.dumps(result))


def count_committed(bootstrap, topic, timeout):
    """Committed records per partition of `topic` (read_committed, to the end)."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "changelog-check-count",
                         "isolation.level": "read_committed", "enable.auto.commit": False,
                         "enable.partition.eof": True, "auto.offset.reset": "earliest"})
    partitions = sorted(consumer.list_topics(topic, timeout=30).topics[topic].partitions)
    consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
    counts = {p: 0 for p in partitions}
    done = set()
    deadline = time.time() + timeout
    while len(done) < len(partitions):
        if time.time() > deadline:
            sys.exit(f"input {topic}: partitions {set(partitions) - done} not read to the end in time")
        messages = consumer.consume(10000, 0.5)
        for message in messages:
            if message.error():
                if message.error().code() == KafkaError._PARTITION_EOF:
                    done.add(message.partition())
                    continue
                sys.exit(f"input read: {message.error()}")
            counts[message.partition()] += 1
    consumer.close()
    return counts


if __name__ == "__main__":
    main()
