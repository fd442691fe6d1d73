"""The mComponent and its client, against a real server process."""
from __future__ import annotations

import errno
import os
import queue
import selectors
import signal
import subprocess
import sys
import textwrap
import time

import grpc
import pytest

from conftest import within
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hst

from legorun import memwire, pagestream
from legorun.errors import ComponentError
from legorun.memory_client import MemoryClient, MemoryRefused
from legorun.proto import memory_pb2 as pb
from legorun_components import common

P = memwire.PAGE_SIZE
BASE = 0x7F0000000000


def page(tag: int) -> bytes:
    """A distinct, never all-zero page."""
    return b"\xa5" + bytes([tag & 0xFF]) * (P - 5) + tag.to_bytes(4, "little")


class Server:
    """A `python -m legorun_components.mcomponent` child process."""

    def __init__(self, listen, *extra):
        env = {k: v for k, v in os.environ.items() if k != common.TOKEN_ENV}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "legorun_components.mcomponent", "--listen", listen, *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        if not sel.select(15):
            self.stop()
            raise AssertionError("server did not print 'listening on'")
        line = self.proc.stdout.readline()
        assert line.startswith("listening on "), (line, self.proc.stderr.read())
        self.address = line.split(" ", 2)[2].strip()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    base = tmp_path_factory.mktemp("mcomp")
    server = Server(f"unix:{base}/m.sock", "--capacity", "256M")
    yield server
    server.proc.send_signal(signal.SIGTERM)
    server.proc.wait(10)


@pytest.fixture
def client(shared):
    c = MemoryClient(shared.address)
    c.connect()
    yield c
    c.close()


@pytest.fixture
def space(client):
    sid = client.create_space()
    yield sid
    client.free_space(sid)


def regions(c, sid):
    return [(r.start, r.length, r.prot) for r in c.regions(sid)]


class Raw:
    """Hand-made requests on raw streams (replays, malformed frames)."""

    def __init__(self, address, client_id=None, token=None):
        self.channel = grpc.insecure_channel(address)
        md = []
        if client_id is not None:
            md.append(("legorun-client", client_id))
        if token:
            md.append(("authorization", f"Bearer {token}"))
        self.md = tuple(md)
        self.q = {}
        self.replies = {}
        for name, method in (("call", "/legorun.memory.v1.Memory/Call"), ("pages", memwire.METHOD_PAGES)):
            q = self.q[name] = queue.SimpleQueue()
            it = iter(q.get, None)
            self.replies[name] = self.channel.stream_stream(method, lambda b: b, lambda b: b)(
                it, metadata=self.md)

    def call(self, req: pb.Request) -> pb.Reply:
        self.q["call"].put(req.SerializeToString())
        return pb.Reply.FromString(next(self.replies["call"]))

    def frame(self, data: bytes) -> bytes:
        self.q["pages"].put(data)
        return next(self.replies["pages"])

    def close(self):
        for q in self.q.values():
            q.put(None)
        self.channel.close()


# -- pages and spaces ----------------------------------------------------------

def test_store_fetch_absent_and_zero_pages(client, space, shared):
    client.map(space, BASE, 16 * P)
    before = client.status().bytes
    client.store(space, [(BASE, page(1)), (BASE + P, page(2)), (BASE + 2 * P, bytes(P))])
    got = client.fetch(space, [BASE, BASE + P, BASE + 2 * P, BASE + 3 * P, 0x1000])
    assert got == [page(1), page(2), None, None, None]  # zeros and never-stored: absent
    assert client.status().bytes - before == 2 * P      # a zero page holds nothing
    # A page stored, then zeroed, reads absent again; storing then fetching in one message.
    got = client.store_and_fetch(space, [(BASE + P, bytes(P)), (BASE + 3 * P, page(3))],
                                 [BASE + P, BASE + 3 * P])
    assert got == [None, page(3)]
    assert client.status().bytes - before == 2 * P
    s = client.stats()
    assert s["store"]["count"] == 1 and s["fetch"]["count"] == 1 and s["store_fetch"]["count"] == 1
    assert s["fetch"]["bytes_received"] >= 2 * P and s["store"]["bytes_sent"] >= 3 * P


