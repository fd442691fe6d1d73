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


# Paths on the wire are UTF-8 text (readable in grpcurl), but a Linux name is
# bytes. A byte that is not part of valid UTF-8 travels as a code point of the
# supplementary private-use plane, U+F0080..U+F00FF for bytes 0x80..0xFF, the
# way Python's surrogateescape carries it as U+DC80..U+DCFF (which UTF-8 cannot
# encode). Both sides convert at their edge: names are "wire text" in between.
_TO_WIRE = {0xDC00 + b: 0xF0000 + b for b in range(0x80, 0x100)}
_FROM_WIRE = {v: k for k, v in _TO_WIRE.items()}


def to_wire(name: str) -> str:
    """A surrogate-escaped str (os.fsdecode) as wire text."""
    return name.translate(_TO_WIRE) if not name.isascii() else name


def from_wire(name: str) -> str:
    """Wire text back to a surrogate-escaped str (os.fsencode gives the bytes)."""
    return name.translate(_FROM_WIRE) if not name.isascii() else name


def name_to_wire(raw: bytes) -> str:
    """Bytes of a file name as wire text."""
    return to_wire(raw.decode("utf-8", "surrogateescape"))
