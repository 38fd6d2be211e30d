// The client: one WebSocket to a quire server, any number of open documents, each with
// a handle (`edit`, `text`, events). The same shape and rules as the Rust client
// (`src/client/handle.rs`, protocol.md "Keeping every edit"): reconnect with backoff,
// resend the op in flight under its id, compose offline edits, persist before sending.

import { DocState, ProtocolViolation, diff, maxOpBytes } from "./doc.js";
import { Emitter } from "./events.js";
import { DEFAULT_MAX_FRAME, MAX_OPEN_DOCS, decode, encode, type Message, type Patch, type Selection, type WireOp } from "./protocol.js";
import type { PersistedState, Store } from "./store.js";
import { applyPatches, cpLen, mapPosition, toPatches } from "./ot.js";

/** What the client needs of a WebSocket: the browser's, or the `ws` package's in Node. */
export interface WebSocketLike {
  binaryType: string;
  readonly readyState: number;
  send(data: Uint8Array): void;
  close(code?: number, reason?: string): void;
  onopen: ((ev: unknown) => void) | null;
  onmessage: ((ev: { data: unknown }) => void) | null;
  onclose: ((ev: unknown) => void) | null;
  onerror: ((ev: unknown) => void) | null;
}
export type WebSocketConstructor = new (url: string) => WebSocketLike;

export type ConnectionState =
  | { state: "connecting" }
  | { state: "connected" }
  | { state: "disconnected"; attempt: number; retryInMs: number }
  /** Refused for good (`code`: 5, 6, 7, 12, 29 or 31): edits keep applying locally. */
  | { state: "failed"; code: number; message: string }
  | { state: "closed" }
  /** Offline by choice (`goOffline`): edits keep applying and queue until `goOnline`. */
  | { state: "offline" };

export interface ClientOptions {
  /** `ws://host:port/ws`. */
  url: string;
  /**
   * Other nodes of the same cluster, `ws://host:port/ws`: tried in turn when the home
   * node cannot be reached, or answers that no node serves a document now (code 33, as
   * a node cut off from etcd does for every document).
   */
  fallbackUrls?: string[];
  token?: string;
  /** Defaults to `globalThis.WebSocket` (browsers; Node 20 has none: pass `ws`). */
  WebSocket?: WebSocketConstructor;
  store?: Store;
  /** A Ping is sent after this long without sending (the server closes after 60 s). */
  pingIntervalMs?: number;
  /**
   * The connection is dropped after this long without hearing from the server, and so
   * is a handshake not welcomed by then (the next URL is tried, or the same one again
   * without `fallbackUrls`, with backoff).
   */
  deadAfterMs?: number;
  backoffInitialMs?: number;
  backoffMaxMs?: number;
  random?: () => number;
  /** Every frame sent and received (tests, debugging). */
  trace?: (dir: "send" | "recv", message: Message) => void;
}

export interface DocEvents {
  remote: { seq: number; clientId: bigint; localSeq: number; patches: Patch[] };
  ack: { seq: number; localSeq: number };
  presence: { clientId: bigint; selections: Selection[] };
  state: ConnectionState;
  /** The document was rebuilt from a snapshot: `patches` turn the old local text into the new. */
  reloaded: { patches: Patch[] };
}

/** Codes after which reconnecting would only be refused again. */
// Code 32 (the document was deleted) stops the client as the Rust client does: going on
// would put the user's edits into a new document under the same id; whether to open it
// anew is the application's call.
const FATAL_ERRORS = new Set([5, 6, 7, 12, 29, 32]);
const FATAL_REJECTS = new Set([29, 31, 32]);
/** No node serves the document right now (cluster mode): retried after the backoff. */
const UNAVAILABLE = 33;
/**
 * Redirects of one document followed in a row without progress (an ack, or a complete
 * `Open` reply with no op in flight) before the client drops its connections and
 * reconnects with its backoff, which keeps growing until a document makes progress on a
 * connection not dropped for another's lack of it (as the Rust client).
 */
export const MAX_REDIRECTS = 8;

/** `Client.open` with MAX_OPEN_DOCS documents open: close one first (`DocHandle.close`). */
export class TooManyOpenError extends Error {
  readonly max = MAX_OPEN_DOCS;
  constructor() {
    super(`${MAX_OPEN_DOCS} documents are open, the most a connection may; close one first`);
    this.name = "TooManyOpenError";
  }
}

