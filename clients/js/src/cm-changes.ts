// The pure half of the CodeMirror binding (only `@codemirror/state`, so Node tests need
// no DOM): CodeMirror counts UTF-16 units and a ChangeSet's ranges all refer to the
// document it starts from; quire counts code points and its patches apply one after
// another, each to the result of the previous.

import { ChangeSet, type Text } from "@codemirror/state";
import type { Patch } from "./protocol.js";
import { cpLen } from "./ot.js";

const isHigh = (c: number) => c >= 0xd800 && c <= 0xdbff;
const isLow = (c: number) => c >= 0xdc00 && c <= 0xdfff;

/** The UTF-16 offset in `text` of code point `cp` (clamped to the end). */
export function cpToUnitIn(text: Text, cp: number): number {
  let unit = 0;
  let n = 0;
  if (cp <= 0) return 0;
  // The iterator yields lines and line breaks: a surrogate pair never spans two values.
  for (const iter = text.iter(); !iter.next().done; ) {
    const s = iter.value;
    for (let i = 0; i < s.length; ) {
      const step = isHigh(s.charCodeAt(i)) && i + 1 < s.length && isLow(s.charCodeAt(i + 1)) ? 2 : 1;
      i += step;
      unit += step;
      if (++n >= cp) return unit;
    }
  }
  return unit;
}

/** The code point offset in `text` of UTF-16 offset `unit`. */
export function unitToCpIn(text: Text, unit: number): number {
  return unit <= 0 ? 0 : cpLen(text.sliceString(0, unit));
}

/**
 * A CodeMirror change set (from `startDoc`) as quire patches, in order: change i's
 * position is taken in the document after changes 0..i-1, which is its position in the
 * result (`fromB`), since every earlier change lies before it.
 */
export function changesToPatches(startDoc: Text, changes: ChangeSet): Patch[] {
  const endDoc = changes.apply(startDoc);
  const out: Patch[] = [];
  let lastB = 0;
  let cpAtLastB = 0;
  changes.iterChanges((fromA, toA, fromB, _toB, inserted) => {
    cpAtLastB += cpLen(endDoc.sliceString(lastB, fromB));
    lastB = fromB;
    const del = toA > fromA ? cpLen(startDoc.sliceString(fromA, toA)) : 0;
    const ins = inserted.toString();
    if (del === 0 && ins === "") return;
    out.push([cpAtLastB, del, ins]);
  });
  return out;
}

/**
 * Quire patches (code points, each on the previous one's result) applied to `doc`, as
 * one CodeMirror change set from `doc`. Throws RangeError if a patch does not fit.
 */
export function patchesToChanges(doc: Text, patches: readonly Patch[]): ChangeSet {
  let text = doc;
  let set = ChangeSet.empty(doc.length);
  for (const [pos, del, ins] of patches) {
    const from = cpToUnitIn(text, pos);
    const to = cpToUnitIn(text, pos + del);
    if (unitToCpIn(text, to) !== pos + del) throw new RangeError(`patch [${pos}, ${del}] past the end of the text`);
    const step = ChangeSet.of({ from, to, insert: ins }, text.length);
    text = step.apply(text);
    set = set.compose(step);
  }
  return set;
}
