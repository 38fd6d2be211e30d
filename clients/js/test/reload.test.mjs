// Reload after compaction: the server snapshotted the document and deleted the log
// segments holding the ops after a client's version, so the client's catch-up is a
// snapshot. A client restarted from its file must still get every edit it made to the
// server exactly once: buffered edits rebased onto the snapshot, and an op that was in
// flight (whose fate the snapshot cannot tell) resent under its id to learn it.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { join } from "node:path";
import { WebSocket } from "ws";
import { client, pluggable, serverText, startServer, tempDir, waitFor } from "./helpers.mjs";
import { FileStore } from "../dist/node.js";
import { encode, decode } from "../dist/protocol.js";

let server;
before(async () => {
  // 1 MiB segments, no retention, frequent snapshots: a few MiB of ops get the old
  // segments deleted at the next maintenance tick (every second).
  server = await startServer({ extra: ["--segment-mib", "1", "--retention-secs", "0", "--snapshot-every-ops", "4"] });
});
after(async () => {
  await server?.stop();
});

/** One raw session: Hello, then `fn(send, next)`. */
async function raw(fn) {
  const ws = new WebSocket(server.url);
  ws.binaryType = "arraybuffer";
  const inbox = [];
  let wake = () => {};
  ws.on("message", (d) => {
    inbox.push(decode(new Uint8Array(d)).message);
    wake();
  });
  await new Promise((res) => ws.on("open", res));
  const next = async () => {
    while (inbox.length === 0) await new Promise((res) => (wake = res));
    return inbox.shift();
  };
  const send = (m) => ws.send(encode(m));
  send({ type: "Hello", clientId: 0n, token: "" });
  while ((await next()).type !== "Welcome");
  try {
    return await fn(send, next);
  } finally {
    ws.close();
  }
}

/** Opens `doc` from `known`: whether the reply is a snapshot, and the last version. */
const openReply = (doc, known) =>
  raw(async (send, next) => {
    send({ type: "Open", doc, knownVersion: known });
    let snapshot = false;
    let version = known;
    for (;;) {
      const m = await next();
      if (m.type === "Snapshot") {
        snapshot = true;
        version = m.version;
      }
      if (m.type === "Ops") {
        for (const op of m.ops) version = op.seq;
        if (!m.more) return { snapshot, version };
      }
    }
  });

/** A store that stops writing once frozen: the process "died" at that point. */
class FreezableStore extends FileStore {
  frozen = false;
  async save(state) {
    if (!this.frozen) await super.save(state);
  }
}

test("clients restarted from their files after the server compacted the log keep every edit, once", async () => {
  const doc = "compacted";
  const dir = tempDir();

  // A: synced at "hello world", then an offline edit, then gone.
  const net = pluggable();
  const fileA = join(dir, "a.json");
  const a = await client(server.url, { WebSocket: net.WebSocket, store: new FileStore(fileA) });
  const ha = a.open(doc);
  await ha.edit([[0, 0, "hello world"]]);
  await ha.synced();
  const known = ha.version;
  net.unplug();
  await ha.edit([[11, 0, " A\u{1F600}"]]);
  await a.close();

  // C: its op reaches the server and is acknowledged, but the process "dies" after
  // sending it and before persisting the ack: its file holds the op as in flight.
  const fileC = join(dir, "c.json");
  const storeC = new FreezableStore(fileC);
  const c = await client(server.url, {
    store: storeC,
    trace: (d, m) => {
      if (d === "send" && m.type === "Submit") storeC.frozen = true;
    },
  });
  const hc = c.open(doc);
  await hc.synced();
  assert.equal(hc.version, known);
  await hc.edit([[0, 0, "C>"]]);
  await hc.synced();
  await c.close();

  // Others write a few MiB (inserted and deleted again), then "B>" at the start.
  await raw(async (send, next) => {
    send({ type: "Open", doc, knownVersion: 0 });
    let version = 0;
    for (;;) {
      const m = await next();
      if (m.type === "Snapshot") version = m.version;
      if (m.type === "Ops") {
        for (const op of m.ops) version = op.seq;
        if (!m.more) break;
      }
    }
    const big = "z".repeat(150_000);
    const ops = [];
    for (let i = 0; i < 24; i++) ops.push([[0, 0, big]], [[0, 150_000, ""]]);
    ops.push([[0, 0, "B>"]]);
    for (const [i, patches] of ops.entries()) {
      send({ type: "Submit", doc, localSeq: i + 1, baseVersion: version, patches });
      for (;;) {
        const m = await next();
        if (m.type === "Ack") {
          version = m.seq;
          break;
        }
        if (m.type === "Reject" || m.type === "Error") throw new Error(`refused: ${m.message}`);
      }
    }
  });
  // Wait (no time limit but the guard) until the ops after `known` are gone.
  for (;;) {
    if ((await openReply(doc, known)).snapshot) break;
    await new Promise((r) => setTimeout(r, 100));
  }

  const expected = "B>C>hello world A\u{1F600}";
  const a2 = await client(server.url, { store: new FileStore(fileA) });
  const ha2 = a2.open(doc);
  assert.equal(ha2.text(), "hello world A\u{1F600}");
  const reloads = [];
  ha2.on("reloaded", (e) => reloads.push(e));
  const c2Frames = [];
  const c2 = await client(server.url, {
    store: new FileStore(fileC),
    trace: (d, m) => c2Frames.push(`${d} ${m.type} ${m.localSeq ?? ""} ${m.knownVersion ?? ""}`.trim()),
  });
  const hc2 = c2.open(doc);
  assert.equal(hc2.text(), "C>hello world");
  assert.ok(hc2.pending);
  await Promise.all([ha2.synced(), hc2.synced()]);
  assert.ok(reloads.length >= 1, "a's catch-up was not a snapshot");
  // c's op in flight was resent under its id after the snapshot (its fate unknown), its
  // ack said it was applied, and the document was opened again from a fresh snapshot.
  const resend = c2Frames.indexOf("send Submit 1");
  assert.ok(resend > 0, c2Frames.join("; "));
  // (a2's op may arrive as a Remote in between: look past it.)
  const acked = c2Frames.indexOf("recv Ack 1", resend);
  assert.ok(acked > resend, c2Frames.join("; "));
  assert.ok(c2Frames.indexOf("send Open  0", acked) > acked, c2Frames.join("; "));
  assert.equal(c2Frames.filter((f) => f.startsWith("send Submit")).length, 1, "c's edit sent again as a new op");
  assert.equal(await serverText(server.url, doc), expected);
  await waitFor(() => ha2.version === hc2.version, "both at one version");
  assert.equal(ha2.text(), expected);
  assert.equal(hc2.text(), expected);
  await Promise.all([a2.close(), c2.close()]);
});
