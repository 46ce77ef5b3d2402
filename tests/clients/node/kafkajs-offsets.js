'use strict';
// KafkaJS committed offsets across a broker restart.
//   node kafkajs-offsets.js HOST:PORT commit TOPIC GROUP  -> produces 20, consumes, commits 12
//   node kafkajs-offsets.js HOST:PORT resume TOPIC GROUP  -> (after restart) resumes at 12

const { assert, bootstrap, runMain, waitFor, sleep } = require('./lib');
const { kafka } = require('./kafkajs-common');

async function main() {
  const client = kafka(bootstrap());
  const [phase, topic, groupId] = process.argv.slice(3);
  assert.ok(['commit', 'resume'].includes(phase) && topic && groupId, 'usage: HOST:PORT commit|resume TOPIC GROUP');
  const admin = client.admin();
  await admin.connect();

  if (phase === 'commit') {
    await admin.createTopics({ topics: [{ topic, numPartitions: 1 }], waitForLeaders: true });
    const producer = client.producer();
    await producer.connect();
    await producer.send({ topic, acks: -1, messages: Array.from({ length: 20 }, (_, i) => ({ key: 'k', value: `m${i}` })) });
    await producer.disconnect();
  }

  const consumer = client.consumer({ groupId, maxWaitTimeInMs: 100, sessionTimeout: 10000, heartbeatInterval: 300 });
  const got = [];
  await consumer.connect();
  await consumer.subscribe({ topic, fromBeginning: true });
  await consumer.run({
    autoCommit: false,
    eachMessage: async ({ message }) => {
      got.push({ offset: Number(message.offset), value: message.value.toString() });
    },
  });

  let summary;
  if (phase === 'commit') {
    await waitFor(() => `20 records (have ${got.length})`, () => got.length >= 20);
    await consumer.commitOffsets([{ topic, partition: 0, offset: '12' }]);
    await consumer.disconnect();
    const committed = await admin.fetchOffsets({ groupId, topics: [topic] });
    assert.equal(committed[0].partitions[0].offset, '12', `committed offset: ${JSON.stringify(committed)}`);
    summary = { phase, consumed: got.length, committed: 12 };
  } else {
    const committed = await admin.fetchOffsets({ groupId, topics: [topic] });
    assert.equal(committed[0].partitions[0].offset, '12', `committed offset after restart: ${JSON.stringify(committed)}`);
    await waitFor(() => `8 records from offset 12 (have ${got.length})`, () => got.length >= 8);
    await sleep(500);
    await consumer.disconnect();
    assert.deepEqual(got.map((r) => r.offset), [12, 13, 14, 15, 16, 17, 18, 19], 'resumed at the committed offset');
    assert.deepEqual(got.map((r) => r.value), ['m12', 'm13', 'm14', 'm15', 'm16', 'm17', 'm18', 'm19']);
    summary = { phase, resumedAt: got[0].offset, consumed: got.length };
  }
  await admin.disconnect();
  return summary;
}

runMain(main);
