"""The mComponent: holds the memory of guest processes (service Memory).

Per address space it keeps the record of the guest's anonymous regions
(LegoOS's mComponent owns the VMA tree) and the pages written back to it.
protos/memory.proto is the contract (units, ownership, idempotency, what an
absent page means); legorun/memwire.py is the raw page path. In short:

* spaces belong to the client that created them (metadata
  ``legorun-client``, plus the token on TCP); any other client naming one
  gets ESRCH;
* a client whose streams are all closed for ``--lease`` loses its spaces;
* fork shares page objects (copy on store); capacity counts a shared page once;
* a store carries a seq: a replayed or overtaken store is ignored, never
  resurrects a dropped page nor overwrites a newer one;
* an all-zero page is held as "absent" (nothing counted against capacity).

Everything runs under one lock: the GIL serializes the work anyway, and a
fork or a remap must see a space that is not changing under it.
"""
from __future__ import annotations

import argparse
import bisect
import errno
import logging
import os
import re
import secrets
import sys
import threading
import time
from collections import Counter

from legorun.grpc_transport import import_grpc, keep_frame_memory

grpc = import_grpc()  # before anything else loads it: see legorun/grpc_transport.py

from legorun import memwire
from legorun.memwire import PAGE_SIZE, PAGE_MASK, REQ, REP
from legorun.proto import memory_pb2 as pb

try:
    from . import common
except ImportError:  # run as a file, not as legorun_components.mcomponent
    import legorun_components.common as common

log = logging.getLogger("legorun.mcomponent")

NAME = "mcomponent"
CLIENT_HEADER = "legorun-client"
DEFAULT_LEASE = 10.0
ADDR_LIMIT = 1 << 64
ZERO_PAGE = bytes(PAGE_SIZE)
_LOW_NIBBLE = bytes(i & 0x0F for i in range(256))
_CLIENT_RE = re.compile(r"[\x21-\x7e]{1,64}\Z")

# The server pings an idle client every 10 s and drops it after 5 s without
# an answer, so the streams of a vanished host end and its lease runs.
SERVER_KEEPALIVE = (
    ("grpc.keepalive_time_ms", common.KEEPALIVE_TIME_MS),
    ("grpc.keepalive_timeout_ms", common.KEEPALIVE_TIMEOUT_MS),
)


class Malformed(ValueError):
    """A request the protocol does not allow: the stream ends with INVALID_ARGUMENT."""


class Refused(Exception):
    """A per-request failure: Reply.errno."""

    def __init__(self, err: int):
        super().__init__(os.strerror(err))
        self.errno = err


class Page:
    """One page of one or more spaces (shared after a fork until stored to).
    ``data`` is None for a page stored as all zeros (held only for its version)."""

    __slots__ = ("data", "version", "refs")

    def __init__(self, data, version: int):
        self.data = data
        self.version = version
        self.refs = 1


def _store_py(pages: dict, frame, store_addrs, data_off: int, seq: int, region_at,
              held: int, capacity: int, page_type, status) -> tuple:
    """Apply a frame's stores to `pages` (address -> Page): status[k] says
    what became of the k-th. Returns (bytes held after, pages stored,
    refused for capacity, change in pages with data). The reference for
    legorun/_ext/mstore.c's store()."""
    region = None
    stored = nomem = added = 0
    for k, addr in enumerate(store_addrs):
        if region is None or not region.start <= addr < region.end:
            region = region_at(addr)
        if region is None:
            status[k] = memwire.NO_REGION
            continue
        if seq and seq <= region.floor:
            status[k] = memwire.STALE
            continue
        p = pages.get(addr)
        if p is not None and seq and seq <= p.version:
            status[k] = memwire.STALE
            continue
        off = data_off + k * PAGE_SIZE
        data = frame[off:off + PAGE_SIZE]
        if data == ZERO_PAGE:
            data = None
        old = p.data if p is not None else None
        if data is not None and (p is None or p.refs > 1 or old is None):
            if held + PAGE_SIZE > capacity:
                status[k] = memwire.NO_MEMORY
                nomem += 1
                continue
            held += PAGE_SIZE
        if p is None:
            pages[addr] = page_type(data, seq)
        elif p.refs == 1:
            if old is not None and data is None:
                held -= PAGE_SIZE
            p.data, p.version = data, seq
        else:  # shared with a fork: copy on store
            p.refs -= 1
            pages[addr] = page_type(data, seq)
        added += (data is not None) - (old is not None)
        stored += 1
    return held, stored, nomem, added


