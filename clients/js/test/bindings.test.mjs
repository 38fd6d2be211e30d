// The pure parts of the editor bindings: CodeMirror change sets to quire patches and
// back (UTF-16 units against code points, start-document positions against patches
// applied one after another), and the textarea's diff.
import { test } from "node:test";
import assert from "node:assert/strict";
import { ChangeSet, EditorState, Text } from "@codemirror/state";
import { changesToPatches, patchesToChanges, cpToUnitIn, unitToCpIn } from "../dist/cm-changes.js";
import { diffText, applyToValue } from "../dist/textarea.js";
import { applyPatches } from "../dist/ot.js";

const doc = (s) => Text.of(s.split("\n"));

test("one insert and one delete around an astral character", () => {
  const start = doc("a😀b");
  // After the emoji (UTF-16 3, code point 2).
  let cs = ChangeSet.of({ from: 3, insert: "X" }, start.length);
  assert.deepEqual(changesToPatches(start, cs), [[2, 0, "X"]]);
  // Delete the emoji (two units, one code point).
  cs = ChangeSet.of({ from: 1, to: 3 }, start.length);
  assert.deepEqual(changesToPatches(start, cs), [[1, 1, ""]]);
});

test("a multi-range transaction becomes patches in order, each on the previous result", () => {
  const text = "😀 one\ntwo 😀 three";
  const state = EditorState.create({ doc: text });
  const tr = state.update({
    changes: [
      { from: 0, to: 2, insert: "🎉🎉" }, // replace the first emoji by two
      { from: 3, to: 6, insert: "1" }, // "one" -> "1"
      { from: 11, to: 13 }, // delete the second emoji
      { from: state.doc.length, insert: " 😀" },
    ],
  });
  const patches = changesToPatches(state.doc, tr.changes);
  assert.deepEqual(patches, [
    [0, 1, "🎉🎉"],
    [3, 3, "1"],
    [9, 1, ""],
    [15, 0, " 😀"],
  ]);
  assert.equal(applyPatches(text, patches), tr.state.doc.toString());
});

test("patches to a change set and back, on random edits with astral characters", () => {
  const alphabet = ["a", "b", "\n", "😀", "é", "𝄞"];
  let seed = 7;
  const rnd = (n) => {
    seed = (seed * 1103515245 + 12345) & 0x7fffffff;
    return seed % n;
  };
  const word = () => Array.from({ length: rnd(4) }, () => alphabet[rnd(alphabet.length)]).join("");
  for (let round = 0; round < 300; round++) {
    const text = Array.from({ length: 1 + rnd(12) }, () => word()).join("");
    const cps = Array.from(text);
    // A few sequential patches, each valid on the result of the previous.
    const patches = [];
    let cur = cps.length;
    for (let k = 0; k < 1 + rnd(4); k++) {
      const pos = rnd(cur + 1);
      const del = rnd(cur - pos + 1);
      const ins = word();
      patches.push([pos, del, ins]);
      cur += Array.from(ins).length - del;
    }
    const startDoc = doc(text);
    const cs = patchesToChanges(startDoc, patches);
    const expected = applyPatches(text, patches);
    assert.equal(cs.apply(startDoc).toString(), expected);
    // Back: the CodeMirror change set as patches gives the same text.
    assert.equal(applyPatches(text, changesToPatches(startDoc, cs)), expected);
  }
});

test("a patch past the end is refused", () => {
  assert.throws(() => patchesToChanges(doc("a😀"), [[1, 2, ""]]), RangeError);
});

test("code points and UTF-16 offsets in a CodeMirror document", () => {
  const t = doc("😀a\n𝄞b");
  assert.equal(cpToUnitIn(t, 0), 0);
  assert.equal(cpToUnitIn(t, 1), 2);
  assert.equal(cpToUnitIn(t, 3), 4); // after the line break
  assert.equal(cpToUnitIn(t, 4), 6);
  assert.equal(cpToUnitIn(t, 99), t.length);
  assert.equal(unitToCpIn(t, 6), 4);
  assert.equal(unitToCpIn(t, t.length), 5);
});

test("the textarea diff: inserts, deletes, replacements, astral characters, the caret", () => {
  assert.equal(diffText("abc", "abc"), null);
  assert.deepEqual(diffText("abc", "abXc"), [2, 0, "X"]);
  assert.deepEqual(diffText("abc", "ac"), [1, 1, ""]);
  assert.deepEqual(diffText("a😀b", "ab"), [1, 1, ""]);
  assert.deepEqual(diffText("a😀b", "a😁b"), [1, 1, "😁"]); // same high surrogate: not split
  assert.deepEqual(diffText("😀", "😀😀"), [1, 0, "😀"]);
  assert.deepEqual(diffText("x😀", "😀"), [0, 1, ""]);
  // Typing "a" at 1 in "aa": the caret (2) says where.
  assert.deepEqual(diffText("aa", "aaa", 2), [1, 0, "a"]);
  assert.deepEqual(diffText("aa", "aaa"), [2, 0, "a"]);
  for (const [a, b] of [
    ["héllo 😀 world", "hello 𝄞 world!"],
    ["😀😀😀", "😀😁😀"],
    ["", "😀"],
    ["😀", ""],
  ]) {
    assert.equal(applyPatches(a, [diffText(a, b)]), b);
  }
});

test("remote patches on a textarea value move the selection along", () => {
  // Caret after "b" in "a😀b" (UTF-16 4); an insert before it moves it, one after does not.
  assert.deepEqual(applyToValue("a😀b", [4, 4], [[0, 0, "😀"]]), { value: "😀a😀b", points: [6, 6] });
  assert.deepEqual(applyToValue("a😀b", [1, 1], [[3, 0, "!"]]), { value: "a😀b!", points: [1, 1] });
  // A selection over a deleted stretch collapses to its start.
  assert.deepEqual(applyToValue("abcdef", [2, 4], [[1, 4, ""]]), { value: "af", points: [1, 1] });
});
