// Frames byte for byte as protocol.md gives them (little-endian, UTF-8 byte lengths,
// code-point patches), and the decoder's refusals.
import { test } from "node:test";
import assert from "node:assert/strict";
import { encode, decode } from "../dist/protocol.js";

const hex = (s) => Uint8Array.from(s.replace(/\s+/g, "").match(/../g).map((h) => parseInt(h, 16)));

test("Hello: magic, version 2, client id 0 (asking for one), empty token", () => {
  // length 21 = type 1 + request id 4 + magic 4 + version 2 + client id 8 + str16 2
  const bytes = hex("15000000 01 00000000 51554952 0200 0000000000000000 0000");
  assert.deepEqual(encode({ type: "Hello", clientId: 0n, token: "" }), bytes);
  assert.deepEqual(decode(bytes).message, { type: "Hello", clientId: 0n, token: "" });
});

test("Welcome with a server-given id at or above 2^63", () => {
  const bytes = hex("13000000 02 00000000 0200 00001000 0100000000000080");
  const { message } = decode(bytes);
  assert.deepEqual(message, { type: "Welcome", version: 2, maxFrame: 1 << 20, clientId: (1n << 63n) + 1n });
  assert.deepEqual(encode(message), bytes);
});

test("Submit with an astral insert: UTF-8 byte length 4, positions in code points", () => {
  // doc "d" (str16), local_seq 1, base 0, 1 patch [2, 1, "😀"]
  const bytes = hex(
    "2c000000 11 07000000 0100 64 0100000000000000 0000000000000000 01000000 02000000 01000000 04000000 f09f9880",
  );
  const msg = { type: "Submit", doc: "d", localSeq: 1, baseVersion: 0, patches: [[2, 1, "\u{1F600}"]] };
  assert.deepEqual(encode(msg, 7), bytes);
  assert.deepEqual(decode(bytes), { requestId: 7, message: msg });
});

test("Ping, Open, Ops, Ack, Remote, Snapshot, PresenceState, Error round-trip", () => {
  assert.deepEqual(encode({ type: "Ping", nonce: 7n }), hex("0d000000 15 00000000 0700000000000000"));
  assert.deepEqual(encode({ type: "Open", doc: "é", knownVersion: 3 }), hex("11000000 10 00000000 0200 c3a9 0300000000000000"));
  const msgs = [
    { type: "Ops", doc: "x", more: true, ops: [{ seq: 4, clientId: 9n, localSeq: 2, patches: [[0, 0, "𝄞a"], [3, 2, ""]] }] },
    { type: "Ack", doc: "x", localSeq: 5, seq: 12 },
    { type: "Remote", doc: "x", seq: 13, clientId: 1n << 63n, localSeq: 1, patches: [] },
    { type: "Snapshot", doc: "x", version: 13, totalLen: 6, text: "a😀b" },
    { type: "PresenceState", doc: "x", clientId: 2n, selections: [{ anchor: 1, head: 3 }] },
    { type: "Reject", doc: "x", localSeq: 5, code: 26, message: "op id reused" },
    { type: "Error", code: 10, message: "timeout" },
    { type: "Pong", nonce: 99n },
    { type: "Reload", doc: "x", reason: "truncated" },
    { type: "Presence", doc: "x", selections: [] },
    { type: "Fetch", doc: "x", afterSeq: 3, limit: 10 },
    { type: "Close", doc: "x" },
  ];
  for (const m of msgs) assert.deepEqual(decode(encode(m, 3)), { requestId: 3, message: m }, m.type);
});

test("Redirect: protocol.md's example, byte for byte", () => {
  // length 15 = type 1 + request id 4 + doc "a" 3 + addr "h:1" 5 + empty ws_url 2
  const bytes = hex("0f000000 28 07000000 0100 61 0300 683a31 0000");
  const msg = { type: "Redirect", doc: "a", addr: "h:1", wsUrl: "" };
  assert.deepEqual(encode(msg, 7), bytes);
  assert.deepEqual(decode(bytes), { requestId: 7, message: msg });
  const full = { type: "Redirect", doc: "d/é", addr: "10.0.0.2:7420", wsUrl: "ws://10.0.0.2:7421/ws" };
  assert.deepEqual(decode(encode(full, 0)), { requestId: 0, message: full });
});

test("the decoder refuses what protocol.md calls malformed", () => {
  const good = encode({ type: "Ack", doc: "x", localSeq: 5, seq: 12 });
  const longer = new Uint8Array([...good, 0]);
  assert.throws(() => decode(longer), /length field/);
  const extra = new Uint8Array([...good, 0]);
  new DataView(extra.buffer).setUint32(0, extra.length - 4, true);
  assert.throws(() => decode(extra), /left over/);
  const badType = good.slice();
  badType[4] = 0x55;
  assert.throws(() => decode(badType), /unknown message type/);
  const badUtf8 = encode({ type: "Error", code: 1, message: "é" });
  badUtf8[badUtf8.length - 1] = 0xff;
  assert.throws(() => decode(badUtf8), /UTF-8/);
  assert.throws(() => decode(good, 8), /max_frame/);
});

test("frames encoded by the Rust implementation (test/ot-cases.json) decode and re-encode byte for byte", async () => {
  const { readFileSync } = await import("node:fs");
  const { frames } = JSON.parse(readFileSync(new URL("./ot-cases.json", import.meta.url), "utf8"));
  assert.ok(frames.length >= 5);
  for (const f of frames) {
    const bytes = hex(f.hex);
    const message = { ...f.message };
    for (const k of ["clientId", "nonce"]) if (k in message) message[k] = BigInt(message[k]);
    const decoded = decode(bytes);
    assert.equal(decoded.requestId, f.request_id, f.name);
    assert.deepEqual(decoded.message, message, f.name);
    assert.deepEqual(encode(message, f.request_id), bytes, f.name);
  }
});
