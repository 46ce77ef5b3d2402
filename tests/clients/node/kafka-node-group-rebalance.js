'use strict';
// kafka-node ConsumerGroup with two members: the second joins (JoinGroup v0 / SyncGroup v0,
// roundrobin), partitions are split, and every record is consumed exactly once.

const { assert, bootstrap, runMain, unique, waitFor, step } = require('./lib');
const { kafka, client, ready, call, versions } = require('./kafka-node-common');

async function main() {
  const host = bootstrap();
  const id = unique();
  const topic = `kn-rebalance-${id}`;
  const groupId = `kn-rebalance-${id}`;
  const c = client(host);
  await ready(c, 'client');
  assert.deepEqual(await call((cb) => c.createTopics([{ topic, partitions: 4, replicationFactor: 1 }], cb)), []);
  await call((cb) => c.refreshMetadata([topic], cb));
  const producer = new kafka.Producer(c, { requireAcks: 1 });
  await ready(producer, 'producer');
  let produced = 0;
  const produce = async (n) => {
    for (let partition = 0; partition < 4; partition++) {
      const messages = Array.from({ length: n / 4 }, () => `r${produced++}`);
      await call((cb) => producer.send([{ topic, partition, messages }], cb));
    }
  };

  const seen = new Map();
  const duplicates = [];
  const errors = [];
  const members = {};
  const start = (name) => {
    const group = new kafka.ConsumerGroup(
      { kafkaHost: host, versions, groupId, fromOffset: 'earliest', autoCommit: true, autoCommitIntervalMs: 200, sessionTimeout: 10000, heartbeatInterval: 300, fetchMaxWaitMs: 100, protocol: ['roundrobin'], encoding: 'utf8' },
      [topic],
    );
    members[name] = { group, received: 0, rebalances: 0 };
    group.on('message', (m) => {
      if (seen.has(m.value)) duplicates.push({ value: m.value, first: seen.get(m.value), again: name });
      seen.set(m.value, name);
      members[name].received++;
    });
    group.on('rebalanced', () => members[name].rebalances++);
    group.on('error', (e) => errors.push(`${name}: ${e.stack || e}`));
  };
  const check = () => { if (errors.length) throw new Error(`ConsumerGroup errors: ${errors}`); };
  const owned = (name) => Object.values(members[name].group.topicPayloads || []).length;
  // The group's committed offsets (OffsetFetch v1), added up over the 4 partitions: with
  // every partition read from 0, the number of records whose consumption is committed.
  const offsets = new kafka.Offset(c);
  let committed = null;
  const waitCommitted = (n) => waitFor(() => `${n} consumed records committed (committed offsets add up to ${committed})`, async () => {
    check();
    const fetched = await call((cb) => offsets.fetchCommitsV1(groupId, [0, 1, 2, 3].map((partition) => ({ topic, partition })), cb));
    committed = Object.values(fetched[topic] || {}).reduce((sum, offset) => sum + Math.max(offset, 0), 0);
    return committed === n;
  }, 30000, 100);

  step('member a');
  start('a');
  await waitFor('a joined', () => { check(); return members.a.rebalances >= 1; }, 30000);
  await produce(40);
  await waitFor(() => `40 consumed (${seen.size})`, () => { check(); return seen.size >= 40; });
  await waitCommitted(40); // autoCommit stored a's offsets: b starts where a left off

  step('member b joins');
  start('b');
  await waitFor(() => `both members own partitions (a ${owned('a')}, b ${owned('b')})`, () => { check(); return members.b.rebalances >= 1 && owned('a') === 2 && owned('b') === 2; }, 40000);
  await produce(40);
  await waitFor(() => `80 consumed (${seen.size})`, () => { check(); return seen.size >= 80; });
  await waitCommitted(80);
  check();
  for (const name of ['a', 'b']) await call((cb) => members[name].group.close(true, cb));
  await call((cb) => producer.close(cb));
  await call((cb) => c.close(cb));

  assert.deepEqual(duplicates, [], 'no record consumed twice across the rebalance');
  assert.equal(seen.size, produced, 'every record consumed');
  assert.ok(members.b.received > 0, 'the joining member consumed records');
  return { produced, perMember: { a: members.a.received, b: members.b.received } };
}

runMain(main, 120000);