def _fetch_py(pages: dict, fetch_addrs, status, k: int, out: list) -> int:
    """Append the data of each fetched page held to `out`, in order; the
    others (never stored, or stored as zeros) get ABSENT at status[k + i].
    Returns how many were appended. The reference for mstore.c's fetch()."""
    fetched = 0
    get = pages.get
    for i, addr in enumerate(fetch_addrs):
        p = get(addr)
        if p is not None and p.data is not None:
            out.append(p.data)
            fetched += 1
        else:
            status[k + i] = memwire.ABSENT
    return fetched


def _select():
    if os.environ.get("LEGORUN_NO_FASTPATH"):
        return None
    try:
        from legorun._ext import mstore
    except ImportError:  # no compiler at install time: Python serves
        return None
    return mstore


_C = _select()
_store, _fetch = (_C.store, _C.fetch) if _C is not None else (_store_py, _fetch_py)
IMPLEMENTATION = "C" if _C is not None else "Python"


class Region:
    """[start, end) of a space; ``floor``: stores with seq <= floor are stale."""

    __slots__ = ("start", "end", "prot", "flags", "floor")

    def __init__(self, start: int, end: int, prot: int, flags: int, floor: int):
        self.start, self.end, self.prot, self.flags, self.floor = start, end, prot, flags, floor

    def copy(self, shift: int = 0, floor: int | None = None) -> "Region":
        return Region(self.start + shift, self.end + shift, self.prot, self.flags,
                      self.floor if floor is None else floor)


class Space:
    __slots__ = ("id", "owner", "pages", "starts", "regions", "ctl_seq", "max_seq", "npages")

    def __init__(self, sid: bytes, owner: str):
        self.id = sid
        self.owner = owner
        self.pages: dict[int, Page] = {}
        self.starts: list[int] = []      # region starts, sorted
        self.regions: list[Region] = []  # parallel to starts, non-overlapping
        self.ctl_seq = 0   # highest seq of a control op applied
        self.max_seq = 0   # highest seq seen (control ops and stores)
        self.npages = 0    # pages with data

    # -- the region record -------------------------------------------------
    def region_at(self, addr: int) -> Region | None:
        i = bisect.bisect_right(self.starts, addr) - 1
        if i >= 0:
            r = self.regions[i]
            if addr < r.end:
                return r
        return None

    def _split_at(self, addr: int) -> None:
        i = bisect.bisect_right(self.starts, addr) - 1
        if i >= 0:
            r = self.regions[i]
            if r.start < addr < r.end:
                tail = Region(addr, r.end, r.prot, r.flags, r.floor)
                r.end = addr
                self.starts.insert(i + 1, addr)
                self.regions.insert(i + 1, tail)

    def carve(self, start: int, end: int) -> tuple[int, int]:
        """Split regions at start and end; regions[i:j] then lie inside [start, end)."""
        self._split_at(start)
        self._split_at(end)
        return bisect.bisect_left(self.starts, start), bisect.bisect_left(self.starts, end)

    def remove(self, i: int, j: int) -> None:
        del self.starts[i:j]
        del self.regions[i:j]

    def insert(self, region: Region) -> None:
        i = bisect.bisect_left(self.starts, region.start)
        self.starts.insert(i, region.start)
        self.regions.insert(i, region)

    def gaps(self, start: int, end: int) -> list[tuple[int, int]]:
        """The parts of [start, end) no region covers."""
        out = []
        at = start
        i = bisect.bisect_right(self.starts, start) - 1
        if i < 0:
            i = 0
        for r in self.regions[i:]:
            if r.start >= end:
                break
            if r.end <= at:
                continue
            if r.start > at:
                out.append((at, r.start))
            at = max(at, r.end)
        if at < end:
            out.append((at, end))
        return out

    def page_addrs(self, start: int, end: int) -> list[int]:
        """Addresses of the pages held in [start, end), whichever way is cheaper."""
        pages = self.pages
        if (end - start) >> memwire.PAGE_SHIFT <= len(pages):
            return [a for a in range(start, end, PAGE_SIZE) if a in pages]
        return [a for a in pages if start <= a < end]


