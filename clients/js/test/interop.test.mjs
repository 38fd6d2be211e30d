// A Rust client (examples/interop_editor.rs, over TCP) and TypeScript clients (over
// WebSocket) edit one document at once, at random, emoji included, and converge: the
// Rust client's text, the TypeScript clients' and the server's are equal. The example's
// binary comes from QUIRE_INTEROP_BIN (cargo build --release --example interop_editor);
// without it the test is skipped, and says so.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { existsSync } from "node:fs";
import { client, cpLength, rng, serverText, startServer, waitFor } from "./helpers.mjs";

const BIN = process.env.QUIRE_INTEROP_BIN;
const END_MARK = "\u{23F9}";
const ALPHABET = ["a", "b", "c", " ", "é", "\u{1F600}", "\u{1D11E}", "\u{1F44D}\u{1F3FD}"];

let server;
before(async () => {
  if (BIN) server = await startServer();
});
after(async () => {
  await server?.stop();
});

test("a Rust client and two TypeScript clients editing one document converge", { skip: !BIN && "QUIRE_INTEROP_BIN not set" }, async () => {
  assert.ok(existsSync(BIN), `no binary at ${BIN}`);
  const tcp = /serving listen=(\S+)/.exec(server.log())[1];
  const doc = "interop";
  const r = rng(42);
  const clients = [await client(server.url), await client(server.url)];
  const handles = clients.map((c) => c.open(doc));
  await Promise.all(handles.map((h) => h.synced()));

  const rust = spawn(BIN, [], {
    env: { ...process.env, QUIRE_ADDR: tcp, QUIRE_DOC: doc, QUIRE_SEED: "7", QUIRE_EDITS: "150" },
    stdio: ["ignore", "pipe", "inherit"],
  });
  let out = "";
  rust.stdout.on("data", (d) => (out += d));
  const exited = new Promise((res) => rust.on("exit", res));

  // Edit until the Rust client has made all its edits (and a while before it starts).
  let edits = 0;
  while (!out.includes("EDITED\n") || edits < 150) {
    const h = handles[r.below(2)];
    const len = cpLength(h.text());
    const pos = r.below(len + 1);
    const del = r.below(3) === 0 ? Math.min(len - pos, r.below(4)) : 0;
    let ins = "";
    for (let i = r.below(4); i > 0; i--) ins += r.pick(ALPHABET);
    await h.edit([[pos, del, ins]]);
    edits++;
    await new Promise((res) => setTimeout(res, r.below(3)));
  }
  await Promise.all(handles.map((h) => h.synced()));
  // The end mark, after every edit of everyone: the Rust client prints its text once it
  // has it.
  await handles[0].edit([[0, 0, END_MARK]]);
  await handles[0].synced();
  assert.equal(await exited, 0, out);
  const line = out.split("\n").find((l) => l.startsWith("TEXT "));
  const rustText = JSON.parse(line.slice(5));
  await waitFor(() => handles[1].version === handles[0].version, "both TypeScript clients at one version");
  assert.equal(handles[0].text(), rustText);
  assert.equal(handles[1].text(), rustText);
  assert.equal(await serverText(server.url, doc), rustText);
  assert.ok(cpLength(rustText) > 10);
  await Promise.all(clients.map((c) => c.close()));
});
