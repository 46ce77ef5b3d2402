'use strict';
// KafkaJS setup shared by the kafkajs-*.js scripts. Client logs go to stderr (stdout carries
// only the JSON summary); KAFKAJS_LOG_LEVEL=debug shows every request and response.

const { Kafka, logLevel, CompressionTypes, CompressionCodecs } = require('kafkajs');
const SnappyCodec = require('kafkajs-snappy');
const { waitFor, sleep } = require('./lib');

CompressionCodecs[CompressionTypes.Snappy] = SnappyCodec;

const stderrLogger = () => ({ namespace, level, label, log }) => {
  const { message, ...extra } = log;
  process.stderr.write(`[kafkajs ${label} ${namespace}] ${message} ${JSON.stringify(extra)}\n`);
};

function kafka(broker, clientId = 'kappa-node-tests') {
  return new Kafka({
    clientId,
    brokers: [broker],
    logLevel: logLevel.WARN,
    logCreator: stderrLogger,
    retry: { retries: 8, initialRetryTime: 100, maxRetryTime: 2000 },
    connectionTimeout: 3000,
    requestTimeout: 10000,
  });
}

// Consumes from the beginning of `topics` with a fresh group until `count` records arrived,
// then keeps going for `settleMs` more to catch duplicates or stray records.
async function consumeAll(client, topics, count, { groupId, readUncommitted = false, settleMs = 500, timeoutMs = 30000 } = {}) {
  const consumer = client.consumer({
    groupId: groupId || `g-${Math.random().toString(36).slice(2)}`,
    readUncommitted,
    maxWaitTimeInMs: 100,
    sessionTimeout: 10000,
    rebalanceTimeout: 10000,
    heartbeatInterval: 500,
    retry: { retries: 3 },
  });
  const records = [];
  await consumer.connect();
  for (const topic of topics) await consumer.subscribe({ topic, fromBeginning: true });
  await consumer.run({
    eachMessage: async ({ topic, partition, message }) => {
      records.push({
        topic,
        partition,
        offset: Number(message.offset),
        key: message.key === null ? null : message.key.toString(),
        value: message.value === null ? null : message.value.toString(),
        timestamp: Number(message.timestamp),
        headers: Object.fromEntries(Object.entries(message.headers || {}).map(([k, v]) => [k, v === null || v === undefined ? v : v.toString()])),
      });
    },
  });
  try {
    await waitFor(() => `${count} records from ${topics.join(',')} (got ${records.length})`, () => records.length >= count, timeoutMs);
    await sleep(settleMs);
  } finally {
    await consumer.disconnect();
  }
  return records;
}

module.exports = { kafka, consumeAll, CompressionTypes, Kafka };
