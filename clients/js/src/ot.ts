// Operational transformation on text: a port of the server's `src/ot.rs`, rule for rule
// (protocol.md, "Operational transformation"), checked against cases the Rust code
// generates (test/ot-cases.json).
//
// Every length and position counts Unicode code points, as on the wire. JavaScript
// strings are UTF-16, so an astral character (😀, 𝄞) is two string units but one code
// point: never index or slice a string by units here; split with `Array.from` (which
// iterates code points) and count with `cpLen`.
//
// An op is a list of components, exactly the JSON form of the conformance file:
// a number is `retain(n)`, a string `insert(s)`, `{ d: n }` `delete(n)`. Components are
// canonical (no empty one, no two adjacent of a kind, an insert before an adjacent
// delete, no trailing retain) so that equal edits have equal forms.

import type { Patch } from "./protocol.js";

export type Component = number | string | { readonly d: number };
export type Op = Component[];

export enum Side {
  /** This op's insert goes first at a tie. */
  Left,
  /** The other op's insert goes first at a tie. */
  Right,
}

/** Length of `s` in code points. */
export function cpLen(s: string): number {
  let n = 0;
  for (let i = 0; i < s.length; i++) {
    const c = s.charCodeAt(i);
    // A high surrogate followed by a low one is one code point. A lone surrogate (which
    // UTF-8 cannot carry anyway) counts as one, like Array.from does.
    if (c >= 0xd800 && c <= 0xdbff && i + 1 < s.length) {
      const d = s.charCodeAt(i + 1);
      if (d >= 0xdc00 && d <= 0xdfff) i++;
    }
    n++;
  }
  return n;
}

/** The string unit index of code point `cp` in `s` (s.length past the end). */
export function cpToUnit(s: string, cp: number): number {
  let i = 0;
  for (let n = 0; n < cp && i < s.length; n++) {
    const c = s.charCodeAt(i);
    i += c >= 0xd800 && c <= 0xdbff && i + 1 < s.length && (s.charCodeAt(i + 1) & 0xfc00) === 0xdc00 ? 2 : 1;
  }
  return i;
}

/** The code point index of string unit `unit` in `s` (for editors that report units). */
export function unitToCp(s: string, unit: number): number {
  return cpLen(s.slice(0, unit));
}

const isRetain = (c: Component | undefined): c is number => typeof c === "number";
const isInsert = (c: Component | undefined): c is string => typeof c === "string";
const isDelete = (c: Component | undefined): c is { readonly d: number } => typeof c === "object";

/** Builds a canonical op component by component (the rules of `TextOp::retain` etc.). */
export class OpBuilder {
  readonly ops: Op = [];

  retain(n: number): this {
    if (n === 0) return this;
    const last = this.ops.length - 1;
    const l = this.ops[last];
    if (isRetain(l)) this.ops[last] = l + n;
    else this.ops.push(n);
    return this;
  }

  delete(n: number): this {
    if (n === 0) return this;
    const last = this.ops.length - 1;
    const l = this.ops[last];
    if (isDelete(l)) this.ops[last] = { d: l.d + n };
    else this.ops.push({ d: n });
    return this;
  }

  insert(s: string): this {
    if (s === "") return this;
    const last = this.ops.length - 1;
    const l = this.ops[last];
    if (isInsert(l)) {
      this.ops[last] = l + s;
    } else if (isDelete(l)) {
      // Canonical order: an insert goes before an adjacent delete.
      const before = this.ops[last - 1];
      if (isInsert(before)) this.ops[last - 1] = before + s;
      else this.ops.splice(last, 0, s);
    } else {
      this.ops.push(s);
    }
    return this;
  }

  push(piece: Component): this {
    if (isRetain(piece)) return this.retain(piece);
    if (isInsert(piece)) return this.insert(piece);
    return this.delete(piece.d);
  }

  /** The op, without its trailing retain (it is implicit). */
  finish(): Op {
    if (isRetain(this.ops[this.ops.length - 1])) this.ops.pop();
    return this.ops;
  }
}

/** A walk over an op's components that can take part of one (an insert by code points). */
class Cursor {
  private index = 0;
  /** Code points left of the current component; Infinity past the end (implicit retain). */
  left = 0;
  /** The current insert's code points, and how many were taken. */
  private chars: string[] = [];
  private taken = 0;

  constructor(private readonly op: Op) {
    this.enter();
  }

  private enter(): void {
    const c = this.op[this.index];
    this.taken = 0;
    if (c === undefined) this.left = Infinity;
    else if (isRetain(c)) this.left = c;
    else if (isDelete(c)) this.left = c.d;
    else {
      this.chars = Array.from(c);
      this.left = this.chars.length;
    }
  }

  peek(): Component | undefined {
    return this.op[this.index];
  }

  done(): boolean {
    return this.index >= this.op.length;
  }

  /** Takes up to `n` code points of the current component. */
  take(n: number): Component {
    const c = this.op[this.index];
    if (c === undefined) return n;
    n = Math.min(n, this.left);
    let piece: Component;
    if (isRetain(c)) piece = n;
    else if (isDelete(c)) piece = { d: n };
    else {
      piece = n === this.left && this.taken === 0 ? c : this.chars.slice(this.taken, this.taken + n).join("");
      this.taken += n;
    }
    if (n === this.left) {
      this.index++;
      this.enter();
    } else {
      this.left -= n;
    }
    return piece;
  }

  takeAll(): Component {
    return this.take(Infinity);
  }
}

function pushRest(out: OpBuilder, c: Cursor): void {
  while (!c.done()) out.push(c.takeAll());
}

