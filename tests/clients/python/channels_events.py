#!/usr/bin/env python3
"""The channels domain's events, generated deterministically, plus a reference fold of
the three example views written independently of the Rust code.

  channels_events.py produce --bootstrap HOST:PORT --seed S --start I --count N
      produces events I..I+N with confluent-kafka (idempotent, acks=all); exits 1 unless
      every one was acknowledged.
  channels_events.py aborted --bootstrap HOST:PORT
      an aborted transaction (channel `aborted`), then a committed one (`after-abort`).
  channels_events.py expect --seed S --count N
      prints {"channel_page": {...}, "channel_stats": {...}, "owner_channels": {...}} after
      events 0..N.
"""
import argparse
import json
import random
import sys
import time

TOPIC = "channels"


def event(seed, i):
    """Event i: (key, value or None, headers)."""
    rng = random.Random(f"{seed}-{i}")
    channel = f"c{rng.randrange(40)}"
    content_id = f"x{rng.randrange(8)}"
    r = rng.random()
    def typed(t, v):
        return [("kappa.type", t.encode()), ("kappa.version", str(v).encode())]
    if r < 0.15 or r < 0.30:
        t = "ChannelCreated" if r < 0.15 else "ChannelUpdated"
        value = {"channelId": channel, "name": f"name-{i}", "ownerId": f"u{rng.randrange(6)}"}
        return channel, value, typed(t, 1)
    if r < 0.55:
        value = {"channelId": channel, "contentId": content_id, "op": "added", "text": f"text-{i}"}
        return channel, value, typed("ChannelContentMutated", 1) + [("contentId", content_id.encode())]
    if r < 0.80:
        value = {"channelId": channel, "contentId": content_id, "action": "upsert",
                 "content": {"title": f"title-{i}", "body": f"body-{i}"}}
        return channel, value, typed("ChannelContentMutated", 2) + [("contentId", content_id.encode())]
    if r < 0.83:
        # No headers (kafka-node's protocol version): type and version in the payload.
        value = {"type": "ChannelContentMutated", "version": 1, "channelId": channel,
                 "contentId": content_id, "op": "added", "text": f"text-{i}"}
        return channel, value, []
    if r < 0.95:
        return channel, None, [("kappa.type", b"ChannelContentMutated"), ("contentId", content_id.encode())]
    return channel, None, [("kappa.type", b"ChannelDeleted")]


def header(headers, name):
    for key, value in reversed(headers):
        if key == name:
            return value.decode()
    return None


def expect(seed, count):
    pages, ids, stats, owner_of, owners = {}, {}, {}, {}, {}

    def set_owner(channel, new):
        old = owner_of.get(channel)
        if old == new:
            return
        if old is not None:
            owners[old].discard(channel)
            if not owners[old]:
                del owners[old]
        if new is None:
            owner_of.pop(channel, None)
        else:
            owners.setdefault(new, set()).add(channel)
            owner_of[channel] = new

    for i in range(count):
        channel, value, headers = event(seed, i)
        content_id = header(headers, "contentId") or (value or {}).get("contentId")
        etype = header(headers, "kappa.type") or (value or {}).get("type")
        if value is None and content_id is None:  # channel deleted
            pages.pop(channel, None)
            stats.pop(channel, None)
            ids.pop(channel, None)
            set_owner(channel, None)
        elif value is None:  # content item removed
            page = pages.get(channel)
            if page is not None:
                page["content"].pop(content_id, None)
                if page["name"] is None and page["ownerId"] is None and not page["content"]:
                    del pages[channel]
            if content_id in ids.get(channel, set()):
                ids[channel].discard(content_id)
                stats[channel] = {"contentCount": len(ids[channel])}
        elif etype in ("ChannelCreated", "ChannelUpdated"):
            page = pages.setdefault(channel, {"channelId": channel, "name": None, "ownerId": None, "content": {}})
            page["name"], page["ownerId"] = value["name"], value["ownerId"]
            stats[channel] = {"contentCount": len(ids.get(channel, set()))}
            set_owner(channel, value["ownerId"])
        else:  # content upserted, v1 or v2
            version = int(header(headers, "kappa.version") or value.get("version") or 1)
            if version == 1:
                content = {"title": None, "body": value["text"]}
            else:
                content = {"title": value["content"]["title"], "body": value["content"]["body"]}
            page = pages.setdefault(channel, {"channelId": channel, "name": None, "ownerId": None, "content": {}})
            page["content"][content_id] = content
            channel_ids = ids.setdefault(channel, set())
            if content_id not in channel_ids:
                channel_ids.add(content_id)
                stats[channel] = {"contentCount": len(channel_ids)}
            elif channel not in stats:
                stats[channel] = {"contentCount": len(channel_ids)}
    return {
        "channel_page": pages,
        "channel_stats": stats,
        "owner_channels": {owner: {"channels": sorted(chs)} for owner, chs in owners.items()},
    }


