'use strict';
// Produces channel events into the channels example's `channels` topic the two ways the
// README shows: KafkaJS with `kappa.type` / `kappa.version` / `contentId` headers, and
// kafka-node (no headers in its protocol version) with `type` / `version` in the payload.

const { bootstrap, runMain, step } = require('./lib');
const { kafka } = require('./kafkajs-common');
const { kafka: kafkaNode, client, ready, call } = require('./kafka-node-common');

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
  const p = new kafkaNode.Producer(c, { requireAcks: -1, partitionerType: 3 });
  await ready(p, 'producer');
  const messages = [
    { type: 'ChannelCreated', version: 1, channelId: 'kn1', name: 'From kafka-node', ownerId: 'u-kn' },
    { type: 'ChannelContentMutated', version: 1, channelId: 'kn1', contentId: 'a', op: 'added', text: 'v1 text' },
  ].map((value) => new kafkaNode.KeyedMessage('kn1', JSON.stringify(value)));
  await call((cb) => p.send([{ topic: 'channels', key: 'kn1', messages }], cb));
  await new Promise((resolve) => c.close(resolve));
  return { produced: 4 };
}

runMain(main);