/** One patch as an op: `retain(pos) insert(ins) delete(del)`. */
export function fromPatch([pos, del, ins]: Patch): Op {
  return new OpBuilder().retain(pos).delete(del).insert(ins).finish();
}

/**
 * Patches applied one after another, as one op. Composed pairwise as a balanced tree
 * (as the Rust code does) so that many scattered patches cost O(n log n), not O(n²);
 * composition is associative and the form canonical, so the grouping changes nothing.
 */
export function fromPatches(patches: readonly Patch[]): Op {
  let ops = patches.map(fromPatch).filter((op) => op.length > 0);
  while (ops.length > 1) {
    const next: Op[] = [];
    for (let i = 0; i < ops.length; i += 2) next.push(i + 1 < ops.length ? compose(ops[i]!, ops[i + 1]!) : ops[i]!);
    ops = next;
  }
  return ops[0] ?? [];
}

/** The op as patches, left to right; an insert and the delete after it become one patch. */
export function toPatches(op: Op): Patch[] {
  const out: [number, number, string][] = [];
  let pos = 0;
  for (const c of op) {
    if (isRetain(c)) pos += c;
    else if (isInsert(c)) {
      out.push([pos, 0, c]);
      pos += cpLen(c);
    } else {
      const last = out[out.length - 1];
      if (last && last[1] === 0 && last[0] + cpLen(last[2]) === pos) last[1] = c.d;
      else out.push([pos, c.d, ""]);
    }
  }
  return out;
}

export function isNoop(op: Op): boolean {
  return op.length === 0;
}

/** `a` then `b` (made on `a`'s result), as one op. */
export function compose(a: Op, b: Op): Op {
  const out = new OpBuilder();
  const ca = new Cursor(a);
  const cb = new Cursor(b);
  for (;;) {
    if (isInsert(cb.peek())) {
      out.push(cb.takeAll());
      continue;
    }
    if (isDelete(ca.peek())) {
      out.push(ca.takeAll());
      continue;
    }
    if (ca.done()) {
      pushRest(out, cb);
      break;
    }
    if (cb.done()) {
      pushRest(out, ca);
      break;
    }
    const n = Math.min(ca.left, cb.left);
    const pa = ca.take(n);
    const pb = cb.take(n);
    if (isRetain(pa)) {
      if (isRetain(pb)) out.retain(pa);
      else out.delete(pa);
    } else if (isInsert(pa) && isRetain(pb)) {
      out.insert(pa);
    }
    // An insert then deleted leaves nothing.
  }
  return out.finish();
}

/**
 * `a` rebased to apply after `b` (both made on the same text). At a tie (both insert at
 * one position) `Side.Left` puts `a`'s text first. The server rebases a late op over
 * earlier ones with Left (the later-sequenced op ends up on the left); a client rebases
 * its pending ops over a remote op with Left and the remote op over them with Right.
 */
export function transform(a: Op, b: Op, side: Side): Op {
  const out = new OpBuilder();
  const ca = new Cursor(a);
  const cb = new Cursor(b);
  for (;;) {
    const aIns = isInsert(ca.peek());
    const bIns = isInsert(cb.peek());
    if (aIns && (side === Side.Left || !bIns)) {
      out.push(ca.takeAll());
      continue;
    }
    if (bIns) {
      out.retain(cb.left);
      cb.takeAll();
      continue;
    }
    if (ca.done()) break;
    if (cb.done()) {
      pushRest(out, ca);
      break;
    }
    const n = Math.min(ca.left, cb.left);
    const pa = ca.take(n);
    const pb = cb.take(n);
    if (isRetain(pb)) {
      if (isRetain(pa)) out.retain(pa);
      else if (isDelete(pa)) out.delete(pa.d);
    }
    // Over a delete: that text is gone (or deleted once).
  }
  return out.finish();
}

/** Applies `op` to `text`; throws if it reaches past the end. */
export function apply(text: string, op: Op): string {
  const chars = Array.from(text);
  const out: string[] = [];
  let at = 0;
  for (const c of op) {
    if (isRetain(c)) {
      if (at + c > chars.length) throw new RangeError("op retains past the end of the text");
      for (let i = 0; i < c; i++) out.push(chars[at + i]!);
      at += c;
    } else if (isDelete(c)) {
      if (at + c.d > chars.length) throw new RangeError("op deletes past the end of the text");
      at += c.d;
    } else out.push(c);
  }
  for (; at < chars.length; at++) out.push(chars[at]!);
  return out.join("");
}

/** Applies patches one after another; throws if one is out of range. */
export function applyPatches(text: string, patches: readonly Patch[]): string {
  if (patches.length === 0) return text;
  const chars = Array.from(text);
  for (const [pos, del, ins] of patches) {
    if (pos + del > chars.length) throw new RangeError(`patch [${pos},${del}] out of range (${chars.length})`);
    chars.splice(pos, del, ...Array.from(ins));
  }
  return chars.join("");
}

/**
 * Where a position of the op's base ends up in its result: a cursor stays before text
 * inserted at it, and one inside deleted text goes to where the deletion was.
 */
export function mapPosition(op: Op, pos: number): number {
  let base = 0;
  let out = 0;
  for (const c of op) {
    if (isRetain(c)) {
      if (pos < base + c) return out + (pos - base);
      base += c;
      out += c;
    } else if (isInsert(c)) {
      if (pos <= base) return out;
      out += cpLen(c);
    } else {
      if (pos < base + c.d) return out;
      base += c.d;
    }
  }
  return out + (pos - base);
}
