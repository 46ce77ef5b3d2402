// The client against a real `channels serve`: HTTP reads, key and prefix subscriptions
// following every kind of channel event (including both kinds of tombstone), reset +
// snapshot when a resume token cannot be replayed, errors that end one subscription and
// leave the others alone, unsubscribe.

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { WebSocket } from 'ws';

import { Kappa, KappaError } from '../kappa.js';
import { ChannelsServer, eventually, events } from './helpers.js';

let server;
let kappa;

before(async () => {
  server = await ChannelsServer.start();
  kappa = new Kappa(server.url, { WebSocket });
});

after(async () => {
  kappa?.close();
  await server?.stop();
});

/** Records every onChange call of a subscription (values copied, so later changes cannot alter them). */
function recorder() {
  const calls = [];
  const onChange = (current, event) => {
    const copy = current instanceof Map ? Object.fromEntries(current) : structuredClone(current);
    calls.push({ current: copy, event });
  };
  return { calls, onChange };
}

const page = (channelId, name, content = {}, ownerId = 'u1') => ({ channelId, name, ownerId, content });

describe('HTTP reads', () => {
  test('get, list, listAll and views read what was produced', async () => {
    await server.produce([events.created('h1', 'one'), events.created('h2', 'two'), events.created('h3', 'three'), events.created('x9', 'other')]);
    // The keys are in different partitions, applied independently: wait for all three.
    for (const key of ['h1', 'h2']) await eventually(`${key} in channel_page`, () => kappa.get('channel_page', key), { server });
    const h3 = await eventually('h3 in channel_page', () => kappa.get('channel_page', 'h3'), { server });
    assert.deepEqual(h3.value, page('h3', 'three'));
    assert.match(h3.position, /^1\.[0-9a-f]{16}\.\d+$/);
    assert.equal(h3.version, 1);

    assert.equal(await kappa.get('channel_page', 'no-such-channel'), null, 'an absent key reads as null');

    const first = await kappa.list('channel_page', { prefix: 'h', limit: 2 });
    assert.deepEqual(first.items.map((i) => i.key), ['h1', 'h2']);
    assert.equal(first.cursor, 'h2');
    const rest = await kappa.list('channel_page', { prefix: 'h', after: first.cursor, limit: 2 });
    assert.deepEqual(rest.items, [{ key: 'h3', value: page('h3', 'three') }]);
    assert.equal(rest.cursor, null);

    const all = [];
    for await (const item of kappa.listAll('channel_page', { prefix: 'h', pageSize: 1 })) all.push(item.key);
    assert.deepEqual(all, ['h1', 'h2', 'h3']);

    const views = await kappa.views();
    assert.deepEqual(views.map((v) => v.name).sort(), ['channel_page', 'channel_stats', 'owner_channels']);
    const channelPage = views.find((v) => v.name === 'channel_page');
    assert.equal(channelPage.active, 1);
    assert.equal(channelPage.versions[0].status, 'serving');
    assert.equal(typeof channelPage.versions[0].progress, 'number');

    const offsets = await kappa.produce('channels', [events.created('h4', 'four')]);
    assert.equal(offsets.length, 1);
    assert.equal(typeof offsets[0].offset, 'number');
  });

  test('afterOffsets reads the write just produced, every time (get and list)', async () => {
    for (let i = 0; i < 30; i++) {
      const offsets = await kappa.produce('channels', [events.created(`ryw-${i}`, `name ${i}`)]);
      assert.equal(offsets[0].topic, 'channels');
      const read = await kappa.get('channel_page', `ryw-${i}`, { afterOffsets: offsets });
      assert.deepEqual(read?.value, page(`ryw-${i}`, `name ${i}`), `read ${i} right after its produce`);
      const { partition, offset } = offsets[0];
      const listed = await kappa.list('channel_page', { prefix: `ryw-${i}`, afterOffsets: [`channels:${partition}:${offset}`], waitMs: 2000 });
      assert.deepEqual(listed.items.map((item) => item.key), [`ryw-${i}`]);
    }
    await assert.rejects(kappa.get('channel_page', 'k', { afterOffsets: [{ topic: 'other', partition: 0, offset: 0 }] }), { code: 'not_an_input', status: 400 });
    await assert.rejects(kappa.get('channel_page', 'k', { afterOffsets: ['channels:0'] }), { code: 'invalid_after_offsets', status: 400 });
    await assert.rejects(kappa.get('channel_page', 'k', { afterOffsets: ['channels:0:1000000000'] }), { code: 'offset_not_written', status: 400 });
    // A produce of nothing answers no offsets: a read after it waits for nothing.
    assert.deepEqual((await kappa.get('channel_page', 'ryw-0', { afterOffsets: [], waitMs: 1000 }))?.value, page('ryw-0', 'name 0'));
    assert.deepEqual((await kappa.list('channel_page', { prefix: 'ryw-0', afterOffsets: [] })).items.map((item) => item.key), ['ryw-0']);
  });

  test('server errors become KappaErrors with the stable code, status and message', async () => {
    await assert.rejects(kappa.get('no_such_view', 'k'), (e) => {
      assert.ok(e instanceof KappaError);
      assert.equal(e.code, 'unknown_view');
      assert.equal(e.status, 404);
      assert.match(e.message, /no_such_view/);
      return true;
    });
    await assert.rejects(kappa.list('channel_page', { limit: 0 }), { code: 'invalid_limit', status: 400 });
    await assert.rejects(kappa.get('channel_page', 'k', { asOf: 'yesterday' }), { code: 'invalid_as_of', status: 400 });
    const down = new Kappa('http://127.0.0.1:9', { WebSocket });
    await assert.rejects(down.get('channel_page', 'k'), { code: 'unreachable' });
  });
});