/** A WebSocket to another node, opened on a `Redirect` and kept while it carries a document. */
interface AwayLink {
  url: string;
  ws: WebSocketLike;
  /** Its `Welcome` arrived: documents can be opened on it. */
  ready: boolean;
  maxFrame: number;
  lastSent: number;
}

type OpenState = "closed" | "opening" | "probing" | "open";

export class DocHandle extends Emitter<DocEvents> {
  /** @internal */ doc: DocState;
  /** @internal */ openState: OpenState = "closed";
  /** @internal */ reply: { snapshot: string | null; snapVersion: number; ops: WireOp[] } | null = null;
  /** @internal which op in flight was sent on which connection (each goes once per connection) */
  sent: { gen: number; localSeq: number } | null = null;
  /** @internal */ presence: Selection[] | null = null;
  /** @internal the WebSocket URL of the node a `Redirect` sent it to (null: the home connection) */
  at: string | null = null;
  /** @internal redirects followed since its last progress (see MAX_REDIRECTS) */
  redirects = 0;
  /** @internal "closing": `close` was called, and waits for the edits to be acknowledged */
  closeState: "open" | "closing" | "closed" = "open";
  /** @internal what `close` resolves */
  closers: (() => void)[] = [];
  private waiters: (() => void)[] = [];

  /** @internal */
  constructor(
    readonly id: string,
    private readonly client: Client,
    doc: DocState,
  ) {
    super();
    this.doc = doc;
  }

  /** The local text: the server's with this client's pending edits. */
  text(): string {
    return this.doc.text;
  }

  /** The last server seq applied here. */
  get version(): number {
    return this.doc.version;
  }

  /** Whether edits are waiting for the server's ack. */
  get pending(): boolean {
    return this.doc.hasPending();
  }

  /**
   * Applies patches (code points, each on the result of the previous) to the local text
   * at once and queues them. Throws RangeError if they do not apply. The promise
   * resolves once the edit is persisted (at once without a store).
   */
  edit(patches: readonly Patch[]): Promise<void> {
    if (this.closeState !== "open") throw new Error(`document ${this.id} is closed`);
    this.doc.localEdit(patches);
    const saved = this.client._persist();
    this.client._pump(this);
    return saved;
  }

  /** This client's cursors and selections, in the local text's code points. */
  setPresence(selections: Selection[]): void {
    this.presence = selections;
    if (this.openState === "open") this.client._sendFor(this, { type: "Presence", doc: this.id, selections });
  }

  /**
   * Closes the document: once its edits are acknowledged by the server (at once with
   * none; offline, after the reconnect) the server is told and the client forgets it
   * (its store entry too), and the promise resolves. Edits after `close` throw; a
   * client has at most MAX_OPEN_DOCS documents open, closing ones included.
   * `client.open(id)` before the close is done keeps this handle open (and resolves
   * the promise); after it, opens the document anew.
   */
  close(): Promise<void> {
    return this.client._closeDoc(this);
  }

  /** Resolves when the document is open on a live connection with nothing pending. */
  synced(): Promise<void> {
    if (this.isSynced()) return Promise.resolve();
    return new Promise((resolve) => this.waiters.push(resolve));
  }

  private isSynced(): boolean {
    return this.openState === "open" && !this.doc.hasPending() && this.client.connectionState.state === "connected";
  }

  /** @internal */
  checkWaiters(): void {
    if (this.waiters.length === 0 || !this.isSynced()) return;
    const w = this.waiters;
    this.waiters = [];
    for (const fn of w) fn();
  }
}

