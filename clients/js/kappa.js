// kappa-client: live views of a kappa server, for browsers and Node >= 20.
//
// One `Kappa` per server holds one WebSocket (`/v1/ws`) shared by every subscription, and
// reads over HTTP with `fetch`. A subscription keeps a local copy of one view key or of
// every key under a prefix: a snapshot, then each change in changelog order. When the
// connection drops, the client reconnects with exponential backoff and resumes every
// subscription from its last token, so it receives exactly the changes it missed; when the
// server cannot replay from that token (another view version serves, the changelog was
// compacted) it sends `reset` and a fresh snapshot, which replaces the local copy.
//
// No dependencies in browsers. In Node < 22 there is no global WebSocket: pass one, e.g.
// `new Kappa(url, { WebSocket: (await import('ws')).WebSocket })`.

/**
 * Adds a read's `after_offsets` (and `wait_ms`) to `query`: offsets as `{topic, partition,
 * offset}` or `'topic:partition:offset'`. An empty list (a produce of nothing) adds nothing:
 * there is nothing to wait for.
 */
function setAfterOffsets(query, afterOffsets, waitMs) {
  if (afterOffsets != null) {
    if (afterOffsets.length === 0) return;
    const list = afterOffsets.map((o) => (typeof o === 'string' ? o : `${o.topic}:${o.partition}:${o.offset}`));
    query.set('after_offsets', list.join(','));
  }
  if (waitMs != null) query.set('wait_ms', String(waitMs));
}

/** An error from the server (its stable `code` and message) or from the client itself. */
export class KappaError extends Error {
  constructor(code, message, details = {}) {
    super(message, details.cause === undefined ? undefined : { cause: details.cause });
    this.name = 'KappaError';
    /** The server's stable error code (`unknown_view`, `snapshot_too_large`, ...) or the client's (`unreachable`, `no_websocket`, `bad_response`). */
    this.code = code;
    /** The HTTP status, for HTTP requests. */
    this.status = details.status;
    /** The server's whole `error` object (`view_behind` adds `view`, `version`, `waited_ms`, `behind`). */
    this.details = details.body;
  }
}

const DEFAULT_BACKOFF = { initialMs: 250, maxMs: 10_000, factor: 2, jitter: 0.2 };

/**
 * Subscription errors worth trying again after a pause: the server or the view is not
 * ready, or storage failed for a moment. Anything else (unknown view, prefix too large,
 * too many subscriptions) ends the subscription with that error.
 */
const RETRYABLE_CODES = new Set(['view_not_ready', 'storage_failed', 'log_error', 'view_error', 'internal']);

/** A minimal event emitter: `on(name, fn)` returns a function that removes `fn`. */
class Emitter {
  #listeners = new Map();

