// The TypeScript client against a real `quire serve`: convergence, reconnect with the
// same op ids, offline editing, and reload from the file store.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { join } from "node:path";
import { WebSocket } from "ws";
import { client, cpLength, pluggable, rng, serverText, startServer, tempDir, waitFor } from "./helpers.mjs";
import { FileStore } from "../dist/node.js";
import { MAX_OPEN_DOCS, TooManyOpenError } from "../dist/index.js";
import { encode, decode } from "../dist/protocol.js";

// The client says on console.warn when it had to drop a connection over something it
// could not make sense of (a protocol violation): none may happen here.
const warnings = [];
const warn = console.warn;
console.warn = (...args) => {
  warnings.push(args.join(" "));
  warn(...args);
};

let server;
before(async () => {
  server = await startServer();
});
after(async () => {
  await server?.stop();
});

test.afterEach(() => {
  assert.deepEqual(warnings.splice(0), [], "the client dropped a connection over a violation");
});

const ALPHABET = ["a", "b", "c", " ", "é", "\u{1F600}", "\u{1D11E}", "\u{1F44D}\u{1F3FD}"];

/** A random edit of `h`'s local text: an insert, a delete, or a splice (code points). */
function randomEdit(r, h) {
  const len = cpLength(h.text());
  const pos = r.below(len + 1);
  const del = r.below(3) === 0 ? Math.min(len - pos, r.below(4)) : 0;
  let ins = "";
  for (let i = r.below(4); i > 0; i--) ins += r.pick(ALPHABET);
  return [[pos, del, ins]];
}

for (const n of [2, 3, 4]) {
  test(`${n} clients editing one document at random (emoji included) converge to the server's text`, async () => {
    const doc = `converge-${n}`;
    const r = rng(1000 + n);
    const clients = await Promise.all(Array.from({ length: n }, () => client(server.url)));
    const handles = clients.map((c) => c.open(doc));
    await Promise.all(handles.map((h) => h.synced()));
    for (let round = 0; round < 60; round++) {
      for (const h of handles) {
        if (r.below(3) > 0) await h.edit(randomEdit(r, h));
      }
      // Let some messages through between rounds, a varying amount (never none).
      for (let i = r.below(4); i >= 0; i--) await new Promise((res) => setImmediate(res));
    }
    await Promise.all(handles.map((h) => h.synced()));
    const top = () => Math.max(...handles.map((h) => h.version));
    await waitFor(() => handles.every((h) => h.version === top() && !h.pending), "every client at the last version");
    const texts = handles.map((h) => h.text());
    for (const t of texts) assert.equal(t, texts[0]);
    assert.ok(texts[0].length > 0);
    // Emoji kept whole: no lone surrogate anywhere.
    assert.ok(!/[\uD800-\uDBFF](?![\uDC00-\uDFFF])|(?<![\uD800-\uDBFF])[\uDC00-\uDFFF]/.test(texts[0]));
    assert.equal(await serverText(server.url, doc), texts[0]);
    await Promise.all(clients.map((c) => c.close()));
  });
}

test("the server answers a resent op (same client id, op id, base and patches) with its original ack, applying it once", async () => {
  // Raw frames: the client's resend path, with nothing in between to hide a duplicate.
  const doc = "raw-duplicate";
  const session = async (clientId, frames) => {
    const ws = new WebSocket(server.url);
    ws.binaryType = "arraybuffer";
    const got = [];
    let wake = () => {};
    ws.on("message", (d) => {
      got.push(decode(new Uint8Array(d)).message);
      wake();
    });
    await new Promise((res) => ws.on("open", res));
    const next = async (type) => {
      for (;;) {
        const i = got.findIndex((m) => m.type === type);
        if (i >= 0) return got.splice(i, 1)[0];
        await new Promise((res) => (wake = res));
      }
    };
    ws.send(encode({ type: "Hello", clientId, token: "" }));
    const welcome = await next("Welcome");
    const out = [];
    for (const f of frames) {
      ws.send(encode(f));
      if (f.type === "Open") while ((await next("Ops")).more);
      if (f.type === "Submit") out.push(await next("Ack"));
    }
    ws.close();
    return { id: welcome.clientId, out };
  };
  const submit = { type: "Submit", doc, localSeq: 1, baseVersion: 0, patches: [[0, 0, "once\u{1F600}"]] };
  const first = await session(0n, [{ type: "Open", doc, knownVersion: 0 }, submit]);
  const again = await session(first.id, [{ type: "Open", doc, knownVersion: 0 }, submit]);
  assert.deepEqual(again.out, first.out);
  assert.equal(await serverText(server.url, doc), "once\u{1F600}");
});