export class Client extends Emitter<{ state: ConnectionState }> {
  clientId = 0n;
  connectionState: ConnectionState = { state: "connecting" };
  private readonly docs = new Map<string, DocHandle>();
  private ws: WebSocketLike | null = null;
  /** `url`, then `fallbackUrls`: the home connection goes to `urls[home]`. */
  private readonly urls: string[];
  private home = 0;
  /** The current home connection got its `Welcome`. */
  private welcomed = false;
  /** The connections are being dropped on a code 33 (no node serves a document now). */
  private unavailable = false;
  /** Connections to other nodes (cluster mode), by WebSocket URL. */
  private readonly away = new Map<string, AwayLink>();
  /** Bumped per connection: events of an older socket are ignored. */
  private gen = 0;
  /**
   * Connections lost since the last progress: the reconnect delay doubles with each.
   * Progress is an op acknowledged, or a document served with no op of ours in flight
   * (or, with no document open, a `Welcome`): a server that welcomes and then breaks
   * the connection, or serves a document and tells its op to retry (code 33, as while
   * it is being deleted), is not asked again every `backoffInitialMs`. A connection
   * dropped for a document that makes no progress (code 33, or redirects round in
   * circles) keeps the count it was dialled with, whatever other documents did.
   */
  private attempt = 0;
  /** `attempt` when the current connection was dialled. */
  private attemptAtDial = 0;
  /** The connections are being dropped because a document was redirected round in circles. */
  private redirectLoop = false;
  private maxFrame = DEFAULT_MAX_FRAME;
  /**
   * Above every local seq a document closed so far used (persisted): a document opened
   * anew starts there, whichever it is (op ids are per document; one client-wide floor
   * keeps no list of the documents once open), so that one opened again sends no new op
   * under an id the server remembers (it would refuse each, code 26, one by one).
   */
  private closedLocalSeq = 1;
  private lastSent = 0;
  private lastHeard = 0;
  private nonce = 0n;
  private timer: ReturnType<typeof setInterval> | null = null;
  private retry: ReturnType<typeof setTimeout> | null = null;
  private saving: Promise<void> | null = null;
  private offline = false;
  private dirty = false;
  private readonly opts: Required<Omit<ClientOptions, "url" | "fallbackUrls" | "store" | "trace" | "token" | "WebSocket">> &
    Pick<ClientOptions, "store" | "trace"> & { token: string; WebSocket: WebSocketConstructor };

  private constructor(opts: ClientOptions) {
    super();
    const WS = opts.WebSocket ?? (globalThis as { WebSocket?: WebSocketConstructor }).WebSocket;
    if (!WS) throw new Error("no WebSocket: pass one in the options (in Node, the `ws` package)");
    this.opts = {
      token: opts.token ?? "",
      WebSocket: WS,
      store: opts.store,
      trace: opts.trace,
      pingIntervalMs: opts.pingIntervalMs ?? 15_000,
      deadAfterMs: opts.deadAfterMs ?? 30_000,
      backoffInitialMs: opts.backoffInitialMs ?? 100,
      backoffMaxMs: opts.backoffMaxMs ?? 10_000,
      random: opts.random ?? Math.random,
    };
    // Kept out of `opts`: what is compared with a redirect's URL is the current home.
    this.urls = [opts.url, ...(opts.fallbackUrls ?? [])];
  }

  /**
   * A client, restored from its store if that holds a state (its id, and each
   * document's unacknowledged edits, which it resends), and connecting.
   */
  static async connect(opts: ClientOptions): Promise<Client> {
    const client = new Client(opts);
    const saved = await opts.store?.load();
    if (saved) {
      client.clientId = BigInt(saved.clientId);
      client.closedLocalSeq = Math.max(1, saved.closedLocalSeq ?? 1);
      for (const [id, p] of Object.entries(saved.docs)) {
        client.docs.set(id, new DocHandle(id, client, DocState.restore(p)));
      }
    }
    client.timer = setInterval(() => client.tick(), 1000);
    // In Node, an idle client must not keep the process alive on its own.
    (client.timer as { unref?: () => void }).unref?.();
    client.dial();
    return client;
  }

  /**
   * The handle of document `id`, opening it (or the one restored from the store).
   * Throws TooManyOpenError when MAX_OPEN_DOCS documents are open (closing ones
   * included): close one first.
   */
  open(id: string): DocHandle {
    let handle = this.docs.get(id);
    if (handle?.closeState === "closing") {
      handle.closeState = "open";
      for (const fn of handle.closers.splice(0)) fn();
    }
    if (!handle) {
      if (this.docs.size >= MAX_OPEN_DOCS) throw new TooManyOpenError();
      const doc = new DocState("", 0, this.closedLocalSeq);
      doc.maxOpBytes = maxOpBytes(this.maxFrame);
      handle = new DocHandle(id, this, doc);
      this.docs.set(id, handle);
    }
    if (handle.openState === "closed" && this.connectionState.state === "connected") this.sendOpen(handle);
    return handle;
  }

  /** Stops for good: the socket is closed, and the state persisted. */
  async close(): Promise<void> {
    this.setState({ state: "closed" });
    if (this.timer) clearInterval(this.timer);
    if (this.retry) clearTimeout(this.retry);
    this.gen++;
    this.ws?.close();
    this.ws = null;
    this.closeAway();
    await this._persist();
  }

