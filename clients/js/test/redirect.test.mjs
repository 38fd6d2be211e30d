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