def produce(bootstrap, seed, start, count):
    from confluent_kafka import Producer
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "acks": "all",
                         "linger.ms": 5, "message.timeout.ms": 30000})
    failures = []
    acked = [0]

    def delivered(err, msg):
        if err is not None:
            failures.append(str(err))
        else:
            acked[0] += 1

    for i in range(start, start + count):
        key, value, headers = event(seed, i)
        payload = None if value is None else json.dumps(value).encode()
        producer.produce(TOPIC, key=key.encode(), value=payload, headers=headers, on_delivery=delivered)
        producer.poll(0)
    remaining = producer.flush(60)
    if failures or remaining or acked[0] != count:
        print(f"produce failed: acked {acked[0]}/{count}, unflushed {remaining}, errors {failures[:3]}", file=sys.stderr)
        sys.exit(1)


def aborted(bootstrap):
    """An aborted transaction writing channel `aborted`, then a committed one writing
    `after-abort`: read_committed readers (and views) must see only the second."""
    from confluent_kafka import Producer
    producer = Producer({"bootstrap.servers": bootstrap, "transactional.id": "channels-abort-test",
                         "message.timeout.ms": 30000})
    producer.init_transactions(30)
    def created(channel, name):
        value = {"channelId": channel, "name": name, "ownerId": "u9"}
        producer.produce(TOPIC, key=channel.encode(), value=json.dumps(value).encode(),
                         headers=[("kappa.type", b"ChannelCreated"), ("kappa.version", b"1")])
    producer.begin_transaction()
    created("aborted", "never")
    producer.flush(30)
    producer.abort_transaction(30)
    producer.begin_transaction()
    created("after-abort", "committed")
    producer.commit_transaction(30)


def commit_one(bootstrap, group):
    """Consumes one record of `channels` in `group` and commits its offset synchronously."""
    from confluent_kafka import Consumer
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "auto.offset.reset": "earliest",
                         "enable.auto.commit": False})
    consumer.subscribe([TOPIC])
    deadline = time.time() + 30
    while time.time() < deadline:
        message = consumer.poll(1.0)
        if message is not None and message.error() is None:
            consumer.commit(message=message, asynchronous=False)
            consumer.close()
            return
    sys.exit("no record consumed within 30 s")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("produce")
    p.add_argument("--bootstrap", required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--start", type=int, default=0)
    p.add_argument("--count", type=int, required=True)
    c = sub.add_parser("commit-one")
    c.add_argument("--bootstrap", required=True)
    c.add_argument("--group", required=True)
    a = sub.add_parser("aborted")
    a.add_argument("--bootstrap", required=True)
    e = sub.add_parser("expect")
    e.add_argument("--seed", type=int, required=True)
    e.add_argument("--count", type=int, required=True)
    args = parser.parse_args()
    if args.command == "produce":
        produce(args.bootstrap, args.seed, args.start, args.count)
    elif args.command == "commit-one":
        commit_one(args.bootstrap, args.group)
    elif args.command == "aborted":
        aborted(args.bootstrap)
    else:
        json.dump(expect(args.seed, args.count), sys.stdout, sort_keys=True)


if __name__ == "__main__":
    main()
