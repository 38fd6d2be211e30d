// One document on the client as an OT state machine with no I/O: a port of
// `src/client/state.rs` (the Jupiter / ShareDB client model). Local edits apply at once;
// one op is in flight to the server; edits made meanwhile (or offline) are composed into
// one buffered op; a remote op is rebased over the in-flight and buffered ops before it
// is applied, and they over it. The server sequences the in-flight op after every remote
// op the client received before its ack, so both sides transform the same pairs with
// the same tie-break.

import type { Patch } from "./protocol.js";
import { Side, apply, applyPatches, compose, cpLen, fromPatch, fromPatches, toPatches, transform, type Op } from "./ot.js";

/** An op as sent: with the client id, `localSeq` is its op id; resent exactly so. */
export interface Outgoing {
  localSeq: number;
  baseVersion: number;
  patches: Patch[];
}

/** What a client keeps of a document across a reload of the page or process. */
export interface PersistedDoc {
  confirmed: string;
  version: number;
  nextLocalSeq: number;
  /** As sent, and as it is now (rebased over the remote ops since). */
  inFlight: { out: Outgoing; op: Op } | null;
  buffer: Op[];
}

export class ProtocolViolation extends Error {}

/** A local edit larger than the server takes in one op: split it. */
export class TooLargeError extends RangeError {
  constructor(
    readonly bytes: number,
    readonly max: number,
  ) {
    super(`an edit of ${bytes} bytes is larger than the server takes in one op (${max})`);
  }
}

/** The largest op (its patches on the wire) a server with `maxFrame` takes. */
export const maxOpBytes = (maxFrame: number): number => maxFrame - 256;

function utf8Len(s: string): number {
  let n = 0;
  for (const ch of s) {
    const c = ch.codePointAt(0)!;
    n += c < 0x80 ? 1 : c < 0x800 ? 2 : c < 0x10000 ? 3 : 4;
  }
  return n;
}

/** The bytes `patches` take on the wire (protocol.md, Limits). */
export function patchesWireLen(patches: readonly Patch[]): number {
  let n = 4;
  for (const [, , ins] of patches) n += 12 + utf8Len(ins);
  return n;
}

/** `patch` cut into patches of at most `max` wire bytes each, between code points. */
export function splitPatch(patch: Patch, max: number): Patch[] {
  if (patchesWireLen([patch]) <= max) return [patch];
  const room = Math.max(max - 16, 4);
  const out: Patch[] = [];
  let [pos, del] = patch;
  let piece: string[] = [];
  let bytes = 0;
  const flush = () => {
    out.push([pos, del, piece.join("")]);
    pos += piece.length;
    del = 0;
    piece = [];
    bytes = 0;
  };
  for (const ch of patch[2]) {
    const b = utf8Len(ch);
    if (bytes + b > room) flush();
    piece.push(ch);
    bytes += b;
  }
  if (piece.length > 0 || del > 0) flush();
  return out;
}

export class DocState {
  /** The local text: the server's text with this client's pending edits. */
  text: string;
  /** The server's text at `version`: the local text without the pending edits. */
  confirmed: string;
  /** The last server seq applied here. */
  version: number;
  inFlight: { out: Outgoing; op: Op } | null = null;
  /**
   * Edits not yet sent: composed into one op while it stays under half the op limit (a
   * composed op that outgrew it could never be sent, and transforming it may add
   * patches), then a new one starts. Each applies to the result of the one before.
   */
  buffer: Op[] = [];
  private limit = maxOpBytes(1 << 20);

  /** The largest op the server takes (from its Welcome's max_frame). */
  get maxOpBytes(): number {
    return this.limit;
  }

