'use strict';
// kafka-node ConsumerGroup: join, consume, commit (OffsetCommit v2), and resume from the
// committed offset after the consumer (and, between phases, the broker) restarts.
//   node kafka-node-group.js HOST:PORT first TOPIC GROUP   -> produces 30, consumes all, commits 30
//   node kafka-node-group.js HOST:PORT resume TOPIC GROUP  -> produces 10 more, gets exactly those

const { assert, bootstrap, runMain, waitFor, sleep, step } = require('./lib');
const { kafka, client, ready, call, versions } = require('./kafka-node-common');

async function produce(host, topic, from, count) {
  const c = client(host);
  await ready(c, 'producer client');
  await call((cb) => c.refreshMetadata([topic], cb));
  const producer = new kafka.Producer(c, { requireAcks: 1, partitionerType: 3 });
  await ready(producer, 'producer');
  const messages = Array.from({ length: count }, (_, i) => new kafka.KeyedMessage(`key-${(from + i) % 5}`, `msg-${from + i}`));
  for (const key of new Set(messages.map((m) => m.key))) {
    await call((cb) => producer.send([{ topic, key, messages: messages.filter((m) => m.key === key) }], cb));
  }
  await call((cb) => producer.close(cb));
}

async function consume(host, topic, groupId, count) {
  const group = new kafka.ConsumerGroup(
    { kafkaHost: host, versions, groupId, fromOffset: 'earliest', autoCommit: false, sessionTimeout: 10000, heartbeatInterval: 500, fetchMaxWaitMs: 100, protocol: ['roundrobin'], encoding: 'utf8', keyEncoding: 'utf8' },
    [topic],
  );
  const messages = [];
  const errors = [];
  group.on('message', (m) => messages.push(m));
  group.on('error', (e) => errors.push(e));
  let joined = null;
  group.on('rebalanced', () => { joined = { generationId: group.generationId, memberId: group.memberId }; });
  try {
    await waitFor(() => `${count} messages via ConsumerGroup (got ${messages.length}; errors: ${errors.map(String)})`, () => {
      if (errors.length) throw new Error(`ConsumerGroup error: ${errors.map((e) => e.stack || e)}`);
      return messages.length >= count;
    }, 40000);
    await sleep(1000);
    assert.ok(joined && joined.generationId >= 1, `joined with a valid generation: ${JSON.stringify(joined)}`);
    // Commit the next offset of each partition (OffsetCommit v2 with generation and member id).
    const commits = Object.entries(messages.reduce((acc, m) => ({ ...acc, [m.partition]: Math.max(acc[m.partition] ?? -1, m.offset) }), {}))
      .map(([partition, last]) => ({ topic, partition: Number(partition), offset: last + 1, metadata: 'kafka-node' }));
    await call((cb) => group.sendOffsetCommitRequest(commits, cb));
  } finally {
    await call((cb) => group.close(false, cb));
  }
  return { messages, joined };
}

async function main() {
  const host = bootstrap();
  const [phase, topic, groupId] = process.argv.slice(3);
  assert.ok(['first', 'resume'].includes(phase) && topic && groupId, 'usage: HOST:PORT first|resume TOPIC GROUP');
  const [from, count] = phase === 'first' ? [0, 30] : [30, 10];

  if (phase === 'first') {
    const c = client(host);
    await ready(c, 'admin client');
    assert.deepEqual(await call((cb) => c.createTopics([{ topic, partitions: 2, replicationFactor: 1 }], cb)), []);
    await call((cb) => c.close(cb));
  }
  step(`produce ${count}`);
  await produce(host, topic, from, count);
  step('consume');
  const { messages, joined } = await consume(host, topic, groupId, count);
  const values = messages.map((m) => m.value).sort();
  const expected = Array.from({ length: count }, (_, i) => `msg-${from + i}`).sort();
  assert.deepEqual(values, expected, `${phase}: exactly the ${count} records after the committed offset`);
  for (const m of messages) assert.equal(m.key, `key-${Number(m.value.slice(4)) % 5}`, 'key matches value');

  // OffsetFetch v1 through the Offset API agrees with what was committed.
  step('fetch commits');
  const c = client(host);
  await ready(c, 'offset client');
  const offset = new kafka.Offset(c);
  const committed = await call((cb) => offset.fetchCommitsV1(groupId, [{ topic, partition: 0 }, { topic, partition: 1 }], cb));
  const latest = await call((cb) => offset.fetchLatestOffsets([topic], cb));
  assert.deepEqual(committed[topic], latest[topic], `committed offsets equal the log end: ${JSON.stringify({ committed, latest })}`);
  const total = Object.values(committed[topic]).reduce((a, b) => a + b, 0);
  assert.equal(total, from + count, 'committed offsets cover every record');
  await call((cb) => c.close(cb));
  return { phase, consumed: messages.length, generationId: joined.generationId, committed: committed[topic] };
}

runMain(main);