def test_a_store_outside_any_region_is_refused(client, space):
    client.map(space, BASE, 2 * P)
    with pytest.raises(MemoryRefused) as e:
        client.store(space, [(BASE, page(1)), (BASE + 5 * P, page(2))])
    assert e.value.errno == errno.EFAULT and e.value.failed == [BASE + 5 * P]
    assert "mComponent at" in str(e.value) and "\n" not in str(e.value)
    assert client.fetch(space, [BASE, BASE + 5 * P]) == [page(1), None]


def test_fork_is_copy_on_write_and_shared_pages_count_once(client, space):
    client.map(space, BASE, 8 * P)
    client.store(space, [(BASE + i * P, page(i + 1)) for i in range(4)])
    held = client.status().bytes
    child = client.fork_space(space)
    assert client.status().bytes == held                        # shared, not copied
    assert client.fetch(child, [BASE + i * P for i in range(4)]) == [page(i + 1) for i in range(4)]
    assert regions(client, child) == regions(client, space)
    client.store(child, [(BASE, page(100))])                    # child writes: copy
    client.store(space, [(BASE + P, page(200))])                # parent writes: copy
    client.discard(child, BASE + 2 * P, P)
    assert client.fetch(space, [BASE + i * P for i in range(4)]) == [page(1), page(200), page(3), page(4)]
    assert client.fetch(child, [BASE + i * P for i in range(4)]) == [page(100), page(2), None, page(4)]
    assert client.status().bytes == held + 2 * P
    grandchild = client.fork_space(child)
    client.unmap(child, BASE, 8 * P)
    assert client.fetch(grandchild, [BASE, BASE + P]) == [page(100), page(2)]
    client.free_space(child)
    client.free_space(grandchild)
    assert client.status().bytes == held


def test_partial_unmap_splits_the_region_and_drops_its_pages(client, space):
    client.map(space, BASE, 10 * P, prot=3)
    client.store(space, [(BASE + i * P, page(i)) for i in range(10)])
    assert client.unmap(space, BASE + 3 * P, 2 * P) == 2
    assert regions(client, space) == [(BASE, 3 * P, 3), (BASE + 5 * P, 5 * P, 3)]
    got = client.fetch(space, [BASE + i * P for i in range(10)])
    assert got == [page(0), page(1), page(2), None, None] + [page(i) for i in range(5, 10)]
    with pytest.raises(MemoryRefused):  # the hole has no region any more
        client.store(space, [(BASE + 3 * P, page(3))])
    client.protect(space, BASE + P, P, 1)
    assert regions(client, space) == [(BASE, P, 3), (BASE + P, P, 1), (BASE + 2 * P, P, 3),
                                      (BASE + 5 * P, 5 * P, 3)]
    # mmap over a live region (MAP_FIXED) replaces it: its pages read zero.
    assert client.map(space, BASE + 6 * P, 2 * P, prot=1) == 2
    assert client.fetch(space, [BASE + 5 * P, BASE + 6 * P, BASE + 8 * P]) == [page(5), None, page(8)]
    # A lazily learned region (if_absent) never drops what is there.
    assert client.map(space, BASE, 12 * P, prot=7, if_absent=True) == 0
    assert client.fetch(space, [BASE, BASE + 9 * P]) == [page(0), page(9)]
    assert regions(client, space)[3:] == [(BASE + 3 * P, 2 * P, 7), (BASE + 5 * P, P, 3),
                                          (BASE + 6 * P, 2 * P, 1), (BASE + 8 * P, 2 * P, 3),
                                          (BASE + 10 * P, 2 * P, 7)]


