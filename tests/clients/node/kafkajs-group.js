'use strict';
// KafkaJS consumer group: members join one by one and one leaves; every rebalance hands
// partitions over without losing a record or delivering one twice.

const { assert, bootstrap, runMain, unique, waitFor, sleep } = require('./lib');
const { kafka } = require('./kafkajs-common');

async function main() {
  const client = kafka(bootstrap());
  const admin = client.admin();
  await admin.connect();
  const id = unique();
  const topic = `group-${id}`;
  const groupId = `grp-${id}`;
  await admin.createTopics({ topics: [{ topic, numPartitions: 6 }], waitForLeaders: true });

  const producer = client.producer();
  await producer.connect();
  let produced = 0;
  const produce = async (n) => {
    const messages = Array.from({ length: n }, () => {
      const i = produced++;
      return { key: `key-${i % 17}`, value: String(i) };
    });
    await producer.send({ topic, messages, acks: -1 });
  };

  const seen = new Map(); // value -> member
  const duplicates = [];
  const members = {};
  const start = async (name) => {
    const consumer = client.consumer({
      groupId,
      maxWaitTimeInMs: 100,
      sessionTimeout: 10000,
      rebalanceTimeout: 10000,
      heartbeatInterval: 300,
    });
    const state = { consumer, assigned: [], received: 0, joins: 0 };
    consumer.on(consumer.events.GROUP_JOIN, (e) => {
      state.assigned = e.payload.memberAssignment[topic] || [];
      state.joins++;
    });
    await consumer.connect();
    await consumer.subscribe({ topic, fromBeginning: true });
    await consumer.run({
      eachMessage: async ({ message }) => {
        const v = message.value.toString();
        if (seen.has(v)) duplicates.push({ v, first: seen.get(v), again: name });
        seen.set(v, name);
        state.received++;
      },
    });
    members[name] = state;
    return state;
  };
  const allConsumed = (what) => waitFor(() => `${what}: ${produced} records consumed (have ${seen.size})`, () => seen.size >= produced, 30000);
  const assignedTotal = (names) => names.reduce((n, m) => n + members[m].assigned.length, 0);
  const groupMembers = async () => (await admin.describeGroups([groupId])).groups[0].members.length;

  // One member owns all six partitions.
  await start('a');
  await waitFor('a assigned six partitions', () => members.a.assigned.length === 6, 20000);
  await produce(60);
  await allConsumed('one member');

  // Two more join: partitions are spread over three members.
  await start('b');
  await start('c');
  await waitFor(() => `three members sharing six partitions (${['a', 'b', 'c'].map((m) => members[m].assigned.length)})`,
    () => ['a', 'b', 'c'].every((m) => members[m].assigned.length === 2), 30000);
  assert.equal(await groupMembers(), 3, 'describeGroups lists three members');
  const joinsBeforeLeave = members.a.joins + members.b.joins;
  await produce(120);
  await allConsumed('three members');
  for (const m of ['b', 'c']) assert.ok(members[m].received > 0, `member ${m} received records after joining`);

  // c leaves: its partitions move to a and b.
  await members.c.consumer.disconnect();
  await waitFor(() => `two members sharing six partitions (${['a', 'b'].map((m) => members[m].assigned.length)})`,
    () => assignedTotal(['a', 'b']) === 6 && members.a.joins + members.b.joins >= joinsBeforeLeave + 2, 30000);
  assert.equal(await groupMembers(), 2, 'describeGroups lists two members after leave');
  await produce(120);
  await allConsumed('after leave');
  await sleep(1000); // let any redelivery show up

  await members.a.consumer.disconnect();
  await members.b.consumer.disconnect();
  await producer.disconnect();
  await admin.disconnect();

  assert.deepEqual(duplicates, [], 'no record consumed twice');
  for (let i = 0; i < produced; i++) assert.ok(seen.has(String(i)), `record ${i} consumed`);
  assert.equal(seen.size, produced, 'no unexpected records');
  return { produced, consumed: seen.size, perMember: Object.fromEntries(Object.entries(members).map(([k, v]) => [k, v.received])) };
}

runMain(main, 120000);
