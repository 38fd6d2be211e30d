// The wire protocol of protocol.md: frames `u32 length, u8 type, u32 request_id, body`,
// little-endian, strings as UTF-8 with a byte length. Over a WebSocket one binary
// message is one frame, its length field included.
//
// Client ids are u64 and the ids the server gives are >= 2^63, so they are `bigint`.
// Versions, seqs and local seqs are u64 on the wire but `number` here: a document would
// need 2^53 ops to overflow, and plain numbers keep the OT state simple; a value past
// Number.MAX_SAFE_INTEGER is refused as malformed rather than silently rounded.

export const MAGIC = [0x51, 0x55, 0x49, 0x52]; // "QUIR"
export const PROTOCOL_VERSION = 2;
export const DEFAULT_MAX_FRAME = 1 << 20;
/** Most documents one connection may have open (protocol.md, "Limits"; past it, code 34). */
export const MAX_OPEN_DOCS = 1024;

/** `[pos, del, ins]`: delete `del` code points at `pos`, then insert `ins` there. */
export type Patch = readonly [pos: number, del: number, ins: string];

export interface Selection {
  anchor: number;
  head: number;
}

export interface WireOp {
  seq: number;
  clientId: bigint;
  localSeq: number;
  patches: Patch[];
}

export const Type = {
  Hello: 0x01,
  Welcome: 0x02,
  Open: 0x10,
  Submit: 0x11,
  Fetch: 0x12,
  Presence: 0x13,
  Close: 0x14,
  Ping: 0x15,
  Snapshot: 0x20,
  Ops: 0x21,
  Ack: 0x22,
  Reject: 0x23,
  Remote: 0x24,
  PresenceState: 0x25,
  Reload: 0x26,
  Pong: 0x27,
  Redirect: 0x28,
  Error: 0x7f,
} as const;

export type Message =
  | { type: "Hello"; clientId: bigint; token: string }
  | { type: "Welcome"; version: number; maxFrame: number; clientId: bigint }
  | { type: "Open"; doc: string; knownVersion: number }
  | { type: "Submit"; doc: string; localSeq: number; baseVersion: number; patches: Patch[] }
  | { type: "Fetch"; doc: string; afterSeq: number; limit: number }
  | { type: "Presence"; doc: string; selections: Selection[] }
  | { type: "Close"; doc: string }
  | { type: "Ping"; nonce: bigint }
  | { type: "Snapshot"; doc: string; version: number; totalLen: number; text: string }
  | { type: "Ops"; doc: string; more: boolean; ops: WireOp[] }
  | { type: "Ack"; doc: string; localSeq: number; seq: number }
  | { type: "Reject"; doc: string; localSeq: number; code: number; message: string }
  | ({ type: "Remote"; doc: string } & WireOp)
  | { type: "PresenceState"; doc: string; clientId: bigint; selections: Selection[] }
  | { type: "Reload"; doc: string; reason: string }
  | { type: "Pong"; nonce: bigint }
  /** Another node serves `doc` (cluster mode): its TCP `addr` and WebSocket `wsUrl` ("" if none). */
  | { type: "Redirect"; doc: string; addr: string; wsUrl: string }
  | { type: "Error"; code: number; message: string };

export interface Frame {
  requestId: number;
  message: Message;
}

export class ProtocolError extends Error {}

const encoder = new TextEncoder();
// `fatal`: invalid UTF-8 is a protocol error, never silently replaced.
const decoder = new TextDecoder("utf-8", { fatal: true });

class Writer {
  private buf = new Uint8Array(64);
  private view = new DataView(this.buf.buffer);
  len = 0;