def test_remap_grows_shrinks_and_moves_with_the_pages(client, space):
    client.map(space, BASE, 4 * P, prot=3)
    client.store(space, [(BASE + i * P, page(i + 1)) for i in range(4)])
    client.remap(space, BASE, 4 * P, BASE, 6 * P)                      # grow in place
    assert regions(client, space) == [(BASE, 4 * P, 3), (BASE + 4 * P, 2 * P, 3)]
    client.store(space, [(BASE + 5 * P, page(6))])
    assert client.remap(space, BASE, 6 * P, BASE, 3 * P) == 0         # shrink: tail dropped
    assert client.fetch(space, [BASE + 3 * P, BASE + 5 * P]) == [None, None]
    new = BASE + 0x100000
    client.map(space, new, 2 * P)
    client.store(space, [(new, page(99))])                              # overwritten by the move
    assert client.remap(space, BASE, 3 * P, new, 8 * P) == 3           # move and grow
    assert client.fetch(space, [BASE, BASE + P]) == [None, None]
    assert client.fetch(space, [new + i * P for i in range(5)]) == [page(1), page(2), page(3), None, None]
    assert sum(r[1] for r in regions(client, space)) == 8 * P
    assert all(r[0] >= new for r in regions(client, space))
    with pytest.raises(MemoryRefused) as e:                             # overlapping move
        client.remap(space, new, 8 * P, new + P, 8 * P)
    assert e.value.errno == errno.EINVAL


def test_discard_reads_zero_and_a_replayed_store_cannot_resurrect(client, space, shared):
    client.map(space, BASE, 4 * P)
    client.store(space, [(BASE, page(1)), (BASE + P, page(2))])
    assert client.discard(space, BASE, P) == 1
    assert client.fetch(space, [BASE, BASE + P]) == [None, page(2)]
    assert regions(client, space) == [(BASE, P, 3), (BASE + P, 3 * P, 3)]
    # Replay the first store frame (seq 2 after map's 1): ignored as stale.
    raw = Raw(shared.address, client.client_id)
    try:
        frame = memwire.request(7, space, client._seq - 2, [BASE, BASE + P], [page(1), page(2)], [])
        reply = raw.frame(frame)
        rid, err, ns, nf, _ = memwire.REP.unpack_from(reply)
        assert (rid, err, ns, nf) == (7, 0, 2, 0)
        assert list(reply[memwire.REP.size:]) == [errno.ESTALE, errno.ESTALE]
        # A replayed control op is a duplicate: no effect.
        r = raw.call(pb.Request(id=1, space=space, seq=1, map=pb.Map(start=BASE, length=4 * P, prot=3)))
        assert r.errno == 0 and r.duplicate
    finally:
        raw.close()
    assert client.fetch(space, [BASE, BASE + P]) == [None, page(2)]
    # A re-created space id is a duplicate too, and keeps its pages.
    assert client.create_space(space) == space
    assert client.fetch(space, [BASE + P]) == [page(2)]


def test_submit_collect_and_control_ops_keep_issue_order(client, space):
    client.map(space, BASE, 64 * P)
    tickets = [client.submit(space, [(BASE + i * P, page(i))]) for i in range(32)]
    client.unmap(space, BASE + 31 * P, P)            # waits for the write-backs in flight
    child = client.fork_space(space)
    assert client.fetch(child, [BASE, BASE + 30 * P, BASE + 31 * P]) == [page(0), page(30), None]
    assert [client.collect(t) for t in tickets] == [[]] * 32
    pre = client.submit(space, (), [BASE + 5 * P])
    client.forget(pre)
    t = client.submit(space, [(BASE + 40 * P, page(40))], [BASE + 40 * P, BASE + 41 * P], kind="wb")
    assert client.collect(t) == [page(40), None]
    assert client.pending() == 0 and client.stats()["wb"]["count"] == 1
    client.free_space(child)


