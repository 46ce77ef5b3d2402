// The page kappa serves at `/`, end to end in headless Chromium (Debian's `chromium`,
// driven by playwright-core): it lists the views with their status and progress, watches a
// key and a prefix chosen in the form, shows each event produced over HTTP, and carries on
// after the server is killed and restarted. The page imports the client from `/kappa.js`,
// so this is also the client running in a real browser.

import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import { after, before, test } from 'node:test';
import { chromium } from 'playwright-core';

import { ChannelsServer, events } from './helpers.js';

const CHROMIUM = process.env.KAPPA_CHROMIUM ?? '/usr/bin/chromium';
const WAIT = { timeout: 20_000 };

let server;
let browser;

before(async () => {
  if (!existsSync(CHROMIUM)) {
    throw new Error(`no Chromium at ${CHROMIUM}: apt-get install chromium (scripts/test-all does), or set KAPPA_CHROMIUM`);
  }
  server = await ChannelsServer.start();
  // --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start.
  browser = await chromium.launch({ executablePath: CHROMIUM, args: ['--no-sandbox'] });
});

after(async () => {
  await browser?.close();
  await server?.stop();
});

/** A new page with every uncaught error and console error recorded. */
async function open(path = '/') {
  const page = await browser.newPage();
  const problems = { pageErrors: [], consoleErrors: [] };
  page.on('pageerror', (e) => problems.pageErrors.push(e.message));
  page.on('console', (m) => m.type() === 'error' && problems.consoleErrors.push(m.text()));
  await page.goto(server.url + path);
  await page.locator('body[data-ready=true]').waitFor(WAIT);
  return { page, problems };
}

const row = (page, key) => page.locator(`#items tr[data-key="${key}"]`);

test('the page lists views, watches a key and a prefix live, and carries on across a server restart', async () => {
  const { page, problems } = await open();

  // Views with their versions, status and progress.
  for (const view of ['channel_page', 'channel_stats', 'owner_channels']) {
    // Each view serves from its own first catch-up; the page refreshes the list.
    const entry = page.locator(`#views tr[data-view="${view}"][data-version="1"][data-status="serving"]`);
    await entry.waitFor(WAIT);
    assert.match(await entry.textContent(), /v1\s*serving\s*100%/);
    assert.equal(await entry.locator('td.active').textContent(), 'v1', 'the active version is marked');
  }
  assert.deepEqual(await page.locator('#view option').allTextContents(), ['channel_page', 'channel_stats', 'owner_channels']);

  // Watch channel_page / c1 through the form.
  await page.selectOption('#view', 'channel_page');
  await page.check('input[name=mode][value=key]');
  await page.fill('#target', 'c1');
  await page.click('#watch');
  await page.locator('#sub-status[data-status=live]').waitFor(WAIT);
  await page.locator('#items td.empty', { hasText: "key 'c1' does not exist" }).waitFor(WAIT);
  assert.equal(await page.locator('#connection').getAttribute('data-status'), 'open');

  await server.produce([events.created('c1', 'first channel')]);
  await row(page, 'c1').filter({ hasText: '"first channel"' }).waitFor(WAIT);
  await server.produce([events.contentV2('c1', 'a1', 'Hello', 'from the test')]);
  await row(page, 'c1').filter({ hasText: '"from the test"' }).waitFor(WAIT);
  await server.produce([events.deleted('c1')]);
  await page.locator('#items td.empty', { hasText: "key 'c1' does not exist" }).waitFor(WAIT);
  await page.locator('#changes li', { hasText: 'deleted c1' }).waitFor(WAIT);
  assert.match(page.url(), /\?view=channel_page&key=c1$/, 'the address remembers the watch');

  // A prefix of channel_stats.
  await page.selectOption('#view', 'channel_stats');
  await page.check('input[name=mode][value=prefix]');
  await page.fill('#target', 'pc-');
  await page.click('#watch');
  await page.locator('#sub-status[data-status=live]').waitFor(WAIT);
  await server.produce([events.created('pc-1', 'one'), events.created('pc-2', 'two'), events.created('other', 'not shown')]);
  await row(page, 'pc-2').waitFor(WAIT);
  await row(page, 'pc-1').waitFor(WAIT);
  await server.produce([events.contentV1('pc-1', 'x', 'text')]);
  await row(page, 'pc-1').filter({ hasText: '"contentCount": 1' }).waitFor(WAIT);
  assert.equal(await page.locator('#items tr[data-key]').count(), 2, 'only keys under the prefix');

  // Kill the server: the page shows the connection closed, then resumes once it is back.
  await server.kill9();
  await page.locator('#connection[data-status=closed]').waitFor(WAIT);
  // The views list is read again every few seconds, and says when it cannot be.
  await page.locator('#views-note.error', { hasText: 'cannot read /v1/views' }).waitFor(WAIT);
  await server.restart();
  await page.locator('#connection[data-status=open]').waitFor(WAIT);
  await page.locator('#views-note:not(.error)', { hasText: 'updated' }).waitFor(WAIT);
  await server.produce([events.contentV1('pc-2', 'y', 'after the restart')]);
  await row(page, 'pc-2').filter({ hasText: '"contentCount": 1' }).waitFor(WAIT);
  assert.equal(await page.locator('#changes li', { hasText: 'resync' }).count(), 0, 'resumed from its token, no fresh snapshot');
  assert.equal(await page.locator('#changes li', { hasText: 'snapshot' }).count(), 1);

  assert.deepEqual(problems.pageErrors, []);
  // While the server was down the browser logs failed connections; nothing else.
  const unexpected = problems.consoleErrors.filter((m) => !/WebSocket connection|Failed to load resource|ERR_CONNECTION_REFUSED/.test(m));
  assert.deepEqual(unexpected, []);
  await page.close();
});

test('a link with ?view=&key= opens watching that key, and errors show in the page', async () => {
  await server.produce([events.created('d1', 'deep link')]);
  const { page, problems } = await open('/?view=channel_page&key=d1');
  await row(page, 'd1').filter({ hasText: '"deep link"' }).waitFor(WAIT);
  assert.equal(await page.inputValue('#target'), 'd1');

  // A prefix that matches more than the server's snapshot limit would fail; an unknown view is simpler.
  await page.goto(`${server.url}/?view=no_such_view&key=k`);
  await page.locator('#sub-status[data-status=failed]', { hasText: 'unknown_view' }).waitFor(WAIT);
  assert.deepEqual(problems.pageErrors, []);
  await page.close();
});