  private reserve(n: number): void {
    if (this.len + n <= this.buf.length) return;
    let size = this.buf.length * 2;
    while (size < this.len + n) size *= 2;
    const next = new Uint8Array(size);
    next.set(this.buf.subarray(0, this.len));
    this.buf = next;
    this.view = new DataView(next.buffer);
  }
  u8(v: number): this {
    this.reserve(1);
    this.view.setUint8(this.len, v);
    this.len += 1;
    return this;
  }
  u16(v: number): this {
    this.reserve(2);
    this.view.setUint16(this.len, v, true);
    this.len += 2;
    return this;
  }
  u32(v: number): this {
    this.reserve(4);
    this.view.setUint32(this.len, v, true);
    this.len += 4;
    return this;
  }
  u64(v: number | bigint): this {
    this.reserve(8);
    this.view.setBigUint64(this.len, BigInt(v), true);
    this.len += 8;
    return this;
  }
  bytes(b: Uint8Array): this {
    this.reserve(b.length);
    this.buf.set(b, this.len);
    this.len += b.length;
    return this;
  }
  str16(s: string): this {
    const b = encoder.encode(s);
    if (b.length > 0xffff) throw new ProtocolError(`string of ${b.length} bytes in a str16`);
    return this.u16(b.length).bytes(b);
  }
  str32(s: string): this {
    const b = encoder.encode(s);
    return this.u32(b.length).bytes(b);
  }
  patches(patches: readonly Patch[]): this {
    this.u32(patches.length);
    for (const [pos, del, ins] of patches) this.u32(pos).u32(del).str32(ins);
    return this;
  }
  selections(sels: readonly Selection[]): this {
    this.u32(sels.length);
    for (const s of sels) this.u32(s.anchor).u32(s.head);
    return this;
  }
  finish(): Uint8Array {
    return this.buf.slice(0, this.len);
  }
  patchLength(at: number): void {
    this.view.setUint32(at, this.len - 4, true);
  }
}

class Reader {
  private pos = 0;
  private readonly view: DataView;
  constructor(private readonly buf: Uint8Array) {
    this.view = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  }
  private need(n: number): void {
    if (this.pos + n > this.buf.length) throw new ProtocolError("message truncated");
  }
  u8(): number {
    this.need(1);
    return this.view.getUint8(this.pos++);
  }
  u16(): number {
    this.need(2);
    const v = this.view.getUint16(this.pos, true);
    this.pos += 2;
    return v;
  }
  u32(): number {
    this.need(4);
    const v = this.view.getUint32(this.pos, true);
    this.pos += 4;
    return v;
  }
  big64(): bigint {
    this.need(8);
    const v = this.view.getBigUint64(this.pos, true);
    this.pos += 8;
    return v;
  }
  u64(): number {
    const v = this.big64();
    if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw new ProtocolError(`u64 ${v} past 2^53`);
    return Number(v);
  }
  private utf8(n: number): string {
    this.need(n);
    const s = this.buf.subarray(this.pos, this.pos + n);
    this.pos += n;
    try {
      return decoder.decode(s);
    } catch {
      throw new ProtocolError("invalid UTF-8");
    }
  }
  str16(): string {
    return this.utf8(this.u16());
  }
  str32(): string {
    return this.utf8(this.u32());
  }
  patches(): Patch[] {
    const n = this.u32();
    const out: Patch[] = [];
    for (let i = 0; i < n; i++) out.push([this.u32(), this.u32(), this.str32()]);
    return out;
  }
  selections(): Selection[] {
    const n = this.u32();
    const out: Selection[] = [];
    for (let i = 0; i < n; i++) out.push({ anchor: this.u32(), head: this.u32() });
    return out;
  }
  end(): void {
    if (this.pos !== this.buf.length) throw new ProtocolError("bytes left over in a message");
  }
}

/** One whole frame, its length field included (one WebSocket message). */
export function encode(message: Message, requestId = 0): Uint8Array {
  const w = new Writer();
  w.u32(0); // the length, filled in at the end
  w.u8(Type[message.type]).u32(requestId);
  const m = message;
  switch (m.type) {
    case "Hello":
      w.bytes(Uint8Array.from(MAGIC)).u16(PROTOCOL_VERSION).u64(m.clientId).str16(m.token);
      break;
    case "Welcome":
      w.u16(m.version).u32(m.maxFrame).u64(m.clientId);
      break;
    case "Open":
      w.str16(m.doc).u64(m.knownVersion);
      break;
    case "Submit":
      w.str16(m.doc).u64(m.localSeq).u64(m.baseVersion).patches(m.patches);
      break;
    case "Fetch":
      w.str16(m.doc).u64(m.afterSeq).u32(m.limit);
      break;
    case "Presence":
      w.str16(m.doc).selections(m.selections);
      break;
    case "Close":
      w.str16(m.doc);
      break;
    case "Ping":
    case "Pong":
      w.u64(m.nonce);
      break;
    case "Snapshot":
      w.str16(m.doc).u64(m.version).u64(m.totalLen).str32(m.text);
      break;
    case "Ops":
      w.str16(m.doc).u8(m.more ? 1 : 0).u32(m.ops.length);
      for (const op of m.ops) w.u64(op.seq).u64(op.clientId).u64(op.localSeq).patches(op.patches);
      break;
    case "Ack":
      w.str16(m.doc).u64(m.localSeq).u64(m.seq);
      break;
    case "Reject":
      w.str16(m.doc).u64(m.localSeq).u16(m.code).str16(m.message);
      break;
    case "Remote":
      w.str16(m.doc).u64(m.seq).u64(m.clientId).u64(m.localSeq).patches(m.patches);
      break;
    case "PresenceState":
      w.str16(m.doc).u64(m.clientId).selections(m.selections);
      break;
    case "Reload":
      w.str16(m.doc).str16(m.reason);
      break;
    case "Redirect":
      w.str16(m.doc).str16(m.addr).str16(m.wsUrl);
      break;
    case "Error":
      w.u16(m.code).str16(m.message);
      break;
  }
  w.patchLength(0);
  return w.finish();
}