def test_an_express_fetch_overtakes_frames_in_flight_and_leaves_their_replies_intact(client, space):
    """fetch(express=True) while frames are in flight goes on a stream of its
    own (the caller vouches none of them stores its pages); the frames in
    flight are collected afterwards as usual, in order."""
    client.map(space, BASE, 4096 * P)
    client.store(space, [(BASE + i * P, page(i)) for i in range(8)])
    big = [(BASE + (64 + i) * P, page(i % 200)) for i in range(2048)]  # 8 MiB in flight
    stores = [client.submit(space, big[i:i + 512]) for i in range(0, 2048, 512)]
    ahead = client.submit(space, (), [BASE + i * P for i in range(8)], kind="readahead")
    assert client.pending() >= 1
    got = client.fetch(space, [BASE + 3 * P, BASE + 5 * P, BASE + 9 * P], express=True)
    assert got == [page(3), page(5), None]
    assert client._express is not None  # (it did take the second stream)
    assert [client.collect(t) for t in stores] == [[]] * 4
    assert client.collect(ahead) == [page(i) for i in range(8)]
    got = client.fetch(space, [BASE + 64 * P, BASE + 2111 * P], express=True)  # nothing in flight
    assert got == [page(0), page(2047 % 200)]
    assert client.pending() == 0 and client.stats()["fetch"]["count"] == 2


# -- capabilities, capacity, leases ------------------------------------------------

def test_clients_only_touch_their_own_spaces(shared, client, space):
    client.map(space, BASE, P)
    client.store(space, [(BASE, page(7))])
    other = MemoryClient(shared.address)
    try:
        for attempt in (lambda: other.fetch(space, [BASE]),
                        lambda: other.store(space, [(BASE, page(8))]),
                        lambda: other.map(space, BASE, P),
                        lambda: other.unmap(space, BASE, P),
                        lambda: other.regions(space),
                        lambda: other.fork_space(space)):
            with pytest.raises(MemoryRefused) as e:
                attempt()
            assert e.value.errno == errno.ESRCH
        with pytest.raises(MemoryRefused) as e:
            other.create_space(space)
        assert e.value.errno == errno.EEXIST
        assert other.free_space(space) == 0          # answers as for an unknown id
        assert other.fetch(other.create_space(), [BASE]) == [None]
    finally:
        other.close()
    assert client.fetch(space, [BASE]) == [page(7)]
    # An unknown id is ESRCH too, on both streams.
    with pytest.raises(MemoryRefused) as e:
        client.fetch(os.urandom(16), [BASE])
    assert e.value.errno == errno.ESRCH


def test_capacity_refuses_stores_and_the_server_recovers(tmp_path):
    server = Server(f"unix:{tmp_path}/m.sock", "--capacity", "64K")  # 16 pages
    c = MemoryClient(server.address)
    try:
        sid = c.create_space()
        c.map(sid, BASE, 32 * P)
        with pytest.raises(MemoryRefused) as e:
            c.store(sid, [(BASE + i * P, page(i)) for i in range(20)])
        assert e.value.errno == errno.ENOMEM and "out of capacity" in str(e.value)
        assert e.value.failed == [BASE + i * P for i in range(16, 20)]
        st = c.status()
        assert (st.bytes, st.capacity, st.refused_nomem) == (64 * 1024, 64 * 1024, 4)
        c.store(sid, [(BASE, page(50))])                 # overwriting needs no new page
        c.store(sid, [(BASE + 20 * P, bytes(P))])        # nor does a zero page
        child = c.fork_space(sid)
        with pytest.raises(MemoryRefused):               # copy-on-write needs one
            c.store(child, [(BASE + P, page(51))])
        c.free_space(child)
        c.discard(sid, BASE, 4 * P)                      # room again
        c.store(sid, [(BASE + i * P, page(i)) for i in range(16, 20)])
        assert c.fetch(sid, [BASE + 19 * P]) == [page(19)]
        c.free_space(sid)
        assert c.status().pages == 0
    finally:
        c.close()
        server.stop()


LEASE_CLIENT = textwrap.dedent("""
    import sys, time
    from legorun.memory_client import MemoryClient
    c = MemoryClient(sys.argv[1])
    for _ in range(3):
        s = c.create_space()
        c.map(s, 0x10000, 64 * 4096)
        c.store(s, [(0x10000 + i * 4096, bytes([i + 1]) * 4096) for i in range(64)])
    print("ready", flush=True)
    time.sleep(60)
""")


