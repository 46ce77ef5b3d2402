// Types for kappa.js. See README.md for the protocol and the guarantees.

/** A JSON value as a view stores it. */
export type Json = null | boolean | number | string | Json[] | { [key: string]: Json };

/** A position in one incarnation of a view version's changelog: `"<version>.<changelog id>.<offset>"`. */
export type Token = string;

export declare class KappaError extends Error {
  /** The server's stable code (`unknown_view`, `snapshot_too_large`, `slow_consumer`, ...) or the client's (`unreachable`, `bad_response`, `no_websocket`, `no_fetch`, `invalid_target`, `invalid_url`, `closed`). */
  readonly code: string;
  /** The HTTP status, for errors from HTTP requests. */
  readonly status?: number;
  /** The server's whole `error` object, for errors from HTTP requests (`view_behind` adds `view`, `version`, `waited_ms` and `behind`). */
  readonly details?: { code: string; message: string; behind?: { topic: string; partition: number; offset: number; position: number }[]; [field: string]: Json | undefined };
}

/** An offset a produce answered: `{topic, partition, offset}` (what `produce` returns) or `'topic:partition:offset'`. */
export type InputOffset = { topic: string; partition: number; offset: number } | string;

/** Read your own writes: wait up to `waitMs` (server default 5000, at most 30000) until the view has applied these offsets (an empty list waits for nothing). A view still behind then fails with `view_behind` (status 504); an offset its partition never wrote with `offset_not_written` (status 400). */
export interface ReadAfter {
  afterOffsets?: InputOffset[];
  waitMs?: number;
}

/** Something that constructs a browser-compatible WebSocket (the `ws` package's `WebSocket` in Node < 22). */
export type WebSocketConstructor = new (url: string) => {
  readyState: number;
  send(data: string): void;
  close(code?: number, reason?: string): void;
  onopen: ((event: unknown) => void) | null;
  onmessage: ((event: { data: unknown }) => void) | null;
  onerror: ((event: unknown) => void) | null;
  onclose: ((event: { code: number; reason: string }) => void) | null;
};

export interface Backoff {
  /** First delay before reconnecting, in ms (default 250). */
  initialMs?: number;
  /** Largest delay, in ms (default 10000). */
  maxMs?: number;
  /** Each failed attempt multiplies the delay by this (default 2). */
  factor?: number;
  /** Random spread, ±fraction of the delay (default 0.2; 0 for none). */
  jitter?: number;
}

export interface KappaOptions {
  /** A WebSocket implementation; defaults to `globalThis.WebSocket`. */
  WebSocket?: WebSocketConstructor;
  /** A fetch implementation; defaults to `globalThis.fetch`. */
  fetch?: typeof fetch;
  /** The subscription endpoint; defaults to the server address with ws(s): and `/v1/ws`. */
  wsUrl?: string;
  backoff?: Backoff;
}

/** Connection status: `idle` until the first subscription, then `connecting` → `open`; `closed` when dropped (a retry follows, `retryInMs`) or after `close()` (`final`). */
export type ConnectionStatus = 'idle' | 'connecting' | 'open' | 'closed';

export interface ConnectionDetail {
  attempt?: number;
  url?: string;
  code?: number;
  reason?: string;
  /** Delay before the next attempt; null when no subscription needs the connection. */
  retryInMs?: number | null;
  /** Set when the client was closed by `close()`. */
  final?: boolean;
}

/** `connecting` (waiting for the connection or the first snapshot), `live`, `resync` (the server sent `reset`; a fresh snapshot follows and replaces the copy), `failed` (see `error`), `closed` (unsubscribed). */
export type SubscriptionStatus = 'connecting' | 'live' | 'resync' | 'failed' | 'closed';

export interface SubscriptionDetail {
  /** Why the server reset the subscription (`resync`). */
  reason?: string;
  /** The error that ended (`failed`) or paused (`connecting`) the subscription. */
  error?: KappaError;
  retryInMs?: number;
}

export type ChangeEvent<T> =
  | { type: 'snapshot'; token: Token; version: number; /** true when it replaced an earlier copy (after a reset or an unusable token) */ resync: boolean }
  | { type: 'change'; key: string; /** undefined when deleted */ value: T | undefined; deleted: boolean; token: Token };

export interface SubscribeOptions<T> {
  /** Continue from this token instead of starting with a snapshot (e.g. a copy saved earlier). */
  resume?: Token;
  /** The copy `resume` belongs to: the key's value, or the prefix's `[key, value]` entries. */
  initial?: T | Iterable<[string, T]>;
  onStatus?: (status: SubscriptionStatus, detail: SubscriptionDetail) => void;
  onError?: (error: KappaError) => void;
}

export interface SubscriptionStats {
  snapshots: number;
  changes: number;
  resets: number;
  /** Subscribe attempts repeated after a retryable server error. */
  retries: number;
  /** Changes at or before the copy's token, ignored (0 unless the server repeats itself). */
  duplicatesDropped: number;
}

