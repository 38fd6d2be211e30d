// The TypeScript OT against the cases src/ot.rs generated (tests/ot_cases.rs writes
// test/ot-cases.json and fails when it drifts): same components, same patches, same
// texts, astral characters and ties included.
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { Side, fromPatches, toPatches, transform, compose, apply, applyPatches, cpLen } from "../dist/ot.js";

const cases = JSON.parse(readFileSync(new URL("./ot-cases.json", import.meta.url), "utf8"));

test("the case file has transform and compose cases, astral ones included", () => {
  assert.ok(cases.transform.length >= 300);
  assert.ok(cases.compose.length >= 200);
  assert.ok(cases.transform.some((c) => /\u{1F600}/u.test(c.base) && /\u{1D11E}/u.test(JSON.stringify(c))));
});

test("transform matches the Rust implementation on every case", () => {
  for (const c of cases.transform) {
    const a = fromPatches(c.a);
    const b = fromPatches(c.b);
    assert.deepEqual(a, c.a_ops, `${c.name}: from_patches(a)`);
    assert.deepEqual(b, c.b_ops, `${c.name}: from_patches(b)`);
    const aLeft = transform(a, b, Side.Left);
    assert.deepEqual(aLeft, c.a_left, `${c.name}: transform(a, b, Left)`);
    assert.deepEqual(transform(a, b, Side.Right), c.a_right, `${c.name}: transform(a, b, Right)`);
    const bRight = transform(b, a, Side.Right);
    assert.deepEqual(bRight, c.b_right, `${c.name}: transform(b, a, Right)`);
    assert.deepEqual(toPatches(aLeft), c.a_left_patches, `${c.name}: patches sent`);
    assert.equal(apply(applyPatches(c.base, c.b), aLeft), c.final, `${c.name}: b then a'`);
    assert.equal(apply(apply(c.base, a), bRight), c.final, `${c.name}: a then b'`);
  }
});

test("compose matches the Rust implementation on every case", () => {
  for (const c of cases.compose) {
    const ab = compose(fromPatches(c.a), fromPatches(c.b));
    assert.deepEqual(ab, c.ab, `${c.name}: compose`);
    assert.deepEqual(toPatches(ab), c.ab_patches, `${c.name}: patches`);
    assert.equal(apply(c.base, ab), c.result, `${c.name}: result`);
  }
});

test("code points, not UTF-16 units", () => {
  assert.equal(cpLen("a\u{1F600}\u{1D11E}"), 3);
  assert.equal(applyPatches("\u{1F600}\u{1F600}", [[1, 1, "x"]]), "\u{1F600}x");
  // A split astral character would show up as a lone surrogate.
  const op = compose(fromPatches([[0, 0, "\u{1F600}\u{1D11E}"]]), fromPatches([[1, 1, ""]]));
  assert.deepEqual(op, ["\u{1F600}"]);
});