  /**
   * A smaller limit (a server's Welcome, after edits were composed under the default,
   * offline or restored) splits the buffered ops that outgrew half of it, as composing
   * under it would have kept them: an op larger than the server takes could never be
   * sent. The op in flight stays as it was sent (its id names that op).
   */
  set maxOpBytes(max: number) {
    const shrunk = max < this.limit;
    this.limit = max;
    const fits = (op: Op): boolean => patchesWireLen(toPatches(op)) <= max / 2;
    if (!shrunk || this.buffer.every(fits)) return;
    // Each patch applies to the result of the one before, as each piece does.
    this.buffer = this.buffer.flatMap((op) =>
      fits(op) ? [op] : toPatches(op).flatMap((p) => splitPatch(p, max / 4)).map((p) => fromPatch(p)),
    );
  }
  /** The next op id; never reused, so persisted with the rest. */
  nextLocalSeq: number;

  constructor(text = "", version = 0, nextLocalSeq = 1) {
    this.text = text;
    this.confirmed = text;
    this.version = version;
    this.nextLocalSeq = Math.max(1, nextLocalSeq);
  }

  static restore(p: PersistedDoc): DocState {
    const doc = new DocState(p.confirmed, p.version, p.nextLocalSeq);
    doc.inFlight = p.inFlight;
    doc.buffer = p.buffer;
    let text = p.confirmed;
    if (p.inFlight) text = apply(text, p.inFlight.op);
    for (const op of p.buffer) text = apply(text, op);
    doc.text = text;
    return doc;
  }

  persisted(): PersistedDoc {
    return {
      confirmed: this.confirmed,
      version: this.version,
      nextLocalSeq: this.nextLocalSeq,
      inFlight: this.inFlight,
      buffer: this.buffer,
    };
  }

  hasPending(): boolean {
    return this.inFlight !== null || this.buffer.length > 0;
  }

  /** Applies a local edit at once and queues it (composed into the last buffered op). */
  localEdit(patches: readonly Patch[]): void {
    const bytes = patchesWireLen(patches);
    if (bytes > this.maxOpBytes) throw new TooLargeError(bytes, this.maxOpBytes);
    this.text = applyPatches(this.text, patches); // throws RangeError before any change
    this.enqueue(fromPatches(patches));
  }

  private enqueue(op: Op): void {
    if (op.length === 0) return;
    const last = this.buffer.length - 1;
    if (last >= 0) {
      const composed = compose(this.buffer[last]!, op);
      if (patchesWireLen(toPatches(composed)) <= this.maxOpBytes / 2) {
        this.buffer[last] = composed;
        return;
      }
    }
    this.buffer.push(op);
  }

  /** The next op to send, if none is in flight: the buffer, under a new op id. */
  takeToSend(): Outgoing | null {
    if (this.inFlight) return null;
    const op = this.buffer.shift();
    if (!op) return null;
    const out: Outgoing = { localSeq: this.nextLocalSeq++, baseVersion: this.version, patches: toPatches(op) };
    this.inFlight = { out, op };
    return out;
  }

  /** The server acknowledged the in-flight op as `seq`. */
  onAck(localSeq: number, seq: number): void {
    if (!this.inFlight || this.inFlight.out.localSeq !== localSeq) {
      throw new ProtocolViolation(`ack for op ${localSeq}, which is not in flight`);
    }
    if (seq !== this.version + 1) {
      throw new ProtocolViolation(`ack at seq ${seq} but the client is at version ${this.version}`);
    }
    // Rebased over every remote op before `seq`, the op is the server's change at `seq`.
    this.confirmed = apply(this.confirmed, this.inFlight.op);
    this.inFlight = null;
    this.version = seq;
  }