export declare class Subscription<T = Json, C = T | undefined> {
  readonly client: Kappa;
  readonly view: string;
  /** The key followed (key subscriptions). */
  readonly key: string | undefined;
  /** The prefix followed (prefix subscriptions). */
  readonly prefix: string | undefined;
  /** key → value of every existing key the subscription covers. */
  readonly items: Map<string, T>;
  /** The key's value, undefined when absent (key subscriptions). */
  readonly value: T | undefined;
  /** The copy's position, sent as `resume` after a reconnect. */
  readonly token: Token | null;
  readonly version: number | null;
  readonly status: SubscriptionStatus;
  readonly error: KappaError | null;
  readonly stats: SubscriptionStats;
  /** Resolves once the copy is complete (first snapshot, or a resume sent); rejects if the subscription fails first. */
  readonly ready: Promise<this>;
  on(event: 'change', fn: (current: C, event: ChangeEvent<T>) => void): () => void;
  on(event: 'status', fn: (status: SubscriptionStatus, detail: SubscriptionDetail) => void): () => void;
  on(event: 'error', fn: (error: KappaError) => void): () => void;
  off(event: 'change' | 'status' | 'error', fn: (...args: any[]) => void): void;
  /** Stops following; no callback runs after this. */
  unsubscribe(): void;
}

export interface ViewVersion {
  version: number;
  /**
   * `serving`, `building`, `ready` (caught up, not serving), `failed` (stopped at an error),
   * `restarting` (waiting to start again after an error that may pass, a full disk), `stopped`
   * (not in this build). A serving version that failed or restarts reads `failed` /
   * `restarting` with `serving: true`: use `serving` to find the version answering reads.
   */
  status: 'serving' | 'building' | 'ready' | 'failed' | 'restarting' | 'stopped';
  phase: string;
  serving: boolean;
  running: boolean;
  /**
   * False once reads were switched away from this version: it then does not take them over
   * by itself when it catches up. Switching to it or retiring it clears that.
   */
  auto_switch: boolean;
  events_applied: number;
  lag: number;
  /** 0..1: events applied / (applied + lag). */
  progress: number;
  rate_per_second: number;
  eta_seconds: number | null;
  positions: Record<string, number>;
  changelog_topic: string;
  changelog_position: number;
  /** Why it stopped (`failed`, `restarting`). */
  error: string | null;
  /** When a `restarting` version starts again, in ms since the epoch. */
  retry_at_ms: number | null;
}

export interface ViewInfo {
  name: string;
  active: number;
  inputs: string[];
  versions: ViewVersion[];
}

export interface KeyRead<T = Json> {
  key: string;
  value: T;
  /** A token (present reads) or the input offsets (`asOf` reads). */
  position: Token | Record<string, number>;
  version?: number;
}

export interface Page<T = Json> {
  items: { key: string; value: T }[];
  /** Pass as `after` for the next page; null when there is none. */
  cursor: string | null;
  position: Token;
  version: number;
}

export interface ProduceRecord {
  key?: string | null;
  /** Any JSON; null is a tombstone. Required: a record without it is refused (400), so a forgotten value never deletes a key. */
  value: Json;
  headers?: Record<string, string | null>;
  partition?: number;
  /** Offset of the key's latest record in its partition, or -1 for none: else the request fails with `offset_mismatch`. */
  expected_offset?: number;
}

export declare class Kappa {
  /** @param url the server's HTTP address; in a browser, defaults to the page's origin. */
  constructor(url?: string, options?: KappaOptions);
  readonly url: string;
  readonly wsUrl: string;
  readonly status: ConnectionStatus;

  /** The current value of a key, or null when absent. */
  get<T = Json>(view: string, key: string, options?: { asOf?: string } & ReadAfter): Promise<KeyRead<T> | null>;
  /** One page of keys in order. */
  list<T = Json>(view: string, options?: { prefix?: string; after?: string | null; limit?: number } & ReadAfter): Promise<Page<T>>;
  /** Every item under a prefix, page by page (not one consistent read: subscribe for that). */
  listAll<T = Json>(view: string, options?: { prefix?: string; pageSize?: number }): AsyncGenerator<{ key: string; value: T }>;
  views(): Promise<ViewInfo[]>;
  produce(topic: string, records: ProduceRecord[]): Promise<{ topic: string; partition: number; offset: number }[]>;

  /** Follows one key of a view: `onChange(value | undefined, event)`. */
  subscribe<T = Json>(
    view: string,
    key: string | { key: string },
    onChange?: (value: T | undefined, event: ChangeEvent<T>) => void,
    options?: SubscribeOptions<T>,
  ): Subscription<T, T | undefined>;
  /** Follows every key under a prefix: `onChange(items, event)` with the live Map of key → value. */
  subscribe<T = Json>(
    view: string,
    target: { prefix: string },
    onChange?: (items: Map<string, T>, event: ChangeEvent<T>) => void,
    options?: SubscribeOptions<T>,
  ): Subscription<T, Map<string, T>>;

  on(event: 'status', fn: (status: ConnectionStatus, detail: ConnectionDetail) => void): () => void;
  /** Connection-level errors the server sent (`slow_consumer`, ...) or unreadable messages. */
  on(event: 'error', fn: (error: KappaError) => void): () => void;
  off(event: 'status' | 'error', fn: (...args: any[]) => void): void;
  /** Closes the connection and ends every subscription (Node exits only once the client is closed). */
  close(): void;
}