/** Decodes one whole frame (a WebSocket message), refusing any inconsistency. */
export function decode(frame: Uint8Array, maxFrame = DEFAULT_MAX_FRAME): Frame {
  if (frame.length < 9) throw new ProtocolError("frame shorter than its header");
  const r = new Reader(frame);
  const length = r.u32();
  if (length !== frame.length - 4) throw new ProtocolError("length field is not the frame's length");
  if (length > maxFrame) throw new ProtocolError(`frame of ${length} bytes over max_frame ${maxFrame}`);
  const type = r.u8();
  const requestId = r.u32();
  let message: Message;
  switch (type) {
    case Type.Hello: {
      for (const b of MAGIC) if (r.u8() !== b) throw new ProtocolError("bad magic");
      const version = r.u16();
      if (version !== PROTOCOL_VERSION) throw new ProtocolError(`protocol version ${version}`);
      message = { type: "Hello", clientId: r.big64(), token: r.str16() };
      break;
    }
    case Type.Welcome:
      message = { type: "Welcome", version: r.u16(), maxFrame: r.u32(), clientId: r.big64() };
      break;
    case Type.Open:
      message = { type: "Open", doc: r.str16(), knownVersion: r.u64() };
      break;
    case Type.Submit:
      message = { type: "Submit", doc: r.str16(), localSeq: r.u64(), baseVersion: r.u64(), patches: r.patches() };
      break;
    case Type.Fetch:
      message = { type: "Fetch", doc: r.str16(), afterSeq: r.u64(), limit: r.u32() };
      break;
    case Type.Presence:
      message = { type: "Presence", doc: r.str16(), selections: r.selections() };
      break;
    case Type.Close:
      message = { type: "Close", doc: r.str16() };
      break;
    case Type.Ping:
      message = { type: "Ping", nonce: r.big64() };
      break;
    case Type.Snapshot:
      message = { type: "Snapshot", doc: r.str16(), version: r.u64(), totalLen: r.u64(), text: r.str32() };
      break;
    case Type.Ops: {
      const doc = r.str16();
      const more = r.u8();
      if (more > 1) throw new ProtocolError("Ops.more is not 0 or 1");
      const n = r.u32();
      const ops: WireOp[] = [];
      for (let i = 0; i < n; i++) {
        ops.push({ seq: r.u64(), clientId: r.big64(), localSeq: r.u64(), patches: r.patches() });
      }
      message = { type: "Ops", doc, more: more === 1, ops };
      break;
    }
    case Type.Ack:
      message = { type: "Ack", doc: r.str16(), localSeq: r.u64(), seq: r.u64() };
      break;
    case Type.Reject:
      message = { type: "Reject", doc: r.str16(), localSeq: r.u64(), code: r.u16(), message: r.str16() };
      break;
    case Type.Remote:
      message = {
        type: "Remote",
        doc: r.str16(),
        seq: r.u64(),
        clientId: r.big64(),
        localSeq: r.u64(),
        patches: r.patches(),
      };
      break;
    case Type.PresenceState:
      message = { type: "PresenceState", doc: r.str16(), clientId: r.big64(), selections: r.selections() };
      break;
    case Type.Reload:
      message = { type: "Reload", doc: r.str16(), reason: r.str16() };
      break;
    case Type.Pong:
      message = { type: "Pong", nonce: r.big64() };
      break;
    case Type.Redirect:
      message = { type: "Redirect", doc: r.str16(), addr: r.str16(), wsUrl: r.str16() };
      break;
    case Type.Error:
      message = { type: "Error", code: r.u16(), message: r.str16() };
      break;
    default:
      throw new ProtocolError(`unknown message type 0x${type.toString(16)}`);
  }
  r.end();
  return { requestId, message };
}