  /** Drops the connection as a network failure would (tests); the client reconnects. */
  dropConnection(): void {
    const ws = this.ws as (WebSocketLike & { terminate?: () => void }) | null;
    if (!ws) return;
    if (ws.terminate) ws.terminate();
    else ws.close();
    this.lost(this.gen);
  }

  /**
   * Drops the connection and stays off (as with no network) until `goOnline`: edits
   * keep applying locally, composed into the queue and persisted.
   */
  goOffline(): void {
    const s = this.connectionState.state;
    if (this.offline || s === "closed" || s === "failed") return;
    this.offline = true;
    if (this.retry) clearTimeout(this.retry);
    this.retry = null;
    if (this.ws) this.dropConnection();
    else this.setState({ state: "offline" });
  }

  /** Connects again after `goOffline`. */
  goOnline(): void {
    if (!this.offline) return;
    this.offline = false;
    this.attempt = 0;
    this.setState({ state: "connecting" });
    this.dial();
  }

  // ---- connection ----

  private dial(): void {
    if (this.offline || this.connectionState.state === "closed" || this.connectionState.state === "failed") return;
    const gen = ++this.gen;
    const ws = new this.opts.WebSocket(this.urls[this.home]);
    ws.binaryType = "arraybuffer";
    this.ws = ws;
    this.welcomed = false;
    this.unavailable = false;
    this.redirectLoop = false;
    this.attemptAtDial = this.attempt;
    // The handshake's deadline counts from here (see `tick`).
    this.lastHeard = Date.now();
    ws.onopen = () => {
      if (gen !== this.gen) return;
      this.lastHeard = Date.now();
      this._send({ type: "Hello", clientId: this.clientId, token: this.opts.token });
    };
    ws.onmessage = (ev) => {
      if (gen !== this.gen) return;
      this.lastHeard = Date.now();
      try {
        const data = ev.data;
        if (!(data instanceof ArrayBuffer)) throw new ProtocolViolation("a text WebSocket message");
        const { message } = decode(new Uint8Array(data), this.maxFrame);
        this.opts.trace?.("recv", message);
        this.receive(message, null);
      } catch (e) {
        // A broken frame or an impossible op: start over from a fresh connection (the
        // documents catch up from their versions; nothing local is lost).
        this.emitError(e);
        this.dropConnection();
      }
      for (const h of this.docs.values()) h.checkWaiters();
    };
    ws.onclose = () => this.lost(gen);
    ws.onerror = () => this.lost(gen);
  }

  private lost(gen: number): void {
    if (gen !== this.gen) return;
    this.gen++;
    const ws = this.ws;
    this.ws = null;
    try {
      ws?.close();
    } catch {
      // already closed
    }
    this.closeAway();
    for (const h of this.docs.values()) {
      h.openState = "closed";
      h.reply = null;
      h.at = null;
    }
    const s = this.connectionState.state;
    if (s === "closed" || s === "failed") return;
    if (this.offline) {
      this.setState({ state: "offline" });
      return;
    }
    // A home that never welcomed us may be down for good: the next attempt goes to the
    // next URL. One that did keeps its URL (a node restarting comes back there), unless
    // the connections were dropped on a code 33: a node cut off from etcd answers it for
    // every document while the other nodes serve (and where no node serves the document,
    // moving on is harmless). No away link is left to the new home, nor a document
    // carried by one (both dropped just above): its documents are opened on the home
    // connection once it is welcomed.
    if (!this.welcomed || this.unavailable) this.home = (this.home + 1) % this.urls.length;
    // Dropped for a document that makes no progress: the delay grows on from where it
    // was, whatever other documents did (see `attempt`).
    if (this.unavailable || this.redirectLoop) this.attempt = this.attemptAtDial;
    this.unavailable = false;
    this.redirectLoop = false;
    // 100 ms doubling to 10 s, each delay a random half to the whole of that: clients
    // cut off together do not all come back at once.
    const full = Math.min(this.opts.backoffMaxMs, this.opts.backoffInitialMs * 2 ** this.attempt);
    const delay = Math.round(full * (0.5 + this.opts.random() * 0.5));
    this.attempt++;
    this.setState({ state: "disconnected", attempt: this.attempt, retryInMs: delay });
    this.retry = setTimeout(() => {
      this.retry = null;
      this.dial();
    }, delay);
  }

