// The CodeMirror binding end to end, in a DOM from jsdom (no layout, which the binding
// does not need): two editors on two clients of a real server converge, remote edits are
// not echoed, undo leaves the others' edits alone, cursors are drawn with labels; and
// going offline and back keeps every edit.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { JSDOM } from "jsdom";
import { startServer, client, waitFor, serverText } from "./helpers.mjs";

const dom = new JSDOM("<!doctype html><body></body>", { pretendToBeVisual: true });
for (const k of ["window", "document", "navigator", "MutationObserver", "requestAnimationFrame", "cancelAnimationFrame", "getComputedStyle", "Node", "HTMLElement", "Element", "DOMRect", "Window", "Text", "Range", "Selection", "KeyboardEvent", "MouseEvent"]) {
  if (!(k in globalThis) || k === "window" || k === "document" || k === "navigator") {
    Object.defineProperty(globalThis, k, { value: k === "window" ? dom.window : dom.window[k], configurable: true, writable: true });
  }
}
// jsdom has no layout: CodeMirror's measuring gets empty rectangles.
dom.window.Range.prototype.getClientRects = () => [];
dom.window.Range.prototype.getBoundingClientRect = () => ({ left: 0, right: 0, top: 0, bottom: 0, width: 0, height: 0 });
const { EditorState, EditorSelection } = await import("@codemirror/state");
const { EditorView } = await import("@codemirror/view");
const { undo, history } = await import("@codemirror/commands");
const { quireCollab } = await import("../dist/codemirror.js");

let server;
before(async () => {
  server = await startServer();
});
after(async () => {
  await server?.stop();
  dom.window.close(); // its animation frames would keep the process alive
});

function editor(handle, extra = []) {
  const parent = document.createElement("div");
  document.body.appendChild(parent);
  return new EditorView({ parent, state: EditorState.create({ doc: handle.text(), extensions: [history(), quireCollab(handle, { label: (id) => `peer-${id}` }), ...extra] }) });
}

test("two editors converge, remote edits are not echoed, cursors are labelled", async () => {
  const [ca, cb] = [await client(server.url), await client(server.url)];
  const [ha, hb] = [ca.open("cm"), cb.open("cm")];
  await Promise.all([ha.synced(), hb.synced()]);
  const [a, b] = [editor(ha), editor(hb)];
  // Closed whatever happens: open clients would keep the test process alive.
  try {
    let sentA = 0;
    ha.on("ack", () => sentA++);

    a.dispatch({ changes: { from: 0, insert: "a😀b\nline two" } });
    await waitFor(() => b.state.doc.toString() === "a😀b\nline two", "b to see a's insert");
    // Several ranges in one transaction, positions in the start document.
    b.dispatch({ changes: [{ from: 1, to: 3, insert: "🎉🎉" }, { from: 5, to: 9, insert: "LINE" }, { from: b.state.doc.length, insert: "!" }] });
    await waitFor(() => a.state.doc.toString() === "a🎉🎉b\nLINE two!", "a to see b's multi-range change");
    await Promise.all([ha.synced(), hb.synced()]);
    assert.equal(sentA, 1, "a sent only its own edit");
    assert.equal(await serverText(server.url, "cm"), "a🎉🎉b\nLINE two!");

    // Undo in a takes back only a's own insert, which b's edits were made inside of.
    undo(a);
    await Promise.all([ha.synced(), hb.synced()]);
    await waitFor(() => b.state.doc.toString() === a.state.doc.toString(), "undo to converge");
    assert.equal(ha.text(), a.state.doc.toString());

    // b's selection is drawn in a, labelled with b's client id. The selection is made once
    // a has b's edit: a presence that arrives before the edit it refers to is clamped
    // until b's edits are acknowledged (the test below), which is not what this checks.
    b.dispatch({ changes: { from: 0, to: b.state.doc.length, insert: "x😀yz" } });
    await waitFor(() => a.state.doc.toString() === "x😀yz", "a to see b's rewrite");
    b.dispatch({ selection: EditorSelection.range(1, 3) });
    await waitFor(
      () =>
        a.dom.querySelector(".cm-quire-label")?.textContent === `peer-${cb.clientId}` &&
        a.dom.querySelector(".cm-quire-selection")?.textContent === "😀",
      "b's labelled selection in a",
    );
  } finally {
    a.destroy();
    b.destroy();
    await ca.close();
    await cb.close();
  }
});

test("offline by choice: the state says so, edits queue, and are sent when back online", async () => {
  const [ca, cb] = [await client(server.url), await client(server.url)];
  const [ha, hb] = [ca.open("offline"), cb.open("offline")];
  await Promise.all([ha.synced(), hb.synced()]);
  const states = [];
  ca.on("state", (s) => states.push(s.state));
  ca.goOffline();
  assert.equal(ca.connectionState.state, "offline");
  const a = editor(ha);
  a.dispatch({ changes: { from: 0, insert: "while offline 😀" } });
  await new Promise((r) => setTimeout(r, 300));
  assert.equal(ca.connectionState.state, "offline", "no reconnect while offline");
  assert.equal(hb.text(), "");
  ca.goOnline();
  await waitFor(() => hb.text() === "while offline 😀", "the queued edit to arrive");
  assert.deepEqual(states.slice(0, 3), ["offline", "connecting", "connected"]);
  a.destroy();
  await ca.close();
  await cb.close();
});

test("a cursor moved with an edit is drawn where it is once the edit arrives (presence resent when the edits are acknowledged)", async () => {
  const [ca, cb] = [await client(server.url), await client(server.url)];
  const [ha, hb] = [ca.open("caret-ahead"), cb.open("caret-ahead")];
  await Promise.all([ha.synced(), hb.synced()]);
  const [a, b] = [editor(ha), editor(hb)];
  try {
    // b types: its first key goes out as an op, the others wait for its ack; its cursor
    // goes out at once, after "hello world", and so reaches a before the text it is in.
    // a clamps it to the text it has.
    for (const ch of "hello world") b.dispatch({ changes: { from: b.state.doc.length, insert: ch }, selection: { anchor: b.state.doc.length + 1 } });
    b.dispatch({ selection: { anchor: 5 } });
    await waitFor(() => a.state.doc.toString() === "hello world", "a to see b's edit");
    // Where a draws b's caret: the text before it in a's editor.
    const before = () => {
      const caret = a.dom.querySelector(".cm-quire-caret");
      if (!caret) return null;
      const range = document.createRange();
      range.setStart(a.contentDOM, 0);
      range.setEndBefore(caret);
      return range.toString();
    };
    await waitFor(() => before() === "hello", `a to draw b's caret after "hello"`, 10_000).catch((e) => {
      throw new Error(`${e.message}: drawn after ${JSON.stringify(before())}`);
    });
  } finally {
    a.destroy();
    b.destroy();
    await ca.close();
    await cb.close();
  }
});

test("consecutive client ids get colours far apart", async () => {
  const { defaultColor } = await import("../dist/codemirror.js");
  const hue = (id) => Number(/hsl\((\d+),/.exec(defaultColor(id))[1]);
  for (const id of [0n, 1n, 5808n, 123456789n]) {
    const d = Math.abs(hue(id) - hue(id + 1n));
    assert.ok(Math.min(d, 360 - d) >= 90, `ids ${id} and ${id + 1n}: hues ${hue(id)} and ${hue(id + 1n)}`);
  }
});
