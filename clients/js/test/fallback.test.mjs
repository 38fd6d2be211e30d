// Further nodes of a cluster (`fallbackUrls`): each failed attempt of the home
// connection (refused, closed before `Welcome`, or a handshake that never completes)
// moves the home to the next URL of [url, ...fallbackUrls]; a home that welcomed the
// client keeps its URL and is tried first again when lost, unless it answered code 33
// (no node serves a document now), which moves the home on too. Redirects back to the
// current home are carried on the home connection. Nodes that must refuse, or never
// answer, are fakes in this process (helpers.mjs, `fakeNetwork`); the ones that serve
// for real are `quire serve`. Each client is closed by `t.after`, also when an
// assertion fails: a live client would keep the test file running.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { createServer, connect } from "node:net";
import { client, fakeNetwork, serverText, startServer, waitFor } from "./helpers.mjs";
import { applyPatches, cpLen } from "../dist/ot.js";

let server;
before(async () => {
  server = await startServer();
});
after(async () => {
  await server?.stop();
});

/** A URL where nothing listens: a port bound, then released. */
async function deadUrl() {
  const srv = createServer();
  await new Promise((res) => srv.listen(0, "127.0.0.1", res));
  const { port } = srv.address();
  await new Promise((res) => srv.close(res));
  return `ws://127.0.0.1:${port}/ws`;
}

/**
 * A TCP relay to `port`, standing for a node of the same cluster (the documents it
 * serves are the ones there). `stop()` kills it for good: the port stops listening and
 * every connection through it is cut.
 */
async function relay(port) {
  const conns = new Set();
  const srv = createServer((down) => {
    const up = connect(port, "127.0.0.1");
    conns.add(down).add(up);
    const end = () => {
      down.destroy();
      up.destroy();
    };
    for (const s of [down, up]) s.on("error", end).on("close", end);
    down.pipe(up);
    up.pipe(down);
  });
  await new Promise((res) => srv.listen(0, "127.0.0.1", res));
  return {
    url: `ws://127.0.0.1:${srv.address().port}/ws`,
    stop() {
      if (!srv.listening) return;
      srv.close();
      for (const s of conns) s.destroy();
    },
  };
}

/** A fake node that serves its documents itself (from memory, acknowledging every op). */
function serving(redirectFirstOpen = null) {
  const texts = new Map();
  let redirected = false;
  const handle = (m, reply) => {
    if (!("doc" in m)) return;
    const d = texts.get(m.doc) ?? { text: "", seq: 0 };
    texts.set(m.doc, d);
    if (m.type === "Open" && redirectFirstOpen && !redirected) {
      redirected = true;
      reply({ type: "Redirect", doc: m.doc, addr: "", wsUrl: redirectFirstOpen });
    } else if (m.type === "Open") {
      reply({ type: "Snapshot", doc: m.doc, version: d.seq, totalLen: cpLen(d.text), text: d.text });
      reply({ type: "Ops", doc: m.doc, more: false, ops: [] });
    } else if (m.type === "Submit") {
      // One client: every op is based on the latest version.
      d.text = applyPatches(d.text, m.patches);
      reply({ type: "Ack", doc: m.doc, localSeq: m.localSeq, seq: ++d.seq });
    }
  };
  handle.texts = texts;
  return handle;
}

test("an unreachable url: the client connects to the next URL and its edits land there", async (t) => {
  const dead = await deadUrl();
  const net = fakeNetwork();
  const c = await client(dead, { WebSocket: net.WebSocket, fallbackUrls: [server.url] });
  t.after(() => c.close());
  const doc = c.open("fallback-first");
  await doc.edit([[0, 0, "reached \u{1F600}"]]);
  await waitFor(() => c.connectionState.state === "connected", "connected to the fallback");
  await doc.synced();
  assert.equal(doc.pending, false);
  assert.equal(await serverText(server.url, "fallback-first"), "reached \u{1F600}");
  assert.deepEqual(net.dialed, [dead, server.url]);
});

test("a home node lost for good: the client moves to the next node, which acknowledges the edits made meanwhile", async (t) => {
  const a = await relay(server.port);
  t.after(() => a.stop());
  const net = fakeNetwork();
  const c = await client(a.url, { WebSocket: net.WebSocket, fallbackUrls: [server.url] });
  t.after(() => c.close());
  const doc = c.open("home-lost");
  await doc.edit([[0, 0, "at A"]]);
  await doc.synced();
  assert.deepEqual(net.dialed, [a.url]);

  a.stop();
  await waitFor(() => c.connectionState.state !== "connected", "the loss of A");
  const acks = [];
  doc.on("ack", (e) => acks.push(e));
  await doc.edit([[4, 0, ", then at B"]]);
  await waitFor(() => c.connectionState.state === "connected", "connected again");
  await doc.synced();
  assert.equal(acks.length, 1);
  assert.equal(await serverText(server.url, "home-lost"), "at A, then at B");
  // A welcomed the client: once lost it was tried again first, and the attempt it
  // refused moved the home to B, where every later connection went.
  assert.deepEqual(net.dialed.slice(0, 3), [a.url, a.url, server.url]);
  assert.ok(net.dialed.slice(3).every((u) => u === server.url), net.dialed.join(" "));
});

