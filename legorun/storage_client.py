"""The launcher's client for the sComponent (service legorun.storage.v1.Storage).

One long-lived bidi ``Call`` stream carries every request: a ping-pong
round trip costs about a third of a unary call. Requests are serialized on
the caller's thread (so byte counts are free) and handed to gRPC as raw
bytes; replies are parsed on the caller's thread too.

Failure model: any gRPC failure (server gone, refused token, malformed
request) raises ComponentError and drops the stream; the next call opens a
new one. Keepalive pings make a peer that vanished without closing its
socket fail the stream instead of hanging it.
"""
from __future__ import annotations

import queue
import threading
import time
from typing import Any

import grpc

from legorun import wire
from legorun.errors import ComponentError
from legorun.grpc_base import CHANNEL_OPTIONS, ComponentClient, _reason  # noqa: F401 (re-exported)
from legorun.stats import Latencies
from legorun.proto import storage_pb2 as pb

METHOD_CALL = "/legorun.storage.v1.Storage/Call"
METHOD_STATUS = "/legorun.storage.v1.Storage/Status"

_END = object()

_varint = wire.varint


# Request.op fields: name -> (message class, key of the length-delimited field).
_OPS = {f.name: (f.message_type._concrete_class, _varint((f.number << 3) | 2))
        for f in pb.Request.DESCRIPTOR.oneofs_by_name["op"].fields}


def encode_request(rid: int, op: dict[str, Any]) -> tuple[str | None, bytes]:
    """Serialize Request(id=rid, **op) without copying the op message into
    a Request first (for a 1 MiB Write that copy costs more than the
    serialization itself): a Request is field 1 followed by its op field."""
    head = b"\x08" + _varint(rid)
    if not op:
        return None, head
    if len(op) != 1:
        raise TypeError(f"one op per request, got {sorted(op)}")
    (name, msg), = op.items()
    try:
        cls, key = _OPS[name]
    except KeyError:
        raise TypeError(f"unknown op {name!r}") from None
    if isinstance(msg, dict):
        msg = cls(**msg)
    body = msg.SerializeToString()
    return name, b"".join((head, key, _varint(len(body)), body))


def _identity(b: bytes) -> bytes:
    return b


class _Stream:
    """One open Call stream: a queue feeding gRPC's request iterator and the
    response iterator read by the caller."""

    def __init__(self, channel: grpc.Channel, metadata, method: str = METHOD_CALL):
        self.requests: queue.SimpleQueue = queue.SimpleQueue()
        call = channel.stream_stream(
            method, request_serializer=_identity, response_deserializer=_identity)
        # A C-level iterator (not a generator): gRPC's feeding thread then
        # takes the GIL only to fetch the next item (~20 us less per message).
        self.responses = call(iter(self.requests.get, _END), metadata=metadata)

    def close(self) -> None:
        self.requests.put(_END)
        self.responses.cancel()


