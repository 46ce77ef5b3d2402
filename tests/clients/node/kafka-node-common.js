'use strict';
// kafka-node helpers shared by the kafka-node-*.js scripts. DEBUG=kafka-node:* shows the
// client's own protocol log on stderr.

const kafka = require('kafka-node');
const { waitFor, sleep } = require('./lib');

// kafka-node asks a new broker connection for ApiVersions and, if no answer comes within
// `versions.requestTimeout` (default 500 ms), takes the broker for a pre-0.10 one and speaks
// the oldest protocol versions on that connection for good — Metadata v0 names no
// controller, so every createTopics then fails with BrokerNotAvailableError('Controller
// broker not available'). On a loaded 2-core CI machine a first answer can take longer: wait
// as long as for any other request. Pass it to every KafkaClient and ConsumerGroup.
const versions = { requestTimeout: 15000 };

function client(kafkaHost) {
  return new kafka.KafkaClient({ kafkaHost, connectTimeout: 5000, requestTimeout: 15000, autoConnect: true, versions });
}

const ready = (emitter, what) =>
  new Promise((resolve, reject) => {
    // Producers emit 'ready' synchronously in their constructor when the client is ready.
    if (emitter.ready) return resolve();
    emitter.once('ready', resolve);
    emitter.once('error', (err) => reject(new Error(`${what}: ${err && err.message ? err.message : err}`)));
  });

const call = (fn) => new Promise((resolve, reject) => fn((err, res) => (err ? reject(err) : resolve(res))));

// Starts a plain Consumer at explicit offsets and collects `count` messages.
async function consumeFrom(kafkaHost, payloads, count, { settleMs = 500, timeoutMs = 30000 } = {}) {
  const c = client(kafkaHost);
  await ready(c, 'consumer client');
  const consumer = new kafka.Consumer(c, payloads, { autoCommit: false, fromOffset: true, fetchMaxWaitMs: 100, encoding: 'utf8', keyEncoding: 'utf8' });
  const messages = [];
  const errors = [];
  consumer.on('message', (m) => messages.push(m));
  consumer.on('error', (e) => errors.push(e));
  consumer.on('offsetOutOfRange', (e) => errors.push(new Error(`offsetOutOfRange ${JSON.stringify(e)}`)));
  try {
    await waitFor(() => `${count} messages from ${JSON.stringify(payloads)} (got ${messages.length}; errors ${errors.map(String)})`, () => {
      if (errors.length) throw new Error(`kafka-node Consumer error: ${errors.map((e) => e.stack || e)}`);
      return messages.length >= count;
    }, timeoutMs);
    await sleep(settleMs);
  } finally {
    await call((cb) => consumer.close(true, cb));
  }
  if (errors.length) throw new Error(`kafka-node Consumer error: ${errors.map((e) => e.stack || e)}`);
  return messages;
}

module.exports = { kafka, client, ready, call, consumeFrom, versions };