def test_lease_frees_the_spaces_of_a_killed_client(tmp_path):
    server = Server(f"unix:{tmp_path}/m.sock", "--lease", "0.4s")
    watcher = MemoryClient(server.address)
    try:
        # Reconnecting within the lease keeps everything.
        c = MemoryClient(server.address)
        sid = c.create_space()
        c.map(sid, BASE, P)
        c.store(sid, [(BASE, page(3))])
        c.close()
        c2 = MemoryClient(server.address, client_id=c.client_id)
        assert c2.fetch(sid, [BASE]) == [page(3)]
        guest = subprocess.Popen([sys.executable, "-c", LEASE_CLIENT, server.address],
                                 stdout=subprocess.PIPE, text=True)
        assert guest.stdout.readline().strip() == "ready"
        st = watcher.status()
        assert st.pages == 193 and st.spaces == 4
        guest.kill()
        guest.wait()
        deadline = time.monotonic() + 10
        while watcher.status().pages != 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        st = watcher.status()
        assert (st.pages, st.spaces, st.spaces_expired) == (1, 1, 3)
        assert [(b.spaces, b.pages) for b in st.by_client if b.spaces] == [(1, 1)]
        c2.close()
        deadline = time.monotonic() + 10
        while watcher.status().spaces and time.monotonic() < deadline:
            time.sleep(0.1)
        assert watcher.status().pages == 0 and watcher.status().spaces == 0
    finally:
        watcher.close()
        server.stop()


# -- malformed requests, failures, auth ---------------------------------------------

def test_malformed_requests_end_the_stream_and_the_server_stays_up(client, space, shared):
    for bad in (lambda: client.map(space, BASE + 1, P),
                lambda: client.unmap(space, BASE, P + 1),
                lambda: client.discard(space, BASE, 0),
                lambda: client.remap(space, BASE, P, 2**64 - P, 2 * P),
                lambda: client.map(b"short", BASE, P),
                lambda: client.fetch(space, [BASE + 12]),
                lambda: client.store(space, [(BASE + 8, page(1))])):
        with pytest.raises(ComponentError) as e:
            within(10, bad)
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT, e.value
        assert str(e.value).startswith(f"mComponent at {client.address}: invalid argument")
    raw = Raw(shared.address, client.client_id)
    try:
        for frame in (b"short",
                      memwire.request(1, space, 0, [], [], [BASE])[:-1],            # truncated
                      memwire.REQ.pack(1, 9, 0, 0, space, 0, 0, 0),                 # unknown op
                      memwire.REQ.pack(1, 1, 0, 0, space, 0, 0, 10**6)):            # too many
            with pytest.raises(grpc.RpcError) as e:
                raw.frame(frame)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            raw.close()
            raw = Raw(shared.address, client.client_id)
        with pytest.raises(grpc.RpcError) as e:
            raw.call(pb.Request(id=3, space=space))                                 # no op
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        raw.close()
    bad_id = Raw(shared.address, "has space")
    with pytest.raises(grpc.RpcError) as e:
        bad_id.frame(memwire.request(1, space, 0, [], [], [BASE]))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    bad_id.close()
    client.map(space, BASE, P)                       # streams reopen; the space is intact
    client.store(space, [(BASE, page(1))])
    assert client.fetch(space, [BASE]) == [page(1)]


def test_a_killed_server_is_a_prompt_one_line_error(tmp_path):
    server = Server(f"unix:{tmp_path}/m.sock")
    c = MemoryClient(server.address)
    sid = c.create_space()
    c.map(sid, BASE, P)
    c.store(sid, [(BASE, page(1))])
    ticket = c.submit(sid, [(BASE, page(2))])
    c.collect(ticket)
    server.proc.kill()
    server.proc.wait()
    t0 = time.monotonic()
    for op in (lambda: c.fetch(sid, [BASE]), lambda: c.unmap(sid, BASE, P), lambda: c.create_space()):
        with pytest.raises(ComponentError) as e:
            within(10, op)
        assert str(e.value).startswith(f"mComponent at {server.address}: ")
        assert "\n" not in str(e.value)
    with pytest.raises(ComponentError):
        within(10, lambda: c.connect(timeout=1))
    assert time.monotonic() - t0 < 8
    c.close()