test("after a rotation, a redirect to the new home is carried on the home connection", async (t) => {
  const net = fakeNetwork();
  const a = net.add("a");
  a.down = true;
  // The new home sends the document to C, which sends it back: the home connection
  // must carry it, not a second connection to the same node under the same client id.
  const bHandle = serving("ws://fake-c/ws");
  const b = net.add("b", bHandle);
  const cNode = net.add("c", serving("ws://fake-b/ws"));
  const c = await client(a.url, { WebSocket: net.WebSocket, fallbackUrls: [b.url] });
  t.after(() => c.close());
  const doc = c.open("bounced");
  await doc.edit([[0, 0, "here"]]);
  await waitFor(() => c.connectionState.state === "connected" && !doc.pending, "the edit acknowledged");
  await doc.synced();
  assert.equal(bHandle.texts.get("bounced").text, "here");
  assert.equal(b.connections, 1);
  assert.equal(cNode.connections, 1);
  assert.deepEqual(net.dialed, [a.url, b.url, cNode.url]);
  assert.deepEqual(
    b.received.map((m) => m.type),
    ["Hello", "Open", "Open", "Submit"],
  );
});

test("a redirect to the home spelled otherwise (host case, default port) is carried on the home connection", async (t) => {
  const net = fakeNetwork();
  const bHandle = serving("ws://fake-c/ws");
  const b = net.add("b", bHandle);
  const cNode = net.add("c", serving("ws://FAKE-b:80/ws"));
  const c = await client(b.url, { WebSocket: net.WebSocket });
  t.after(() => c.close());
  const doc = c.open("bounced");
  await doc.edit([[0, 0, "here"]]);
  await waitFor(() => c.connectionState.state === "connected" && !doc.pending, "the edit acknowledged");
  await doc.synced();
  assert.equal(bHandle.texts.get("bounced").text, "here");
  assert.equal(b.connections, 1);
  assert.deepEqual(net.dialed, [b.url, cNode.url]);
  assert.deepEqual(
    b.received.map((m) => m.type),
    ["Hello", "Open", "Open", "Submit"],
  );
});

test("a handshake that never completes is given up after deadAfterMs, and the next URL tried", async (t) => {
  const net = fakeNetwork();
  const mute = net.add("mute", () => {}, { welcome: false });
  const c = await client(mute.url, { WebSocket: net.WebSocket, fallbackUrls: [server.url], deadAfterMs: 200 });
  t.after(() => c.close());
  const doc = c.open("after-mute");
  await doc.edit([[0, 0, "x"]]);
  await waitFor(() => c.connectionState.state === "connected", "connected to the fallback");
  await doc.synced();
  assert.equal(await serverText(server.url, "after-mute"), "x");
  assert.deepEqual(net.dialed, [mute.url, server.url]);
  assert.deepEqual(
    mute.received.map((m) => m.type),
    ["Hello"],
  );
  assert.equal(mute.sockets.size, 0);
});

test("without fallbackUrls, a handshake that never completes is given up after deadAfterMs, and the url tried again", async (t) => {
  const net = fakeNetwork();
  const mute = net.add("mute", () => {}, { welcome: false });
  const c = await client(mute.url, { WebSocket: net.WebSocket, deadAfterMs: 200, backoffInitialMs: 10 });
  t.after(() => c.close());
  const states = [];
  c.on("state", (s) => states.push(s.state));
  const doc = c.open("mute-only");
  await doc.edit([[0, 0, "kept locally"]]);
  await waitFor(() => mute.connections >= 2, "a second attempt after the first handshake's deadline");
  assert.ok(net.dialed.every((u) => u === mute.url), net.dialed.join(" "));
  assert.ok(states.includes("disconnected"), states.join(" "));
  assert.ok(!states.includes("connected"));
  // The abandoned attempt's socket is closed: at most the current one is open.
  await waitFor(() => mute.sockets.size <= 1, "the first socket closed");
  assert.equal(doc.text(), "kept locally");
  assert.ok(doc.pending);
});

test("without fallbackUrls, a dead url is tried again and again, and only it", async (t) => {
  const net = fakeNetwork();
  const a = net.add("a");
  a.down = true;
  const c = await client(a.url, { WebSocket: net.WebSocket });
  t.after(() => c.close());
  const states = [];
  c.on("state", (s) => states.push(s.state));
  const doc = c.open("nowhere");
  await doc.edit([[0, 0, "kept locally"]]);
  await waitFor(() => a.connections >= 3, "three attempts");
  assert.ok(net.dialed.length >= 3);
  assert.ok(net.dialed.every((u) => u === a.url), net.dialed.join(" "));
  assert.ok(!states.includes("connected"));
  assert.equal(c.connectionState.state, "disconnected");
  assert.equal(doc.text(), "kept locally");
  assert.ok(doc.pending);
});

test("a home that answers code 33 to every Open (a node cut off from etcd): the next URL serves the edits", async (t) => {
  const net = fakeNetwork();
  const cutOff = net.add("cut-off", (m, reply) => {
    if (m.type === "Open") reply({ type: "Error", code: 33, message: "no node serves it right now, retry" });
  });
  const c = await client(cutOff.url, { WebSocket: net.WebSocket, fallbackUrls: [server.url] });
  t.after(() => c.close());
  const doc = c.open("after-cut-off");
  await doc.edit([[0, 0, "x"]]);
  await waitFor(() => c.connectionState.state === "connected" && !doc.pending, "the edit acknowledged");
  await doc.synced();
  assert.equal(await serverText(server.url, "after-cut-off"), "x");
  // Welcomed, then code 33: that moved the home on, and it stayed at the node that serves.
  assert.deepEqual(
    cutOff.received.slice(0, 2).map((m) => m.type),
    ["Hello", "Open"],
  );
  assert.equal(net.dialed[0], cutOff.url);
  assert.ok(net.dialed.slice(1).every((u) => u === server.url), net.dialed.join(" "));
});
