// Resume across crashes: a producer writes channel events without pause while the server
// is killed with SIGKILL and restarted on the same data directory several times. The
// client must reconnect with exponential backoff and resume each subscription from its
// last token: no reset, no second snapshot, and exactly the changes the server's
// changelog holds after the first snapshot — checked against an independent raw
// WebSocket that replays the changelog from that snapshot's token at the end.

import assert from 'node:assert/strict';
import { test } from 'node:test';
import { WebSocket } from 'ws';

import { Kappa } from '../kappa.js';
import { ChannelsServer, eventually, events, freePort, sleep } from './helpers.js';

const RESTARTS = 4;
const BACKOFF = { initialMs: 40, maxMs: 320, factor: 2, jitter: 0 };

/** Every change after `token` of one subscription, read by a plain WebSocket until `untilToken`. */
async function replay(url, view, target, token, untilToken) {
  const ws = new WebSocket(url.replace('http:', 'ws:') + '/v1/ws');
  await new Promise((resolve, reject) => {
    ws.once('open', resolve);
    ws.once('error', reject);
  });
  const changes = [];
  const done = new Promise((resolve, reject) => {
    ws.on('message', (data) => {
      const message = JSON.parse(data.toString());
      if (message.type !== 'change') return reject(new Error(`replay got ${data}`));
      changes.push({ key: message.key, value: message.value, token: message.token });
      if (message.token === untilToken) resolve();
    });
  });
  ws.send(JSON.stringify({ op: 'subscribe', id: 'replay', view, ...target, resume: token }));
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`replay of ${view} ${JSON.stringify(target)} from ${token} never reached ${untilToken}; got ${changes.length} changes`)), 20_000);
  });
  try {
    await Promise.race([done, timeout]);
  } finally {
    clearTimeout(timer);
    ws.close();
  }
  return changes;
}

