'use strict';
// Produces channel events into the channels example's `channels` topic the two ways the
// README shows: KafkaJS with `kappa.type` / `kappa.version` / `contentId` headers, and
// kafka-node (no headers in its protocol version) with `type` / `version` in the payload,
// partitioned by the README's murmur2 partitioner, so a key lands where KafkaJS, the Java
// client and kappa's HTTP API put it.

const { bootstrap, runMain, step } = require('./lib');
const { kafka } = require('./kafkajs-common');
const { kafka: kafkaNode, client, ready, call } = require('./kafka-node-common');
const { Partitioners } = require('kafkajs');
const { murmur2Partitioner } = require('../../../clients/kafka-node/murmur2-partitioner');

/** KafkaJS's default (Java-compatible) partition of `key` among `count` partitions. */
function kafkajsPartition(key, count) {
  const partitionMetadata = [...Array(count).keys()].map((partitionId) => ({ partitionId, leader: 0 }));
  return Partitioners.DefaultPartitioner()({ topic: 'channels', partitionMetadata, message: { key } });
}

/** The README's kafka-node partitioner agrees with KafkaJS's on ASCII, UTF-8 and long keys. */
function checkPartitionerAgreement() {
  for (const count of [1, 4, 7, 64]) {
    const ids = [...Array(count).keys()];
    for (let i = 0; i < 3000; i++) {
      const key = [`c${i}`, `ключ-${i}-é`, 'x'.repeat(i % 41) + i][i % 3];
      const [ours, theirs] = [murmur2Partitioner(ids, key), kafkajsPartition(key, count)];
      if (ours !== theirs) {
        throw new Error(`key ${JSON.stringify(key)} of ${count} partitions: murmur2-partitioner.js says ${ours}, KafkaJS ${theirs}`);
      }
    }
  }
}

async function main() {
  const host = bootstrap();
  step('KafkaJS with headers');
  const producer = kafka(host).producer({ idempotent: true, maxInFlightRequests: 1 });
  await producer.connect();
  await producer.send({
    topic: 'channels',
    acks: -1,
    messages: [
      { key: 'js1', value: JSON.stringify({ channelId: 'js1', name: 'From KafkaJS', ownerId: 'u-js' }),
        headers: { 'kappa.type': 'ChannelCreated', 'kappa.version': '1' } },
      { key: 'js1', value: JSON.stringify({ channelId: 'js1', contentId: 'a', action: 'upsert', content: { title: 'T', body: 'B' } }),
        headers: { 'kappa.type': 'ChannelContentMutated', 'kappa.version': '2', contentId: 'a' } },
    ],
  });
  await producer.disconnect();

  step('kafka-node with the type in the payload');
  const c = client(host);
  await ready(c, 'client');
  await call((cb) => c.refreshMetadata(['channels'], cb));
  checkPartitionerAgreement();
  const p = new kafkaNode.Producer(c, { requireAcks: -1, partitionerType: 4 }, murmur2Partitioner);
  await ready(p, 'producer');
  const messages = [
    { type: 'ChannelCreated', version: 1, channelId: 'kn1', name: 'From kafka-node', ownerId: 'u-kn' },
    { type: 'ChannelContentMutated', version: 1, channelId: 'kn1', contentId: 'a', op: 'added', text: 'v1 text' },
  ].map((value) => new kafkaNode.KeyedMessage('kn1', JSON.stringify(value)));
  const sent = await call((cb) => p.send([{ topic: 'channels', key: 'kn1', messages }], cb));
  const partitions = Object.keys(sent.channels).map(Number);
  if (partitions.length !== 1 || partitions[0] !== kafkajsPartition('kn1', 4)) {
    throw new Error(`kafka-node wrote kn1 to ${JSON.stringify(sent)}; KafkaJS puts it in ${kafkajsPartition('kn1', 4)}`);
  }
  await new Promise((resolve) => c.close(resolve));
  return { produced: 4 };
}

runMain(main);