class MemoryStore:
    """All spaces and clients; the caller holds ``lock`` around every method
    except status_reply()."""

    def __init__(self, capacity: int, lease: float):
        self.capacity = capacity
        self.lease = lease
        self.lock = threading.Lock()
        self.spaces: dict[bytes, Space] = {}
        self.clients: dict[str, dict] = {}  # id -> {"streams", "idle_since", "spaces": set}
        self.held = 0  # bytes of page data held (unique pages)
        self.started = time.monotonic()
        self.by_op: Counter[str] = Counter()
        self.requests = 0
        self.counts = Counter()  # pages_stored, pages_fetched, pages_absent, refused_nomem, spaces_expired

    # -- clients and the lease ----------------------------------------------
    def _client(self, cid: str) -> dict:
        c = self.clients.get(cid)
        if c is None:
            c = self.clients[cid] = {"streams": 0, "idle_since": time.monotonic(), "spaces": set()}
        return c

    def stream_opened(self, cid: str) -> None:
        with self.lock:
            c = self._client(cid)
            c["streams"] += 1
            c["idle_since"] = None

    def stream_closed(self, cid: str) -> None:
        with self.lock:
            c = self.clients.get(cid)
            if c is not None:
                c["streams"] -= 1
                if c["streams"] <= 0:
                    c["streams"] = 0
                    c["idle_since"] = time.monotonic()

    def expire(self, now: float | None = None) -> int:
        """Free the spaces of clients idle for longer than the lease; returns
        how many spaces were freed."""
        now = time.monotonic() if now is None else now
        freed = 0
        with self.lock:
            for cid, c in list(self.clients.items()):
                idle = c["idle_since"]
                if c["streams"] or idle is None or now - idle < self.lease:
                    continue
                for sid in list(c["spaces"]):
                    self._free(self.spaces[sid])
                    freed += 1
                del self.clients[cid]
            self.counts["spaces_expired"] += freed
        if freed:
            log.info("lease expired: freed %d spaces", freed)
        return freed

    # -- spaces ---------------------------------------------------------------
    def space(self, cid: str, sid: bytes) -> Space:
        s = self.spaces.get(sid)
        if s is None or s.owner != cid:
            raise Refused(errno.ESRCH)
        return s

    def _new_space(self, cid: str, sid: bytes) -> tuple[Space | None, bool]:
        """(space, duplicate): an id the client owns already is a replay."""
        if not sid:
            sid = secrets.token_bytes(memwire.SPACE_ID_BYTES)
            while sid in self.spaces:
                sid = secrets.token_bytes(memwire.SPACE_ID_BYTES)
        old = self.spaces.get(sid)
        if old is not None:
            if old.owner == cid:
                return old, True
            raise Refused(errno.EEXIST)
        s = self.spaces[sid] = Space(sid, cid)
        self._client(cid)["spaces"].add(sid)
        return s, False

    def create(self, cid: str, sid: bytes) -> tuple[Space, bool]:
        return self._new_space(cid, sid)

    def fork(self, cid: str, parent: Space, child_id: bytes) -> tuple[Space, bool]:
        child, dup = self._new_space(cid, child_id)
        if dup:
            return child, True
        pages = child.pages = dict(parent.pages)
        for p in pages.values():
            p.refs += 1
        child.npages = parent.npages
        child.starts = list(parent.starts)
        child.regions = [r.copy() for r in parent.regions]
        child.ctl_seq, child.max_seq = parent.ctl_seq, parent.max_seq
        return child, False

    def _release(self, s: Space, p: Page) -> None:
        if p.data is not None:
            s.npages -= 1
        p.refs -= 1
        if p.refs == 0 and p.data is not None:
            self.held -= PAGE_SIZE

    def _free(self, s: Space) -> int:
        n = s.npages
        for p in s.pages.values():
            self._release(s, p)
        s.pages = {}
        s.starts, s.regions = [], []
        del self.spaces[s.id]
        c = self.clients.get(s.owner)
        if c is not None:
            c["spaces"].discard(s.id)
        return n

    def free(self, cid: str, sid: bytes) -> int:
        s = self.spaces.get(sid)
        if s is None or s.owner != cid:
            return 0  # idempotent, and says nothing about other clients' ids
        return self._free(s)

    # -- regions --------------------------------------------------------------
    def drop(self, s: Space, start: int, end: int) -> int:
        addrs = s.page_addrs(start, end)
        pages = s.pages
        dropped = 0
        for a in addrs:
            p = pages.pop(a)
            if p.data is not None:
                dropped += 1
            self._release(s, p)
        return dropped

    def map(self, s: Space, m: pb.Map, seq: int) -> int:
        start, end = m.start, m.start + m.length
        if m.if_absent:
            for a, b in s.gaps(start, end):
                s.insert(Region(a, b, m.prot, m.flags, seq))
            return 0
        i, j = s.carve(start, end)
        s.remove(i, j)
        dropped = self.drop(s, start, end)
        s.insert(Region(start, end, m.prot, m.flags, seq))
        return dropped

    def unmap(self, s: Space, start: int, end: int) -> int:
        i, j = s.carve(start, end)
        s.remove(i, j)
        return self.drop(s, start, end)

    def protect(self, s: Space, m: pb.Protect) -> int:
        i, j = s.carve(m.start, m.start + m.length)
        for r in s.regions[i:j]:
            r.prot = m.prot
        return 0

    def discard(self, s: Space, m: pb.Discard, seq: int) -> int:
        start, end = m.start, m.start + m.length
        i, j = s.carve(start, end)
        for r in s.regions[i:j]:
            r.floor = max(r.floor, seq)
        return self.drop(s, start, end)

    def remap(self, s: Space, m: pb.Remap, seq: int) -> int:
        old, olen, new, nlen = m.old, m.old_length, m.new, m.new_length
        oend, nend = old + olen, new + nlen
        i, j = s.carve(old, oend)
        pieces = s.regions[i:j]
        template = pieces[0] if pieces else Region(0, 0, m.prot, m.flags, seq)
        if new == old:
            if nlen < olen:
                self.unmap(s, old + nlen, oend)
            if nlen > olen:
                if pieces and pieces[-1].end == oend:
                    template = pieces[-1]
                self.unmap(s, oend, nend)
                s.insert(Region(oend, nend, template.prot, template.flags, seq))
            return 0
        if old < nend and new < oend:
            raise Refused(errno.EINVAL)
        moved_len = min(olen, nlen)
        mend = old + moved_len
        shift = new - old
        # What was at the destination goes (MREMAP_FIXED unmaps it first).
        self.unmap(s, new, nend)
        # Take the moved part's pages out, then drop the rest of the old range.
        pages = s.pages
        moving = [(a, pages.pop(a)) for a in s.page_addrs(old, mend)]
        self.drop(s, mend, oend)
        i, j = s.carve(old, oend)
        s.remove(i, j)
        for r in pieces:
            if r.start >= mend:
                break
            piece = r.copy(shift, floor=max(r.floor, seq))
            piece.end = min(piece.end, new + moved_len)
            s.insert(piece)
        for a, b in s.gaps(new, nend):
            s.insert(Region(a, b, template.prot, template.flags, seq))
        for a, p in moving:
            pages[a + shift] = p
        return sum(1 for _, p in moving if p.data is not None)

    # -- pages ----------------------------------------------------------------
    def pages(self, s: Space, seq: int, frame: bytes, store_addrs, data_off: int,
              fetch_addrs, rid: int) -> bytes:
        """Apply the stores, answer the fetches; returns the reply frame."""
        status = bytearray(len(store_addrs) + len(fetch_addrs))
        self.held, stored, nomem, added = _store(
            s.pages, frame, store_addrs, data_off, seq, s.region_at, self.held,
            self.capacity, Page, status)
        s.npages += added
        if seq > s.max_seq:
            s.max_seq = seq
        out = [REP.pack(rid, 0, len(store_addrs), len(fetch_addrs), 0), b""]
        fetched = _fetch(s.pages, fetch_addrs, status, len(store_addrs), out) if fetch_addrs else 0
        out[1] = status
        c = self.counts
        c["pages_stored"] += stored
        c["refused_nomem"] += nomem
        c["pages_fetched"] += fetched
        c["pages_absent"] += len(fetch_addrs) - fetched
        return b"".join(out)

    # -- status ---------------------------------------------------------------
    def status_reply(self) -> pb.StatusReply:
        now = time.monotonic()
        with self.lock:
            by_client = []
            streams = 0
            for cid, c in self.clients.items():
                pages = sum(self.spaces[sid].npages for sid in c["spaces"])
                streams += c["streams"]
                idle = c["idle_since"]
                by_client.append(pb.ClientStatus(
                    client=cid[:8], streams=c["streams"], spaces=len(c["spaces"]), pages=pages,
                    bytes=pages * PAGE_SIZE, idle_s=0.0 if idle is None else now - idle))
            return pb.StatusReply(
                uptime_s=now - self.started, capacity=self.capacity, bytes=self.held,
                pages=self.held // PAGE_SIZE, spaces=len(self.spaces), clients=len(self.clients),
                open_streams=streams, requests=self.requests, requests_by_op=dict(self.by_op),
                pages_stored=self.counts["pages_stored"], pages_fetched=self.counts["pages_fetched"],
                pages_absent=self.counts["pages_absent"], refused_nomem=self.counts["refused_nomem"],
                spaces_expired=self.counts["spaces_expired"], lease_s=self.lease, by_client=by_client)


