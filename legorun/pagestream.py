"""The page path's bidi stream (Memory/Pages) on legorun's own HTTP/2 code.

The grpcio stream (memory_client._Stream) moves every frame through gRPC's
Python threads, which hold the GIL while they copy megabytes; the fault
path then waits for the GIL as much as for the reply. This stream is the
same gRPC call on the wire (HTTP/2, gRPC's length-prefixed messages, the
client's metadata), driven by legorun/_ext/h2stream.c: the caller's thread
writes each frame to the socket (its pieces with one writev: no join), or a
writer thread in C does (post: write-backs, sent while the fault path goes
on), and a reader thread in C, without the GIL, answers the server and
assembles the replies in buffers that are read in place.

It opens its own connection to the server, on a Unix socket or plain TCP;
with TLS, or without the C extension, the grpcio stream serves (so does
LEGORUN_PAGE_STREAM=grpc, for comparison, and LEGORUN_NO_FASTPATH=1). A failure raises StreamBroken
with a short reason in the words memory_client uses for grpcio's errors; the
trailers that end a call are decoded with hpack (the HPACK of RFC 7541).
"""
from __future__ import annotations

import errno
import os
import socket
from urllib.parse import unquote

import grpc

try:
    from legorun._ext import h2stream as _h2
except ImportError:  # no compiler at install time: grpcio serves
    _h2 = None

ENV = "LEGORUN_PAGE_STREAM"
CONNECT_TIMEOUT = 5.0
MAX_PARTS = 64            # buffers h2stream.Stream.send takes at once
BUFFER = 4 << 20          # socket buffers: a 1 MiB reply waits in the kernel, not the server

# gRPC status codes (grpc.StatusCode's values), as memory_client words them
_CODES = {1: "cancelled", 2: "unknown", 3: "invalid argument", 4: "deadline exceeded",
          5: "not found", 6: "already exists", 7: "permission denied", 8: "resource exhausted",
          9: "failed precondition", 10: "aborted", 11: "out of range", 12: "unimplemented",
          13: "internal", 14: "unavailable", 15: "data loss", 16: "unauthenticated"}
# HTTP/2 error codes (RFC 9113, section 7)
_H2_ERRORS = {0: "no error", 1: "protocol error", 2: "internal error", 3: "flow-control error",
              4: "settings timeout", 5: "stream closed", 6: "frame size error",
              7: "refused stream", 8: "cancelled", 9: "compression error", 10: "connect error",
              11: "enhance your calm", 12: "inadequate security", 13: "HTTP/1.1 required"}


class StreamBroken(Exception):
    """The stream failed; ``reason`` says why in a few words, ``code`` is the
    grpc.StatusCode the server ended the call with, if it did."""

    def __init__(self, reason: str, code=None):
        super().__init__(reason)
        self.reason = reason
        self.code = code


def available(address: str, tls: bool) -> bool:
    """Whether this stream can serve (else the grpcio one does): built, no
    TLS, an address of the forms unix:PATH or HOST:PORT (others, such as
    dns:///, are for gRPC's resolvers), and neither LEGORUN_PAGE_STREAM=grpc
    nor LEGORUN_NO_FASTPATH set."""
    return (_h2 is not None and not tls and _target(address) is not None
            and os.environ.get(ENV, "") != "grpc" and not os.environ.get("LEGORUN_NO_FASTPATH"))


def _target(address: str):
    """(family, sockaddr, authority) for a gRPC target legorun uses, or None."""
    if address.startswith("unix:"):
        path = address[5:]
        if path.startswith("//"):
            path = path[2:]
        return socket.AF_UNIX, path, "localhost"
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        return None
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host or "/" in host or (":" in host and not address.startswith("[")):
        return None  # (dns:///x:1, ipv4:1.2.3.4:5, ...: gRPC's own schemes)
    return socket.AF_UNSPEC, (host, int(port)), address


def _string(text: str) -> bytes:
    """An HPACK string literal, not Huffman-coded (RFC 7541, 5.2)."""
    data = text.encode()
    return _integer(len(data), 7, 0) + data


def _integer(value: int, bits: int, first: int) -> bytes:
    """An HPACK integer with an N-bit prefix (RFC 7541, 5.1)."""
    limit = (1 << bits) - 1
    if value < limit:
        return bytes([first | value])
    out = [first | limit]
    value -= limit
    while value >= 128:
        out.append(value % 128 + 128)
        value //= 128
    out.append(value)
    return bytes(out)


def header_block(path: str, authority: str, metadata) -> bytes:
    """The request's headers as one HPACK block: every field a literal never
    indexed (no state in the server's table, nothing for a proxy to keep)."""
    fields = [(":method", "POST"), (":scheme", "http"), (":path", path),
              (":authority", authority), ("content-type", "application/grpc"),
              ("te", "trailers"), ("user-agent", "legorun-pages/1"), *(metadata or ())]
    return b"".join(b"\x10" + _string(k) + _string(v) for k, v in fields)


