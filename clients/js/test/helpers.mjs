// A real `quire serve` per test file (binary from QUIRE_BIN), clients wired to it, and
// small utilities. Nothing here measures time: waits poll for a condition and only give
// up after a long guard (a hang becomes a failure, never a pass).
import { spawn } from "node:child_process";
import { mkdtempSync, rmSync, existsSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { WebSocket } from "ws";
import { Client } from "../dist/client.js";
import { NodeWebSocket } from "../dist/node.js";
import { decode, encode } from "../dist/protocol.js";

const here = fileURLToPath(new URL(".", import.meta.url));
export const QUIRE_BIN = resolve(process.env.QUIRE_BIN ?? join(here, "../../../target/release/quire"));

// Every temporary directory is removed when the test process exits: a server's data
// directory holds preallocated log segments (over 100 MB each), which would fill the
// disk over many runs.
const made = [];
process.on("exit", () => {
  for (const dir of made) rmSync(dir, { recursive: true, force: true });
});

export function tempDir(prefix = "quire-js-") {
  const dir = mkdtempSync(join(tmpdir(), prefix));
  made.push(dir);
  return dir;
}

/** Starts `quire serve` on a fresh (or the given) data dir; resolves once it serves. */
export async function startServer({ dataDir = join(tempDir(), "data"), httpListen = "127.0.0.1:0", extra = [], adminTokenFile = null } = {}) {
  if (!existsSync(QUIRE_BIN)) throw new Error(`no quire binary at ${QUIRE_BIN}: build it or set QUIRE_BIN`);
  // The admin endpoint only when a test needs it (with its token file).
  const admin = adminTokenFile
    ? ["--admin-listen", "127.0.0.1:0", "--admin-token-file", adminTokenFile, "--min-free-mib", "0"]
    : ["--admin-listen", "off"];
  const child = spawn(
    QUIRE_BIN,
    ["serve", "--data-dir", dataDir, "--listen", "127.0.0.1:0", "--http-listen", httpListen, ...admin, ...extra],
    { stdio: ["ignore", "ignore", "pipe"], env: { ...process.env, RUST_LOG: "info" } },
  );
  let log = "";
  const url = await new Promise((res, rej) => {
    let url = null;
    child.stderr.on("data", (d) => {
      log += d;
      url ??= /WebSocket clients: (ws:\/\/\S+)/.exec(log)?.[1] ?? null;
      if (url && /serving listen=/.test(log)) res(url);
    });
    child.on("exit", (code) => rej(new Error(`quire serve exited (${code}):\n${log}`)));
  });
  const exited = new Promise((res) => child.on("exit", res));
  return {
    url,
    dataDir,
    admin: /admin=(\S+)/.exec(log)?.[1] ?? null,
    port: Number(new URL(url).port),
    log: () => log,
    async stop() {
      child.kill("SIGTERM");
      await exited;
    },
  };
}

/**
 * A WebSocket constructor that can be unplugged: while `offline`, new connections go to
 * a closed port (refused at once) and the live one is cut, as a lost network would.
 */
export function pluggable() {
  const ctl = { offline: false, sockets: new Set() };
  class Pluggable extends WebSocket {
    constructor(url) {
      super(ctl.offline ? "ws://127.0.0.1:9/ws" : url);
      ctl.sockets.add(this);
      this.on("close", () => ctl.sockets.delete(this));
      // Refused connections are expected while offline: the client handles onerror.
      this.on("error", () => {});
    }
  }
  ctl.WebSocket = Pluggable;
  ctl.unplug = () => {
    ctl.offline = true;
    for (const s of ctl.sockets) s.terminate();
  };
  ctl.plug = () => {
    ctl.offline = false;
  };
  return ctl;
}

export async function client(url, opts = {}) {
  return Client.connect({
    url,
    WebSocket: NodeWebSocket,
    backoffInitialMs: 20,
    backoffMaxMs: 200,
    ...opts,
  });
}

/**
 * Fake nodes by URL (`ws://fake-NAME/ws`), in this process, speaking the protocol of
 * protocol.md: `handle(message, reply)` answers each frame the client sends;
 * `reply(message, requestId)` queues a frame for it. A node `down` refuses connections
 * (error, then close, never open); `kill(node)` puts it down and cuts its connections.
 * A node added with `{ welcome: false }` accepts connections but never answers `Hello`.
 * `dialed` lists every URL a connection was made to, in order, fake or not.
 */
let nextClientId = 1000n;

export function fakeNetwork() {
  const nodes = new Map();
  const dialed = [];
  class FakeSocket {
    constructor(url) {
      this.url = url;
      this.binaryType = "arraybuffer";
      this.readyState = 0;
      this.onopen = this.onmessage = this.onclose = this.onerror = null;
      this.node = nodes.get(url);
      this.node.connections += 1;
      if (this.node.down) {
        setTimeout(() => {
          this.readyState = 3;
          this.onerror?.({});
          this.onclose?.({});
        }, 0);
        return;
      }
      this.node.sockets.add(this);
      setTimeout(() => {
        if (this.readyState !== 0) return;
        this.readyState = 1;
        this.onopen?.({});
      }, 0);
    }
    send(bytes) {
      const { requestId, message } = decode(bytes);
      this.node.received.push(message);
      const reply = (m, rid = requestId) =>
        setTimeout(() => {
          if (this.readyState !== 1) return;
          const frame = encode(m, rid);
          this.onmessage?.({ data: frame.buffer.slice(frame.byteOffset, frame.byteOffset + frame.byteLength) });
        }, 0);
      if (message.type === "Hello") {
        // An id of its own for a client that has none (below 2^63: never one the real
        // server gives, which would make the two clients replace each other there).
        if (this.node.welcome) reply({ type: "Welcome", version: 2, maxFrame: 1 << 20, clientId: message.clientId || nextClientId++ });
      } else if (message.type !== "Ping") {
        this.node.handle(message, reply);
      }
    }
    close() {
      if (this.readyState === 3) return;
      this.readyState = 3;
      this.node.sockets.delete(this);
      setTimeout(() => this.onclose?.({}), 0);
    }
  }
  return {
    dialed,
    add(name, handle = () => {}, { welcome = true } = {}) {
      const node = { url: `ws://fake-${name}/ws`, handle, welcome, down: false, received: [], connections: 0, sockets: new Set() };
      nodes.set(node.url, node);
      return node;
    },
    kill(node) {
      node.down = true;
      for (const s of [...node.sockets]) s.close();
    },
    // Fakes for their URLs, the `ws` package for real servers.
    WebSocket: class {
      constructor(url) {
        dialed.push(url);
        return nodes.has(url) ? new FakeSocket(url) : new WebSocket(url);
      }
    },
  };
}

export async function waitFor(cond, what = "condition", guardMs = 60_000) {
  const start = Date.now();
  while (!cond()) {
    if (Date.now() - start > guardMs) throw new Error(`gave up waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 5));
  }
}

/** The server's text of `doc`, read back by a fresh client. */
export async function serverText(url, doc) {
  const c = await client(url);
  const h = c.open(doc);
  await h.synced();
  const text = h.text();
  await c.close();
  return text;
}

/** mulberry32: a seeded PRNG, so every run makes the same edits. */
export function rng(seed) {
  let a = seed >>> 0;
  const next = () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
  next.below = (n) => Math.floor(next() * n);
  next.pick = (arr) => arr[next.below(arr.length)];
  return next;
}

export const cpLength = (s) => Array.from(s).length;

export function cleanup(dir) {
  rmSync(dir, { recursive: true, force: true });
}