# -- validation ---------------------------------------------------------------

def _range(start: int, length: int, what: str) -> None:
    if start & PAGE_MASK:
        raise Malformed(f"{what} address {start:#x} is not page-aligned")
    if length == 0 or length & PAGE_MASK:
        raise Malformed(f"{what} length {length} is not a positive multiple of {PAGE_SIZE}")
    if start + length > ADDR_LIMIT:
        raise Malformed(f"{what} range {start:#x}+{length:#x} passes the end of the address space")


def check_request(op: str | None, req: pb.Request) -> None:
    """Raise Malformed for a request the protocol does not allow."""
    if op is None:
        raise Malformed("no op set")
    if op == "create":
        if len(req.space) not in (0, memwire.SPACE_ID_BYTES):
            raise Malformed(f"space id must be {memwire.SPACE_ID_BYTES} bytes (or empty)")
        return
    if len(req.space) != memwire.SPACE_ID_BYTES:
        raise Malformed(f"space id must be {memwire.SPACE_ID_BYTES} bytes, got {len(req.space)}")
    m = getattr(req, op)
    if op == "fork":
        if len(m.child) not in (0, memwire.SPACE_ID_BYTES):
            raise Malformed(f"child space id must be {memwire.SPACE_ID_BYTES} bytes (or empty)")
    elif op in ("map", "unmap", "protect", "discard"):
        _range(m.start, m.length, op)
    elif op == "remap":
        _range(m.old, m.old_length, "remap old")
        _range(m.new, m.new_length, "remap new")