  private tick(): void {
    if (!this.ws) return;
    const now = Date.now();
    if (this.connectionState.state !== "connected") {
      // A node that is down without refusing (its host gone, packets dropped), or that
      // accepts the connection and never answers `Hello`, would hold the attempt until
      // the system gives up on it, which may be never: the handshake has the deadline of
      // a silent connection. The next attempt goes to the next URL if there are others,
      // else to the same one again, with backoff.
      if (now - this.lastHeard > this.opts.deadAfterMs) this.dropConnection();
      return;
    }
    if (now - this.lastHeard > this.opts.deadAfterMs) {
      this.dropConnection();
    } else if (now - this.lastSent >= this.opts.pingIntervalMs) {
      this._send({ type: "Ping", nonce: ++this.nonce });
    }
    // The other nodes close a connection that stays silent too.
    for (const link of this.away.values()) {
      if (link.ready && now - link.lastSent >= this.opts.pingIntervalMs) {
        this.sendOn(link, { type: "Ping", nonce: ++this.nonce });
      }
    }
  }

  /**
   * A WebSocket to the node at `url` (one a `Redirect` named): `Hello` with this
   * client's id, then, on its `Welcome`, `Open` of each document it carries. Any
   * failure of it is treated as the loss of the connection: everything starts over
   * from the home node with backoff, and redirects are followed again.
   */
  private dialAway(url: string): void {
    const gen = this.gen;
    const ws = new this.opts.WebSocket(url);
    ws.binaryType = "arraybuffer";
    const link: AwayLink = { url, ws, ready: false, maxFrame: DEFAULT_MAX_FRAME, lastSent: 0 };
    this.away.set(url, link);
    const current = () => gen === this.gen && this.away.get(url) === link;
    ws.onopen = () => {
      if (current()) this.sendOn(link, { type: "Hello", clientId: this.clientId, token: this.opts.token });
    };
    ws.onmessage = (ev) => {
      if (!current()) return;
      try {
        const data = ev.data;
        if (!(data instanceof ArrayBuffer)) throw new ProtocolViolation("a text WebSocket message");
        const { message } = decode(new Uint8Array(data), link.maxFrame);
        this.opts.trace?.("recv", message);
        if (message.type === "Welcome") {
          link.ready = true;
          link.maxFrame = message.maxFrame;
          for (const h of this.docs.values()) if (h.at === url) this.sendOpen(h);
        } else {
          this.receive(message, url);
        }
      } catch (e) {
        this.emitError(e);
        this.dropConnection();
      }
      for (const h of this.docs.values()) h.checkWaiters();
    };
    ws.onclose = ws.onerror = () => {
      if (current()) this.dropConnection();
    };
  }

  private sendOn(link: AwayLink, message: Message): void {
    if (link.ws.readyState !== 1) return;
    this.opts.trace?.("send", message);
    link.ws.send(encode(message));
    link.lastSent = Date.now();
  }

  /** Closes the connection to `url` once no document is carried by it. */
  private prune(url: string | null): void {
    if (url === null) return;
    for (const h of this.docs.values()) if (h.at === url) return;
    const link = this.away.get(url);
    this.away.delete(url);
    link?.ws.close();
  }

  private closeAway(): void {
    const links = [...this.away.values()];
    this.away.clear();
    for (const link of links) {
      try {
        link.ws.close();
      } catch {
        // already closed
      }
    }
  }

  private setState(s: ConnectionState): void {
    this.connectionState = s;
    this.emit("state", s);
    for (const h of this.docs.values()) {
      h.emit("state", s);
      h.checkWaiters();
    }
  }

  private emitError(e: unknown): void {
    // No error event on purpose: the client recovers by itself; say it for debugging.
    if (typeof console !== "undefined") console.warn("quire client:", e instanceof Error ? e.message : e);
  }

  /** @internal */
  _send(message: Message): void {
    if (!this.ws || this.ws.readyState !== 1) return;
    this.opts.trace?.("send", message);
    this.ws.send(encode(message));
    this.lastSent = Date.now();
  }

  /** @internal Sends a message about `h` on the connection that carries it. */
  _sendFor(h: DocHandle, message: Message): void {
    if (h.at === null) return this._send(message);
    const link = this.away.get(h.at);
    // Not welcomed yet: its documents are opened on the `Welcome`.
    if (link?.ready) this.sendOn(link, message);
  }

  /** @internal See `DocHandle.close`. */
  _closeDoc(h: DocHandle): Promise<void> {
    if (this.docs.get(h.id) !== h) return Promise.resolve();
    const closed = new Promise<void>((resolve) => h.closers.push(resolve));
    h.closeState = "closing";
    this.closeIfDone(h);
    return closed;
  }

