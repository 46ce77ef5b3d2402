'use strict';
// KafkaJS transactions: committed and aborted transactions as seen by read_committed and
// read_uncommitted consumers, an open transaction holding back the last stable offset, and
// consume-transform-produce with sendOffsets.

const { assert, bootstrap, runMain, unique, waitFor, sleep } = require('./lib');
const { kafka, consumeAll } = require('./kafkajs-common');

async function main() {
  const client = kafka(bootstrap());
  const admin = client.admin();
  await admin.connect();
  const id = unique();
  const summary = {};

  // --- commit / abort -------------------------------------------------------------------
  const topic = `txn-${id}`;
  await admin.createTopics({ topics: [{ topic, numPartitions: 2 }], waitForLeaders: true });
  const txProducer = client.producer({ transactionalId: `tx-${id}`, idempotent: true, maxInFlightRequests: 1 });
  await txProducer.connect();
  const runTxn = async (label, outcome, n = 5) => {
    const txn = await txProducer.transaction();
    await txn.send({ topic, messages: Array.from({ length: n }, (_, i) => ({ key: `k${i}`, value: `${label}-${i}` })) });
    if (outcome === 'commit') await txn.commit();
    else if (outcome === 'abort') await txn.abort();
    return txn;
  };
  await runTxn('c1', 'commit');
  await runTxn('a1', 'abort');
  await runTxn('c2', 'commit');

  const committed = await consumeAll(client, [topic], 10, { settleMs: 1000 });
  const values = (rs) => rs.map((r) => r.value).sort();
  const expectedCommitted = ['c1', 'c2'].flatMap((l) => Array.from({ length: 5 }, (_, i) => `${l}-${i}`)).sort();
  assert.deepEqual(values(committed), expectedCommitted, 'read_committed sees committed transactions only');
  const uncommitted = await consumeAll(client, [topic], 15, { readUncommitted: true, settleMs: 1000 });
  const expectedAll = ['c1', 'a1', 'c2'].flatMap((l) => Array.from({ length: 5 }, (_, i) => `${l}-${i}`)).sort();
  assert.deepEqual(values(uncommitted), expectedAll, 'read_uncommitted sees aborted records too');
  summary.readCommitted = committed.length;
  summary.readUncommitted = uncommitted.length;

  // --- an open transaction holds back later records from read_committed -------------------
  const open = await runTxn('o1', 'open', 3);
  const plain = client.producer();
  await plain.connect();
  await plain.send({ topic, messages: [{ key: 'k0', value: 'after-open-0' }, { key: 'k1', value: 'after-open-1' }] });
  const whileOpen = await consumeAll(client, [topic], 10, { settleMs: 1500 });
  assert.deepEqual(values(whileOpen), expectedCommitted, 'open transaction and records after it are not visible to read_committed');
  const uncommittedWhileOpen = await consumeAll(client, [topic], 20, { readUncommitted: true, settleMs: 500 });
  assert.equal(uncommittedWhileOpen.length, 20, 'read_uncommitted sees the open transaction');
  await open.commit();
  const afterCommit = await consumeAll(client, [topic], 15, { settleMs: 1000 });
  assert.deepEqual(values(afterCommit), [...expectedCommitted, 'o1-0', 'o1-1', 'o1-2', 'after-open-0', 'after-open-1'].sort(), 'visible after commit');
  summary.lastStableOffset = 'ok';

  // --- consume-transform-produce with sendOffsets ----------------------------------------
  const input = `ctp-in-${id}`;
  const output = `ctp-out-${id}`;
  const groupId = `ctp-${id}`;
  await admin.createTopics({ topics: [{ topic: input, numPartitions: 1 }, { topic: output, numPartitions: 1 }], waitForLeaders: true });
  await plain.send({ topic: input, messages: Array.from({ length: 10 }, (_, i) => ({ key: `k${i}`, value: `in${i}` })) });

  const ctpProducer = client.producer({ transactionalId: `ctp-tx-${id}`, idempotent: true, maxInFlightRequests: 1 });
  await ctpProducer.connect();
  // Processes input records one transaction each; `abortAt` makes that record's transaction
  // abort and stops the worker there (a crash after writing but before committing).
  const worker = async (abortAt) => {
    const consumer = client.consumer({ groupId, maxWaitTimeInMs: 100, sessionTimeout: 10000, heartbeatInterval: 300 });
    let done = 0;
    let stopped = false;
    await consumer.connect();
    await consumer.subscribe({ topic: input, fromBeginning: true });
    await consumer.run({
      autoCommit: false,
      eachMessage: async ({ topic: t, partition, message }) => {
        if (stopped) return;
        const n = Number(message.offset);
        const txn = await ctpProducer.transaction();
        await txn.send({ topic: output, messages: [{ key: message.key, value: message.value.toString().toUpperCase() }] });
        await txn.sendOffsets({ consumerGroupId: groupId, topics: [{ topic: t, partitions: [{ partition, offset: String(n + 1) }] }] });
        if (n === abortAt) {
          await txn.abort();
          stopped = true;
          consumer.pause([{ topic: input }]);
        } else {
          await txn.commit();
        }
        done = n + 1;
      },
    });
    const target = abortAt === undefined ? 10 : abortAt + 1;
    await waitFor(() => `worker processed up to ${target} (at ${done})`, () => done >= target, 30000);
    await consumer.disconnect();
  };
  await worker(6);
  let offsets = await admin.fetchOffsets({ groupId, topics: [input] });
  assert.equal(offsets[0].partitions[0].offset, '6', `offsets committed by the transactions, not the aborted one: ${JSON.stringify(offsets)}`);
  await worker(undefined);
  offsets = await admin.fetchOffsets({ groupId, topics: [input] });
  assert.equal(offsets[0].partitions[0].offset, '10', 'all input committed');
  await ctpProducer.disconnect();

  const out = await consumeAll(client, [output], 10, { settleMs: 1000 });
  assert.deepEqual(out.sort((a, b) => a.offset - b.offset).map((r) => r.value), Array.from({ length: 10 }, (_, i) => `IN${i}`), 'each input transformed exactly once');
  const outAll = await consumeAll(client, [output], 11, { readUncommitted: true, settleMs: 500 });
  assert.equal(outAll.filter((r) => r.value === 'IN6').length, 2, 'read_uncommitted also sees the aborted attempt');
  summary.consumeTransformProduce = out.length;

  await txProducer.disconnect();
  await plain.disconnect();
  await admin.disconnect();
  return summary;
}

runMain(main, 120000);
