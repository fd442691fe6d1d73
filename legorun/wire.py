"""The sComponent's raw data path: frames on the bidi method Storage/Data.

Bulk reads and writes skip protobuf (a copy on each side, and half the
throughput, PLATFORM.md): gRPC carries these frames as raw bytes. Every
other operation uses the protobuf method Storage/Call (protos/storage.proto).
Stateless like Call: each frame names the file by path and gives the
absolute offset.

Request frame:  REQ header, then the path (UTF-8, surrogate-escaped bytes,
                relative to the served root), then for WRITE/APPEND the data.
Reply frame:    REP header, then for READ the data (`count` bytes).
All integers little-endian. A reply with errno != 0 carries no data.
"""
from __future__ import annotations

import struct

METHOD_DATA = "/legorun.storage.v1.Storage/Data"

READ, WRITE, APPEND = 1, 2, 3

# id u64, op u8, pad u8, path_len u16, length u32 (READ: bytes wanted;
# WRITE/APPEND: bytes that follow), offset u64 (ignored by APPEND)
REQ = struct.Struct("<QBxHIQ")
# id u64, errno i32, count u32 (bytes read or written), offset u64 (where
# the data landed; for APPEND the end of file before it)
REP = struct.Struct("<QiIQ")

MAX_FRAME_DATA = 16 * 1024 * 1024


def varint(n: int) -> bytes:
    """A protobuf base-128 varint (for framing protobuf messages by hand)."""
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)