def test_tcp_requires_the_token(tmp_path):
    env_free = {k: v for k, v in os.environ.items() if k != common.TOKEN_ENV}
    p = subprocess.run([sys.executable, "-m", "legorun_components.mcomponent", "--listen",
                        "127.0.0.1:0"], capture_output=True, text=True, env=env_free, timeout=30)
    assert p.returncode == 2 and "without a token" in p.stderr and len(p.stderr.splitlines()) == 1
    server = Server("127.0.0.1:0", "--token", "s3cret")
    try:
        for token in (None, "wrong"):
            c = MemoryClient(server.address, token=token)
            with pytest.raises(ComponentError) as e:
                within(10, c.create_space)
            assert e.value.code == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(ComponentError) as e:  # the page stream is refused alike
                within(10, lambda: c.fetch(b"\0" * 16, [BASE]))
            assert e.value.code == grpc.StatusCode.UNAUTHENTICATED, e.value
            assert "unauthenticated" in str(e.value) and "\n" not in str(e.value)
            c.close()
        c = MemoryClient(server.address, token="s3cret")
        sid = c.create_space()
        c.map(sid, BASE, P)
        c.store(sid, [(BASE, page(4))])
        assert c.fetch(sid, [BASE]) == [page(4)]
        assert c.page_stream == ("legorun" if pagestream.available(server.address, False) else "grpcio")
        c.close()
    finally:
        server.stop()


def test_bad_arguments_are_one_line_errors(tmp_path):
    for args, needle in ((["--capacity", "lots"], "bad --capacity"),
                         (["--lease=-1s"], "bad --lease"), (["--lease", "soon"], "bad --lease")):
        p = subprocess.run([sys.executable, "-m", "legorun_components.mcomponent", "--listen",
                            f"unix:{tmp_path}/x.sock", *args], capture_output=True, text=True, timeout=30)
        assert p.returncode == 2 and needle in p.stderr and len(p.stderr.splitlines()) == 1
    assert memwire.parse_size("8G") == 8 << 30 and memwire.parse_size("64KiB") == 65536
    assert memwire.parse_size("1.5M") == 3 << 19 and memwire.parse_size("4096") == 4096


def test_health_reflection_and_status(shared, client, space):
    with grpc.insecure_channel(shared.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "legorun.memory.v1.Memory"):
            r = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert r.status == health_pb2.HealthCheckResponse.SERVING
        from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
        refl = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {s.name for s in next(replies).list_services_response.service}
        assert "legorun.memory.v1.Memory" in names
    client.map(space, BASE, 2 * P)
    client.store(space, [(BASE, page(1)), (BASE + P, page(2))])
    st = client.status()
    mine = [b for b in st.by_client if b.client == client.client_id[:8]]
    assert mine and mine[0].pages == 2 and mine[0].bytes == 2 * P and mine[0].streams == 2
    assert st.requests_by_op["pages"] >= 1 and st.uptime_s > 0 and st.lease_s == 10


# -- a model of the region record and the pages ---------------------------------------

N = 24  # pages in the model's window
addr_page = hst.integers(0, N - 1)
ops = hst.one_of(
    hst.tuples(hst.just("map"), addr_page, hst.integers(1, 8), hst.sampled_from([0, 1, 3]), hst.booleans()),
    hst.tuples(hst.just("unmap"), addr_page, hst.integers(1, 8)),
    hst.tuples(hst.just("discard"), addr_page, hst.integers(1, 8)),
    hst.tuples(hst.just("protect"), addr_page, hst.integers(1, 8), hst.sampled_from([0, 1, 3])),
    hst.tuples(hst.just("remap"), addr_page, hst.integers(1, 6), addr_page, hst.integers(1, 6)),
    hst.tuples(hst.just("store"), hst.lists(addr_page, min_size=1, max_size=5, unique=True),
              hst.integers(0, 3)),
    hst.tuples(hst.just("fork")),
    hst.tuples(hst.just("switch")),
)


class Model:
    def __init__(self):
        self.mapped = {}  # page -> prot
        self.data = {}    # page -> bytes

    def clone(self):
        m = Model()
        m.mapped, m.data = dict(self.mapped), dict(self.data)
        return m


