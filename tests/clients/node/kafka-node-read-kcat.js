'use strict';
// kafka-node reads what librdkafka (kcat) wrote: RecordBatch v2, possibly compressed,
// down-converted by the broker to the message sets kafka-node understands.
//   node kafka-node-read-kcat.js HOST:PORT TOPIC EXPECTED_JSON
// EXPECTED_JSON is [[key, value], ...] in partition-0 offset order.

const { assert, bootstrap, runMain } = require('./lib');
const { kafka, client, ready, call, consumeFrom, versions } = require('./kafka-node-common');

async function main() {
  const host = bootstrap();
  const topic = process.argv[3];
  const expected = JSON.parse(process.argv[4]);
  assert.ok(topic && Array.isArray(expected) && expected.length > 0, 'usage: HOST:PORT TOPIC EXPECTED_JSON');
  // Plain Consumer (Fetch v0 -> magic 0) from offset 0.
  const got = await consumeFrom(host, [{ topic, partition: 0, offset: 0 }], expected.length);
  assert.deepEqual(got.map((m) => [m.key, m.value]), expected, 'keys and values written by kcat');
  assert.deepEqual(got.map((m) => m.offset), expected.map((_, i) => i), 'offsets 0..');
  // From the middle of a batch.
  const mid = Math.floor(expected.length / 2);
  const tail = await consumeFrom(host, [{ topic, partition: 0, offset: mid }], expected.length - mid);
  assert.deepEqual(tail.map((m) => [m.key, m.value]), expected.slice(mid), `from offset ${mid}`);
  // ConsumerGroup (Fetch v2 -> magic 1).
  const group = new kafka.ConsumerGroup(
    { kafkaHost: host, versions, groupId: `kcat-reader-${Date.now()}`, fromOffset: 'earliest', autoCommit: false, fetchMaxWaitMs: 100, encoding: 'utf8', keyEncoding: 'utf8' },
    [topic],
  );
  const viaGroup = [];
  const errors = [];
  group.on('message', (m) => viaGroup.push(m));
  group.on('error', (e) => errors.push(e));
  const { waitFor, sleep } = require('./lib');
  try {
    await waitFor(() => `${expected.length} via ConsumerGroup (got ${viaGroup.length}; errors ${errors.map(String)})`, () => {
      if (errors.length) throw new Error(`ConsumerGroup error: ${errors.map((e) => e.stack || e)}`);
      return viaGroup.length >= expected.length;
    }, 40000);
    await sleep(500);
  } finally {
    await call((cb) => group.close(false, cb));
  }
  assert.deepEqual(viaGroup.map((m) => [m.key, m.value]), expected, 'ConsumerGroup: keys and values written by kcat');
  assert.ok(viaGroup.every((m) => typeof m.timestamp === 'object' && m.timestamp.getTime() > 0), 'magic 1 messages carry timestamps');
  const c = client(host);
  await ready(c, 'client');
  const latest = await call((cb) => new kafka.Offset(c).fetchLatestOffsets([topic], cb));
  assert.equal(latest[topic]['0'], expected.length, 'latest offset');
  await call((cb) => c.close(cb));
  return { topic, consumed: got.length, viaGroup: viaGroup.length };
}

runMain(main);
