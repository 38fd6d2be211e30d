// A minimal binding for a plain <textarea> (`@quire/client/textarea`): each input event
// is diffed against the previous value into one patch; remote patches rewrite the value
// with the caret and selection moved along. No remote cursors (a textarea cannot draw
// them); the local selection is sent as presence.

import type { DocHandle } from "./client.js";
import type { Patch } from "./protocol.js";
import { cpLen, cpToUnit, unitToCp } from "./ot.js";

const isLow = (c: number) => c >= 0xdc00 && c <= 0xdfff;

/**
 * The patch (code points) turning `prev` into `next`: the common prefix and suffix
 * kept, never splitting a surrogate pair. `caret` (a UTF-16 offset in `next`, where the
 * edit ended) picks the place among equal candidates: typing "a" into "aa" at 1 gives
 * [1, 0, "a"], not [2, 0, "a"]. Null when the texts are equal.
 */
export function diffText(prev: string, next: string, caret?: number): Patch | null {
  if (prev === next) return null;
  const max = Math.min(prev.length, next.length);
  let pre = 0;
  while (pre < max && prev.charCodeAt(pre) === next.charCodeAt(pre)) pre++;
  // The edit ends at the caret: the prefix cannot reach past where the insert starts.
  if (caret !== undefined) {
    const grown = next.length - prev.length;
    if (grown > 0) pre = Math.min(pre, Math.max(0, caret - grown));
  }
  let suf = 0;
  while (suf < max - pre && prev.charCodeAt(prev.length - 1 - suf) === next.charCodeAt(next.length - 1 - suf)) suf++;
  if (pre > 0 && isLow(prev.charCodeAt(pre)) ) pre--;
  if (pre > 0 && pre < next.length && isLow(next.charCodeAt(pre))) pre--;
  while (suf > 0 && (isLow(prev.charCodeAt(prev.length - suf)) || isLow(next.charCodeAt(next.length - suf)))) suf--;
  const pos = cpLen(prev.slice(0, pre));
  const del = cpLen(prev.slice(pre, prev.length - suf));
  return [pos, del, next.slice(pre, next.length - suf)];
}

/** `value` with `patches` applied, and the offsets `points` (UTF-16) mapped along. */
export function applyToValue(value: string, points: readonly number[], patches: readonly Patch[]): { value: string; points: number[] } {
  let out = value;
  let pts = [...points];
  for (const [pos, del, ins] of patches) {
    const from = cpToUnit(out, pos);
    const to = cpToUnit(out, pos + del);
    if (unitToCp(out, to) !== pos + del) throw new RangeError(`patch [${pos}, ${del}] past the end of the text`);
    out = out.slice(0, from) + ins + out.slice(to);
    pts = pts.map((p) => (p <= from ? p : p >= to ? p + ins.length - (to - from) : from));
  }
  return { value: out, points: pts };
}

/** Binds `textarea` to `handle`; returns a function that unbinds it. */
export function bindTextarea(textarea: HTMLTextAreaElement, handle: DocHandle): () => void {
  let shown = handle.text();
  textarea.value = shown;

  const sendPresence = () => {
    const v = textarea.value;
    const dir = textarea.selectionDirection === "backward";
    const start = unitToCp(v, textarea.selectionStart);
    const end = unitToCp(v, textarea.selectionEnd);
    handle.setPresence([dir ? { anchor: end, head: start } : { anchor: start, head: end }]);
  };
  const onInput = () => {
    const patch = diffText(shown, textarea.value, textarea.selectionEnd);
    shown = textarea.value;
    if (!patch) return;
    try {
      void handle.edit([patch]).catch(() => {});
    } catch {
      show(handle.text()); // refused: the textarea shows the document again
    }
    sendPresence();
  };
  const show = (text: string) => {
    const r = applyToValue(textarea.value, [textarea.selectionStart, textarea.selectionEnd], [[0, cpLen(textarea.value), text]]);
    textarea.value = shown = r.value;
  };
  const onRemote = ({ patches }: { patches: Patch[] }) => {
    if (textarea.value !== shown) onInput(); // an input not yet seen goes first
    try {
      const focused = typeof document !== "undefined" && document.activeElement === textarea;
      const r = applyToValue(textarea.value, [textarea.selectionStart, textarea.selectionEnd], patches);
      const dir = textarea.selectionDirection;
      textarea.value = shown = r.value;
      if (focused) textarea.setSelectionRange(r.points[0]!, r.points[1]!, dir);
    } catch {
      show(handle.text());
    }
  };

  textarea.addEventListener("input", onInput);
  textarea.addEventListener("select", sendPresence);
  textarea.addEventListener("keyup", sendPresence);
  textarea.addEventListener("mouseup", sendPresence);
  const offs = [handle.on("remote", onRemote), handle.on("reloaded", onRemote)];
  return () => {
    textarea.removeEventListener("input", onInput);
    textarea.removeEventListener("select", sendPresence);
    textarea.removeEventListener("keyup", sendPresence);
    textarea.removeEventListener("mouseup", sendPresence);
    for (const off of offs) off();
  };
}