class MemoryServicer:
    def __init__(self, store: MemoryStore):
        self.store = store

    def _identity(self, context) -> str:
        for key, value in context.invocation_metadata() or ():
            if key == CLIENT_HEADER:
                if isinstance(value, bytes):
                    value = value.decode("ascii", "replace")
                if not _CLIENT_RE.match(value):
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                  f"{CLIENT_HEADER} must be 1-64 printable ASCII characters")
                return value
        return "anon-" + secrets.token_hex(16)  # a stream of its own: its spaces die with it

    def _open(self, context) -> str:
        cid = self._identity(context)
        self.store.stream_opened(cid)
        if not context.add_callback(lambda: self.store.stream_closed(cid)):
            self.store.stream_closed(cid)  # the RPC ended already
        return cid

    def Call(self, request_iterator, context):
        store = self.store
        cid = self._open(context)
        for req in request_iterator:
            op = req.WhichOneof("op")
            try:
                check_request(op, req)
            except Malformed as e:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request {req.id}: {e}")
            reply = pb.Reply(id=req.id)
            seq = req.seq
            try:
                with store.lock:
                    store.requests += 1
                    store.by_op[op] += 1
                    if op == "create":
                        s, reply.duplicate = store.create(cid, req.space)
                        reply.space.space, reply.space.seq = s.id, s.max_seq
                    elif op == "free":
                        reply.pages = store.free(cid, req.space)
                    else:
                        s = store.space(cid, req.space)
                        if op == "fork":
                            child, reply.duplicate = store.fork(cid, s, req.fork.child)
                            reply.space.space, reply.space.seq = child.id, child.max_seq
                        elif op == "regions":
                            lst = reply.regions.regions
                            for r in s.regions:
                                n = sum(1 for a in s.page_addrs(r.start, r.end)
                                        if s.pages[a].data is not None)
                                lst.add(start=r.start, length=r.end - r.start, prot=r.prot,
                                        flags=r.flags, pages=n, floor=r.floor)
                        elif seq and seq <= s.ctl_seq:
                            reply.duplicate = True
                        else:
                            if op == "map":
                                reply.pages = store.map(s, req.map, seq)
                            elif op == "unmap":
                                reply.pages = store.unmap(s, req.unmap.start,
                                                          req.unmap.start + req.unmap.length)
                            elif op == "remap":
                                reply.pages = store.remap(s, req.remap, seq)
                            elif op == "protect":
                                store.protect(s, req.protect)
                            elif op == "discard":
                                reply.pages = store.discard(s, req.discard, seq)
                            if seq:
                                s.ctl_seq = seq
                                if seq > s.max_seq:
                                    s.max_seq = seq
            except Refused as e:
                reply = pb.Reply(id=req.id, errno=e.errno)
            except Exception:  # a bug: answer EIO, keep serving
                log.exception("%s failed", op)
                reply = pb.Reply(id=req.id, errno=errno.EIO)
            yield reply

    def Pages(self, request_iterator, context):
        """The raw page path (legorun/memwire.py)."""
        store = self.store
        cid = self._open(context)
        hsize = REQ.size
        unpack = REQ.unpack_from
        unpack_addrs = memwire.unpack_addrs
        for frame in request_iterator:
            n = len(frame)
            if n < hsize:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "page frame shorter than its header")
            rid, op, flags, _, sid, seq, ns, nf = unpack(frame)
            problem = None
            if op != memwire.OP_PAGES or flags:
                problem = f"unknown op {op} or flags {flags}"
            elif ns > memwire.MAX_PAGES or nf > memwire.MAX_PAGES:
                problem = f"more than {memwire.MAX_PAGES} pages to store or fetch"
            elif n != hsize + 8 * (ns + nf) + PAGE_SIZE * ns:
                problem = "frame length does not match its header"
            else:
                store_addrs = unpack_addrs(frame, hsize, ns) if ns else ()
                fetch_addrs = unpack_addrs(frame, hsize + 8 * ns, nf) if nf else ()
                # The low 12 bits of every address, in C: byte 0 and the low
                # nibble of byte 1 of each little-endian u64.
                end = hsize + 8 * (ns + nf)
                if (frame[hsize:end:8].strip(b"\0")
                        or frame[hsize + 1:end:8].translate(_LOW_NIBBLE).strip(b"\0")):
                    bad = next(a for a in store_addrs + fetch_addrs if a & PAGE_MASK)
                    problem = f"page address {bad:#x} is not page-aligned"
            if problem:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"frame {rid}: {problem}")
            try:
                with store.lock:
                    store.requests += 1
                    store.by_op["pages"] += 1
                    s = store.space(cid, sid)
                    reply = store.pages(s, seq, frame, store_addrs, hsize + 8 * (ns + nf),
                                        fetch_addrs, rid)
                yield reply
            except Refused as e:
                yield REP.pack(rid, e.errno, 0, 0, 0)
            except Exception:
                log.exception("page frame failed")
                yield REP.pack(rid, errno.EIO, 0, 0, 0)

    def Status(self, request, context):
        return self.store.status_reply()


