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

