"""The mComponent's page path: raw frames on the bidi method Memory/Pages.

Page data skips protobuf (a copy on each side and half the throughput,
PLATFORM.md); gRPC carries these frames as raw bytes. Spaces and regions
use the protobuf method Memory/Call (protos/memory.proto, which also states
the semantics: versions, floors, absent pages).

Request frame: REQ header, then n_store u64 store addresses, then n_fetch
               u64 fetch addresses, then n_store * 4096 bytes of page data
               (in the order of the store addresses).
Reply frame:   REP header, then n_store store status bytes, n_fetch fetch
               status bytes, then PAGE_SIZE bytes for every fetched page
               whose status is 0, in order. A reply with errno != 0 has
               n_store = n_fetch = 0 and nothing after the header.
All integers little-endian. Stores are applied before fetches.
"""
from __future__ import annotations

import errno
import struct

METHOD_PAGES = "/legorun.memory.v1.Memory/Pages"

PAGE_SIZE = 4096
PAGE_SHIFT = 12
PAGE_MASK = PAGE_SIZE - 1
SPACE_ID_BYTES = 16

OP_PAGES = 1

# id u64, op u8, flags u8, pad u16, space 16 bytes, seq u64, n_store u32, n_fetch u32
REQ = struct.Struct("<QBBH16sQII")
# id u64, errno i32, n_store u32, n_fetch u32, pad u32
REP = struct.Struct("<QiIII")

# Most pages one frame may store, and most it may fetch: 16 MiB of data,
# within the component's message limit (common.MAX_PAYLOAD).
MAX_PAGES = 4096

# Per-page status codes (Linux errno values, all < 256).
OK = 0
ABSENT = errno.ENOENT      # fetch: never stored, dropped, or stored as zeros: zero-fill
STALE = errno.ESTALE       # store: ignored, a replay or overtaken by a newer seq/floor
NO_REGION = errno.EFAULT   # store: no region covers the address
NO_MEMORY = errno.ENOMEM   # store: over the server's capacity

_ADDRS = {}


def pack_addrs(addrs) -> bytes:
    """The addresses as u64 little-endian."""
    n = len(addrs)
    s = _ADDRS.get(n)
    if s is None:
        s = _ADDRS[n] = struct.Struct(f"<{n}Q")
    return s.pack(*addrs)


def unpack_addrs(buf, offset: int, n: int) -> tuple:
    s = _ADDRS.get(n)
    if s is None:
        s = _ADDRS[n] = struct.Struct(f"<{n}Q")
    return s.unpack_from(buf, offset)


class Pages:
    """Pages to store as one block: their addresses, and their bytes back to
    back (an eviction reads them so: no object per page). Stands for a list
    of (address, data) pairs wherever the client takes stores."""

    __slots__ = ("addrs", "data")

    def __init__(self, addrs: list, data) -> None:
        if len(data) != len(addrs) * PAGE_SIZE:
            raise ValueError(f"{len(addrs)} pages need {len(addrs) * PAGE_SIZE} bytes, not {len(data)}")
        self.addrs = addrs
        self.data = data

    def __len__(self) -> int:
        return len(self.addrs)


def split_stores(stores) -> tuple:
    """(addresses, data pieces) of a list of (address, data) pairs or a Pages."""
    if isinstance(stores, Pages):
        return stores.addrs, (stores.data,)
    return [a for a, _ in stores], [d for _, d in stores]


def request_parts(rid: int, space: bytes, seq: int, store_addrs, store_data,
                  fetch_addrs) -> tuple:
    """One request frame as the bytes-like parts it is made of, in order.
    ``store_data``: pieces that together hold the pages of ``store_addrs``
    in order (one PAGE_SIZE piece per page, or a single block)."""
    ns, nf = len(store_addrs), len(fetch_addrs)
    return (REQ.pack(rid, OP_PAGES, 0, 0, space, seq, ns, nf),
            pack_addrs(store_addrs) if ns else b"",
            pack_addrs(fetch_addrs) if nf else b"",
            *store_data)


def parts_size(parts) -> int:
    return sum(map(len, parts))


def request(rid: int, space: bytes, seq: int, store_addrs, store_data, fetch_addrs) -> bytes:
    """One request frame, joined."""
    return b"".join(request_parts(rid, space, seq, store_addrs, store_data, fetch_addrs))


def parse_size(text: str) -> int:
    """Bytes from '8G', '512M', '64K', '4096', '1.5G' (powers of 1024; an
    optional 'B'/'iB' after the suffix). Raises ValueError."""
    t = text.strip()
    low = t.lower()
    for tail in ("ib", "b"):
        if low.endswith(tail) and len(low) > len(tail) and low[-len(tail) - 1] in "kmgt":
            low = low[:-len(tail)]
            break
    mult = 1
    if low and low[-1] in "kmgt":
        mult = 1024 ** ("kmgt".index(low[-1]) + 1)
        low = low[:-1]
    try:
        value = float(low) if "." in low else int(low)
    except ValueError:
        raise ValueError(f"bad size {text!r}: expected a number with an optional K, M, G or T suffix") from None
    if value < 0:
        raise ValueError(f"bad size {text!r}: negative")
    return int(value * mult)
