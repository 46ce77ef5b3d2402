// Resume tokens name a changelog's incarnation (`<version>.<changelog id>.<offset>`): the
// client drops a change as already applied only when its token is from the same history as
// the copy's, and forgets its position on `reset`. No server needed: the subscription is fed
// the server's messages directly.

import assert from 'node:assert/strict';
import { test } from 'node:test';

import { Subscription } from '../kappa.js';

const OLD = '00000000000000aa';
const NEW = '00000000000000bb';

function subscription(resume) {
  const client = { _subscriptions: new Set(), _unsubscribe() {}, _delay: () => 0 };
  const changes = [];
  const sub = new Subscription(client, 'v', { prefix: '' }, (_current, event) => changes.push(event), { resume });
  return { sub, changes };
}

test('a change from another changelog history is applied even at a lower offset', () => {
  const { sub, changes } = subscription(`1.${OLD}.500`);
  sub._change({ key: 'k', value: 1, token: `1.${NEW}.3` });
  assert.equal(sub.stats.duplicatesDropped, 0);
  assert.deepEqual(Object.fromEntries(sub.items), { k: 1 });
  assert.equal(sub.token, `1.${NEW}.3`);
  assert.equal(changes.length, 1);
});

test('within one history a change at or before the copy is dropped as a duplicate', () => {
  const { sub } = subscription(`1.${OLD}.500`);
  sub._change({ key: 'k', value: 1, token: `1.${OLD}.500` });
  sub._change({ key: 'k', value: 2, token: `1.${OLD}.12` });
  assert.equal(sub.stats.duplicatesDropped, 2);
  sub._change({ key: 'k', value: 3, token: `1.${OLD}.501` });
  assert.deepEqual(Object.fromEntries(sub.items), { k: 3 });
});

test('a reset forgets the position, so nothing after it is compared with the old history', () => {
  const { sub } = subscription(`1.${OLD}.500`);
  sub._reset('the changelog of version 1 was deleted and created again');
  assert.equal(sub.token, null);
  sub._snapshot({ version: 1, items: [], token: `1.${NEW}.2` });
  sub._change({ key: 'k', value: 7, token: `1.${NEW}.3` });
  assert.equal(sub.stats.duplicatesDropped, 0);
  assert.deepEqual(Object.fromEntries(sub.items), { k: 7 });
});

test('tokens of older servers and of work mode parse as before', () => {
  const { sub } = subscription('2.40');
  assert.equal(sub.version, 2);
  sub._change({ key: 'k', value: 1, token: '2.39' });
  assert.equal(sub.stats.duplicatesDropped, 1, 'an old-format token compares with an old-format copy');
  sub._change({ key: 'k', value: 1, token: `2.${NEW}.39` });
  assert.equal(sub.stats.duplicatesDropped, 1, 'but not with a token that names its changelog');
  const work = subscription('1.5_6').sub;
  work._change({ key: 'k', value: 1, token: '1.4_6' });
  assert.equal(work.stats.duplicatesDropped, 0, 'per-partition tokens are never compared');
});
