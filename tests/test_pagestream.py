"""legorun's own page stream (legorun/pagestream.py, legorun/_ext/h2stream.c)
against a real mComponent, beside grpcio's stream that it replaces."""
from __future__ import annotations

import signal
import time

import hpack
import pytest

from conftest import within
from legorun import pagestream
from legorun.errors import ComponentError
from legorun.memory_client import MemoryClient
from test_mcomponent import Server, page

P = 4096
BASE = 0x7F0000000000

pytest.importorskip("legorun._ext.h2stream")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(f"unix:{tmp_path_factory.mktemp('ps')}/m.sock", "--capacity", "512M")
    yield s
    s.stop()


def test_the_request_headers_are_a_block_hpack_reads_back():
    md = (("legorun-client", "c" * 200), ("authorization", "Bearer " + "t" * 130))
    block = pagestream.header_block("/legorun.memory.v1.Memory/Pages", "localhost", md)
    assert hpack.Decoder().decode(block) == [
        (":method", "POST"), (":scheme", "http"), (":path", "/legorun.memory.v1.Memory/Pages"),
        (":authority", "localhost"), ("content-type", "application/grpc"), ("te", "trailers"),
        ("user-agent", "legorun-pages/1"), *md]


@pytest.mark.parametrize("stream", ["legorun", "grpcio"])
def test_frames_past_every_window_and_many_in_flight_keep_every_page(server, monkeypatch, stream):
    # The server opens 4 MiB windows and takes 4 MiB frames: a 16 MiB store,
    # a 16 MiB fetch and 48 frames in flight cross both many times over.
    monkeypatch.setenv(pagestream.ENV, "c" if stream == "legorun" else "grpc")
    c = MemoryClient(server.address)
    try:
        sid = c.create_space()
        n = 4096
        c.map(sid, BASE, n * P)
        c.store(sid, [(BASE + i * P, page(i)) for i in range(n)])
        assert c.page_stream == stream
        got = c.fetch(sid, [BASE + i * P for i in range(n)])
        assert got == [page(i) for i in range(n)]
        # readaheads and write-backs in flight together, collected newest
        # first: each fetch sees the stores sent before it, none after
        tickets = []
        for k in range(16):
            addrs = [BASE + (k * 256 + i) * P for i in range(256)]
            old = [page(k * 256 + i) for i in range(256)]
            new = [page(k * 256 + i + 7) for i in range(256)]
            tickets.append((c.submit(sid, fetch_addrs=addrs), old))
            tickets.append((c.submit(sid, stores=list(zip(addrs, new))), []))
            tickets.append((c.submit(sid, fetch_addrs=addrs), new))
        for ticket, expected in reversed(tickets):
            assert [bytes(v) for v in c.collect(ticket, views=True)] == expected
        assert c.fetch(sid, [BASE + i * P for i in range(n)]) == [page(i + 7) for i in range(n)]
        c.free_space(sid)
    finally:
        c.close()


def test_a_stopped_server_fails_a_waiting_fetch_or_store_by_keepalive_and_nothing_is_lost(tmp_path):
    server = Server(f"unix:{tmp_path}/m.sock")
    c = MemoryClient(server.address)
    try:
        sid = c.create_space()
        c.map(sid, BASE, 4 * P)
        c.store(sid, [(BASE + i * P, page(i)) for i in range(4)])
        assert c.page_stream == "legorun"
        server.proc.send_signal(signal.SIGSTOP)
        t0 = time.monotonic()
        with pytest.raises(ComponentError) as e:
            within(40, lambda: c.fetch(sid, [BASE]))
        assert str(e.value) == f"mComponent at {server.address}: no answer to keepalive pings"
        assert time.monotonic() - t0 < 25
        server.proc.send_signal(signal.SIGCONT)
        # the next call opens a new stream; the pages are where they were
        assert within(20, lambda: c.fetch(sid, [BASE + i * P for i in range(4)])) == \
            [page(i) for i in range(4)]
        # a send held up (16 MiB: past the server's 4 MiB window) fails alike
        c.map(sid, BASE, 4096 * P, if_absent=True)
        server.proc.send_signal(signal.SIGSTOP)
        t0 = time.monotonic()
        with pytest.raises(ComponentError) as e:
            within(40, lambda: c.store(sid, [(BASE + i * P, page(i + 9)) for i in range(4096)]))
        assert str(e.value) == f"mComponent at {server.address}: no answer to keepalive pings"
        assert time.monotonic() - t0 < 25
        server.proc.send_signal(signal.SIGCONT)
        got = within(20, lambda: c.fetch(sid, [BASE + i * P for i in range(4)]))
        assert got in ([page(i) for i in range(4)], [page(i + 9) for i in range(4)])
        # a write-back handed to the stream's writer thread (submit returns
        # at once): its failure surfaces when its reply is collected
        server.proc.send_signal(signal.SIGSTOP)
        ticket = c.submit(sid, stores=[(BASE + i * P, page(i + 5)) for i in range(4096)])
        t0 = time.monotonic()
        with pytest.raises(ComponentError) as e:
            within(40, lambda: c.collect(ticket))
        assert str(e.value) == f"mComponent at {server.address}: no answer to keepalive pings"
        assert time.monotonic() - t0 < 25
        server.proc.send_signal(signal.SIGCONT)
        got = within(20, lambda: c.fetch(sid, [BASE + i * P for i in range(4)]))
        assert got in ([page(i) for i in range(4)], [page(i + 9) for i in range(4)],
                       [page(i + 5) for i in range(4)])
    finally:
        server.proc.send_signal(signal.SIGCONT)
        c.close()
        server.stop()


def test_addresses_for_grpc_s_resolvers_and_tls_keep_grpcio_s_stream(monkeypatch):
    monkeypatch.delenv(pagestream.ENV, raising=False)
    monkeypatch.delenv("LEGORUN_NO_FASTPATH", raising=False)
    for address in ("unix:/tmp/m.sock", "unix:///tmp/m.sock", "127.0.0.1:7000", "[::1]:7000",
                    "mem.example:7000"):
        assert pagestream.available(address, tls=False), address
        assert not pagestream.available(address, tls=True), address
    for address in ("dns:///mem.example:7000", "ipv4:127.0.0.1:7000", "unix-abstract:m",
                    "mem.example"):
        assert not pagestream.available(address, tls=False), address
    monkeypatch.setenv(pagestream.ENV, "grpc")
    assert not pagestream.available("unix:/tmp/m.sock", tls=False)


@pytest.mark.parametrize("stream", ["legorun", "grpcio"])
def test_the_summary_and_the_stats_name_the_page_stream_used(tmp_path, stream):
    import json
    import os
    import subprocess
    import sys
    env = dict(os.environ)
    env.pop(pagestream.ENV, None)
    if stream == "grpcio":
        env[pagestream.ENV] = "grpc"
    p = subprocess.run([sys.executable, "-m", "legorun", "--excache", "4M", "-c", "--stats-json",
                        str(tmp_path / "s.json"), "--", sys.executable, "-c",
                        "b = bytearray(32 << 20); b[::4096] = b'x' * 8192; print(b.count(b'x'))"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout == "8192\n"
    said = "legorun's HTTP/2 stream (h2stream)" if stream == "legorun" else "grpcio's stream"
    assert f"  pages moved on {said}\n" in p.stderr
    assert json.loads((tmp_path / "s.json").read_text())["page_stream"] == stream
