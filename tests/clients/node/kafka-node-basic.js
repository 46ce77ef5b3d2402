'use strict';
// kafka-node: Producer and HighLevelProducer (keyed, uncompressed, gzip and snappy), plain
// Consumer fetching from explicit offsets, Offset.fetch / fetchLatestOffsets /
// fetchEarliestOffsets, topic creation and metadata.

const { assert, bootstrap, runMain, unique, step, waitFor, sleep } = require('./lib');
const { kafka, client, ready, call, consumeFrom } = require('./kafka-node-common');

async function main() {
  const host = bootstrap();
  const id = unique();
  const summary = {};
  const c = client(host);
  await ready(c, 'client');

  const keyed = `kn-keyed-${id}`;
  const codecs = [['none', 0], ['gzip', 1], ['snappy', 2]];
  const plainTopics = codecs.map(([name]) => `kn-${name}-${id}`);
  const hlTopic = `kn-hl-${id}`;
  const created = await call((cb) => c.createTopics([
    { topic: keyed, partitions: 3, replicationFactor: 1 },
    ...plainTopics.map((topic) => ({ topic, partitions: 1, replicationFactor: 1 })),
    { topic: hlTopic, partitions: 2, replicationFactor: 1 },
  ], cb));
  assert.deepEqual(created, [], `createTopics errors: ${JSON.stringify(created)}`);

  step('metadata');
  // Producers partition by the client's cached metadata: load it for the new topics.
  await call((cb) => c.refreshMetadata([keyed, ...plainTopics, hlTopic], cb));
  // Metadata: every topic has its partitions and a leader.
  const [, meta] = await call((cb) => c.loadMetadataForTopics([keyed, hlTopic], cb));
  assert.equal(Object.keys(meta.metadata[keyed]).length, 3, `partitions of ${keyed}: ${JSON.stringify(meta)}`);
  assert.equal(Object.keys(meta.metadata[hlTopic]).length, 2, 'partitions of the HighLevelProducer topic');

  step('keyed produce');
  // Producer, keyed partitioner, messages in several sends.
  const producer = new kafka.Producer(c, { requireAcks: 1, partitionerType: 3 });
  await ready(producer, 'producer');
  const keys = ['chan-1', 'chan-2', 'chan-3', 'chan-4'];
  const sent = [];
  for (let batch = 0; batch < 3; batch++) {
    const messages = [];
    for (let i = 0; i < 8; i++) {
      const n = batch * 8 + i;
      const key = keys[n % keys.length];
      sent.push({ key, value: `event-${n}` });
      messages.push(new kafka.KeyedMessage(key, `event-${n}`));
    }
    // One payload per key so the keyed partitioner places each key.
    const payloads = keys.map((key) => ({ topic: keyed, key, messages: messages.filter((m) => m.key === key) }));
    const res = await call((cb) => producer.send(payloads, cb));
    assert.ok(res[keyed], `produce result: ${JSON.stringify(res)}`);
  }
  step('keyed consume');
  // Fetch every partition from offset 0 with a plain Consumer.
  const got = await consumeFrom(host, [0, 1, 2].map((partition) => ({ topic: keyed, partition, offset: 0 })), sent.length);
  assert.equal(got.length, sent.length, `exactly ${sent.length} messages, got ${got.length}`);
  for (const key of keys) {
    const mine = got.filter((m) => m.key === key);
    assert.deepEqual(mine.map((m) => m.value), sent.filter((m) => m.key === key).map((m) => m.value), `key ${key} in order`);
    assert.equal(new Set(mine.map((m) => m.partition)).size, 1, `key ${key} on one partition`);
  }
  for (const partition of [0, 1, 2]) {
    const offsets = got.filter((m) => m.partition === partition).map((m) => m.offset);
    assert.deepEqual(offsets, offsets.map((_, i) => i), `partition ${partition}: offsets 0.. without gaps`);
  }
  summary.keyed = got.length;

  // Uncompressed, gzip and snappy message sets; read from 0 and from the middle.
  summary.codecs = {};
  for (let t = 0; t < codecs.length; t++) {
    const [name, attributes] = codecs[t];
    const topic = plainTopics[t];
    step(`codec ${name}`);
    const values = Array.from({ length: 20 }, (_, i) => `${name}-value-${i}-`.repeat(5));
    for (const chunk of [values.slice(0, 10), values.slice(10)]) {
      const messages = chunk.map((v, i) => new kafka.KeyedMessage(`k${i}`, v));
      await call((cb) => producer.send([{ topic, messages, attributes }], cb));
    }
    const all = await consumeFrom(host, [{ topic, partition: 0, offset: 0 }], 20);
    assert.deepEqual(all.map((m) => m.offset), values.map((_, i) => i), `${name}: offsets 0..19`);
    assert.deepEqual(all.map((m) => m.value), values, `${name}: values`);
    assert.deepEqual(all.map((m) => m.key), values.map((_, i) => `k${i % 10}`), `${name}: keys`);
    const tail = await consumeFrom(host, [{ topic, partition: 0, offset: 13 }], 7);
    assert.deepEqual(tail.map((m) => m.offset), [13, 14, 15, 16, 17, 18, 19], `${name}: fetch from offset 13`);
    assert.deepEqual(tail.map((m) => m.value), values.slice(13), `${name}: values from offset 13`);
    summary.codecs[name] = all.length;
  }

  step('HighLevelProducer');
  // HighLevelProducer: round-robins across partitions; keyed messages too.
  const hl = new kafka.HighLevelProducer(c, { requireAcks: 1, partitionerType: 3 });
  await ready(hl, 'high level producer');
  const hlSent = Array.from({ length: 12 }, (_, i) => ({ key: `user-${i % 3}`, value: `hl-${i}` }));
  for (const m of hlSent) {
    await call((cb) => hl.send([{ topic: hlTopic, key: m.key, messages: [new kafka.KeyedMessage(m.key, m.value)], attributes: m.key === 'user-1' ? 1 : 0 }], cb));
  }
  const hlGot = await consumeFrom(host, [0, 1].map((partition) => ({ topic: hlTopic, partition, offset: 0 })), hlSent.length);
  assert.equal(hlGot.length, hlSent.length, 'HighLevelProducer: every message once');
  for (const key of ['user-0', 'user-1', 'user-2']) {
    assert.deepEqual(hlGot.filter((m) => m.key === key).map((m) => m.value), hlSent.filter((m) => m.key === key).map((m) => m.value), `HighLevelProducer key ${key} in order`);
  }
  summary.highLevel = hlGot.length;

  step('Offset API');
  // Offset API (ListOffsets v0).
  const offset = new kafka.Offset(c);
  const latest = await call((cb) => offset.fetch([{ topic: plainTopics[0], partition: 0, time: -1, maxNum: 1 }], cb));
  assert.deepEqual(latest[plainTopics[0]]['0'], [20], `Offset.fetch latest: ${JSON.stringify(latest)}`);
  const earliest = await call((cb) => offset.fetch([{ topic: plainTopics[0], partition: 0, time: -2, maxNum: 1 }], cb));
  assert.deepEqual(earliest[plainTopics[0]]['0'], [0], `Offset.fetch earliest: ${JSON.stringify(earliest)}`);
  const latestAll = await call((cb) => offset.fetchLatestOffsets([keyed, ...plainTopics], cb));
  const keyedTotal = Object.values(latestAll[keyed]).reduce((a, b) => a + b, 0);
  assert.equal(keyedTotal, sent.length, `fetchLatestOffsets sums to the records produced: ${JSON.stringify(latestAll)}`);
  for (const topic of plainTopics) assert.equal(latestAll[topic]['0'], 20, `latest offset of ${topic}`);
  const earliestAll = await call((cb) => offset.fetchEarliestOffsets([keyed], cb));
  assert.deepEqual(Object.values(earliestAll[keyed]), [0, 0, 0], `fetchEarliestOffsets: ${JSON.stringify(earliestAll)}`);
  summary.offsets = { latest: 20 };

  // Offsets of the plain Consumer API: Offset.commit (OffsetCommit v0), OffsetFetch v0, and a
  // Consumer with a groupId and fromOffset: false resuming at the committed offset.
  step('OffsetCommit v0 / OffsetFetch v0');
  const plainGroup = `kn-plain-${id}`;
  await call((cb) => offset.commit(plainGroup, [{ topic: plainTopics[1], partition: 0, offset: 15, metadata: 'm' }], cb));
  const fetched = await call((cb) => c.sendOffsetFetchRequest(plainGroup, [{ topic: plainTopics[1], partition: 0 }], cb));
  assert.equal(fetched[plainTopics[1]]['0'], 15, `OffsetFetch v0: ${JSON.stringify(fetched)}`);
  const resumed = await (async () => {
    const rc = client(host);
    await ready(rc, 'resuming consumer client');
    const consumer = new kafka.Consumer(rc, [{ topic: plainTopics[1], partition: 0 }], { groupId: plainGroup, autoCommit: false, fromOffset: false, fetchMaxWaitMs: 100, encoding: 'utf8', keyEncoding: 'utf8' });
    const got = [];
    consumer.on('message', (m) => got.push(m.offset));
    consumer.on('error', (e) => got.push(`error ${e}`));
    await waitFor(() => `5 messages from the committed offset (got ${got})`, () => got.length >= 5);
    await sleep(500);
    await call((cb) => consumer.close(true, cb));
    return got;
  })();
  assert.deepEqual(resumed, [15, 16, 17, 18, 19], 'plain Consumer resumes at the committed offset');
  summary.plainConsumerResumedAt = resumed[0];

  await call((cb) => producer.close(cb));
  await call((cb) => hl.close(cb));
  await call((cb) => c.close(cb));
  return summary;
}

runMain(main);