def apply_model(m: Model, op, tag: int):
    kind = op[0]
    if kind == "map":
        _, a, n, prot, lazy = op
        for p in range(a, a + n):
            if lazy:
                m.mapped.setdefault(p, prot)
            else:
                m.mapped[p] = prot
                m.data.pop(p, None)
    elif kind == "unmap":
        for p in range(op[1], op[1] + op[2]):
            m.mapped.pop(p, None)
            m.data.pop(p, None)
    elif kind == "discard":
        for p in range(op[1], op[1] + op[2]):
            m.data.pop(p, None)
    elif kind == "protect":
        for p in range(op[1], op[1] + op[2]):
            if p in m.mapped:
                m.mapped[p] = op[3]
    elif kind == "remap":
        _, old, olen, new, nlen = op
        src = [p for p in range(old, old + olen) if p in m.mapped]
        if new == old:
            if nlen < olen:
                apply_model(m, ("unmap", old + nlen, olen - nlen), tag)
            elif nlen > olen:
                prot = m.mapped.get(old + olen - 1, m.mapped[src[0]] if src else 3)
                apply_model(m, ("map", old + olen, nlen - olen, prot, False), tag)
            return
        template = m.mapped[src[0]] if src else 3
        moved = min(olen, nlen)
        mapped = {p: m.mapped.get(old + p - new, template) if p - new < moved else template
                  for p in range(new, new + nlen)}
        data = {p - old + new: m.data[p] for p in range(old, old + moved) if p in m.data}
        apply_model(m, ("unmap", new, nlen), tag)
        apply_model(m, ("unmap", old, olen), tag)
        m.mapped.update(mapped)
        m.data.update(data)
    elif kind == "store":
        for p in op[1]:
            if p in m.mapped:
                m.data[p] = None if op[2] == 0 else page(tag * 8 + op[2])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(hst.lists(ops, min_size=1, max_size=25))
def test_region_and_page_model(client, program):
    spaces = [client.create_space()]
    models = [Model()]
    cur = 0
    base = BASE
    try:
        for step, op in enumerate(program):
            sid, m = spaces[cur], models[cur]
            kind = op[0]
            if kind == "fork":
                spaces.append(client.fork_space(sid))
                models.append(m.clone())
                continue
            if kind == "switch":
                cur = (cur + 1) % len(spaces)
                continue
            if kind == "remap" and op[1] != op[3] and op[1] < op[3] + op[4] and op[3] < op[1] + op[2]:
                with pytest.raises(MemoryRefused):
                    client.remap(sid, base + op[1] * P, op[2] * P, base + op[3] * P, op[4] * P)
                continue
            if kind == "map":
                client.map(sid, base + op[1] * P, op[2] * P, prot=op[3], if_absent=op[4])
            elif kind in ("unmap", "discard"):
                getattr(client, kind)(sid, base + op[1] * P, op[2] * P)
            elif kind == "protect":
                client.protect(sid, base + op[1] * P, op[2] * P, op[3])
            elif kind == "remap":
                client.remap(sid, base + op[1] * P, op[2] * P, base + op[3] * P, op[4] * P, prot=3)
            elif kind == "store":
                pairs = [(base + p * P, bytes(P) if op[2] == 0 else page(step * 8 + op[2])) for p in op[1]]
                try:
                    client.store(sid, pairs)
                except MemoryRefused as e:
                    assert e.errno == errno.EFAULT
                    assert sorted(e.failed) == sorted(base + p * P for p in op[1] if p not in m.mapped)
                else:
                    assert all(p in m.mapped for p in op[1])
            apply_model(m, op, step)
            for s, mm in zip(spaces, models):
                got = client.fetch(s, [base + p * P for p in range(N + 8)])
                assert got == [mm.data.get(p) for p in range(N + 8)]
                pages = {}
                for r in client.regions(s):
                    for a in range(r.start, r.start + r.length, P):
                        pages[(a - base) // P] = r.prot
                assert pages == mm.mapped
    finally:
        for s in spaces:
            client.free_space(s)
