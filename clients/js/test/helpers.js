// Test helpers: a real `channels serve` (the example application in crates/kappa/examples)
// on a temp data directory and free loopback ports, that can be killed with SIGKILL and
// started again on the same directory and ports; producing channel events over HTTP; and
// waiting for a condition with a generous deadline.

import { spawn } from 'node:child_process';
import { existsSync, mkdtempSync, openSync, readFileSync, rmSync, closeSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));
const repo = resolve(here, '../../..');

/** The channels example binary: $KAPPA_CHANNELS_BIN, else the cargo build directory's. */
export function channelsBinary() {
  const explicit = process.env.KAPPA_CHANNELS_BIN;
  const candidates = explicit
    ? [explicit]
    : [process.env.CARGO_TARGET_DIR, join(repo, 'target'), '/var/tmp/kappa-target']
        .filter(Boolean)
        .map((dir) => join(dir, 'debug/examples/channels'));
  const found = candidates.find((path) => existsSync(path));
  if (!found) {
    throw new Error(`the channels example is missing (looked at ${candidates.join(', ')}): run \`cargo build -p kappa --examples\` or set KAPPA_CHANNELS_BIN`);
  }
  return found;
}

/** A loopback port nobody listens on right now. */
export function freePort() {
  return new Promise((resolvePort, reject) => {
    const server = createServer();
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address();
      server.close(() => resolvePort(port));
    });
  });
}

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Polls `check` (sync or async; a truthy result ends the wait) until `timeoutMs`; the error says what was awaited. */
export async function eventually(what, check, { timeoutMs = 20_000, intervalMs = 25, server } = {}) {
  const deadline = Date.now() + timeoutMs;
  let last;
  for (;;) {
    try {
      const result = await check();
      if (result) return result;
    } catch (e) {
      last = e;
    }
    if (Date.now() > deadline) {
      const log = server ? `\n--- server log (tail) ---\n${server.logTail()}` : '';
      throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}${last ? ` (last error: ${last.message})` : ''}${log}`);
    }
    await sleep(intervalMs);
  }
}

/** A running `channels serve`. */
export class ChannelsServer {
  static async start() {
    const server = new ChannelsServer();
    server.kafkaPort = await freePort();
    server.httpPort = await freePort();
    await server.spawn();
    return server;
  }

  constructor() {
    this.binary = channelsBinary();
    this.root = mkdtempSync(join(tmpdir(), 'kappa-js-'));
    this.dataDir = join(this.root, 'data');
    this.logPath = join(this.root, 'server.log');
    this.child = null;
    this.starts = 0;
  }

  get url() {
    return `http://127.0.0.1:${this.httpPort}`;
  }

  async spawn() {
    if (this.child) throw new Error('the server is running; kill it first');
    this.starts++;
    const log = openSync(this.logPath, 'a');
    const child = spawn(
      this.binary,
      ['serve', '--data-dir', this.dataDir, '--kafka-listen', `127.0.0.1:${this.kafkaPort}`, '--http-listen', `127.0.0.1:${this.httpPort}`],
      { stdio: ['ignore', 'ignore', log], env: { ...process.env, RUST_LOG: process.env.RUST_LOG ?? 'info' } },
    );
    closeSync(log);
    this.child = child;
    this.exited = new Promise((r) => child.once('exit', (code, signal) => r({ code, signal })));
    let exited = null;
    this.exited.then((status) => (exited = status));
    await eventually(
      'the channels views to serve',
      async () => {
        if (exited) throw new Error(`channels serve exited (${JSON.stringify(exited)}) before serving`);
        const response = await fetch(`${this.url}/v1/views`);
        if (!response.ok) return false;
        const { views } = await response.json();
        const serving = views.filter((v) => v.versions.some((version) => version.status === 'serving')).map((v) => v.name);
        return ['channel_page', 'channel_stats', 'owner_channels'].every((name) => serving.includes(name));
      },
      { timeoutMs: 30_000, server: this },
    );
  }

  /** SIGKILL: a crash. Resolves when the process is gone. */
  async kill9() {
    if (!this.child) return;
    const child = this.child;
    this.child = null;
    child.kill('SIGKILL');
    await this.exited;
  }

  /** Starts again on the same data directory and ports. */
  async restart() {
    await this.spawn();
  }

  /** Kills the server and removes its directory. */
  async stop() {
    await this.kill9();
    rmSync(this.root, { recursive: true, force: true });
  }

  logTail(lines = 40) {
    try {
      return readFileSync(this.logPath, 'utf8').split('\n').slice(-lines).join('\n');
    } catch {
      return '(no log)';
    }
  }

  /** POST /v1/topics/channels/records; throws with the server's error. */
  async produce(records) {
    const response = await fetch(`${this.url}/v1/topics/channels/records`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ records }),
    });
    const body = await response.json();
    if (!response.ok) throw new Error(`produce answered ${response.status}: ${JSON.stringify(body)}`);
    return body.offsets;
  }
}

// The channels application's events (crates/kappa/src/channels.rs).
const typed = (type, version = '1') => ({ 'kappa.type': type, 'kappa.version': version });

export const events = {
  created: (channelId, name, ownerId = 'u1') => ({ key: channelId, value: { channelId, name, ownerId }, headers: typed('ChannelCreated') }),
  updated: (channelId, name, ownerId = 'u1') => ({ key: channelId, value: { channelId, name, ownerId }, headers: typed('ChannelUpdated') }),
  /** v1 content: `{"op":"added","text"}`, upcast by the server to v2. */
  contentV1: (channelId, contentId, text) => ({
    key: channelId,
    value: { channelId, contentId, op: 'added', text },
    headers: { ...typed('ChannelContentMutated'), contentId },
  }),
  contentV2: (channelId, contentId, title, body) => ({
    key: channelId,
    value: { channelId, contentId, action: 'upsert', content: { title, body } },
    headers: { ...typed('ChannelContentMutated', '2'), contentId },
  }),
  /** A tombstone with a contentId header removes that content item. */
  contentRemoved: (channelId, contentId) => ({ key: channelId, value: null, headers: { contentId } }),
  /** A tombstone without contentId deletes the channel. */
  deleted: (channelId) => ({ key: channelId, value: null }),
};