def add_memory_to_server(servicer: MemoryServicer, server: grpc.Server) -> str:
    """Registers Call (protobuf), Pages (raw frames) and Status; returns the
    service's full name."""
    name = pb.DESCRIPTOR.services_by_name["Memory"].full_name
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(name, {
        "Call": grpc.stream_stream_rpc_method_handler(
            servicer.Call, request_deserializer=pb.Request.FromString,
            response_serializer=pb.Reply.SerializeToString),
        "Pages": grpc.stream_stream_rpc_method_handler(servicer.Pages),  # raw frames
        "Status": grpc.unary_unary_rpc_method_handler(
            servicer.Status, request_deserializer=pb.StatusRequest.FromString,
            response_serializer=pb.StatusReply.SerializeToString),
    })])
    return name


def parse_duration(text: str) -> float:
    """Seconds from '10s', '500ms', '2m', '1h' or a plain number of seconds."""
    t = text.strip().lower()
    for suffix, mult in (("ms", 1e-3), ("s", 1.0), ("m", 60.0), ("h", 3600.0)):
        if t.endswith(suffix):
            t, scale = t[:-len(suffix)], mult
            break
    else:
        scale = 1.0
    try:
        value = float(t) * scale
    except ValueError:
        raise ValueError(f"bad duration {text!r}: expected e.g. 10s, 500ms, 2m") from None
    if value < 0 or value != value:
        raise ValueError(f"bad duration {text!r}: negative")
    return value