test('subscriptions resume across kill -9 and restart without gap, duplicate or reset', async (t) => {
  const server = await ChannelsServer.start();
  const kappa = new Kappa(server.url, { WebSocket, backoff: BACKOFF });
  t.after(async () => {
    kappa.close();
    await server.stop();
  });
  const connection = [];
  kappa.on('status', (status, detail) => connection.push({ status, retryInMs: detail.retryInMs }));

  const seen = { page: [], stats: [] };
  const record = (list) => (_current, event) => {
    if (event.type === 'change') list.push({ key: event.key, value: event.deleted ? null : event.value, token: event.token });
  };
  const page = kappa.subscribe('channel_page', 'live-1', record(seen.page));
  const stats = kappa.subscribe('channel_stats', { prefix: 'live-' }, record(seen.stats));
  await Promise.all([page.ready, stats.ready]);
  const start = { page: page.token, stats: stats.token };

  // The producer: one request per step, retried until acknowledged (a request that died with
  // the server may or may not have been written; the changelog replay is the referee).
  let produced = 0;
  let stopProducing = false;
  const producer = (async () => {
    for (let i = 0; !stopProducing; i++) {
      const step = [events.updated('live-1', `n${i}`), events.contentV2(`live-${i % 4}`, `c${i}`, `t${i}`, `b${i}`)];
      for (;;) {
        try {
          await server.produce(step);
          break;
        } catch {
          await sleep(20);
        }
      }
      produced = i + 1;
      await sleep(2);
    }
  })();

  for (let restart = 0; restart < RESTARTS; restart++) {
    const at = produced;
    // A message since the last reconnect too: the client resets its backoff on a message, not
    // on open (a resumed subscription gets no acknowledgement, only the next change).
    const seenBefore = seen.page.length + seen.stats.length;
    await eventually(
      'the producer to make progress and a change to arrive',
      () => produced >= at + 15 && seen.page.length + seen.stats.length > seenBefore,
      { server, timeoutMs: 30_000 },
    );
    const closedBefore = connection.filter((c) => c.status === 'closed').length;
    await server.kill9();
    // Let a few reconnects fail so the backoff shows, then bring the server back.
    await eventually('three failed reconnects', () => connection.filter((c) => c.status === 'closed').length >= closedBefore + 3, { timeoutMs: 10_000 });
    await server.restart();
    await eventually('the client to reconnect', () => kappa.status === 'open', { server });
  }
  const finalAt = produced;
  await eventually('more progress after the last restart', () => produced >= finalAt + 15, { server });
  stopProducing = true;
  await producer;
  const last = `n${produced - 1}`;
  await eventually(`the page subscription to reach ${last}`, () => page.value?.name === last, { server });
  // Compared as sorted entries: the copy's Map keeps insertion order, a read is in key order.
  const sorted = (entries) => JSON.stringify([...entries].sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0)));
  const fresh = async () => sorted((await kappa.list('channel_stats', { prefix: 'live-' })).items.map((i) => [i.key, i.value]));
  try {
    await eventually('the stats copy to equal a fresh read', async () => sorted(stats.items) === (await fresh()), { server });
  } catch (e) {
    throw new Error(`${e.message}\ncopy:  ${sorted(stats.items)}\nfresh: ${await fresh()}\ntoken ${stats.token}, stats ${JSON.stringify(stats.stats)}`);
  }

  // The backoff: after each kill, the delays double from initialMs up to maxMs, and a message after reconnecting resets them.
  const delays = [];
  let run = [];
  for (const c of connection) {
    if (c.status === 'closed') run.push(c.retryInMs);
    if (c.status === 'open' && run.length) {
      delays.push(run);
      run = [];
    }
  }
  assert.equal(delays.length, RESTARTS, `one outage per restart: ${JSON.stringify(connection)}`);
  for (const outage of delays) {
    const expected = outage.map((_, k) => Math.min(BACKOFF.maxMs, BACKOFF.initialMs * BACKOFF.factor ** k));
    assert.deepEqual(outage, expected);
  }

  // Resumed, never restarted: one snapshot, no reset, nothing dropped as a duplicate.
  for (const sub of [page, stats]) {
    assert.equal(sub.stats.snapshots, 1, `${sub.view}: ${JSON.stringify(sub.stats)}`);
    assert.equal(sub.stats.resets, 0, `${sub.view}: ${JSON.stringify(sub.stats)}`);
    assert.equal(sub.stats.duplicatesDropped, 0, `${sub.view}: ${JSON.stringify(sub.stats)}`);
  }

  // Exactly the changelog's changes after the first snapshot, in its order.
  const truthPage = await replay(server.url, 'channel_page', { key: 'live-1' }, start.page, page.token);
  const truthStats = await replay(server.url, 'channel_stats', { prefix: 'live-' }, start.stats, stats.token);
  assert.deepEqual(seen.page, truthPage);
  assert.deepEqual(seen.stats, truthStats);
  // And in the order the producer wrote them (the view may fold several updates into one change).
  const order = seen.page.map((c) => Number(c.value.name.slice(1)));
  assert.deepEqual(order, [...order].sort((a, b) => a - b), 'names arrive in the order they were produced');
  t.diagnostic(`produced ${produced} steps across ${RESTARTS} kill -9 restarts; the client saw ${seen.page.length} page and ${seen.stats.length} stats changes`);
});

test('a client started before its server keeps retrying and subscribes once the server is up', async (t) => {
  const server = new ChannelsServer();
  server.kafkaPort = await freePort();
  server.httpPort = await freePort();
  const kappa = new Kappa(server.url, { WebSocket, backoff: BACKOFF });
  t.after(async () => {
    kappa.close();
    await server.stop();
  });
  const closed = [];
  kappa.on('status', (status, detail) => status === 'closed' && closed.push(detail.retryInMs));
  const sub = kappa.subscribe('channel_page', 'early', () => {});
  await eventually('failed connection attempts', () => closed.length >= 4, { timeoutMs: 10_000 });
  assert.equal(sub.status, 'connecting');
  await server.spawn();
  await sub.ready;
  assert.equal(sub.value, undefined);
  await server.produce([events.created('early', 'finally')]);
  await eventually('the change', () => sub.value?.name === 'finally', { server });
  assert.deepEqual(closed.slice(0, 4), [40, 80, 160, 320]);
});