describe('subscriptions', () => {
  test('a key subscription follows create, update, content v1 and v2, content removal and channel deletion', async () => {
    const { calls, onChange } = recorder();
    const sub = kappa.subscribe('channel_page', 'k1', onChange);
    await sub.ready;
    assert.equal(sub.status, 'live');
    assert.equal(sub.value, undefined, 'the channel does not exist yet');
    assert.equal(calls[0].event.type, 'snapshot');
    assert.equal(calls[0].event.resync, false);
    assert.match(sub.token, /^1\.[0-9a-f]{16}\.\d+$/);

    const steps = [
      [events.created('k1', 'first'), page('k1', 'first')],
      [events.updated('k1', 'second', 'u2'), page('k1', 'second', {}, 'u2')],
      [events.contentV1('k1', 'a', 'hello'), page('k1', 'second', { a: { title: null, body: 'hello' } }, 'u2')],
      [events.contentV2('k1', 'b', 'T', 'B'), page('k1', 'second', { a: { title: null, body: 'hello' }, b: { title: 'T', body: 'B' } }, 'u2')],
      [events.contentRemoved('k1', 'a'), page('k1', 'second', { b: { title: 'T', body: 'B' } }, 'u2')],
      [events.deleted('k1'), undefined],
    ];
    for (const [record, expected] of steps) {
      const seen = calls.length;
      await server.produce([record]);
      await eventually(`the change after ${JSON.stringify(record)}`, () => calls.length > seen, { server });
      assert.equal(calls.length, seen + 1, 'exactly one change per event');
      const { current, event } = calls[seen];
      assert.deepEqual(current, expected);
      assert.deepEqual(sub.value, expected);
      assert.equal(event.type, 'change');
      assert.equal(event.key, 'k1');
      assert.equal(event.deleted, expected === undefined);
      assert.equal(sub.token, event.token);
    }
    assert.equal(sub.items.size, 0);
    assert.deepEqual(sub.stats, { snapshots: 1, changes: steps.length, resets: 0, retries: 0, duplicatesDropped: 0 });
    sub.unsubscribe();
  });

  test('a prefix subscription keeps a copy of every matching key and ignores the rest', async () => {
    await server.produce([events.created('p-1', 'one'), events.created('p-2', 'two')]);
    await eventually('p-2 in channel_stats', () => kappa.get('channel_stats', 'p-2'), { server });
    const { calls, onChange } = recorder();
    const sub = kappa.subscribe('channel_stats', { prefix: 'p-' }, onChange);
    await sub.ready;
    assert.deepEqual(Object.fromEntries(sub.items), { 'p-1': { contentCount: 0 }, 'p-2': { contentCount: 0 } });
    assert.equal(sub.value, undefined, 'value is for key subscriptions');

    await server.produce([events.created('q-1', 'not matched'), events.contentV1('p-1', 'c1', 'x'), events.contentV1('p-1', 'c2', 'y')]);
    await server.produce([events.created('p-3', 'three'), events.contentRemoved('p-1', 'c1'), events.deleted('p-2')]);
    const expected = { 'p-1': { contentCount: 1 }, 'p-3': { contentCount: 0 } };
    await eventually('the prefix copy to follow', () => {
      assert.deepEqual(Object.fromEntries(sub.items), expected);
      return true;
    }, { server });
    assert.ok(calls.slice(1).every((c) => c.event.key.startsWith('p-')), 'only keys under the prefix');
    // The copy equals what a fresh read says, once reads have the last change too: a
    // subscription hears of a change as soon as it is durable in the view's changelog, and
    // the view's store, which reads answer from, commits it just after (a read at once may
    // still miss it).
    await eventually('a fresh read to equal the copy', async () => {
      const fresh = await kappa.list('channel_stats', { prefix: 'p-' });
      assert.deepEqual(Object.fromEntries(fresh.items.map((i) => [i.key, i.value])), expected);
      return true;
    }, { server });
    sub.unsubscribe();
  });

  test('resuming from a token the server cannot replay yields reset and a fresh snapshot that replaces the copy', async () => {
    await server.produce([events.created('r1', 'real')]);
    await eventually('r1', () => kappa.get('channel_page', 'r1'), { server });
    const statuses = [];
    const { calls, onChange } = recorder();
    const sub = kappa.subscribe('channel_page', 'r1', onChange, {
      resume: '1.999999999', // beyond the changelog's end
      initial: { stale: true },
      onStatus: (status) => statuses.push(status),
    });
    assert.deepEqual(sub.value, { stale: true }, 'the given copy shows until the server answers');
    await eventually('the fresh snapshot', () => sub.stats.snapshots === 1, { server });
    assert.equal(sub.stats.resets, 1);
    assert.deepEqual(statuses, ['live', 'resync', 'live']);
    assert.deepEqual(sub.value, page('r1', 'real'));
    assert.equal(calls.length, 1);
    assert.equal(calls[0].event.type, 'snapshot');
    assert.equal(calls[0].event.resync, true);
    sub.unsubscribe();
  });

  test('resuming from a valid token delivers exactly the changes after it', async () => {
    await server.produce([events.created('t1', 'v0')]);
    const start = await eventually('t1', () => kappa.get('channel_page', 't1'), { server });
    // One view step per update (a step that reads both would fold them into one change).
    for (const name of ['v1', 'v2']) {
      await server.produce([events.updated('t1', name)]);
      await eventually(`t1 = ${name}`, async () => (await kappa.get('channel_page', 't1')).value.name === name, { server });
    }
    const { calls, onChange } = recorder();
    const sub = kappa.subscribe('channel_page', 't1', onChange, { resume: start.position, initial: start.value });
    await eventually('the missed changes', () => sub.value.name === 'v2', { server });
    assert.deepEqual(calls.map((c) => c.current.name), ['v1', 'v2']);
    assert.equal(sub.stats.snapshots, 0, 'no snapshot: a resume');
    assert.equal(sub.stats.resets, 0);
    sub.unsubscribe();
  });

  test('an unknown view fails that subscription with the server error; others on the connection go on', async () => {
    const good = kappa.subscribe('channel_page', 'e1', () => {});
    await good.ready;
    const errors = [];
    const bad = kappa.subscribe('no_such_view', 'k', () => assert.fail('no change for a failed subscription'), { onError: (e) => errors.push(e) });
    await assert.rejects(bad.ready, (e) => e instanceof KappaError && e.code === 'unknown_view' && /no_such_view/.test(e.message));
    assert.equal(bad.status, 'failed');
    assert.equal(bad.error.code, 'unknown_view');
    assert.equal(errors.length, 1);
    await server.produce([events.created('e1', 'still works')]);
    await eventually('the good subscription to see its change', () => good.value?.name === 'still works', { server });
    good.unsubscribe();
    assert.throws(() => kappa.subscribe('channel_page', { key: 'a', prefix: 'b' }), { code: 'invalid_target' });
  });

  test('after unsubscribe no callback runs, and other subscriptions to the same key still do', async () => {
    let unsubscribedCalls = 0;
    const gone = kappa.subscribe('channel_page', 'u1', () => unsubscribedCalls++);
    const stays = kappa.subscribe('channel_page', 'u1', () => {});
    await Promise.all([gone.ready, stays.ready]);
    const before = unsubscribedCalls;
    gone.unsubscribe();
    assert.equal(gone.status, 'closed');
    await server.produce([events.created('u1', 'after')]);
    await eventually('the remaining subscription to see the change', () => stays.value?.name === 'after', { server });
    assert.equal(unsubscribedCalls, before);
    stays.unsubscribe();
  });

  test('without a WebSocket implementation subscribe says what to pass', { skip: globalThis.WebSocket !== undefined && 'this Node has a global WebSocket' }, () => {
    const bare = new Kappa(server.url);
    assert.throws(() => bare.subscribe('channel_page', 'k', () => {}), (e) => e.code === 'no_websocket' && /'ws' package/.test(e.message));
  });
});