def default_capacity() -> int:
    """Half of the machine's memory."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    except (ValueError, OSError):
        return 1 << 30


def _reaper(store: MemoryStore, stop: threading.Event) -> None:
    interval = max(0.05, min(1.0, store.lease / 4))
    while not stop.wait(interval):
        try:
            store.expire()
        except Exception:
            log.exception("lease expiry failed")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="legorun-mcomponent",
        description="The mComponent: hold the memory of legorun's guests (their pages and "
                    "region records) over gRPC (service legorun.memory.v1.Memory). "
                    "Prints 'listening on ADDR' when ready.")
    common.add_server_arguments(parser, NAME)
    parser.add_argument("--capacity", metavar="SIZE", default=None,
                        help="most bytes of page data held, with K/M/G/T suffixes (powers of "
                             "1024); a store past it is refused with ENOMEM "
                             "(default: half of this machine's memory)")
    parser.add_argument("--lease", metavar="DURATION", default=f"{DEFAULT_LEASE:g}s",
                        help="free the spaces of a client whose streams have all been closed "
                             "this long (e.g. 10s, 500ms; default %(default)s)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="legorun-mcomponent: %(levelname)s: %(message)s")
    try:
        capacity = memwire.parse_size(args.capacity) if args.capacity else default_capacity()
    except ValueError as e:
        common.die(f"bad --capacity: {e}")
    try:
        lease = parse_duration(args.lease)
    except ValueError as e:
        common.die(f"bad --lease: {e}")
    config = common.server_config_from_args(args, NAME)
    keep_frame_memory()
    store = MemoryStore(capacity, lease)
    servicer = MemoryServicer(store)
    stop = threading.Event()
    threading.Thread(target=_reaper, args=(store, stop), name="lease", daemon=True).start()

    def register(server: grpc.Server) -> list[str]:
        return [add_memory_to_server(servicer, server)]

    try:
        return common.serve(config, register, max_workers=256, options=SERVER_KEEPALIVE)
    finally:
        stop.set()


if __name__ == "__main__":
    sys.exit(main())
