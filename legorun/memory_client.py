"""The launcher's client for the mComponent (service legorun.memory.v1.Memory).

Two lazily opened long-lived bidi streams: ``Call`` (protobuf, through
grpcio) for spaces and regions, ``Pages`` (raw frames, legorun/memwire.py)
for page data, on legorun's own HTTP/2 stream (legorun/pagestream.py) where
it can serve, else through grpcio.
protos/memory.proto states the semantics; this module adds:

* identity: a random 128-bit client id sent as metadata ``legorun-client``
  on every stream (plus the token on TCP); the spaces it creates belong to
  it, and outlive a broken stream for the server's lease;
* sequence numbers: one counter per client, drawn for every mutating
  request, so that a replayed request is harmless (see the proto);
* ordering: the requests of one client to one space take effect in the
  order they were issued. Page frames share one stream; a control op
  first waits for the replies of that space's frames still in flight
  (submitted write-backs), keeping them for collect(). The one exception
  is fetch(express=True): while frames are in flight it goes on a second
  Pages stream, ahead of them (a fault's fetch would otherwise wait behind
  megabytes of readahead and write-back); the caller vouches that no frame
  in flight stores any of its pages.

Errors: a transport failure (server gone, refused token, a malformed request
ending the stream with INVALID_ARGUMENT) raises ComponentError naming
"mComponent at ADDR: reason" and drops that stream; the next call opens a
new one. A per-request refusal raises MemoryRefused (a ComponentError with
``.errno``): ESRCH (no such space: freed, or another client's), ENOMEM
(capacity), EFAULT (store where no region is recorded), EINVAL. Keepalive
pings make a vanished peer fail the stream within ~15 s instead of hanging.

Thread-safe (one lock; a call holds it for its round trip). Not fork-safe:
create it after forking.
"""
from __future__ import annotations

import errno as _errno
import os
import queue
import secrets
import threading
import time
from typing import Sequence

import grpc

from legorun import memwire, pagestream
from legorun.memory import pagecore as PC
from legorun.errors import ComponentError
from legorun.memwire import REP
from legorun.proto import memory_pb2 as pb
from legorun.grpc_base import ComponentClient, _reason
from legorun.pagestream import StreamBroken

METHOD_CALL = "/legorun.memory.v1.Memory/Call"
METHOD_STATUS = "/legorun.memory.v1.Memory/Status"
METHOD_PAGES = memwire.METHOD_PAGES
CLIENT_HEADER = "legorun-client"

PROT_READ, PROT_WRITE = 1, 2
MAP_PRIVATE, MAP_ANONYMOUS = 0x02, 0x20
MADV_DONTNEED = 4

_END = object()
_STAT_KEYS = ("count", "errors", "seconds", "bytes_sent", "bytes_received", "pages")


class MemoryRefused(ComponentError):
    """The mComponent refused a request: ``errno`` says why. For page stores
    ``failed`` lists the addresses not stored, and for a store_and_fetch
    ``results`` holds the fetch results all the same."""

    def __init__(self, name: str, address: str, err: int, what: str,
                 failed: Sequence[int] = (), results: list | None = None):
        text = {_errno.ESRCH: "no such space (freed, expired or not this client's)",
                _errno.ENOMEM: "out of capacity",
                _errno.EFAULT: "no region recorded there"}.get(err, os.strerror(err))
        super().__init__(name, address, f"{what} refused: {text} "
                                        f"({_errno.errorcode.get(err, err)})")
        self.errno = err
        self.failed = list(failed)
        self.results = results


def _identity(b: bytes) -> bytes:
    return b


class _Stream:
    """One open bidi stream through grpcio: a queue feeding gRPC's request
    iterator, and the response iterator read by the caller. As a page
    stream it has pagestream.PageStream's send()/recv()."""

    def __init__(self, channel: grpc.Channel, metadata, method: str):
        self.requests: queue.SimpleQueue = queue.SimpleQueue()
        call = channel.stream_stream(method, request_serializer=_identity,
                                     response_deserializer=_identity)
        # A C-level iterator, not a generator: gRPC's thread that consumes it
        # then runs no Python bytecode per request (about 20 us less per
        # round trip, measured: that thread competes for the GIL).
        self.responses = call(iter(self.requests.get, _END), metadata=metadata)

    def send(self, parts) -> None:
        self.requests.put(b"".join(parts))

    post = send  # (gRPC's own thread writes it)

    def recv(self) -> bytes:
        try:
            return next(self.responses)
        except grpc.RpcError as e:
            raise StreamBroken(_reason(e), e.code() if hasattr(e, "code") else None) from None
        except StopIteration:
            raise StreamBroken("page stream closed by the server") from None

    def close(self) -> None:
        self.requests.put(_END)
        self.responses.cancel()


