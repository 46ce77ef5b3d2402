'use strict';
// KafkaJS: metadata, keyed produce/consume in order with headers, gzip and snappy, the
// idempotent producer, admin create/delete topic, describe/alter configs and
// fetchTopicOffsetsByTimestamp.

const { assert, bootstrap, runMain, unique } = require('./lib');
const { kafka, consumeAll, CompressionTypes } = require('./kafkajs-common');

async function main() {
  const broker = bootstrap();
  const client = kafka(broker);
  const admin = client.admin();
  await admin.connect();
  const summary = {};
  const id = unique();

  // Metadata: the cluster is this one broker, advertised at the address we dialled.
  const cluster = await admin.describeCluster();
  assert.equal(cluster.brokers.length, 1, `one broker expected: ${JSON.stringify(cluster)}`);
  assert.equal(`${cluster.brokers[0].host}:${cluster.brokers[0].port}`, broker, 'advertised address');
  assert.equal(cluster.controller, cluster.brokers[0].nodeId, 'controller is the broker');

  const keyed = `keyed-${id}`;
  assert.equal(await admin.createTopics({ topics: [{ topic: keyed, numPartitions: 3 }], waitForLeaders: true }), true);
  assert.ok((await admin.listTopics()).includes(keyed), 'created topic is listed');
  const meta = await admin.fetchTopicMetadata({ topics: [keyed] });
  assert.equal(meta.topics[0].partitions.length, 3, 'three partitions');
  for (const p of meta.topics[0].partitions) assert.equal(p.leader, cluster.brokers[0].nodeId, `partition ${p.partitionId} led by the broker`);
  // Creating it again fails with TOPIC_ALREADY_EXISTS (createTopics returns false).
  assert.equal(await admin.createTopics({ topics: [{ topic: keyed, numPartitions: 3 }] }), false, 'second create reports existing topic');

  // Keyed produce in several batches, with headers; each key lands on one partition in order.
  const producer = client.producer();
  await producer.connect();
  const keys = ['alpha', 'bravo', 'charlie', 'delta', 'echo'];
  const sent = [];
  for (let batch = 0; batch < 4; batch++) {
    const messages = [];
    for (let i = 0; i < 10; i++) {
      const n = batch * 10 + i;
      const key = keys[n % keys.length];
      const m = { key, value: `v${n}`, headers: { seq: String(n), 'event-type': 'ChannelUpdated' } };
      messages.push(m);
      sent.push(m);
    }
    const acks = await producer.send({ topic: keyed, messages, acks: -1 });
    assert.ok(acks.every((a) => a.errorCode === 0), `produce acks: ${JSON.stringify(acks)}`);
  }
  const got = await consumeAll(client, [keyed], sent.length);
  assert.equal(got.length, sent.length, `exactly ${sent.length} records, got ${got.length}`);
  const partitionOfKey = {};
  for (const key of keys) {
    const mine = got.filter((r) => r.key === key);
    const expected = sent.filter((m) => m.key === key).map((m) => m.value);
    assert.deepEqual(mine.map((r) => r.value), expected, `key ${key} in produce order`);
    assert.equal(new Set(mine.map((r) => r.partition)).size, 1, `key ${key} on one partition`);
    partitionOfKey[key] = mine[0].partition;
    for (const r of mine) {
      assert.equal(r.headers['event-type'], 'ChannelUpdated', 'header event-type');
      assert.equal(`v${r.headers.seq}`, r.value, 'header seq matches value');
    }
  }
  summary.keyed = { records: got.length, partitions: new Set(Object.values(partitionOfKey)).size };

  // Compression: gzip (built in) and snappy (kafkajs-snappy). lz4/zstd need native codec
  // packages KafkaJS does not ship, so they are not covered here.
  summary.compression = {};
  for (const [name, type] of [['gzip', CompressionTypes.GZIP], ['snappy', CompressionTypes.Snappy]]) {
    const topic = `${name}-${id}`;
    const messages = Array.from({ length: 50 }, (_, i) => ({ key: `k${i % 3}`, value: `${name} payload ${i} `.repeat(20), headers: { i: String(i) } }));
    await producer.send({ topic, compression: type, messages: messages.slice(0, 25) });
    await producer.send({ topic, compression: type, messages: messages.slice(25) });
    const back = await consumeAll(client, [topic], messages.length);
    assert.equal(back.length, messages.length, `${name}: exactly ${messages.length} records`);
    back.sort((a, b) => a.offset - b.offset);
    assert.deepEqual(back.map((r) => r.offset), messages.map((_, i) => i), `${name}: offsets 0..${messages.length - 1}`);
    assert.deepEqual(back.map((r) => [r.key, r.value, r.headers.i]), messages.map((m) => [m.key, m.value, m.headers.i]), `${name}: contents`);
    summary.compression[name] = back.length;
  }
  await producer.disconnect();

  // Idempotent producer: sequence numbers accepted, every record exactly once.
  const idem = `idempotent-${id}`;
  await admin.createTopics({ topics: [{ topic: idem, numPartitions: 2 }], waitForLeaders: true });
  const idemProducer = client.producer({ idempotent: true, maxInFlightRequests: 1 });
  await idemProducer.connect();
  for (let i = 0; i < 5; i++) {
    await idemProducer.send({ topic: idem, acks: -1, messages: Array.from({ length: 20 }, (_, j) => ({ key: `k${j % 4}`, value: `${i}-${j}` })) });
  }
  await idemProducer.disconnect();
  const idemBack = await consumeAll(client, [idem], 100);
  assert.equal(idemBack.length, 100, 'idempotent: exactly 100 records');
  assert.equal(new Set(idemBack.map((r) => r.value)).size, 100, 'idempotent: no duplicates');
  summary.idempotent = idemBack.length;

  // Configs: describe defaults, alter, describe again.
  const cfgTopic = `configs-${id}`;
  await admin.createTopics({ topics: [{ topic: cfgTopic, numPartitions: 1, configEntries: [{ name: 'cleanup.policy', value: 'compact' }] }], waitForLeaders: true });
  const describe = async () => {
    const res = await admin.describeConfigs({ resources: [{ type: 2 /* TOPIC */, name: cfgTopic }], includeSynonyms: false });
    assert.equal(res.resources[0].errorCode, 0, `describeConfigs error: ${JSON.stringify(res.resources[0])}`);
    return Object.fromEntries(res.resources[0].configEntries.map((e) => [e.configName, e.configValue]));
  };
  const before = await describe();
  assert.equal(before['cleanup.policy'], 'compact', 'cleanup.policy set at creation');
  assert.ok('retention.ms' in before, `retention.ms described: ${JSON.stringify(before)}`);
  const altered = await admin.alterConfigs({
    validateOnly: false,
    resources: [{ type: 2, name: cfgTopic, configEntries: [
      { name: 'cleanup.policy', value: 'compact' },
      { name: 'retention.ms', value: '3600000' },
      { name: 'kappa.compaction.subkey.header', value: 'contentId' },
    ] }],
  });
  assert.equal(altered.resources[0].errorCode, 0, `alterConfigs: ${JSON.stringify(altered)}`);
  const after = await describe();
  assert.equal(after['retention.ms'], '3600000', 'retention.ms altered');
  assert.equal(after['kappa.compaction.subkey.header'], 'contentId', 'sub-key header altered');
  // An unknown config is refused with an error, not silently accepted.
  await assert.rejects(
    admin.alterConfigs({ resources: [{ type: 2, name: cfgTopic, configEntries: [{ name: 'no.such.config', value: '1' }] }] }),
    (err) => /config|invalid/i.test(`${err.message} ${err.type}`),
    'unknown config refused',
  );
  summary.configs = { retentionMs: after['retention.ms'] };

  // Offsets by timestamp: records with explicit increasing timestamps.
  const tsTopic = `timestamps-${id}`;
  await admin.createTopics({ topics: [{ topic: tsTopic, numPartitions: 1 }], waitForLeaders: true });
  const base = 1_700_000_000_000;
  const tsProducer = client.producer();
  await tsProducer.connect();
  for (let i = 0; i < 10; i++) {
    await tsProducer.send({ topic: tsTopic, messages: [{ value: `t${i}`, timestamp: String(base + i * 1000) }] });
  }
  await tsProducer.disconnect();
  const at = async (ts) => (await admin.fetchTopicOffsetsByTimestamp(tsTopic, ts))[0].offset;
  assert.equal(await at(base + 4000), '4', 'exact timestamp');
  assert.equal(await at(base + 4500), '5', 'between timestamps: next record');
  assert.equal(await at(base - 1), '0', 'before the first record');
  const latest = await admin.fetchTopicOffsets(tsTopic);
  assert.equal(latest[0].high, '10', 'high watermark');
  assert.equal(latest[0].low, '0', 'log start');
  // Past the last timestamp: KafkaJS resolves -1 to the latest offset.
  assert.ok(['-1', '10'].includes(await at(base + 60000)), 'after the last record');
  summary.timestamps = { at4: 4, latest: 10 };

  // Delete topics: gone from the list and the metadata.
  await admin.deleteTopics({ topics: [keyed, cfgTopic] });
  const remaining = await admin.listTopics();
  assert.ok(!remaining.includes(keyed) && !remaining.includes(cfgTopic), `deleted topics still listed: ${remaining}`);
  summary.deleted = 2;

  await admin.disconnect();
  return summary;
}

runMain(main);