class StorageClient(ComponentClient):
    """A client of one sComponent, over one lazily opened bidi stream.

    Thread-safe: concurrent call()/pipeline() are serialized (each holds the
    stream for its round trip). Not fork-safe: create it after forking.
    """

    def __init__(self, address: str, token: str | None = None, tls_ca: str | None = None,
                 name: str = "sComponent"):
        super().__init__(address, name,
                         (("authorization", f"Bearer {token}"),) if token else (), tls_ca)
        self._stream: _Stream | None = None
        self._data: _Stream | None = None  # the raw data path (legorun.wire)
        self._lock = threading.Lock()
        self._next_id = 1
        # op -> [count, errors, seconds, bytes_sent, bytes_received]
        self._stats: dict[str, list] = {}

    METHOD_STATUS = METHOD_STATUS

    def _get_stream(self) -> _Stream:
        if self._stream is None:
            self._stream = _Stream(self._get_channel(), self._metadata)
        return self._stream

    def _fail(self, err: grpc.RpcError) -> ComponentError:
        for stream in (self._stream, self._data):
            if stream is not None:
                stream.close()
        self._stream = self._data = None
        return self._error(_reason(err), err.code() if hasattr(err, "code") else None)

    # -- requests ---------------------------------------------------------
    def _encode(self, op: dict[str, Any]) -> tuple[str | None, bytes, int]:
        rid = self._next_id
        self._next_id += 1
        name, data = encode_request(rid, op)
        return name, data, rid

    def _account(self, opname: str | None, seconds: float, sent: int, raw: bytes, reply: pb.Reply) -> None:
        s = self._stats.get(opname or "")
        if s is None:
            s = self._stats[opname or ""] = [0, 0, 0.0, 0, 0, Latencies()]
        s[0] += 1
        if reply.errno:
            s[1] += 1
        s[2] += seconds
        s[5].add(seconds)
        s[3] += sent
        s[4] += len(raw)

    def _receive(self, stream: _Stream, rid: int) -> tuple[bytes, pb.Reply]:
        raw = next(stream.responses)
        reply = pb.Reply.FromString(raw)
        if reply.id != rid:
            self._stream = None
            stream.close()
            raise self._error(f"protocol error: reply {reply.id} for request {rid}")
        return raw, reply

    def call(self, **op: Any) -> pb.Reply:
        """Send one request (e.g. ``call(stat=pb.Stat(path="a", follow=True))``;
        the op may also be a dict of its fields) and wait for its reply. Per-op failures are ``reply.errno``; transport
        failures raise ComponentError."""
        with self._lock:
            opname, data, rid = self._encode(op)
            start = time.perf_counter()
            try:
                stream = self._get_stream()
                stream.requests.put(data)
                raw, reply = self._receive(stream, rid)
            except grpc.RpcError as e:
                raise self._fail(e) from None
            except StopIteration:
                self._stream = None
                raise self._error("stream closed by the server") from None
            self._account(opname, time.perf_counter() - start, len(data), raw, reply)
            return reply

    def pipeline(self, requests: list[dict[str, Any]]) -> list[pb.Reply]:
        """Send all requests, then collect their replies (same order). For
        bulk data split into chunks; raises ComponentError like call()."""
        with self._lock:
            encoded = [self._encode(op) for op in requests]
            start = time.perf_counter()
            replies: list[pb.Reply] = []
            try:
                stream = self._get_stream()
                put = stream.requests.put
                for _, data, _ in encoded:
                    put(data)
                raws = []
                for _, _, rid in encoded:
                    raw, reply = self._receive(stream, rid)
                    raws.append(raw)
                    replies.append(reply)
            except grpc.RpcError as e:
                raise self._fail(e) from None
            except StopIteration:
                self._stream = None
                raise self._error("stream closed by the server") from None
            each = (time.perf_counter() - start) / max(len(encoded), 1)
            for (opname, data, _), raw, reply in zip(encoded, raws, replies):
                self._account(opname, each, len(data), raw, reply)
            return replies

    def new_ids(self, count: int) -> int:
        """Reserve `count` consecutive request ids for data frames; returns the first."""
        with self._lock:
            first = self._next_id
            self._next_id += count
            return first

    def exchange(self, frames: list, kind: str) -> list:
        """Send raw data frames (legorun.wire.REQ ...) on the Data stream and
        return their raw replies, in order; raises ComponentError like call()."""
        return self.collect(self.submit(frames, kind))

    def submit(self, frames: list, kind: str) -> list:
        """Send data frames now and return their ids, to collect() later (or
        forget()): the server works on them while the caller does other things."""
        with self._lock:
            try:
                if self._data is None:
                    self._data = _Stream(self._get_channel(), self._metadata, wire.METHOD_DATA)
                    self._stash, self._forgotten, self._sent_at = {}, set(), {}
                put = self._data.requests.put
                for frame in frames:
                    put(frame)
            except grpc.RpcError as e:
                raise self._fail(e) from None
            now = time.perf_counter()
            s = self._stats.get(kind)
            if s is None:
                s = self._stats[kind] = [0, 0, 0.0, 0, 0, Latencies()]
            ids = []
            for frame in frames:
                rid = wire.REQ.unpack_from(frame)[0] if len(frame) >= wire.REQ.size else -1
                ids.append(rid)
                self._sent_at[rid] = (now, s)
                s[0] += 1
                s[3] += len(frame)
            return ids

    def collect(self, ids: list) -> list:
        """The replies to frames sent by submit(), in the order of `ids`."""
        with self._lock:
            stash = self._stash
            try:
                out = []
                for rid in ids:
                    while rid not in stash:
                        self._receive_data()
                    out.append(stash.pop(rid))
                return out
            except grpc.RpcError as e:
                raise self._fail(e) from None
            except StopIteration:
                self._data = None
                raise self._error("data stream closed by the server") from None

    def forget(self, ids: list) -> None:
        """Drop the replies to these frames when they come (a read-ahead not needed)."""
        with self._lock:
            for rid in ids:
                if self._stash.pop(rid, None) is None and rid in self._sent_at:
                    self._forgotten.add(rid)

    def _receive_data(self) -> None:
        reply = next(self._data.responses)
        rid, err, _, _ = wire.REP.unpack_from(reply)
        sent = self._sent_at.pop(rid, None)
        if sent is None:
            self._data.close()
            self._data = None
            raise self._error(f"protocol error: unexpected data reply {rid}")
        when, s = sent
        s[1] += 1 if err else 0
        took = time.perf_counter() - when
        s[2] += took
        s[5].add(took)
        s[4] += len(reply)
        if rid in self._forgotten:
            self._forgotten.discard(rid)
        else:
            self._stash[rid] = reply

    def status(self, timeout: float = 10.0) -> pb.StatusReply:
        """The server's Status (files, bytes, requests served)."""
        return pb.StatusReply.FromString(self.status_bytes(timeout))

    def stats(self) -> dict[str, dict[str, float]]:
        """Per op: count, errors (replies with errno), seconds (round trips;
        a pipeline's time is shared evenly), bytes_sent and bytes_received
        (serialized messages), and p50_ms/p99_ms of the round trips."""
        keys = ("count", "errors", "seconds", "bytes_sent", "bytes_received")
        with self._lock:
            out = {}
            for op, values in self._stats.items():
                out[op] = dict(zip(keys, values[:5]))
                out[op]["p50_ms"] = values[5].quantile(0.5) * 1e3
                out[op]["p99_ms"] = values[5].quantile(0.99) * 1e3
            return out

    def close(self) -> None:
        """Close the stream and the channel; a later call reopens them."""
        with self._lock:
            for stream in (self._stream, self._data):
                if stream is not None:
                    stream.close()
            self._stream = self._data = None
            if self._channel is not None:
                self._channel.close()
                self._channel = None

    def __enter__(self) -> "StorageClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
