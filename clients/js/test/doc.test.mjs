// The document state machine without a server: composing the queue under the op limit,
// rebasing remote ops over several queued ops, splitting refused and oversized ops.
import { test } from "node:test";
import assert from "node:assert/strict";
import { DocState, TooLargeError, splitPatch, patchesWireLen } from "../dist/doc.js";
import { apply, applyPatches, toPatches } from "../dist/ot.js";

/** The local text must always be the confirmed text with every pending op applied. */
function consistent(doc) {
  let t = doc.confirmed;
  if (doc.inFlight) t = apply(t, doc.inFlight.op);
  for (const op of doc.buffer) t = apply(t, op);
  assert.equal(t, doc.text);
}

test("queued edits compose into one op until it reaches half the op limit, then a new one starts", () => {
  const doc = new DocState("", 0, 1);
  doc.maxOpBytes = 200;
  for (let i = 0; i < 20; i++) doc.localEdit([[i * 10, 0, "0123456789"]]);
  // 100 bytes of patches per op at most: 10 + 12 + 4 per patch, composed while <= 100.
  assert.ok(doc.buffer.length > 1 && doc.buffer.length < 20, `${doc.buffer.length} ops`);
  consistent(doc);
  assert.throws(() => doc.localEdit([[0, 0, "x".repeat(300)]]), TooLargeError);
  assert.equal(doc.text, "0123456789".repeat(20));
});

test("a remote op is rebased over the op in flight and every queued op (emoji, ties)", () => {
  const doc = new DocState("a\u{1F600}b", 3, 1);
  doc.maxOpBytes = 40; // each edit its own op
  doc.localEdit([[1, 0, "XXXXXXXXXXXX"]]);
  const sent = doc.takeToSend();
  assert.equal(sent.localSeq, 1);
  doc.localEdit([[0, 0, "YYYYYYYYYYYY"]]);
  doc.localEdit([[cpLen(doc.text), 0, "\u{1D11E}"]]);
  assert.ok(doc.buffer.length >= 2);
  // The server sequenced another client's op first: it inserts at 1 (a tie with our
  // in-flight insert: ours was sequenced later, so ours goes left) and deletes the emoji.
  const applied = doc.onRemote(4, [[1, 1, "R"]]);
  assert.ok(applied.length > 0);
  assert.equal(doc.confirmed, "aRb");
  assert.equal(doc.text, "YYYYYYYYYYYYaXXXXXXXXXXXXRb\u{1D11E}");
  consistent(doc);
  doc.onAck(1, 5);
  assert.equal(doc.confirmed, "aXXXXXXXXXXXXRb");
  consistent(doc);
  assert.throws(() => doc.onRemote(7, []), /seq 7/);
});

test("edits composed under the default limit are split when a server's Welcome allows less", () => {
  // Offline from the start: no Welcome yet, so the default limit (1 MiB) composes.
  const doc = new DocState("ab", 1, 5);
  for (let i = 0; i < 40; i++) doc.localEdit([[1 + i * 100, 0, "\u{1F600}x".repeat(50)]]);
  assert.equal(doc.buffer.length, 1);
  const text = doc.text;
  doc.maxOpBytes = 1000;
  assert.ok(doc.buffer.length >= 8, `${doc.buffer.length} ops`);
  for (const op of doc.buffer) assert.ok(patchesWireLen(toPatches(op)) <= 500);
  assert.equal(doc.text, text);
  consistent(doc);
  // Each piece goes out alone and fits.
  while (doc.hasPending()) {
    const sent = doc.takeToSend();
    assert.ok(patchesWireLen(sent.patches) <= 1000);
    doc.onAck(sent.localSeq, doc.version + 1);
  }
  assert.equal(doc.confirmed, text);
});

function cpLen(s) {
  return Array.from(s).length;
}

test("an op refused as too large comes back cut into pieces a quarter of the limit", () => {
  const doc = new DocState("ab", 1, 5);
  doc.maxOpBytes = 400;
  doc.localEdit([[1, 1, "\u{1F600}".repeat(40)]]); // 160 bytes of insert
  doc.takeToSend();
  doc.requeueInFlight(true);
  assert.ok(doc.buffer.length >= 2);
  consistent(doc);
  const next = doc.takeToSend();
  assert.equal(next.localSeq, 6, "a new op id, never the refused one's");
  assert.ok(patchesWireLen(next.patches) <= 100);
});

test("splitPatch cuts between code points, never inside a surrogate pair", () => {
  const pieces = splitPatch([3, 2, "\u{1F600}a\u{1D11E}".repeat(20)], 40);
  assert.ok(pieces.length > 1);
  for (const p of pieces) {
    assert.ok(patchesWireLen([p]) <= 40);
    assert.ok(!/[\uD800-\uDBFF]$/.test(p[2]) && !/^[\uDC00-\uDFFF]/.test(p[2]));
  }
  assert.equal(pieces[0][1], 2);
  assert.ok(pieces.slice(1).every((p) => p[1] === 0));
  let t = "0123456789";
  for (const p of pieces) t = applyPatches(t, [p]);
  assert.equal(t, "012" + "\u{1F600}a\u{1D11E}".repeat(20) + "56789");
});

test("the state survives a round trip through its persisted form", () => {
  const doc = new DocState("hello", 2, 3);
  doc.localEdit([[5, 0, " \u{1F600}"]]);
  doc.takeToSend();
  doc.localEdit([[0, 1, "H"]]);
  const back = DocState.restore(JSON.parse(JSON.stringify(doc.persisted())));
  assert.equal(back.text, "Hello \u{1F600}");
  assert.deepEqual(back.inFlight, doc.inFlight);
  assert.equal(back.nextLocalSeq, 4);
  consistent(back);
});