  /** Forgets a closing document once nothing of it waits for the server. */
  private closeIfDone(h: DocHandle): void {
    if (h.closeState !== "closing" || h.doc.hasPending()) return;
    // Answers to an `Open` still coming are ignored: the document is not known then.
    if (h.openState !== "closed") this._sendFor(h, { type: "Close", doc: h.id });
    h.openState = "closed";
    h.closeState = "closed";
    this.docs.delete(h.id);
    this.closedLocalSeq = Math.max(this.closedLocalSeq, h.doc.nextLocalSeq);
    this.prune(h.at);
    void this._persist();
    for (const fn of h.closers.splice(0)) fn();
  }

  /** @internal Saves the state (coalesced: one save at a time, the latest state). */
  _persist(): Promise<void> {
    const store = this.opts.store;
    if (!store) return Promise.resolve();
    this.dirty = true;
    this.saving ??= (async () => {
      while (this.dirty) {
        this.dirty = false;
        try {
          await store.save(this.persisted());
        } catch (e) {
          this.emitError(e);
        }
      }
      this.saving = null;
    })();
    return this.saving;
  }

  private persisted(): PersistedState {
    const docs: PersistedState["docs"] = {};
    for (const [id, h] of this.docs) docs[id] = h.doc.persisted();
    return { clientId: this.clientId.toString(), docs, closedLocalSeq: this.closedLocalSeq };
  }

  // ---- documents ----

  private sendOpen(h: DocHandle, knownVersion = h.doc.version): void {
    h.openState = "opening";
    h.reply = { snapshot: null, snapVersion: 0, ops: [] };
    this._sendFor(h, { type: "Open", doc: h.id, knownVersion });
  }

  /** @internal Sends the next op of `h` if none is in flight. */
  _pump(h: DocHandle): void {
    if (h.openState !== "open" || this.connectionState.state !== "connected") return;
    if (!h.doc.inFlight) h.doc.takeToSend();
    void this.sendInFlight(h);
  }

  /**
   * Sends the op in flight once per connection, after it is persisted: after a
   * reconnect it goes again under the same id, base and patches, so the server answers
   * a duplicate with its original ack instead of applying it twice.
   */
  private async sendInFlight(h: DocHandle): Promise<void> {
    const gen = this.gen;
    // The op as sent stays the same while remote ops rebase it (a new `inFlight` object,
    // the same `out`): compare by op id.
    const out = h.doc.inFlight?.out;
    if (!out || (h.sent?.gen === gen && h.sent.localSeq === out.localSeq)) return;
    h.sent = { gen, localSeq: out.localSeq };
    await this._persist();
    // A new connection resends it after its catch-up; a document being reopened, after
    // the reply (both clear `sent`).
    if (gen !== this.gen || h.doc.inFlight?.out.localSeq !== out.localSeq) return;
    if (h.openState !== "open") {
      h.sent = null;
      return;
    }
    this._sendFor(h, { type: "Submit", doc: h.id, ...out });
  }

