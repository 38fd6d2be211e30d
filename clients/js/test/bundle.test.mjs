// The browser bundle (dist/quire.browser.min.js, esbuild) is self-contained and takes
// the WebSocket from globalThis, as in a browser: here `ws` stands in for the browser's.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { WebSocket } from "ws";
import { startServer } from "./helpers.mjs";

let server;
before(async () => {
  server = await startServer();
});
after(async () => {
  await server?.stop();
});

test("the browser bundle imports nothing and edits through globalThis.WebSocket", async () => {
  const url = new URL("../dist/quire.browser.min.js", import.meta.url);
  const source = readFileSync(url, "utf8");
  assert.ok(!/\bimport\s*[("'{*]|require\(/.test(source), "the bundle imports or requires something");
  const { Client } = await import(url);
  globalThis.WebSocket = WebSocket;
  try {
    const c = await Client.connect({ url: server.url });
    const h = c.open("bundle");
    await h.edit([[0, 0, "from the bundle \u{1F600}"]]);
    await h.synced();
    assert.equal(h.version, 1);
    await c.close();
  } finally {
    delete globalThis.WebSocket;
  }
});
