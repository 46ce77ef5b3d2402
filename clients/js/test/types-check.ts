// Compiled (not run) by types.test.js with `tsc --strict`: the declarations in kappa.d.ts
// describe the API as the README uses it, and reject what the client rejects.
import { Kappa, KappaError, type ChangeEvent, type Subscription, type ViewInfo } from '../kappa.js';

interface ChannelPage {
  channelId: string;
  name: string | null;
  ownerId: string | null;
  content: Record<string, { title: string | null; body: string | null }>;
}

export async function use(WebSocketImpl: any): Promise<void> {
  const kappa = new Kappa('http://127.0.0.1:8080', { WebSocket: WebSocketImpl, backoff: { initialMs: 100, jitter: 0 } });
  kappa.on('status', (status, detail) => {
    const s: 'idle' | 'connecting' | 'open' | 'closed' = status;
    const retry: number | null | undefined = detail.retryInMs;
    void s, retry;
  });

  const page: Subscription<ChannelPage, ChannelPage | undefined> = kappa.subscribe<ChannelPage>('channel_page', 'c1', (value, event) => {
    const name: string | null | undefined = value?.name;
    if (event.type === 'change') {
      const key: string = event.key;
      const deleted: boolean = event.deleted;
      void key, deleted;
    } else {
      const resync: boolean = event.resync;
      void resync;
    }
    void name;
  });
  await page.ready;
  const token: string | null = page.token;
  page.unsubscribe();

  const stats = kappa.subscribe<{ contentCount: number }>('channel_stats', { prefix: 'c' }, (items) => {
    const count: number | undefined = items.get('c1')?.contentCount;
    void count;
  }, { resume: token ?? undefined, onStatus: (status) => status === 'resync' });
  stats.on('change', (_items: Map<string, { contentCount: number }>, _event: ChangeEvent<{ contentCount: number }>) => {});

  const read = await kappa.get<ChannelPage>('channel_page', 'c1');
  const name: string | null | undefined = read?.value.name;
  const pageOfKeys = await kappa.list('channel_page', { prefix: 'c', limit: 10 });
  const cursor: string | null = pageOfKeys.cursor;
  for await (const item of kappa.listAll<ChannelPage>('channel_page', { prefix: 'c' })) {
    const id: string = item.value.channelId;
    void id;
  }
  const views: ViewInfo[] = await kappa.views();
  const progress: number = views[0].versions[0].progress;
  const offsets = await kappa.produce('channels', [{ key: 'c1', value: null, headers: { contentId: 'a' } }]);
  // @ts-expect-error: a record names its value (null for a tombstone); the server refuses one without
  await kappa.produce('channels', [{ key: 'c1' }]);
  const offset: number = offsets[0].offset;
  // Read your own writes: the produce answer goes straight back, or as strings.
  await kappa.get<ChannelPage>('channel_page', 'c1', { afterOffsets: offsets, waitMs: 1000 });
  await kappa.list('channel_page', { prefix: 'c', afterOffsets: ['channels:0:41'] });
  // @ts-expect-error an offset names its topic and partition
  await kappa.get('channel_page', 'c1', { afterOffsets: [41] });
  try {
    await kappa.get('nope', 'k');
  } catch (e) {
    if (e instanceof KappaError) {
      const code: string = e.code;
      const behind: number | undefined = e.details?.behind?.[0]?.position;
      void code, behind;
    }
  }
  void name, cursor, progress, offset;

  // @ts-expect-error a subscription follows a key or a prefix, not a number
  kappa.subscribe('channel_page', 42, () => {});
  // @ts-expect-error a prefix subscription's onChange gets a Map, not a value
  kappa.subscribe<ChannelPage>('channel_page', { prefix: 'c' }, (value: ChannelPage | undefined) => value);
  kappa.close();
}