  /**
   * Another client's op sequenced as `seq`. Returns the patches applied to the local
   * text, or null for an op already seen (a broadcast can overlap the snapshot).
   */
  onRemote(seq: number, patches: readonly Patch[]): Patch[] | null {
    if (seq <= this.version) return null;
    if (seq !== this.version + 1) {
      throw new ProtocolViolation(`remote op at seq ${seq} but the client is at version ${this.version}`);
    }
    this.confirmed = applyPatches(this.confirmed, patches);
    let remote = fromPatches(patches);
    // The remote op was sequenced before the pending ops will be: it goes over them with
    // Right (their inserts first at a tie), they over it with Left.
    if (this.inFlight) {
      const r = transform(remote, this.inFlight.op, Side.Right);
      this.inFlight = { out: this.inFlight.out, op: transform(this.inFlight.op, remote, Side.Left) };
      remote = r;
    }
    this.buffer = this.buffer.map((op) => {
      const r = transform(remote, op, Side.Right);
      const rebased = transform(op, remote, Side.Left);
      remote = r;
      return rebased;
    });
    this.text = apply(this.text, remote);
    this.version = seq;
    return toPatches(remote);
  }

  /**
   * The in-flight op was refused: it goes back to the front of the buffer, still applied
   * locally, to be sent again as a new op once the document is open again.
   *
   * `tooLarge`: refused for its size after the server transformed it (code 24:
   * transforming can add patches): it goes back as one op per patch, each cut to a
   * quarter of the op limit, so that sending it again cannot be refused the same way.
   */
  requeueInFlight(tooLarge = false): void {
    if (!this.inFlight) return;
    const op = this.inFlight.op;
    this.inFlight = null;
    if (!tooLarge) {
      this.buffer.unshift(op);
      return;
    }
    const pieces = toPatches(op).flatMap((p) => splitPatch(p, this.maxOpBytes / 4));
    this.buffer.unshift(...pieces.map((p) => fromPatch(p)));
  }

  /**
   * Whether the in-flight op reached the server is now known (a reload learned it):
   * applied, it becomes part of the confirmed text; not, it returns to the buffer. The
   * version is then unknown (0): open the document from a snapshot and `reload` onto it.
   */
  settleApplied(applied: boolean): void {
    if (!this.inFlight) return;
    if (applied) {
      this.confirmed = apply(this.confirmed, this.inFlight.op);
      this.inFlight = null;
    } else {
      this.requeueInFlight();
    }
    this.version = 0;
  }

  /**
   * Replaces the base with the server's text at `version` (the server no longer holds
   * the ops this client missed). Nothing is in flight (see `settleApplied`). This
   * client's buffered change is known exactly; the others' change is recomputed as the
   * difference between the confirmed text and the server's, and the buffer is rebased
   * over it (this client's inserts left of theirs at one position, as protocol.md says).
   * Returns the patches that turn the old local text into the new one.
   */
  reload(server: string, version: number): Patch[] {
    if (this.inFlight) throw new Error("reload with an op in flight: settle it first");
    const theirs = diff(this.confirmed, server);
    const mine = this.buffer.reduce((acc, op) => compose(acc, op), [] as Op);
    const rebased = transform(mine, theirs, Side.Left);
    const local = apply(server, rebased);
    const shown = toPatches(diff(this.text, local));
    this.confirmed = server;
    this.text = local;
    this.version = version;
    this.buffer = [];
    for (const patch of toPatches(rebased)) {
      for (const piece of splitPatch(patch, this.maxOpBytes / 2)) this.enqueue(fromPatch(piece));
    }
    return shown;
  }
}

/**
 * The op turning `from` into `to`, in code points: the common prefix and suffix kept,
 * the middle replaced. Enough for convergence (any correct diff is); the Rust client
 * runs a line-then-character Myers diff here, which keeps more of a concurrent edit's
 * intent when both sides rewrote one stretch while apart.
 */
export function diff(from: string, to: string): Op {
  const a = Array.from(from);
  const b = Array.from(to);
  let pre = 0;
  while (pre < a.length && pre < b.length && a[pre] === b[pre]) pre++;
  let suf = 0;
  while (suf < a.length - pre && suf < b.length - pre && a[a.length - 1 - suf] === b[b.length - 1 - suf]) suf++;
  const del = a.length - pre - suf;
  const ins = b.slice(pre, b.length - suf).join("");
  return fromPatches([[pre, del, ins]]);
}

export { cpLen };
