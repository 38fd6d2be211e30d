// Access tokens: a valid token is sent in Hello and its grant holds; an invalid one stops
// the client for good (Error 7: reconnecting would only be refused again), and a
// read-only token refuses edits with Reject 31, which also stops it.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { QUIRE_BIN, client, startServer, waitFor } from "./helpers.mjs";

const SECRET = "0123456789abcdef-test-secret";
let server;
before(async () => {
  server = await startServer({ extra: ["--secret", SECRET] });
});
after(async () => {
  await server?.stop();
});

const token = (...args) =>
  execFileSync(QUIRE_BIN, ["token", "--secret", SECRET, ...args], { encoding: "utf8" }).trim();

test("a valid token edits; a forged one fails with code 7; a read-only one fails its edit with 31", async () => {
  const good = await client(server.url, { token: token("--doc", "notes/*", "--write") });
  const h = good.open("notes/a");
  await h.edit([[0, 0, "ok \u{1F600}"]]);
  await h.synced();
  assert.equal(h.text(), "ok \u{1F600}");
  await good.close();

  const forged = await client(server.url, { token: "bad.token" });
  forged.open("notes/a");
  await waitFor(() => forged.connectionState.state === "failed", "refused for good");
  assert.equal(forged.connectionState.code, 7);
  await forged.close();

  const reader = await client(server.url, { token: token("--doc", "notes/*") });
  const r = reader.open("notes/a");
  await waitFor(() => r.text() === "ok \u{1F600}", "the reader has the text");
  await r.edit([[0, 0, "no "]]);
  await waitFor(() => reader.connectionState.state === "failed", "refused for good");
  assert.equal(reader.connectionState.code, 31);
  // The edit stays local (and persisted, with a store): a new token needs a new client.
  assert.equal(r.text(), "no ok \u{1F600}");
  await reader.close();
});
