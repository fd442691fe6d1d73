"""grpc_baseline.py: the raw gRPC figures legorun's file benchmarks compare with.

Issue #2 states its file targets against gRPC itself, measured in the same
run: sequential I/O against "a raw gRPC stream moving the same bytes between
the same processes", random 4 KiB reads against "a gRPC ping-pong with 4 KiB
replies".  This script starts a server process and measures, from a client
process, over a Unix socket (legorun's default transport), with raw-bytes
serializers (no protobuf):

- stream_write_MBps: the client streams SIZE bytes in CHUNK-byte messages,
  the server acknowledges once at the end;
- stream_read_MBps: the server streams SIZE bytes in CHUNK-byte messages;
- pingpong_per_s: on one bidi stream, COUNT round trips of an 8-byte request
  and a 4 KiB reply.

Usage: python benchmarks/grpc_baseline.py [--size-mb 256] [--chunk-kb 1024]
       [--count 5000] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import grpc

SERVICE = "legorun.bench.Baseline"
_ident = lambda b: b  # noqa: E731  raw bytes in, raw bytes out


def _handlers(chunk: int):
    def upload(it, ctx):
        n = 0
        for msg in it:
            n += len(msg)
        return n.to_bytes(8, "little")

    def download(req, ctx):
        size = int.from_bytes(req[:8], "little")
        buf = b"\xa5" * chunk
        while size > 0:
            yield buf if size >= chunk else buf[:size]
            size -= chunk

    def pingpong(it, ctx):
        reply = b"\x5a" * 4096
        for _ in it:
            yield reply

    return grpc.method_handlers_generic_handler(SERVICE, {
        "Upload": grpc.stream_unary_rpc_method_handler(upload, _ident, _ident),
        "Download": grpc.unary_stream_rpc_method_handler(download, _ident, _ident),
        "PingPong": grpc.stream_stream_rpc_method_handler(pingpong, _ident, _ident),
    })


def serve(address: str, chunk: int) -> None:
    from concurrent import futures
    opts = [("grpc.max_receive_message_length", 64 << 20),
            ("grpc.max_send_message_length", 64 << 20)]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=opts)
    server.add_generic_rpc_handlers((_handlers(chunk),))
    server.add_insecure_port(address)
    server.start()
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    sys.stdin.read()          # until the client closes our stdin
    server.stop(0)


def measure(size: int, chunk: int, count: int) -> dict:
    d = tempfile.mkdtemp(prefix="legorun-grpc-baseline-")
    address = f"unix:{d}/sock"
    srv = subprocess.Popen([sys.executable, __file__, "--serve", address,
                            "--chunk-kb", str(chunk // 1024)],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        if srv.stdout.readline().strip() != b"ready":
            raise RuntimeError("baseline server did not start")
        opts = [("grpc.max_receive_message_length", 64 << 20),
                ("grpc.max_send_message_length", 64 << 20)]
        with grpc.insecure_channel(address, options=opts) as ch:
            grpc.channel_ready_future(ch).result(timeout=10)
            up = ch.stream_unary(f"/{SERVICE}/Upload", _ident, _ident)
            down = ch.unary_stream(f"/{SERVICE}/Download", _ident, _ident)
            pp = ch.stream_stream(f"/{SERVICE}/PingPong", _ident, _ident)
            buf = b"\x3c" * chunk

            def chunks():
                left = size
                while left > 0:
                    yield buf if left >= chunk else buf[:left]
                    left -= chunk

            up(iter([buf]))                      # warm the channel
            t0 = time.perf_counter()
            n = int.from_bytes(up(chunks()), "little")
            t1 = time.perf_counter()
            got = sum(len(m) for m in down(size.to_bytes(8, "little")))
            t2 = time.perf_counter()
            assert n == size and got == size, (n, got, size)

            import queue
            q: queue.Queue = queue.Queue()

            def requests():
                while True:
                    item = q.get()
                    if item is None:
                        return
                    yield item

            q.put(b"warmup00")
            replies = pp(requests())
            next(replies)
            t3 = time.perf_counter()
            for _ in range(count):
                q.put(b"pingpong")
                r = next(replies)
                assert len(r) == 4096
            t4 = time.perf_counter()
            q.put(None)
            for _ in replies:
                pass
    finally:
        try:
            srv.stdin.close()
        except OSError:
            pass
        try:
            srv.wait(timeout=10)
        except subprocess.TimeoutExpired:
            srv.kill()
            srv.wait()
        try:
            os.unlink(f"{d}/sock")
        except FileNotFoundError:
            pass
        os.rmdir(d)
    return {
        "transport": "unix socket, raw-bytes serializers, Python grpcio "
                     + grpc.__version__,
        "size_bytes": size, "chunk_bytes": chunk, "pingpong_count": count,
        "stream_write_MBps": size / (t1 - t0) / 1e6,
        "stream_read_MBps": size / (t2 - t1) / 1e6,
        "pingpong_per_s": count / (t4 - t3),
    }


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size-mb", type=float, default=256)
    ap.add_argument("--chunk-kb", type=int, default=1024)
    ap.add_argument("--count", type=int, default=5000)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--serve", metavar="ADDR", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.serve:
        serve(a.serve, a.chunk_kb * 1024)
        return 0
    r = measure(int(a.size_mb * 1024 * 1024), a.chunk_kb * 1024, a.count)
    if a.json:
        print(json.dumps(r))
    else:
        for k, v in r.items():
            print(f"{k}: {v:.1f}" if isinstance(v, float) else f"{k}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