  /** A message from the home connection (`from` null) or the one to node `from`. */
  private receive(m: Message, from: string | null): void {
    const about = "doc" in m ? this.docs.get(m.doc) : undefined;
    if (about && about.at !== from) {
      // About a document this connection no longer carries (it was redirected): the
      // answers to what was sent before it moved (more `Redirect`s).
      return;
    }
    switch (m.type) {
      case "Welcome": {
        const first = this.clientId === 0n;
        this.clientId = m.clientId;
        this.maxFrame = m.maxFrame;
        this.welcomed = true;
        // Nothing else can show progress (see `attempt`).
        if (this.docs.size === 0) this.attempt = 0;
        for (const h of this.docs.values()) h.doc.maxOpBytes = maxOpBytes(m.maxFrame);
        this.setState({ state: "connected" });
        // The id must be on disk before any op goes out under it.
        if (first) void this._persist();
        for (const h of this.docs.values()) this.sendOpen(h);
        return;
      }
      case "Snapshot": {
        const h = this.docs.get(m.doc);
        if (!h?.reply) return;
        h.reply.snapshot = (h.reply.snapshot ?? "") + m.text;
        h.reply.snapVersion = m.version;
        return;
      }
      case "Ops": {
        const h = this.docs.get(m.doc);
        if (!h?.reply) return;
        h.reply.ops.push(...m.ops);
        if (!m.more) this.finishOpen(h);
        return;
      }
      case "Reload": {
        const h = this.docs.get(m.doc);
        if (h) this.sendOpen(h);
        return;
      }
      case "Ack": {
        const h = this.docs.get(m.doc);
        if (!h) return;
        // Progress (see `attempt`).
        this.attempt = 0;
        if (h.openState === "probing") return this.probeAnswered(h, m.localSeq, true);
        if (h.doc.inFlight?.out.localSeq !== m.localSeq) return;
        h.redirects = 0;
        h.doc.onAck(m.localSeq, m.seq);
        void this._persist();
        h.emit("ack", { seq: m.seq, localSeq: m.localSeq });
        this._pump(h);
        this.closeIfDone(h);
        return;
      }
      case "Reject": {
        const h = this.docs.get(m.doc);
        if (!h) return;
        if (m.code === UNAVAILABLE) {
          // Not applied; sent again under its id once a node serves the document.
          this.emitError(new Error(`document ${m.doc}: ${m.message}`));
          this.unavailable = true;
          return this.dropConnection();
        }
        if (h.openState === "probing") return this.probeAnswered(h, m.localSeq, false);
        if (h.doc.inFlight?.out.localSeq !== m.localSeq) return;
        if (FATAL_REJECTS.has(m.code)) return this.fail(m.code, m.message);
        // The op goes back to the buffer (already rebased over what arrived) and is sent
        // as a new op once the document is opened again: the server refuses this
        // connection's later ops to it until then (code 25).
        h.doc.requeueInFlight(m.code === 24);
        void this._persist();
        this.sendOpen(h);
        return;
      }
      case "Remote": {
        const h = this.docs.get(m.doc);
        if (!h || (h.openState !== "open" && h.openState !== "opening")) return;
        if (m.clientId === this.clientId && h.doc.inFlight?.out.localSeq === m.localSeq) {
          // Our own op, sent on a connection since lost: the server broadcasts it to this
          // one like any other op. It is the op's ack (the Ack that answers the resend
          // comes later and is then ignored).
          if (m.seq <= h.doc.version) return;
          h.doc.onAck(m.localSeq, m.seq);
          void this._persist();
          h.emit("ack", { seq: m.seq, localSeq: m.localSeq });
          this._pump(h);
          this.closeIfDone(h);
          return;
        }
        const patches = h.doc.onRemote(m.seq, m.patches);
        if (patches) {
          void this._persist();
          h.emit("remote", { seq: m.seq, clientId: m.clientId, localSeq: m.localSeq, patches });
        }
        return;
      }
      case "PresenceState": {
        const h = this.docs.get(m.doc);
        if (!h) return;
        // Offsets in the sender's text, which has the server's ops but not our pending
        // edits: clamped to the server's text as we know it (the server does not check
        // them), then mapped through our pending ops to our local text.
        const len = cpLen(h.doc.confirmed);
        const pending = [...(h.doc.inFlight ? [h.doc.inFlight.op] : []), ...h.doc.buffer];
        const place = (n: number) => pending.reduce((pos, op) => mapPosition(op, pos), Math.min(n, len));
        const selections = m.selections.map((s) => ({ anchor: place(s.anchor), head: place(s.head) }));
        h.emit("presence", { clientId: m.clientId, selections });
        return;
      }
      case "Pong":
        return;
      case "Redirect":
        return this.redirected(m.doc, m.wsUrl);
      case "Error":
        if (FATAL_ERRORS.has(m.code)) return this.fail(m.code, m.message);
        if (m.code === UNAVAILABLE) {
          // The server keeps the connection; the document waits for an owner: retried
          // with the backoff (at the next URL if there are several).
          this.emitError(new Error(`server error ${m.code}: ${m.message}`));
          this.unavailable = true;
          return this.dropConnection();
        }
        // Others (replaced, timeout, busy, ...): the server closes; reconnecting helps.
        this.emitError(new Error(`server error ${m.code}: ${m.message}`));
        return;
      default:
        throw new ProtocolViolation(`unexpected ${m.type} from the server`);
    }
  }