  on(name, fn) {
    if (!this.#listeners.has(name)) this.#listeners.set(name, new Set());
    this.#listeners.get(name).add(fn);
    return () => this.off(name, fn);
  }

  off(name, fn) {
    this.#listeners.get(name)?.delete(fn);
  }

  _emit(name, ...args) {
    for (const fn of [...(this.#listeners.get(name) ?? [])]) {
      try {
        fn(...args);
      } catch (e) {
        // A listener's bug must not break the client; surface it as an uncaught error.
        setTimeout(() => {
          throw e;
        });
      }
    }
  }
}

/**
 * `"<version>.<changelog id>.<offset>"` → `{version, history, offset}`, or null. `history` is
 * everything before the last dot: offsets compare only within one history (a changelog
 * deleted and created again gets another id and counts offsets from 0 again). Tokens of
 * older servers (`"<version>.<offset>"`) parse too; work-mode tokens (an offset per
 * partition) do not, so they are never compared.
 */
function parseToken(token) {
  if (typeof token !== 'string') return null;
  const dot = token.lastIndexOf('.');
  if (dot < 0) return null;
  const history = token.slice(0, dot);
  const version = Number(history.split('.')[0]);
  const offset = Number(token.slice(dot + 1));
  return Number.isInteger(version) && Number.isInteger(offset) ? { version, history, offset } : null;
}

/** Whether a change at `token` is already in a copy at `have`: only within one history. */
function alreadyApplied(token, have) {
  const change = parseToken(token);
  const copy = parseToken(have);
  return change !== null && copy !== null && change.history === copy.history && change.offset <= copy.offset;
}

/** `http(s)://host[/base]` → `ws(s)://host[/base]/v1/ws`. */
function httpToWs(base) {
  return base.replace(/^http/, 'ws') + '/v1/ws';
}

/** A client for one kappa server. */
export class Kappa extends Emitter {
  /**
   * @param {string} [url] the server's HTTP address, e.g. `http://127.0.0.1:8080`; in a
   *   browser it defaults to the page's origin.
   * @param {object} [options] see kappa.d.ts (`WebSocket`, `fetch`, `wsUrl`, `backoff`).
   */
  constructor(url, options = {}) {
    super();
    const base = url ?? globalThis.location?.origin;
    if (!base) throw new KappaError('invalid_url', 'give the server address, e.g. new Kappa("http://127.0.0.1:8080")');
    this.url = new URL(base).href.replace(/\/$/, '');
    if (!/^https?:/.test(this.url)) throw new KappaError('invalid_url', `the server address must be http(s)://..., not ${base}`);
    this.wsUrl = options.wsUrl ?? httpToWs(this.url);
    this._WebSocket = options.WebSocket ?? globalThis.WebSocket;
    this._fetch = options.fetch ?? globalThis.fetch?.bind(globalThis);
    this.backoff = { ...DEFAULT_BACKOFF, ...(options.backoff ?? {}) };
    /** `idle` (no connection needed yet), `connecting`, `open`, `closed` (dropped; a retry is scheduled unless the client was closed). */
    this.status = 'idle';
    this._ws = null;
    this._attempt = 0;
    this._reconnectTimer = null;
    this._closed = false;
    this._subscriptions = new Set();
    this._wire = new Map(); // wire id → subscription
    this._nextWireId = 0;
  }

  // ---- HTTP reads -------------------------------------------------------------------

  async _request(method, path, body) {
    if (!this._fetch) throw new KappaError('no_fetch', 'no fetch implementation: pass options.fetch');
    let response;
    try {
      response = await this._fetch(this.url + path, {
        method,
        headers: body === undefined ? {} : { 'content-type': 'application/json' },
        body: body === undefined ? undefined : JSON.stringify(body),
      });
    } catch (e) {
      throw new KappaError('unreachable', `${method} ${this.url}${path} failed: ${e.message}`, { cause: e });
    }
    const text = await response.text();
    let json;
    try {
      json = text ? JSON.parse(text) : null;
    } catch (e) {
      throw new KappaError('bad_response', `${method} ${path} answered ${response.status} with non-JSON: ${text.slice(0, 200)}`, { status: response.status });
    }
    if (!response.ok) {
      const error = json?.error ?? {};
      throw new KappaError(error.code ?? 'http_error', error.message ?? `${method} ${path} answered ${response.status}`, { status: response.status, body: json?.error });
    }
    return json;
  }

  /**
   * The current value of one view key: `{key, value, position, version}`, or null when the
   * key does not exist. `asOf` (an RFC 3339 time or `topic/partition=offset,...`) reads the
   * past (then `position` is the input offsets). `afterOffsets` (what `produce` answered:
   * `[{topic, partition, offset}]`, or `'topic:partition:offset'` strings) waits up to
   * `waitMs` (server default 5000, at most 30000) until the view has applied them: read
   * your own writes (an empty list waits for nothing). A view still behind then fails with
   * code `view_behind` (status 504; `error.details.behind` says where it is): read again. An
   * offset its partition never wrote fails with `offset_not_written` (status 400).
   */
  async get(view, key, { asOf, afterOffsets, waitMs } = {}) {
    const query = new URLSearchParams();
    if (asOf !== undefined) query.set('as_of', asOf);
    setAfterOffsets(query, afterOffsets, waitMs);
    // Not `query.size`: older browsers and Node releases lack it.
    const search = query.toString() === '' ? '' : `?${query}`;
    try {
      return await this._request('GET', `/v1/views/${encodeURIComponent(view)}/keys/${encodeURIComponent(key)}${search}`);
    } catch (e) {
      if (e instanceof KappaError && e.code === 'unknown_key') return null;
      throw e;
    }
  }

  /** One page of keys in order: `{items:[{key,value}], cursor, position, version}`; pass `cursor` as `after` for the next page (null: no more). `afterOffsets` and `waitMs` as for `get`. */
  list(view, { prefix = '', after, limit, afterOffsets, waitMs } = {}) {
    const query = new URLSearchParams({ prefix });
    if (after != null) query.set('after', after);
    if (limit != null) query.set('limit', String(limit));
    setAfterOffsets(query, afterOffsets, waitMs);
    return this._request('GET', `/v1/views/${encodeURIComponent(view)}/keys?${query}`);
  }

  /** Every `{key, value}` under `prefix`, page by page. Pages are read at different moments; for a consistent copy, subscribe. */
  async *listAll(view, { prefix = '', pageSize = 1000 } = {}) {
    let after;
    for (;;) {
      const page = await this.list(view, { prefix, after, limit: pageSize });
      yield* page.items;
      if (page.cursor == null) return;
      after = page.cursor;
    }
  }

  /** Every view with its versions, status, lag and rebuild progress (`GET /v1/views`). */
  async views() {
    return (await this._request('GET', '/v1/views')).views;
  }

  /** Appends records to a topic over HTTP: `[{key, value, headers?, partition?, expected_offset?}]` → `[{topic, partition, offset}]`. */
  async produce(topic, records) {
    const { offsets } = await this._request('POST', `/v1/topics/${encodeURIComponent(topic)}/records`, { records });
    // With the topic, so the answer can be passed straight to a read's `afterOffsets`.
    return offsets.map((o) => (o == null ? o : { topic, ...o }));
  }

  // ---- subscriptions ----------------------------------------------------------------

  /**
   * Follows one key (`target` a string or `{key}`) or every key under a prefix
   * (`{prefix}`) of a view. `onChange(current, event)` runs after the local copy changed:
   * `current` is the key's value (undefined when absent) or, for a prefix, the Map of
   * key → value. Options: `resume` (a token to continue from, with `initial`: the copy it
   * belongs to), `onStatus`, `onError`.
   */
  subscribe(view, target, onChange, options = {}) {
    if (this._closed) throw new KappaError('closed', 'this client was closed; create a new one');
    if (!this._WebSocket) {
      throw new KappaError(
        'no_websocket',
        "no WebSocket implementation: this runtime has no global WebSocket (Node < 22); pass one: new Kappa(url, { WebSocket }) with WebSocket from the 'ws' package",
      );
    }
    const subscription = new Subscription(this, view, target, onChange, options);
    this._subscriptions.add(subscription);
    if (this._ws?.readyState === 1) this._send(subscription);
    else this._connect();
    return subscription;
  }

  /** Closes the connection and ends every subscription. */
  close() {
    this._closed = true;
    clearTimeout(this._reconnectTimer);
    for (const subscription of [...this._subscriptions]) subscription.unsubscribe();
    const ws = this._ws;
    this._ws = null;
    if (ws) {
      ws.onopen = ws.onmessage = ws.onerror = ws.onclose = null;
      try {
        ws.close(1000, 'client closed');
      } catch {
        // Not yet open: closing is all we wanted.
      }
    }
    this._setStatus('closed', { final: true });
  }

  _setStatus(status, detail = {}) {
    this.status = status;
    this._emit('status', status, detail);
  }

  _connect() {
    if (this._ws || this._closed || this._reconnectTimer) return;
    this._setStatus('connecting', { attempt: this._attempt + 1, url: this.wsUrl });
    let ws;
    try {
      ws = new this._WebSocket(this.wsUrl);
    } catch (e) {
      this._emit('error', new KappaError('unreachable', `cannot open ${this.wsUrl}: ${e.message}`, { cause: e }));
      this._dropped(1006, e.message);
      return;
    }
    this._ws = ws;
    ws.onopen = () => {
      this._setStatus('open', { url: this.wsUrl });
      for (const subscription of this._subscriptions) {
        if (!subscription._retryTimer) this._send(subscription);
      }
    };
    ws.onmessage = (event) => {
      // The backoff starts over once the server answers, not at open: a server that
      // accepts and then cuts the connection (slow_consumer) is not retried at full speed.
      this._attempt = 0;
      this._receive(event.data);
    };
    ws.onerror = () => {}; // a close event follows with what we can know
    ws.onclose = (event) => {
      if (this._ws !== ws) return;
      this._ws = null;
      this._dropped(event.code, event.reason);
    };
  }

  /** The connection is gone: forget the wire ids and try again later if anyone listens. */
  _dropped(code, reason) {
    this._ws = null;
    this._wire.clear();
    for (const subscription of this._subscriptions) {
      subscription._wireId = null;
      subscription._setStatus('connecting');
    }
    if (this._closed) return;
    const retryInMs = this._subscriptions.size > 0 ? this._delay(this._attempt++) : null;
    this._setStatus('closed', { code, reason, retryInMs });
    if (retryInMs !== null) {
      this._reconnectTimer = setTimeout(() => {
        this._reconnectTimer = null;
        this._connect();
      }, retryInMs);
    }
  }

  _delay(attempt) {
    const { initialMs, maxMs, factor, jitter } = this.backoff;
    const base = Math.min(maxMs, initialMs * factor ** attempt);
    return Math.round(base * (1 - jitter + 2 * jitter * Math.random()));
  }

  /** Sends a subscribe for `subscription` under a fresh wire id (a retry never collides with the server's record of an earlier attempt). */
  _send(subscription) {
    const id = `s${++this._nextWireId}`;
    subscription._wireId = id;
    this._wire.set(id, subscription);
    const message = { op: 'subscribe', id, view: subscription.view, ...subscription._target };
    if (subscription.token) message.resume = subscription.token;
    this._ws.send(JSON.stringify(message));
    // A resumed subscription gets no acknowledgement, only the changes it missed.
    if (subscription.token && subscription.status !== 'resync') subscription._setStatus('live');
  }

  _unsubscribe(subscription) {
    this._subscriptions.delete(subscription);
    const id = subscription._wireId;
    if (id) {
      this._wire.delete(id);
      if (this._ws?.readyState === 1) this._ws.send(JSON.stringify({ op: 'unsubscribe', id }));
    }
  }

  _receive(data) {
    const text = typeof data === 'string' ? data : new TextDecoder().decode(data);
    let message;
    try {
      message = JSON.parse(text);
    } catch {
      this._emit('error', new KappaError('bad_response', `the server sent a message that is not JSON: ${text.slice(0, 200)}`));
      return;
    }
    if (message.id == null) {
      // A connection-level error (slow_consumer, invalid_message, ...); a close may follow.
      if (message.type === 'error') this._emit('error', new KappaError(message.code, message.message));
      return;
    }
    const subscription = this._wire.get(message.id);
    if (!subscription) return; // an answer to a subscription we already left
    switch (message.type) {
      case 'snapshot':
        subscription._snapshot(message);
        break;
      case 'change':
        subscription._change(message);
        break;
      case 'reset':
        subscription._reset(message.reason);
        break;
      case 'error':
        this._wire.delete(message.id);
        subscription._wireId = null;
        subscription._failed(new KappaError(message.code, message.message));
        break;
      default:
        this._emit('error', new KappaError('bad_response', `unknown message type ${JSON.stringify(message.type)}`));
    }
  }
}

/** A live copy of one key or one prefix of a view. */
export class Subscription extends Emitter {
  constructor(client, view, target, onChange, options) {
    super();
    if (typeof target === 'string') target = { key: target };
    const hasKey = typeof target?.key === 'string';
    const hasPrefix = typeof target?.prefix === 'string';
    if (hasKey === hasPrefix) throw new KappaError('invalid_target', 'subscribe to a key ("c1" or {key: "c1"}) or a prefix ({prefix: "c"}), not both');
    this.client = client;
    this.view = view;
    this.key = hasKey ? target.key : undefined;
    this.prefix = hasPrefix ? target.prefix : undefined;
    this._target = hasKey ? { key: target.key } : { prefix: target.prefix };
    /** key → value of every key this subscription covers that exists. */
    this.items = new Map(options.initial === undefined ? [] : hasKey ? [[target.key, options.initial]] : options.initial);
    /** The position of the local copy: `"<version>.<changelog id>.<offset>"`, sent as `resume` on reconnect. */
    this.token = options.resume ?? null;
    /** The view version the copy comes from. */
    this.version = parseToken(this.token)?.version ?? null;
    /** `connecting`, `live`, `resync` (a reset arrived; a fresh snapshot follows), `failed`, `closed`. */
    this.status = 'connecting';
    /** The error that ended the subscription, when `status` is `failed`. */
    this.error = null;
    /** Counters: snapshots, changes, resets, retries, and changes dropped as already applied (always 0 unless the server repeats itself). */
    this.stats = { snapshots: 0, changes: 0, resets: 0, retries: 0, duplicatesDropped: 0 };
    this._wireId = null;
    this._retryTimer = null;
    this._retries = 0;
    this._replaces = options.resume != null; // whether a snapshot replaces an existing copy
    if (onChange) this.on('change', onChange);
    if (options.onStatus) this.on('status', options.onStatus);
    if (options.onError) this.on('error', options.onError);
    let settle;
    /** Resolves when the copy is first complete (the first snapshot, or a resume was sent); rejects if the subscription fails first. */
    this.ready = new Promise((resolve, reject) => {
      settle = { resolve, reject };
    });
    this.ready.catch(() => {}); // a subscriber that never awaits `ready` must not see an unhandled rejection
    this._settle = settle;
  }

  /** The key's current value (undefined when absent); for a key subscription. */
  get value() {
    return this.key === undefined ? undefined : this.items.get(this.key);
  }

  /** Stops following; no callback runs after this. */
  unsubscribe() {
    if (this.status === 'closed') return;
    clearTimeout(this._retryTimer);
    this.client._unsubscribe(this);
    this._setStatus('closed');
    this._settle.reject(new KappaError('closed', 'unsubscribed before the first snapshot'));
  }

  _current() {
    return this.key === undefined ? this.items : this.items.get(this.key);
  }

  _setStatus(status, detail = {}) {
    if (this.status === status || this.status === 'closed' || this.status === 'failed') return;
    this.status = status;
    if (status === 'live') this._settle.resolve(this);
    this._emit('status', status, detail);
  }

  _snapshot(message) {
    const resync = this._replaces;
    this._replaces = true;
    this.items = new Map(message.items.map((item) => [item.key, item.value]));
    this.token = message.token;
    this.version = message.version;
    this.stats.snapshots++;
    this._retries = 0;
    this._setStatus('live');
    this._emit('change', this._current(), { type: 'snapshot', token: message.token, version: message.version, resync });
  }

  _change(message) {
    if (alreadyApplied(message.token, this.token)) {
      this.stats.duplicatesDropped++;
      return;
    }
    const version = parseToken(message.token)?.version;
    if (message.value === null) this.items.delete(message.key);
    else this.items.set(message.key, message.value);
    this.token = message.token;
    this.version = version ?? this.version;
    this.stats.changes++;
    this._retries = 0;
    this._emit('change', this._current(), { type: 'change', key: message.key, value: message.value ?? undefined, deleted: message.value === null, token: message.token });
  }

  _reset(reason) {
    // Keep showing the old copy until the fresh snapshot replaces it; drop its position, which
    // may be in another history than what follows.
    this.token = null;
    this.stats.resets++;
    this._setStatus('resync', { reason });
  }

  _failed(error) {
    if (error.code === 'invalid_token') {
      // Our token means nothing to this server: start over from a snapshot.
      this.token = null;
      this._retryLater(error);
      return;
    }
    if (RETRYABLE_CODES.has(error.code)) {
      this._retryLater(error);
      return;
    }
    this.error = error;
    this.client._subscriptions.delete(this);
    this._setStatus('failed', { error });
    this._settle.reject(error);
    this._emit('error', error);
  }

  _retryLater(error) {
    this.stats.retries++;
    const delay = this.client._delay(this._retries++);
    this._setStatus('connecting', { error, retryInMs: delay });
    this._retryTimer = setTimeout(() => {
      this._retryTimer = null;
      if (this.status !== 'closed' && this.client._ws?.readyState === 1) this.client._send(this);
    }, delay);
  }
}