test("connections cut right after a Submit: ops resent under the same ids, each edit in the text exactly once", async () => {
  const doc = "reconnect";
  const r = rng(7);
  const submits = new Map(); // localSeq -> times sent
  let cuts = 0;
  let a;
  a = await client(server.url, {
    trace: (dir, m) => {
      if (dir !== "send" || m.type !== "Submit") return;
      submits.set(m.localSeq, (submits.get(m.localSeq) ?? 0) + 1);
      // Cut one connection in two right after a Submit is handed to the socket: the
      // server has it or not, and either way it must end up applied once.
      if (r.below(2) === 0) {
        cuts++;
        queueMicrotask(() => a.dropConnection());
      }
    },
  });
  const b = await client(server.url);
  const ha = a.open(doc);
  const hb = b.open(doc);
  await Promise.all([ha.synced(), hb.synced()]);
  const tokens = [];
  for (let i = 0; i < 40; i++) {
    // Tokens go in at the start or the end only, so no insert lands inside another token.
    const ta = `<a${i}\u{1F600}>`;
    const tb = `<b${i}>`;
    tokens.push(ta, tb);
    await ha.edit([[r.below(2) ? 0 : cpLength(ha.text()), 0, ta]]);
    await hb.edit([[r.below(2) ? 0 : cpLength(hb.text()), 0, tb]]);
    if (i % 5 === 4) await ha.synced();
  }
  await Promise.all([ha.synced(), hb.synced()]);
  await waitFor(() => ha.version === hb.version, "both at one version");
  assert.ok(cuts >= 5, `only ${cuts} cuts`);
  assert.ok([...submits.values()].some((n) => n > 1), "no op was resent");
  const text = await serverText(server.url, doc);
  assert.equal(ha.text(), text);
  assert.equal(hb.text(), text);
  for (const t of tokens) assert.equal(text.split(t).length - 1, 1, `${t} in ${text}`);
  await Promise.all([a.close(), b.close()]);
});

test("edits made offline are composed, sent on reconnect, and merged with the others' edits", async () => {
  const doc = "offline";
  const net = pluggable();
  const a = await client(server.url, { WebSocket: net.WebSocket });
  const b = await client(server.url);
  const ha = a.open(doc);
  const hb = b.open(doc);
  await ha.edit([[0, 0, "hello world"]]);
  await ha.synced();
  await waitFor(() => hb.text() === "hello world", "b has the text");
  net.unplug();
  await waitFor(() => a.connectionState.state === "disconnected", "a offline");
  const submitsBefore = [];
  // Offline: many keystrokes, applied locally at once.
  for (const ch of Array.from(" \u{1F600}\u{1D11E}!")) await ha.edit([[cpLength(ha.text()), 0, ch]]);
  await ha.edit([[0, 1, "H"]]);
  assert.equal(ha.text(), "Hello world \u{1F600}\u{1D11E}!");
  assert.ok(ha.pending);
  // Meanwhile b edits the same text.
  await hb.edit([[6, 5, "there"]]);
  await hb.synced();
  let sent = 0;
  const off = ha.on("ack", () => sent++);
  net.plug();
  await ha.synced();
  await waitFor(() => hb.version === ha.version, "b caught up");
  off();
  // The offline edits went as one composed op.
  assert.equal(sent, 1);
  assert.equal(ha.text(), "Hello there \u{1F600}\u{1D11E}!");
  assert.equal(hb.text(), ha.text());
  assert.equal(await serverText(server.url, doc), ha.text());
  assert.deepEqual(submitsBefore, []);
  await Promise.all([a.close(), b.close()]);
});

test("a new client from the same persistence file sends the edits the old one left unacknowledged", async () => {
  const doc = "persist";
  const dir = tempDir();
  const file = join(dir, "state.json");
  const net = pluggable();
  const a = await client(server.url, { WebSocket: net.WebSocket, store: new FileStore(file) });
  const ha = a.open(doc);
  await ha.edit([[0, 0, "base."]]);
  await ha.synced();
  const id = a.clientId;
  net.unplug();
  await ha.edit([[5, 0, " offline \u{1F600}"]]);
  // Crash with the edit unsent: only the file remains.
  await a.close();

  // An op in flight when the process died: a second client, cut off right after its
  // Submit leaves (the server may or may not have it), then restarted from its file.
  const file2 = join(dir, "state2.json");
  let c;
  c = await client(server.url, {
    store: new FileStore(file2),
    trace: (dir, m) => {
      if (dir === "send" && m.type === "Submit" && m.patches.some((p) => p[2].includes("inflight"))) {
        queueMicrotask(() => void c.close());
      }
    },
  });
  const hc = c.open(doc);
  await hc.synced();
  await hc.edit([[0, 0, "inflight>"]]);
  await waitFor(() => c.connectionState.state === "closed", "c crashed");

  const a2 = await client(server.url, { store: new FileStore(file) });
  assert.equal(a2.clientId, id);
  const ha2 = a2.open(doc);
  assert.equal(ha2.text(), "base. offline \u{1F600}");
  const c2 = await client(server.url, { store: new FileStore(file2) });
  const hc2 = c2.open(doc);
  await Promise.all([ha2.synced(), hc2.synced()]);
  const text = await serverText(server.url, doc);
  assert.equal(text, "inflight>base. offline \u{1F600}");
  await waitFor(() => ha2.version === hc2.version, "both at one version");
  assert.equal(ha2.text(), text);
  assert.equal(hc2.text(), text);
  await Promise.all([a2.close(), c2.close()]);
});

