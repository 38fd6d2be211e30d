// Persistence of what a client must not lose: its id, and per document the confirmed
// text and version, the op in flight (as sent, so it is resent under the same id) and
// the buffered edits. Written before an op is first sent, so the server never sees an
// op id the client could forget (and then reuse for a different op: Reject 26).

import type { PersistedDoc } from "./doc.js";

export interface PersistedState {
  /** The client id as a decimal string (a u64: ids the server gives are >= 2^63). */
  clientId: string;
  docs: Record<string, PersistedDoc>;
  /**
   * Above every local seq the documents closed so far used (absent: 1): a document
   * opened again starts there, so that no new op goes under an op id it used before.
   */
  closedLocalSeq?: number;
}

export interface Store {
  load(): Promise<PersistedState | null>;
  /** Replaces what is stored, atomically: after a crash either the old or the new state. */
  save(state: PersistedState): Promise<void>;
}

/** Keeps the state in memory (tests; a client that needs no reload). */
export class MemoryStore implements Store {
  private state: string | null = null;
  async load(): Promise<PersistedState | null> {
    return this.state === null ? null : (JSON.parse(this.state) as PersistedState);
  }
  async save(state: PersistedState): Promise<void> {
    this.state = JSON.stringify(state);
  }
}

/**
 * The state in IndexedDB (browsers), one record under one key: a single `put` in one
 * transaction is atomic, so a reload sees the old state or the new one, never half.
 */
export class IndexedDbStore implements Store {
  private db: Promise<IDBDatabase> | null = null;

  constructor(
    private readonly dbName = "quire-client",
    private readonly key = "state",
    private readonly factory: IDBFactory = globalThis.indexedDB,
  ) {}

  private open(): Promise<IDBDatabase> {
    this.db ??= new Promise((resolve, reject) => {
      const req = this.factory.open(this.dbName, 1);
      req.onupgradeneeded = () => req.result.createObjectStore("state");
      req.onsuccess = () => resolve(req.result);
      req.onerror = () => reject(req.error);
    });
    return this.db;
  }

  async load(): Promise<PersistedState | null> {
    const db = await this.open();
    return new Promise((resolve, reject) => {
      const req = db.transaction("state", "readonly").objectStore("state").get(this.key);
      req.onsuccess = () => resolve((req.result as PersistedState | undefined) ?? null);
      req.onerror = () => reject(req.error);
    });
  }

  async save(state: PersistedState): Promise<void> {
    const db = await this.open();
    return new Promise((resolve, reject) => {
      // "strict" durability: the promise resolves once the write is on disk, as the
      // file store's fsync does (browsers default to "relaxed").
      const tx = db.transaction("state", "readwrite", { durability: "strict" });
      tx.objectStore("state").put(state, this.key);
      tx.oncomplete = () => resolve();
      tx.onerror = () => reject(tx.error);
      tx.onabort = () => reject(tx.error);
    });
  }
}