  /**
   * A `Redirect` of a document on the connection that carries it: it is closed there
   * and opened at `wsUrl` (the home connection if that is the current home URL) with its
   * version; its op in flight is resent there under its id once it is open, as after a
   * reconnect.
   */
  private redirected(doc: string, wsUrl: string): void {
    const h = this.docs.get(doc);
    if (!h) return;
    if (++h.redirects > MAX_REDIRECTS || wsUrl === "") {
      // Round in circles, or an owner that serves no WebSocket: start over later.
      h.redirects = 0;
      this.redirectLoop = true;
      this.emitError(new Error(`document ${doc}: cannot follow its redirects${wsUrl ? "" : " (no WebSocket URL)"}`));
      return this.dropConnection();
    }
    h.openState = "closed";
    h.reply = null;
    h.sent = null;
    const old = h.at;
    h.at = sameUrl(wsUrl, this.urls[this.home]) ? null : wsUrl;
    if (h.at !== null && !this.away.has(h.at)) this.dialAway(h.at);
    this.sendOpen(h);
    this.prune(old);
  }

  private fail(code: number, message: string): void {
    this.setState({ state: "failed", code, message });
    this.gen++;
    this.ws?.close();
    this.ws = null;
  }

  /** The whole reply to `Open` is in: catch up, or rebuild from a snapshot. */
  private finishOpen(h: DocHandle): void {
    const r = h.reply!;
    h.reply = null;
    const doc = h.doc;
    const own = (op: WireOp) => op.clientId === this.clientId && doc.inFlight?.out.localSeq === op.localSeq;
    if (r.snapshot === null) {
      // A catch-up: the ops after our version, our own op in flight among them if the
      // server applied it before the connection was lost (that is its ack).
      for (const op of r.ops) {
        if (op.seq <= doc.version) continue;
        if (own(op)) {
          doc.onAck(op.localSeq, op.seq);
          h.emit("ack", { seq: op.seq, localSeq: op.localSeq });
        } else {
          const patches = doc.onRemote(op.seq, op.patches);
          if (patches) h.emit("remote", { seq: op.seq, clientId: op.clientId, localSeq: op.localSeq, patches });
        }
      }
    } else {
      let text = r.snapshot;
      let version = r.snapVersion;
      let applied: boolean | null = doc.inFlight ? null : false;
      for (const op of r.ops) {
        if (own(op)) applied = true;
        text = applyPatches(text, op.patches);
        version = op.seq;
      }
      if (!doc.hasPending()) {
        const old = doc.text;
        const nextLocalSeq = doc.nextLocalSeq;
        h.doc = new DocState(text, version, nextLocalSeq);
        h.doc.maxOpBytes = doc.maxOpBytes;
        if (old !== text) h.emit("reloaded", { patches: toPatches(diff(old, text)) });
      } else if (applied === null) {
        // Whether the server applied our op in flight is unknown (its ops are gone):
        // resend it under its id and let the answer say (protocol.md, "Reload").
        h.openState = "probing";
        this._sendFor(h, { type: "Submit", doc: h.id, ...doc.inFlight!.out });
        return;
      } else {
        doc.settleApplied(applied);
        const patches = doc.reload(text, version);
        h.emit("reloaded", { patches });
      }
    }
    h.openState = "open";
    // Served, and nothing of ours waits on it: progress (see `attempt` and
    // MAX_REDIRECTS). With an op in flight, progress is its ack: the server may serve
    // the document and still refuse the op (told to retry, code 33) or redirect it.
    if (!h.doc.inFlight) {
      h.redirects = 0;
      this.attempt = 0;
    }
    void this._persist();
    if (h.presence) this._sendFor(h, { type: "Presence", doc: h.id, selections: h.presence });
    h.sent = null;
    this._pump(h);
    this.closeIfDone(h);
  }

  /** The answer to resending the op in flight after a snapshot: applied or not. */
  private probeAnswered(h: DocHandle, localSeq: number, acked: boolean): void {
    if (h.doc.inFlight?.out.localSeq !== localSeq) return;
    h.doc.settleApplied(acked);
    void this._persist();
    // From a fresh snapshot (version 0), which holds the op if it was applied.
    this.sendOpen(h, 0);
  }
}

/**
 * Whether two WebSocket URLs name the same node as the URL standard parses them: the
 * same text, or the same once parsed (`ws://Node-B:80/ws` and `ws://node-b/ws`). A
 * redirect to the home node must be carried on the home connection, since a second
 * connection there with this client's id would replace it (code 11). Names are not
 * resolved (a browser cannot): give each node as it advertises itself.
 */
function sameUrl(a: string, b: string): boolean {
  if (a === b) return true;
  try {
    return new URL(a).href === new URL(b).href;
  } catch {
    return false;
  }
}