def _connect(address: str) -> tuple[int, str]:
    family, where, authority = _target(address)  # (available() checked it)
    sock = None
    try:
        if family == socket.AF_UNIX:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(CONNECT_TIMEOUT)
            sock.connect(where)
        else:
            sock = socket.create_connection(where, timeout=CONNECT_TIMEOUT)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except socket.gaierror as e:
        raise StreamBroken(f"cannot resolve {where[0]}: {e.strerror}") from None
    except OSError as e:  # (TimeoutError has no errno)
        if sock is not None:
            sock.close()
        raise StreamBroken(_errno_reason(e.errno) if e.errno else
                           f"not ready after {CONNECT_TIMEOUT:g} s") from None
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, BUFFER)
        except OSError:
            pass
    sock.settimeout(None)
    return sock.detach(), authority


def _errno_reason(err: int) -> str:
    return {errno.ECONNREFUSED: "connection refused",
            errno.ENOENT: "no such socket (no such file or directory)",
            errno.EACCES: "permission denied",
            errno.ECONNRESET: "connection reset",
            errno.EPIPE: "connection closed",
            errno.ETIMEDOUT: "connection timed out",
            errno.EHOSTUNREACH: "host unreachable",
            errno.ENETUNREACH: "network unreachable"}.get(err, os.strerror(err).lower())


class PageStream:
    """One Memory/Pages call on a connection of its own: send(parts) writes
    one message made of these bytes-like parts, post(parts) has it written
    by the stream's writer thread instead, recv() returns the next reply
    (a memoryview of it). All raise StreamBroken once the call is over."""

    def __init__(self, address: str, method: str, metadata, reader_cpus=None) -> None:
        fd, authority = _connect(address)
        try:
            self._s = _h2.Stream(fd, header_block(method, authority, metadata))
        except OSError as e:
            os.close(fd)
            raise StreamBroken(_errno_reason(e.errno) if e.errno else str(e)) from None
        if reader_cpus:
            try:
                self._s.reader_cpus(sorted(reader_cpus))
            except (OSError, ValueError):
                pass  # (a CPU gone offline: the reader runs where it was)

    def send(self, parts) -> None:
        if len(parts) > MAX_PARTS:  # (stores given page by page) one writev takes so many
            parts = (b"".join(parts),)
        if not self._s.send(*parts):
            raise self._broken()

    def post(self, parts) -> None:
        """send() without waiting: the stream's writer thread sends it, in
        order with the rest. The parts must not change until it is written
        (bytes, or a buffer nobody writes to again)."""
        if len(parts) > MAX_PARTS:
            parts = (b"".join(parts),)
        if not self._s.post(*parts):
            raise self._broken()

    def recv(self) -> memoryview:
        msg = self._s.recv()
        if msg is None:
            raise self._broken()
        return memoryview(msg)

    def close(self) -> None:
        self._s.close()

    def _broken(self) -> StreamBroken:
        why = self._s.why()
        if why is not None and why[0] == "trailers":
            return StreamBroken(*_trailers_reason(why[3]))
        return StreamBroken(self._why(why))

    @staticmethod
    def _why(why) -> str:
        if why is None:
            return "page stream failed"
        kind, err, code, blocks, debug = why
        if kind == "reset":
            return f"stream reset by the server ({_H2_ERRORS.get(code, code)})"
        if kind == "goaway":
            if code == 0:
                return "server shut down"
            text = debug.decode(errors="replace").strip()
            detail = f"{_H2_ERRORS.get(code, code)}: {text}" if text else _H2_ERRORS.get(code, code)
            return f"connection ended by the server ({detail})"
        if kind == "eof":
            return "connection closed"
        if kind == "errno":
            return _errno_reason(err)
        if kind == "timeout":
            return "no answer to keepalive pings"
        if kind == "protocol":
            return f"protocol error on the page stream ({_H2_ERRORS.get(code, code)})"
        return "page stream closed"


def _trailers_reason(blocks: list) -> tuple:
    """(reason, grpc.StatusCode or None): the call's status from its header
    blocks, in memory_client's words."""
    try:
        import hpack
        decoder = hpack.Decoder()
        decoder.max_allowed_table_size = 1 << 16
        headers = {}
        for block in blocks:  # in order: the table they share changes as they come
            headers.update(decoder.decode(block, raw=False))
    except Exception as e:  # noqa: BLE001 - a block hpack cannot read
        return f"page stream closed by the server (its trailers cannot be read: {e})", None
    status = headers.get("grpc-status")
    details = " ".join(unquote(headers.get("grpc-message", "")).split())
    if status is None or status == "0":
        return "page stream closed by the server", None
    number = int(status) if status.isdigit() else -1
    code = next((c for c in grpc.StatusCode if c.value[0] == number), None)
    name = _CODES.get(number, f"status {status}")
    if "cancelling all calls" in details.lower():
        return "server shut down", code
    return (f"{name}: {details}" if details else name), code