test("presence: a peer's selections arrive (mapped into the local text), and an empty set when it leaves", async () => {
  const doc = "presence";
  const a = await client(server.url);
  const b = await client(server.url);
  const ha = a.open(doc);
  const hb = b.open(doc);
  await ha.edit([[0, 0, "\u{1F600}bcdef"]]);
  await ha.synced();
  await waitFor(() => hb.text() === "\u{1F600}bcdef", "b has the text");
  const seen = [];
  hb.on("presence", (p) => seen.push(p));
  ha.setPresence([{ anchor: 1, head: 3 }]);
  await waitFor(() => seen.length > 0, "b sees a's selection");
  assert.deepEqual(seen.at(-1), { clientId: a.clientId, selections: [{ anchor: 1, head: 3 }] });
  await a.close();
  await waitFor(() => seen.at(-1).selections.length === 0, "b sees a leave");
  assert.equal(seen.at(-1).clientId, a.clientId);
  await b.close();
});

test("a client opens at most MAX_OPEN_DOCS documents; close waits for the edits' acks, tells the server, and makes room", async () => {
  const rejects = [];
  const c = await client(server.url, { trace: (dir, m) => dir === "recv" && m.type === "Reject" && rejects.push(m) });
  const name = (i) => `many-${i}`;
  const handles = Array.from({ length: MAX_OPEN_DOCS }, (_, i) => c.open(name(i)));
  await waitFor(() => handles.every((h) => h.openState === "open"), "every document open");
  assert.throws(() => c.open(name(MAX_OPEN_DOCS)), TooManyOpenError);
  assert.equal(c.open(name(5)), handles[5], "an open document opens again");
  // Closed with an edit pending, offline: the close waits for the ack, after the reconnect.
  c.goOffline();
  await handles[0].edit([[0, 0, "kept"]]);
  let closed = false;
  const closing = handles[0].close().then(() => (closed = true));
  assert.throws(() => handles[0].edit([[0, 0, "x"]]), /closed/);
  assert.throws(() => c.open(name(MAX_OPEN_DOCS)), TooManyOpenError, "a closing document still counts");
  await new Promise((r) => setTimeout(r, 50));
  assert.equal(closed, false, "closed before its edit was acknowledged");
  c.goOnline();
  await closing;
  assert.equal(await serverText(server.url, name(0)), "kept");
  // The server was told: it serves one more on this connection (else it refuses with
  // code 34, which the client would report on console.warn).
  const past = c.open(name(MAX_OPEN_DOCS));
  await past.edit([[0, 0, "past"]]);
  await waitFor(() => past.openState === "open" && !past.pending, "the edit acknowledged");
  assert.equal(await serverText(server.url, name(MAX_OPEN_DOCS)), "past");
  // Closed with nothing pending: at once; opened again, it is a new handle with the text.
  await handles[1].close();
  const again = c.open(name(1));
  assert.notEqual(again, handles[1]);
  await again.synced();
  // A close undone by an open before it is done keeps the handle.
  c.goOffline();
  await handles[2].edit([[0, 0, "two"]]);
  const undone = handles[2].close();
  assert.equal(c.open(name(2)), handles[2]);
  await undone;
  await handles[2].edit([[3, 0, "!"]]);
  c.goOnline();
  await handles[2].synced();
  assert.equal(await serverText(server.url, name(2)), "two!");
  // Opened again after its close, a document's new ops go under ids not used there
  // before (else the server refuses each, code 26, and the client reloads).
  await past.close();
  const reopened = c.open(name(0));
  await reopened.synced();
  assert.equal(reopened.text(), "kept");
  const acks = [];
  reopened.on("ack", (a) => acks.push(a.localSeq));
  await reopened.edit([[4, 0, "!"]]);
  await reopened.synced();
  assert.equal(await serverText(server.url, name(0)), "kept!");
  assert.deepEqual(rejects, []);
  assert.ok(acks.length === 1 && acks[0] > 1, `acks ${acks}`);
  await c.close();
});

test("a document closed, then opened again by the client restarted on its store, sends new ops under new ids", async () => {
  const { MemoryStore } = await import("../dist/index.js");
  const store = new MemoryStore();
  const rejects = [];
  const trace = (dir, m) => dir === "recv" && m.type === "Reject" && rejects.push(m);
  const a = await client(server.url, { store, trace });
  const h = a.open("closed-then-restarted");
  for (const word of ["one ", "two "]) {
    await h.edit([[0, 0, word]]);
    await h.synced();
  }
  await h.close();
  await a.close();
  const b = await client(server.url, { store, trace });
  const again = b.open("closed-then-restarted");
  await again.synced();
  assert.equal(b.clientId, a.clientId);
  await again.edit([[0, 0, "three "]]);
  await again.synced();
  assert.equal(await serverText(server.url, "closed-then-restarted"), "three two one ");
  assert.deepEqual(rejects, []);
  await b.close();
});
