// Cluster redirects (protocol.md, Redirects): the client follows a `Redirect` to the
// node's `ws_url` over a WebSocket of its own, opens the document there with its
// version and resends its op in flight under its id. `quire serve` has no cluster mode
// yet, so the nodes that redirect are fakes in this process (they speak the protocol
// from protocol.md) and the owner they point at is a real `quire serve`.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { client, fakeNetwork, serverText, startServer, waitFor } from "./helpers.mjs";

let server;
before(async () => {
  server = await startServer();
});
after(async () => {
  await server?.stop();
});

/** A node that serves nothing: every request about a document is answered with a Redirect. */
function redirector(to) {
  return (m, reply) => {
    if ("doc" in m) reply({ type: "Redirect", doc: m.doc, addr: "", wsUrl: to() });
  };
}

test("a document served by another node is opened and edited there, over a second WebSocket", async () => {
  const net = fakeNetwork();
  const home = net.add("home", redirector(() => server.url));
  const sent = [];
  const c = await client(home.url, { WebSocket: net.WebSocket, trace: (dir, m) => dir === "send" && sent.push(m) });
  const doc = c.open("elsewhere");
  await doc.edit([[0, 0, "hello \u{1F600}"]]);
  await doc.synced();
  await doc.edit([[6, 0, "there "]]);
  await doc.synced();
  assert.equal(await serverText(server.url, "elsewhere"), "hello there \u{1F600}");
  // The home node was asked once and redirected; everything else went to the owner.
  assert.deepEqual(
    home.received.map((m) => m.type),
    ["Hello", "Open"],
  );
  assert.equal(sent.filter((m) => m.type === "Hello").length, 2);
  assert.equal(c.connectionState.state, "connected");
  await c.close();
});

test("a redirect that comes unasked with an op in flight: the op is resent at the owner under its id", async () => {
  const net = fakeNetwork();
  let handedOver = false;
  // Serves the document (empty) until the first op arrives, which it does not
  // acknowledge: it hands the document over to the real server instead.
  const home = net.add("home", (m, reply) => {
    if (!("doc" in m)) return;
    if (handedOver) return reply({ type: "Redirect", doc: m.doc, addr: "", wsUrl: server.url });
    if (m.type === "Open") {
      reply({ type: "Snapshot", doc: m.doc, version: 0, totalLen: 0, text: "" });
      reply({ type: "Ops", doc: m.doc, more: false, ops: [] });
    } else if (m.type === "Submit") {
      handedOver = true;
      reply({ type: "Redirect", doc: m.doc, addr: "", wsUrl: server.url }, 0);
    }
  });
  const submits = [];
  const c = await client(home.url, {
    WebSocket: net.WebSocket,
    trace: (dir, m) => dir === "send" && m.type === "Submit" && submits.push(m),
  });
  const doc = c.open("moving");
  await waitFor(() => doc.version === 0 && c.connectionState.state === "connected" && home.received.some((m) => m.type === "Open"), "opened at home");
  await doc.edit([[0, 0, "abc"]]);
  await doc.synced();
  assert.equal(doc.text(), "abc");
  assert.equal(await serverText(server.url, "moving"), "abc");
  // Sent twice, the same op under the same id: to the node that lost the document,
  // then to the owner.
  assert.equal(submits.length, 2);
  assert.deepEqual(submits[0], submits[1]);
  await c.close();
});

test("nodes that redirect to each other make the client back off, its delay growing", async () => {
  const net = fakeNetwork();
  const p = net.add("p", redirector(() => "ws://fake-q/ws"));
  net.add("q", redirector(() => "ws://fake-p/ws"));
  const c = await client(p.url, { WebSocket: net.WebSocket, random: () => 1 });
  const states = [];
  c.on("state", (s) => s.state === "disconnected" && states.push(s));
  const doc = c.open("loop");
  await doc.edit([[0, 0, "kept locally"]]);
  await waitFor(() => states.length >= 3, "three reconnects");
  // No document was served in between: the attempts count on and the delay doubles.
  assert.deepEqual(
    states.slice(0, 3).map((s) => s.attempt),
    [1, 2, 3],
  );
  assert.ok(states[1].retryInMs > states[0].retryInMs && states[2].retryInMs > states[1].retryInMs);
  assert.equal(doc.text(), "kept locally");
  assert.ok(doc.pending);
  await c.close();
});

test("an op told to retry (code 33) on a document it had: the delay grows, the op gets in after", async () => {
  // A node that serves the document (at version 3) and answers its op with code 33, as
  // a cluster node does while the document is being handed over; then acks it. The
  // client opens it again with the version it has: a catch-up, no snapshot.
  const net = fakeNetwork();
  let refusing = true;
  let text = "abc";
  let version = 3;
  const node = net.add("node", (m, reply) => {
    if (m.type === "Open") {
      assert.ok(m.knownVersion === 0 || m.knownVersion === version, "only these are asked for");
      if (m.knownVersion === 0) reply({ type: "Snapshot", doc: m.doc, version, totalLen: [...text].length, text });
      reply({ type: "Ops", doc: m.doc, more: false, ops: [] });
    } else if (m.type === "Submit") {
      if (refusing) {
        reply({ type: "Reject", doc: m.doc, localSeq: m.localSeq, code: 33, message: "being handed over; retry" });
      } else {
        // An insert at 0 on version 3, the document's version.
        assert.equal(m.baseVersion, version);
        text = m.patches[0][2] + text;
        version += 1;
        reply({ type: "Ack", doc: m.doc, localSeq: m.localSeq, seq: version });
      }
    }
  });
  const c = await client(node.url, { WebSocket: net.WebSocket, random: () => 1 });
  const states = [];
  c.on("state", (s) => s.state === "disconnected" && states.push(s));
  // Another document, served on every connection with nothing in flight: no progress
  // of the refused op's (before the review of 0904b4c it started the backoff over).
  const idle = c.open("idle");
  const doc = c.open("doc");
  await doc.synced();
  await idle.synced();
  assert.equal(doc.text(), "abc");
  await doc.edit([[0, 0, "kept "]]);
  await waitFor(() => states.length >= 3, "three reconnects");
  // Served on each connection, the op refused each time: the attempts count on and the
  // delay doubles (before, each catch-up served started the backoff over: attempt 1).
  assert.deepEqual(
    states.slice(0, 3).map((s) => s.attempt),
    [1, 2, 3],
  );
  assert.ok(states[1].retryInMs > states[0].retryInMs && states[2].retryInMs > states[1].retryInMs);
  assert.ok(doc.pending);
  refusing = false;
  await doc.synced();
  assert.equal(doc.text(), "kept abc");
  assert.equal(doc.version, 4);
  assert.equal(text, "kept abc");
  // The same op each time, under the same id; none for the idle document.
  const submits = node.received.filter((m) => m.type === "Submit");
  assert.ok(submits.every((m) => m.doc === "doc"));
  assert.ok(submits.length >= 4);
  for (const s of submits) assert.deepEqual(s, submits[0]);
  await c.close();
});
