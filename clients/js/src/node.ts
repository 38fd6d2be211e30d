// Node-only parts: the `ws` WebSocket (Node 20 has no global one) and a file store.
// Kept out of index.ts so that the browser bundle never imports `ws` or `node:fs`.
import { WebSocket } from "ws";
import { open, readFile, rename } from "node:fs/promises";
import { dirname, basename, join } from "node:path";
import type { WebSocketConstructor } from "./client.js";
import type { PersistedState, Store } from "./store.js";

export const NodeWebSocket = WebSocket as unknown as WebSocketConstructor;

/**
 * The state as JSON in one file, replaced atomically: written to a temporary file,
 * fsynced, renamed over the old one, and the directory fsynced, so that a crash leaves
 * the old state or the new one, never a torn file.
 */
export class FileStore implements Store {
  constructor(readonly path: string) {}

  async load(): Promise<PersistedState | null> {
    try {
      return JSON.parse(await readFile(this.path, "utf8")) as PersistedState;
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === "ENOENT") return null;
      throw e;
    }
  }

  async save(state: PersistedState): Promise<void> {
    const tmp = join(dirname(this.path), `.${basename(this.path)}.tmp`);
    const f = await open(tmp, "w");
    try {
      await f.writeFile(JSON.stringify(state));
      await f.sync();
    } finally {
      await f.close();
    }
    await rename(tmp, this.path);
    const dir = await open(dirname(this.path), "r");
    try {
      await dir.sync();
    } finally {
      await dir.close();
    }
  }
}
