'use strict';
// kafka-node's keyed partitioner (partitionerType 3) hashes keys its own way, so a key it
// writes lands in another partition than the same key written by the Java client, KafkaJS,
// kafka-python, kappa's CLI and HTTP API — and one key in two partitions loses its order.
// This is Kafka's default partitioner for keyed records, for kafka-node's custom partitioner
// type (4):
//
//   const { murmur2Partitioner } = require('./murmur2-partitioner');
//   const producer = new kafka.Producer(client, { partitionerType: 4 }, murmur2Partitioner);
//
// Keys are hashed as UTF-8 bytes, as Kafka's string serializer writes them.

const SEED = 0x9747b28c;
const M = 0x5bd1e995;

/** Kafka's 32-bit murmur2 of `bytes` (a Buffer), as a signed 32-bit integer. */
function murmur2(bytes) {
  const length = bytes.length;
  let h = SEED ^ length;
  const whole = length & ~3;
  for (let i = 0; i < whole; i += 4) {
    let k = bytes[i] | (bytes[i + 1] << 8) | (bytes[i + 2] << 16) | (bytes[i + 3] << 24);
    k = Math.imul(k, M);
    k ^= k >>> 24;
    k = Math.imul(k, M);
    h = Math.imul(h, M) ^ k;
  }
  switch (length & 3) {
    case 3:
      h ^= bytes[whole + 2] << 16;
    // falls through
    case 2:
      h ^= bytes[whole + 1] << 8;
    // falls through
    case 1:
      h ^= bytes[whole];
      h = Math.imul(h, M);
  }
  h ^= h >>> 13;
  h = Math.imul(h, M);
  h ^= h >>> 15;
  return h | 0;
}

/**
 * kafka-node's custom partitioner: `partitions` are the topic's partition ids, `key` the
 * message key (a string or a Buffer). A record without a key goes to a random partition.
 */
function murmur2Partitioner(partitions, key) {
  const ids = [...partitions].sort((a, b) => a - b);
  if (key === null || key === undefined) {
    return ids[Math.floor(Math.random() * ids.length)];
  }
  const bytes = Buffer.isBuffer(key) ? key : Buffer.from(String(key), 'utf8');
  return ids[(murmur2(bytes) & 0x7fffffff) % ids.length];
}

module.exports = { murmur2, murmur2Partitioner };