class MemoryClient(ComponentClient):
    """A client of one mComponent."""

    def __init__(self, address: str, token: str | None = None, tls_ca: str | None = None,
                 name: str = "mComponent", client_id: str | None = None):
        self.client_id = client_id or secrets.token_hex(16)
        md = [(CLIENT_HEADER, self.client_id)]
        if token:
            md.append(("authorization", f"Bearer {token}"))
        super().__init__(address, name, tuple(md), tls_ca)
        self._call: _Stream | None = None
        self._pages: _Stream | None = None
        self._express: _Stream | None = None   # fetches that overtake the frames in flight
        self.page_stream: str | None = None    # "legorun" or "grpcio": the last Pages stream opened
        self.reader_cpus = None   # CPUs for legorun's page stream's reader thread (None: any)
        self._lock = threading.Lock()
        self._next_id = 1
        self._seq = 0
        # Page frames in flight: id -> (space, sent_at, stats row)
        self._pending: dict[int, tuple] = {}
        # Page frames not yet collected or forgotten: id -> (store addrs, fetch count, stats row)
        self._info: dict[int, tuple] = {}
        self._stash: dict[int, bytes] = {}   # replies received before their collect()
        self._forgotten: set[int] = set()
        self._stats: dict[str, list] = {}

    METHOD_STATUS = METHOD_STATUS

    # -- failures ---------------------------------------------------------------
    def _fail_call(self, err: grpc.RpcError) -> ComponentError:
        if self._call is not None:
            self._call.close()
            self._call = None
        return self._error(_reason(err), err.code() if hasattr(err, "code") else None)

    def _open_pages(self):
        """A new Pages stream: legorun's own (pagestream) where it can serve,
        else grpcio's."""
        if pagestream.available(self.address, bool(self._tls_ca)):
            self.page_stream = "legorun"
            return pagestream.PageStream(self.address, METHOD_PAGES, self._metadata,
                                         self.reader_cpus)
        self.page_stream = "grpcio"
        return _Stream(self._get_channel(), self._metadata, METHOD_PAGES)

    def _fail_pages(self, reason: str, code=None) -> ComponentError:
        if self._pages is not None:
            self._pages.close()
            self._pages = None
        for rid, (_, _, row) in self._pending.items():
            row[1] += 1
            self._info.pop(rid, None)
        self._pending.clear()
        self._forgotten.clear()
        return self._error(reason, code)

    def _row(self, op: str) -> list:
        row = self._stats.get(op)
        if row is None:
            row = self._stats[op] = [0, 0, 0.0, 0, 0, 0]
        return row

    # -- control ops ----------------------------------------------------------
    def _control(self, space: bytes, op: str, msg, seq: bool = True, barrier: bool = True) -> pb.Reply:
        with self._lock:
            if barrier and self._pending:
                self._barrier(space)
            rid = self._next_id
            self._next_id += 1
            req = pb.Request(id=rid, space=space or b"")
            if seq:
                self._seq += 1
                req.seq = self._seq
            getattr(req, op).CopyFrom(msg)
            data = req.SerializeToString()
            row = self._row(op)
            start = time.perf_counter()
            try:
                if self._call is None:
                    self._call = _Stream(self._get_channel(), self._metadata, METHOD_CALL)
                stream = self._call
                stream.requests.put(data)
                raw = next(stream.responses)
            except grpc.RpcError as e:
                row[0] += 1
                row[1] += 1
                raise self._fail_call(e) from None
            except StopIteration:
                self._call = None
                raise self._error("control stream closed by the server") from None
            reply = pb.Reply.FromString(raw)
            row[0] += 1
            row[2] += time.perf_counter() - start
            row[3] += len(data)
            row[4] += len(raw)
            if reply.id != rid:
                self._call.close()
                self._call = None
                raise self._error(f"protocol error: reply {reply.id} for request {rid}")
            if reply.errno:
                row[1] += 1
                raise MemoryRefused(self.name, self.address, reply.errno, op)
            if reply.HasField("space") and reply.space.seq > self._seq:
                self._seq = reply.space.seq
            return reply

    def create_space(self, space: bytes | None = None) -> bytes:
        """A new empty address space; returns its 16-byte id (made here from
        128 random bits unless given: creating an id this client owns again
        is a harmless replay)."""
        sid = space or secrets.token_bytes(memwire.SPACE_ID_BYTES)
        return self._control(sid, "create", pb.CreateSpace(), seq=False, barrier=False).space.space

    def fork_space(self, space: bytes, child: bytes | None = None) -> bytes:
        """A copy-on-write duplicate of ``space`` as of now (pages written
        back before this call included); returns the child's id."""
        child = child or secrets.token_bytes(memwire.SPACE_ID_BYTES)
        return self._control(space, "fork", pb.ForkSpace(child=child), seq=False).space.space

    def free_space(self, space: bytes) -> int:
        """Drop the space and its pages (exec, exit); returns the pages freed.
        Freeing an unknown space is not an error."""
        return self._control(space, "free", pb.FreeSpace(), seq=False).pages

    def map(self, space: bytes, start: int, length: int, prot: int = PROT_READ | PROT_WRITE,
            flags: int = MAP_PRIVATE | MAP_ANONYMOUS, if_absent: bool = False) -> int:
        """Record a region (mmap, brk growth); without ``if_absent`` it replaces
        what was there and drops those pages. Returns the pages dropped.

        With ``if_absent`` it only fills gaps in the record and drops
        nothing, so no page frame in flight can be affected by its order:
        it skips the wait for them (an eviction maps a region just before
        its first store, with readaheads and stores still in flight)."""
        return self._control(space, "map", pb.Map(start=start, length=length, prot=prot,
                                                  flags=flags, if_absent=if_absent),
                             barrier=not if_absent).pages

    def unmap(self, space: bytes, start: int, length: int) -> int:
        """munmap: cut the regions, drop their pages; returns the pages dropped."""
        return self._control(space, "unmap", pb.Unmap(start=start, length=length)).pages

    def remap(self, space: bytes, old: int, old_length: int, new: int, new_length: int,
              prot: int = PROT_READ | PROT_WRITE, flags: int = MAP_PRIVATE | MAP_ANONYMOUS) -> int:
        """mremap as it happened (grow, shrink or move); pages move with the
        region. ``prot``/``flags`` serve for destination parts with no known
        source region. Returns the pages moved."""
        return self._control(space, "remap", pb.Remap(old=old, old_length=old_length, new=new,
                                                      new_length=new_length, prot=prot,
                                                      flags=flags)).pages

    def protect(self, space: bytes, start: int, length: int, prot: int) -> None:
        """mprotect: recorded (not enforced)."""
        self._control(space, "protect", pb.Protect(start=start, length=length, prot=prot))

    def discard(self, space: bytes, start: int, length: int, advice: int = MADV_DONTNEED) -> int:
        """madvise DONTNEED/FREE: drop the pages of the range (they read as
        absent); returns the pages dropped."""
        return self._control(space, "discard", pb.Discard(start=start, length=length,
                                                          advice=advice)).pages

    def regions(self, space: bytes) -> list:
        """The space's region record: pb.Region (start, length, prot, flags,
        pages, floor) in address order."""
        return list(self._control(space, "regions", pb.Regions(), seq=False,
                                  barrier=False).regions.regions)

    # -- pages ----------------------------------------------------------------
    def _frame(self, space: bytes, stores, fetch_addrs) -> tuple:
        """A new frame (lock held): (its id, the store addresses, its parts);
        a frame that stores draws a sequence number."""
        if len(stores) > memwire.MAX_PAGES or len(fetch_addrs) > memwire.MAX_PAGES:
            raise ValueError(f"at most {memwire.MAX_PAGES} pages to store and to fetch per message")
        rid = self._next_id
        self._next_id += 1
        if stores:
            self._seq += 1
            addrs, datas = memwire.split_stores(stores)
            return rid, addrs, memwire.request_parts(rid, space, self._seq, addrs, datas,
                                                     fetch_addrs)
        return rid, (), memwire.request_parts(rid, space, 0, (), (), fetch_addrs)

    def _send_frame(self, space: bytes, stores, fetch_addrs, op: str, post: bool = False) -> int:
        """Send one frame (lock held); returns its id. With `post`, the
        stream's writer sends it while this returns (the parts must not
        change meanwhile: see submit)."""
        rid, addrs, parts = self._frame(space, stores, fetch_addrs)
        row = self._row(op)
        try:
            if self._pages is None:
                self._pages = self._open_pages()
            (self._pages.post if post else self._pages.send)(parts)
        except StreamBroken as e:
            raise self._fail_pages(e.reason, e.code) from None
        row[0] += 1
        row[3] += memwire.parts_size(parts)
        self._pending[rid] = (space, time.perf_counter(), row)
        self._info[rid] = (addrs, len(fetch_addrs), row)
        return rid

    def _receive(self) -> int:
        """Read one reply from the page stream into the stash (lock held)."""
        try:
            raw = self._pages.recv()
        except StreamBroken as e:
            raise self._fail_pages(e.reason, e.code) from None
        rid = REP.unpack_from(raw)[0] if len(raw) >= REP.size else -1
        sent = self._pending.pop(rid, None)
        if sent is None:
            raise self._fail_pages(f"protocol error: unexpected page reply {rid}")
        row = sent[2]
        row[2] += time.perf_counter() - sent[1]
        row[4] += len(raw)
        if rid in self._forgotten:
            self._forgotten.discard(rid)
            self._info.pop(rid, None)
        else:
            self._stash[rid] = raw
        return rid

    def _wait(self, rid: int) -> bytes:
        stash = self._stash
        while rid not in stash:
            if rid not in self._pending or self._pages is None:
                self._info.pop(rid, None)
                raise self._error(f"no reply for page frame {rid}: its stream failed")
            self._receive()
        return stash.pop(rid)

    def _result(self, rid: int, what: str, views: bool = False) -> list:
        raw = self._wait(rid)
        addrs, nfetch, row = self._info.pop(rid)
        return self._parse(raw, what, row, addrs, nfetch, views)

    def _barrier(self, space: bytes) -> None:
        """Wait for the replies of this space's frames in flight (lock held)."""
        while any(p[0] == space for p in self._pending.values()):
            self._receive()

    def _parse(self, raw: bytes, what: str, row: list, addrs, nfetch: int,
               views: bool = False) -> list:
        _, err, ns, nf, _ = REP.unpack_from(raw)
        if err:
            row[1] += 1
            raise MemoryRefused(self.name, self.address, err, what)
        base = REP.size
        results = PC.views(raw, base + ns, nf) if nf else []
        if not views:  # pages of their own
            results = [None if page is None else bytes(page) for page in results]
        row[5] += len(addrs) + nf
        if ns:
            status = bytes(raw[base:base + ns])
            if status.count(0) != ns:
                failed = [(a, s) for a, s in zip(addrs, status) if s not in (0, memwire.STALE)]
                if failed:
                    row[1] += 1
                    codes = {s for _, s in failed}
                    err = memwire.NO_MEMORY if memwire.NO_MEMORY in codes else failed[0][1]
                    raise MemoryRefused(self.name, self.address, err,
                                        f"store of {len(failed)} of {ns} pages",
                                        failed=[a for a, _ in failed], results=results)
        return results

    def _round_trip(self, space: bytes, stores, fetch_addrs, op: str, views: bool = False,
                    express: bool = False) -> list:
        with self._lock:
            if express and self._pending and self._pages is not None:
                # frames in flight, none storing these pages: overtake them
                if self._express is None:
                    try:
                        self._express = self._open_pages()
                    except StreamBroken as e:
                        raise self._error(e.reason, e.code) from None
                stream, fail = self._express, self._fail_express
            else:
                stream, fail = self._pages, self._fail_pages
                if stream is None or self._pending:
                    return self._result(self._send_frame(space, stores, fetch_addrs, op), op, views)
            # The fault path: nothing in flight on this stream, so the next
            # reply is ours. All bookkeeping happens before the send or after
            # the reply: Python work while the round trip runs delays gRPC's
            # threads.
            rid, addrs, parts = self._frame(space, stores, fetch_addrs)
            row = self._row(op)
            start = time.perf_counter()
            try:
                stream.send(parts)
                raw = stream.recv()
            except StreamBroken as e:
                row[0] += 1
                raise fail(e.reason, e.code) from None
            row[2] += time.perf_counter() - start
            row[0] += 1
            row[3] += memwire.parts_size(parts)
            row[4] += len(raw)
            if len(raw) < REP.size or REP.unpack_from(raw)[0] != rid:
                raise fail(f"protocol error: unexpected page reply for {rid}")
            return self._parse(raw, op, row, addrs, len(fetch_addrs), views)

    def _fail_express(self, reason: str, code=None) -> ComponentError:
        """The express stream failed: it alone goes (the frames in flight on
        the other one are not its)."""
        self._express.close()
        self._express = None
        return self._error(reason, code)

    def fetch(self, space: bytes, addrs: Sequence[int], views: bool = False,
              express: bool = False) -> list:
        """The pages at ``addrs`` (page-aligned, at most 4096): for each, its
        4096 bytes, or None for an absent page (zero-fill it locally). With
        ``views``, memoryviews of the reply (see collect). With ``express``,
        the caller knows that no frame in flight stores any of these pages:
        the fetch overtakes the frames in flight (see the module's ordering)."""
        return self._round_trip(space, (), addrs, "fetch", views, express)

    def store(self, space: bytes, pages: Sequence[tuple[int, bytes]]) -> None:
        """Write back (address, 4096 bytes) pairs (at most 4096) in one
        message; a page of zeros is held as absent. Raises MemoryRefused
        listing the pages not stored (ENOMEM, EFAULT)."""
        if pages:
            self._round_trip(space, pages, (), "store")

    def store_and_fetch(self, space: bytes, stores: Sequence[tuple[int, bytes]],
                        fetch_addrs: Sequence[int]) -> list:
        """Store, then fetch, in one round trip (an eviction's write-back and
        a fault's fetch, as LegoOS does); returns what fetch() would."""
        return self._round_trip(space, stores, fetch_addrs, "store_fetch")

    def submit(self, space: bytes, stores: Sequence[tuple[int, bytes]] = (),
               fetch_addrs: Sequence[int] = (), kind: str = "submit") -> int:
        """Send a frame without waiting for its reply (write-back off the
        fault path, or a prefetch); returns a ticket for collect() or
        forget(). A frame that stores is written to the socket by the page
        stream's writer thread, beside the caller: its page data must not
        change afterwards (bytes, or a memwire.Pages of bytes)."""
        with self._lock:
            return self._send_frame(space, stores, fetch_addrs, kind, post=bool(stores))

    def collect(self, ticket: int, views: bool = False) -> list:
        """The result of a submit(): what store_and_fetch() would return or
        raise. With ``views``, each page is a memoryview of the reply rather
        than bytes of its own: no copy, and pages that follow each other in
        the reply lie back to back (pagecore.install maps such a run from
        the reply in place)."""
        with self._lock:
            return self._result(ticket, "page frame", views)

    def collect_reply(self, ticket: int) -> tuple:
        """collect() of a frame that only fetched, left unparsed: (the reply,
        where its status bytes begin), for pagecore.views or take; its pages
        are the frame's fetch addresses in order. Raises as collect() does."""
        with self._lock:
            raw = self._wait(ticket)
            addrs, nfetch, row = self._info.pop(ticket)
            _, err, ns, nf, _ = REP.unpack_from(raw)
            if err:
                row[1] += 1
                raise MemoryRefused(self.name, self.address, err, "page frame")
            if ns or addrs or nf != nfetch:
                raise self._fail_pages(f"protocol error: page reply {ticket} does not "
                                       f"answer its frame")
            row[5] += nf
            return raw, REP.size

    def forget(self, ticket: int) -> None:
        """Drop the reply of a submit() when it comes, errors included (for a
        prefetch that is no longer needed; collect() write-backs instead)."""
        with self._lock:
            if self._stash.pop(ticket, None) is not None:
                self._info.pop(ticket, None)
            elif ticket in self._pending:
                self._forgotten.add(ticket)

    def pending(self) -> int:
        """Frames sent whose reply has not been received yet."""
        with self._lock:
            return len(self._pending)

    # -- the rest -------------------------------------------------------------
    def status(self, timeout: float = 10.0) -> pb.StatusReply:
        """The server's Status (spaces, pages, bytes per client, counters)."""
        return pb.StatusReply.FromString(self.status_bytes(timeout))

    def stats(self) -> dict[str, dict[str, float]]:
        """Per op (create, fork, free, map, unmap, remap, protect, discard,
        regions, fetch, store, store_fetch, and submit()'s kinds): count,
        errors, seconds (round trips; for submitted frames, submit to
        receipt of the reply), bytes_sent, bytes_received (messages as
        serialized), pages (page frames only: pages stored plus fetched)."""
        with self._lock:
            return {op: dict(zip(_STAT_KEYS, row)) for op, row in self._stats.items()}

    def close(self) -> None:
        """Close the streams and the channel; a later call reopens them.
        Frames in flight are lost. The spaces stay until the server's lease
        runs out (free them first when done)."""
        with self._lock:
            for stream in (self._call, self._pages, self._express):
                if stream is not None:
                    stream.close()
            self._call = self._pages = self._express = None
            self._pending.clear()
            self._info.clear()
            self._forgotten.clear()
            self._stash.clear()
            if self._channel is not None:
                self._channel.close()
                self._channel = None

    def __enter__(self) -> "MemoryClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
