#!/usr/bin/env python3
"""Write a small quire data directory from wal-format.md alone (not from quire's code).

The test suite (tests/format_sample.rs) decodes the output with quire's own reader: if
the document and the code disagree, that test fails. Run from the repository root:
    python3 tools/make-sample-wal.py tests/data/sample
"""
import os
import struct
import sys


def crc32c(data: bytes, crc: int = 0) -> int:
    crc ^= 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


assert crc32c(b"123456789") == 0xE3069283


def op_payload(server_seq, base_version, client_id, local_seq, ts, doc, patches):
    doc_b = doc.encode()
    out = struct.pack("<QQQQQH", server_seq, base_version, client_id, local_seq, ts, len(doc_b)) + doc_b
    out += struct.pack("<I", len(patches))
    for pos, dele, ins in patches:
        ins_b = ins.encode()
        out += struct.pack("<III", pos, dele, len(ins_b)) + ins_b
    return out


def tombstone_payload(version, ts, doc):
    doc_b = doc.encode()
    return struct.pack("<QQH", version, ts, len(doc_b)) + doc_b


def record(lsn, batch_index, payload, rtype=1):
    head = bytearray(24)
    struct.pack_into("<I", head, 0, len(payload))
    struct.pack_into("<Q", head, 8, lsn)
    head[16] = rtype
    struct.pack_into("<I", head, 20, batch_index)
    check = crc32c(bytes(head[0:4]) + bytes(head[8:17]) + bytes(head[20:24]))
    head[17:20] = struct.pack("<I", check)[:3]
    crc = crc32c(bytes(head[0:4]) + bytes(head[8:24]) + payload)
    struct.pack_into("<I", head, 4, crc)
    rec = bytes(head) + payload
    return rec + b"\0" * (-len(rec) % 8)


def segment_header(segment_id, first_lsn, created_ms):
    head = b"QUIREWAL" + struct.pack("<IIQQQ", 1, 64, segment_id, first_lsn, created_ms) + b"\0" * 20
    return head + struct.pack("<I", crc32c(head))


def snapshot(doc, seq, created_ms, text, dedupe):
    doc_b, text_b = doc.encode(), text.encode()
    out = b"QUIRSNAP" + struct.pack("<IIQQH", 1, 0, seq, created_ms, len(doc_b)) + doc_b
    out += struct.pack("<Q", len(text_b)) + text_b + struct.pack("<I", len(dedupe))
    for client, local, s in sorted(dedupe):
        out += struct.pack("<QQQ", client, local, s)
    return out + struct.pack("<I", crc32c(out))


# The sample's content. tests/format_sample.rs states the same ops and expects them back.
OPS = [
    # (lsn, batch_index, server_seq, base_version, client, local_seq, doc, patches)
    (1, 0, 1, 0, 7, 1, "notes", [(0, 0, "hello")]),
    (2, 1, 1, 0, 9, 1, "b/\U0001F600", [(0, 0, "x\U0001F600y")]),
    (3, 0, 2, 1, 7, 2, "notes", [(5, 0, " w\u00f6rld"), (0, 1, "H")]),
    (4, 0, 2, 1, 9, 2, "b/\U0001F600", [(1, 1, "")]),
]


def main(root):
    os.makedirs(os.path.join(root, "wal"), exist_ok=True)
    os.makedirs(os.path.join(root, "snapshots"), exist_ok=True)
    seg = segment_header(1, 1, 1_700_000_000_000)
    for lsn, bi, seq, base, client, local, doc, patches in OPS:
        seg += record(lsn, bi, op_payload(seq, base, client, local, 1_700_000_000_000 + lsn, doc, patches))
    # A short segment file: its end is the end of the records (all-zero tail of length 0).
    with open(os.path.join(root, "wal", "%020d.wal" % 1), "wb") as f:
        f.write(seg)
    snap = snapshot("notes", 1, 1_700_000_000_500, "hello", [(7, 1, 1)])
    name = "%s.%020d.snap" % ("notes".encode().hex(), 1)
    with open(os.path.join(root, "snapshots", name), "wb") as f:
        f.write(snap)


# A document deleted and used again: op 1 of "gone", its tombstone (record type 3) at
# version 1, then op 1 of the new "gone"; and a snapshot of the deleted one, which a
# reader must not use.
DELETED = [
    # (lsn, payload, record type)
    (1, op_payload(1, 0, 7, 1, 1_700_000_000_001, "gone", [(0, 0, "old")]), 1),
    (2, tombstone_payload(1, 1_700_000_000_002, "gone"), 3),
    (3, op_payload(1, 0, 7, 1, 1_700_000_000_003, "gone", [(0, 0, "anew")]), 1),
]


def main_deleted(root):
    os.makedirs(os.path.join(root, "wal"), exist_ok=True)
    os.makedirs(os.path.join(root, "snapshots"), exist_ok=True)
    seg = segment_header(1, 1, 1_700_000_000_000)
    for lsn, payload, rtype in DELETED:
        seg += record(lsn, 0, payload, rtype)
    with open(os.path.join(root, "wal", "%020d.wal" % 1), "wb") as f:
        f.write(seg)
    snap = snapshot("gone", 1, 1_700_000_000_001, "old", [(7, 1, 1)])
    name = "%s.%020d.snap" % ("gone".encode().hex(), 1)
    with open(os.path.join(root, "snapshots", name), "wb") as f:
        f.write(snap)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tests/data/sample")
    main_deleted(sys.argv[2] if len(sys.argv) > 2 else "tests/data/sample-deleted")
