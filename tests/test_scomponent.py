"""The sComponent and its client, against a real server process."""
from __future__ import annotations

import errno
import pathlib
import os
import selectors
import signal
import stat
import subprocess
import sys
import threading
import time

import grpc
import pytest

from conftest import within
from grpc_health.v1 import health_pb2, health_pb2_grpc

from legorun.proto import storage_pb2 as pb
from legorun.storage_client import ComponentError, StorageClient
from legorun_components import common

MiB = 1024 * 1024
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2


class Server:
    """A `python -m legorun_components.scomponent` child process."""

    def __init__(self, root, listen, *extra, env_extra=None):
        env = {k: v for k, v in os.environ.items() if k != common.TOKEN_ENV}
        env.update(env_extra or {})
        self.root = str(root)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "legorun_components.scomponent", "--listen", listen,
             "--root", self.root, *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        self.address = None

    def wait_ready(self, timeout=15.0):
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            self.stop()
            raise AssertionError("server did not print 'listening on'")
        line = self.proc.stdout.readline()
        assert line.startswith("listening on "), (line, self.proc.stderr.read())
        self.address = line.split(" ", 2)[2].strip()
        return self

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def start_server(root, listen, *extra, **kw):
    return Server(root, listen, *extra, **kw).wait_ready()


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    base = tmp_path_factory.mktemp("scomp")
    server = start_server(base / "root", f"unix:{base}/s.sock")
    yield server
    server.proc.send_signal(signal.SIGTERM)
    server.proc.wait(10)


@pytest.fixture
def client(shared):
    c = StorageClient(shared.address)
    c.connect()
    yield c
    c.close()


@pytest.fixture
def area(shared, request):
    """A fresh directory inside the shared root: (relative path, absolute path)."""
    rel = request.node.name.replace("[", "_").replace("]", "_")
    absolute = os.path.join(shared.root, rel)
    os.makedirs(absolute)
    return rel, absolute


# -- data and errno ---------------------------------------------------------

def test_create_write_read_and_append_report_offsets(client, area):
    rel, absolute = area
    path = f"{rel}/f"
    r = client.call(open=pb.Open(path=path, flags=os.O_CREAT | os.O_WRONLY, mode=0o640))
    assert r.errno == 0 and stat.S_ISREG(r.attr.mode) and r.attr.mode & 0o777 == 0o640
    r = client.call(write=pb.Write(path=path, offset=0, data=b"hello"))
    assert (r.written.count, r.written.offset) == (5, 0)
    r = client.call(write=pb.Write(path=path, offset=10, data=b"X"))
    assert (r.written.count, r.written.offset) == (1, 10)
    r = client.call(write=pb.Write(path=path, offset=0, data=b"tail", append=True))
    assert (r.written.count, r.written.offset) == (4, 11)
    with open(f"{absolute}/f", "rb") as f:
        assert f.read() == b"hello\0\0\0\0\0Xtail"
    assert client.call(read=pb.Read(path=path, offset=3, length=4)).data == b"lo\0\0"
    assert client.call(read=pb.Read(path=path, offset=13, length=100)).data == b"il"
    assert client.call(read=pb.Read(path=path, offset=100, length=10)).data == b""
    r = client.call(stat=pb.Stat(path=path, follow=True))
    assert r.attr.size == 15 and r.attr.ino == os.stat(f"{absolute}/f").st_ino


def test_concurrent_appends_never_overlap(shared, area):
    rel, absolute = area
    path = f"{rel}/log"
    with open(f"{absolute}/log", "wb"):
        pass
    offsets = []

    def appender(tag):
        c = StorageClient(shared.address)
        for _ in range(30):
            offsets.append(c.call(write=pb.Write(path=path, data=tag * 100, append=True)).written.offset)
        c.close()

    threads = [threading.Thread(target=appender, args=(t,)) for t in (b"a", b"b", b"c")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(offsets) == list(range(0, 9000, 100))
    data = open(f"{absolute}/log", "rb").read()
    for off in offsets:
        assert len(set(data[off:off + 100])) == 1


def test_errno_values_are_linux_errnos(client, area):
    rel, absolute = area
    open(f"{absolute}/exists", "w").close()
    os.mkdir(f"{absolute}/dir")
    excl = os.O_CREAT | os.O_EXCL | os.O_WRONLY
    assert client.call(open=pb.Open(path=f"{rel}/exists", flags=excl, mode=0o600)).errno == errno.EEXIST
    assert client.call(open=pb.Open(path=f"{rel}/new", flags=excl, mode=0o600)).errno == 0
    assert client.call(stat=pb.Stat(path=f"{rel}/missing", follow=True)).errno == errno.ENOENT
    assert client.call(read=pb.Read(path=f"{rel}/missing", length=1)).errno == errno.ENOENT
    assert client.call(open=pb.Open(path=f"{rel}/dir", flags=os.O_WRONLY)).errno == errno.EISDIR
    assert client.call(open=pb.Open(path=f"{rel}/exists", flags=os.O_DIRECTORY)).errno == errno.ENOTDIR
    assert client.call(read=pb.Read(path=f"{rel}/dir", length=1)).errno == errno.EISDIR
    assert client.call(rmdir=pb.Rmdir(path=f"{rel}/exists")).errno == errno.ENOTDIR
    assert client.call(unlink=pb.Unlink(path=f"{rel}/dir")).errno == errno.EISDIR
    assert client.call(mkdir=pb.Mkdir(path=f"{rel}/dir", mode=0o755)).errno == errno.EEXIST
    assert client.call(readlink=pb.Readlink(path=f"{rel}/exists")).errno == errno.EINVAL
    assert client.call(rmdir=pb.Rmdir(path="")).errno == errno.EBUSY
    assert client.call(unlink=pb.Unlink(path=f"{rel}/..")).errno == errno.EISDIR
    # O_TRUNC truncates; O_NOFOLLOW on a symlink is ELOOP.
    with open(f"{absolute}/exists", "w") as f:
        f.write("data")
    r = client.call(open=pb.Open(path=f"{rel}/exists", flags=os.O_WRONLY | os.O_TRUNC))
    assert r.errno == 0 and r.attr.size == 0
    os.symlink("exists", f"{absolute}/link")
    assert client.call(open=pb.Open(path=f"{rel}/link", flags=os.O_NOFOLLOW)).errno == errno.ELOOP
    assert client.call(stat=pb.Stat(path=f"{rel}/link", follow=False)).attr.mode & 0o170000 == stat.S_IFLNK
    assert client.call(readlink=pb.Readlink(path=f"{rel}/link")).data == b"exists"


def test_metadata_operations_change_the_served_files(client, area):
    rel, absolute = area
    p = f"{rel}/f"
    client.call(open=pb.Open(path=p, flags=os.O_CREAT | os.O_RDWR, mode=0o644))
    assert client.call(chmod=pb.Chmod(path=p, mode=0o600)).attr.mode & 0o7777 == 0o600
    assert stat.S_IMODE(os.stat(f"{absolute}/f").st_mode) == 0o600
    assert client.call(truncate=pb.Truncate(path=p, length=12345)).attr.size == 12345
    assert client.call(fallocate=pb.Fallocate(path=p, offset=0, length=20000)).attr.size == 20000
    assert client.call(fsync=pb.Fsync(path=p)).errno == 0
    assert client.call(fsync=pb.Fsync(path=p, data_only=True)).errno == 0
    r = client.call(utimens=pb.Utimens(path=p, atime_ns=1_500_000_000_123_456_789, mtime_omit=True,
                                       follow=True))
    st = os.stat(f"{absolute}/f")
    assert r.attr.atime_ns == st.st_atime_ns == 1_500_000_000_123_456_789
    assert st.st_mtime_ns > 1_600_000_000 * 10**9
    client.call(utimens=pb.Utimens(path=p, atime_omit=True, mtime_ns=7 * 10**9, follow=True))
    assert os.stat(f"{absolute}/f").st_mtime_ns == 7 * 10**9
    client.call(utimens=pb.Utimens(path=p, atime_now=True, mtime_now=True, follow=True))
    assert abs(os.stat(f"{absolute}/f").st_mtime - time.time()) < 5
    uid = os.getuid()
    assert client.call(chown=pb.Chown(path=p, uid=uid, gid=-1, follow=True)).attr.uid == uid
    r = client.call(link=pb.Link(old_path=p, new_path=f"{rel}/hard"))
    assert r.attr.nlink == 2 and r.attr.ino == os.stat(f"{absolute}/f").st_ino
    r = client.call(symlink=pb.Symlink(target="f", path=f"{rel}/sym"))
    assert stat.S_ISLNK(r.attr.mode) and os.readlink(f"{absolute}/sym") == "f"
    assert client.call(access=pb.Access(path=p, mode=os.R_OK | os.W_OK)).errno == 0
    assert client.call(access=pb.Access(path=f"{rel}/nope", mode=os.F_OK)).errno == errno.ENOENT
    r = client.call(statfs=pb.Statfs(path=rel))
    vfs = os.statvfs(absolute)
    assert r.statfs.type != 0 and r.statfs.bsize == vfs.f_bsize and r.statfs.namelen == vfs.f_namemax
    assert client.call(mkdir=pb.Mkdir(path=f"{rel}/d/", mode=0o750)).attr.mode & 0o777 == 0o750
    assert client.call(rmdir=pb.Rmdir(path=f"{rel}/d")).errno == 0
    assert client.call(unlink=pb.Unlink(path=f"{rel}/hard")).errno == 0
    assert sorted(os.listdir(absolute)) == ["f", "sym"]


def test_big_transfers_pipelined_in_chunks_round_trip(client, area):
    rel, absolute = area
    p = f"{rel}/big"
    blob = os.urandom(3 * MiB + 123)
    client.call(open=pb.Open(path=p, flags=os.O_CREAT | os.O_WRONLY, mode=0o644))
    replies = client.pipeline([{"write": pb.Write(path=p, offset=off, data=blob[off:off + MiB])}
                               for off in range(0, len(blob), MiB)])
    assert [r.written.count for r in replies] == [MiB, MiB, MiB, 123]
    replies = client.pipeline([{"read": pb.Read(path=p, offset=off, length=MiB)}
                               for off in range(0, len(blob), MiB)])
    assert b"".join(r.data for r in replies) == blob
    # A single 16 MiB read is within the limit.
    assert client.call(read=pb.Read(path=p, length=16 * MiB)).data == blob
    s = client.stats()
    assert s["write"]["count"] == 4 and s["write"]["bytes_sent"] > len(blob)
    assert s["read"]["bytes_received"] > 2 * len(blob) and s["open"]["errors"] == 0


# -- directories -------------------------------------------------------------

def test_readdir_returns_real_entries_in_byte_order(client, area):
    rel, absolute = area
    names = ["b", "a", "B", "é", "z.txt", "_"]
    for n in names:
        open(os.path.join(absolute, n), "w").close()
    os.mkdir(f"{absolute}/sub")
    os.symlink("a", f"{absolute}/ln")
    r = client.call(readdir=pb.Readdir(path=rel))
    got = [e.name for e in r.entries.entries]
    assert got == sorted(names + ["sub", "ln"], key=os.fsencode)
    assert r.entries.end
    types = {e.name: e.type for e in r.entries.entries}
    assert (types["a"], types["sub"], types["ln"]) == (8, 4, 10)
    assert client.call(readdir=pb.Readdir(path=f"{rel}/a")).errno == errno.ENOTDIR


def test_readdir_resumes_while_entries_are_being_removed(client, area):
    rel, absolute = area
    names = {f"f{i:03d}" for i in range(60)}
    for n in names:
        open(os.path.join(absolute, n), "w").close()
    seen, after, pages = [], "", 0
    while True:  # what rm -r does: list a page, unlink it, ask for more
        r = client.call(readdir=pb.Readdir(path=rel, after=after, max_entries=7))
        assert r.errno == 0
        page = [e.name for e in r.entries.entries]
        pages += 1
        for n in page:
            assert client.call(unlink=pb.Unlink(path=f"{rel}/{n}")).errno == 0
        seen += page
        if r.entries.end:
            break
        after = page[-1]
    assert sorted(seen) == sorted(names) and len(seen) == len(set(seen))
    assert pages == 9
    assert client.call(rmdir=pb.Rmdir(path=rel)).errno == 0


def test_rename_honours_noreplace_and_exchange(client, area):
    rel, absolute = area
    for n, content in (("a", "A"), ("b", "B")):
        with open(f"{absolute}/{n}", "w") as f:
            f.write(content)
    r = client.call(rename=pb.Rename(old_path=f"{rel}/a", new_path=f"{rel}/b", flags=RENAME_NOREPLACE))
    assert r.errno == errno.EEXIST
    r = client.call(rename=pb.Rename(old_path=f"{rel}/a", new_path=f"{rel}/b", flags=RENAME_EXCHANGE))
    assert r.errno == 0
    assert open(f"{absolute}/a").read() == "B" and open(f"{absolute}/b").read() == "A"
    r = client.call(rename=pb.Rename(old_path=f"{rel}/a", new_path=f"{rel}/c", flags=RENAME_EXCHANGE))
    assert r.errno == errno.ENOENT
    assert client.call(rename=pb.Rename(old_path=f"{rel}/a", new_path=f"{rel}/c")).errno == 0
    assert sorted(os.listdir(absolute)) == ["b", "c"]


# -- confinement -------------------------------------------------------------

def test_symlinks_and_dotdot_never_leave_the_root(shared, client, area, tmp_path):
    rel, absolute = area
    # A file outside the root, and the same relative name inside it.
    outside = tmp_path / "secret"
    outside.write_text("OUTSIDE")
    depth = len(os.path.relpath(outside, absolute).split(os.sep)) - 1
    ups = "../" * depth
    os.makedirs(os.path.join(shared.root, "etc"), exist_ok=True)
    with open(os.path.join(shared.root, "etc", "passwd"), "w") as f:
        f.write("root-inside")
    os.symlink(str(outside), f"{absolute}/abs")             # absolute, outside
    os.symlink(ups + os.path.relpath(outside, "/"), f"{absolute}/rel")  # relative, outside
    os.symlink("/", f"{absolute}/slash")
    os.symlink("/etc/passwd", f"{absolute}/passwd")
    os.symlink("../../../../../../..", f"{absolute}/up")

    # A link whose target leaves the root is never followed by the server: the
    # reply is EXDEV with a redirect, for the client to follow in its own view.
    r = client.call(read=pb.Read(path=f"{rel}/abs", length=100))
    assert r.errno == errno.EXDEV and r.redirect.target == str(outside) and r.redirect.rest == ""
    assert r.redirect.link_dir == rel
    r = client.call(stat=pb.Stat(path=f"{rel}/slash/etc/passwd", follow=True))
    assert (r.errno, r.redirect.target, r.redirect.rest) == (errno.EXDEV, "/", "etc/passwd")
    r = client.call(stat=pb.Stat(path=f"{rel}/up/x/", follow=True))
    assert (r.errno, r.redirect.rest) == (errno.EXDEV, "x/")
    # not following the final link is no escape
    assert client.call(stat=pb.Stat(path=f"{rel}/abs", follow=False)).errno == 0
    assert client.call(readlink=pb.Readlink(path=f"{rel}/abs")).data == str(outside).encode()
    # '..' past the root in the request itself is refused the same way
    up_path = f"{rel}/{ups}{os.path.relpath(outside, '/')}"
    assert client.call(read=pb.Read(path=up_path, length=100)).errno == errno.EXDEV
    root_ino = os.stat(shared.root).st_ino
    assert client.call(stat=pb.Stat(path="/", follow=True)).attr.ino == root_ino

    # Nothing outside is read, written, truncated, removed, chmod-ed or created.
    escapes = (f"{rel}/abs", f"{rel}/rel", f"{rel}/passwd", up_path, f"{rel}/slash/made")
    for p in escapes:
        assert client.call(read=pb.Read(path=p, length=100)).errno == errno.EXDEV, p
        assert client.call(write=pb.Write(path=p, data=b"pwned")).errno == errno.EXDEV, p
        assert client.call(truncate=pb.Truncate(path=p, length=0)).errno == errno.EXDEV, p
        assert client.call(chmod=pb.Chmod(path=p, mode=0o777)).errno == errno.EXDEV, p
        assert client.call(open=pb.Open(path=p, flags=os.O_CREAT | os.O_WRONLY,
                                        mode=0o600)).errno == errno.EXDEV, p
    assert client.call(mkdir=pb.Mkdir(path=f"{rel}/slash/made", mode=0o755)).errno == errno.EXDEV
    assert client.call(unlink=pb.Unlink(path=up_path)).errno == errno.EXDEV
    r = client.call(rename=pb.Rename(old_path=f"{rel}/passwd", new_path=f"{rel}/up/moved"))
    assert r.errno == errno.EXDEV
    assert outside.read_text() == "OUTSIDE" and stat.S_IMODE(outside.stat().st_mode) != 0o777
    assert not os.path.exists("/made") and not os.path.exists("/moved")
    assert open(os.path.join(shared.root, "etc", "passwd")).read() == "root-inside"
    # Readlink reports the stored target unchanged.
    assert client.call(readlink=pb.Readlink(path=f"{rel}/abs")).data == os.fsencode(str(outside))


def test_a_directory_swapped_for_an_escaping_symlink_mid_lookup_stays_inside(client, area, tmp_path):
    rel, absolute = area
    (tmp_path / "secret").write_text("OUTSIDE")
    os.mkdir(f"{absolute}/real")
    with open(f"{absolute}/real/secret", "w") as f:
        f.write("INSIDE")
    os.symlink(str(tmp_path), f"{absolute}/evil")
    os.symlink("real", f"{absolute}/d")
    stop = threading.Event()

    def flipper():  # atomically point d at the real directory, then outside
        while not stop.is_set():
            for target in ("evil", "real"):
                os.symlink(target, f"{absolute}/d.new")
                os.rename(f"{absolute}/d.new", f"{absolute}/d")

    t = threading.Thread(target=flipper)
    t.start()
    try:
        results = {client.call(read=pb.Read(path=f"{rel}/d/secret", length=100)).data for _ in range(300)}
    finally:
        stop.set()
        t.join()
    assert b"INSIDE" in results and b"OUTSIDE" not in results


# -- protocol, transport, auth -------------------------------------------------

def test_malformed_requests_abort_only_their_stream(shared, client):
    other = StorageClient(shared.address)
    assert other.call(stat=pb.Stat(path="")).errno == 0  # a second stream, open
    for bad in ({}, {"read": pb.Read(path="x", length=16 * MiB + 1)},
                {"stat": pb.Stat(path="a\0b")}):
        with pytest.raises(ComponentError) as info:
            client.call(**bad)
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "\n" not in str(info.value) and str(info.value).startswith(f"sComponent at {shared.address}: ")
        # The next call opens a new stream and is served.
        assert client.call(stat=pb.Stat(path="")).errno == 0
    assert other.call(stat=pb.Stat(path="")).errno == 0
    other.close()


def test_malformed_data_frames_abort_only_their_stream(shared, client):
    from legorun import wire
    (pathlib.Path(shared.root) / "d").write_bytes(b"0123456789")
    good = lambda rid: wire.REQ.pack(rid, wire.READ, 1, 4, 2) + b"d"
    for bad in (b"short",                                             # shorter than a header
                wire.REQ.pack(1, 9, 1, 4, 0) + b"d",                  # unknown op
                wire.REQ.pack(1, wire.READ, 3, 4, 0) + b"a\0b",       # NUL in the path
                wire.REQ.pack(1, wire.READ, 1, 32 << 20, 0) + b"d",   # too long
                wire.REQ.pack(1, wire.WRITE, 1, 10, 0) + b"d" + b"x"):  # length mismatch
        with pytest.raises(ComponentError) as info:
            client.exchange([bad], "data")
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
        rid = client.new_ids(1)
        reply, = client.exchange([good(rid)], "data")  # a new stream is served
        assert wire.REP.unpack_from(reply)[:3] == (rid, 0, 4)
        assert reply[wire.REP.size:] == b"2345"


def test_data_frames_write_append_and_read(shared, client):
    from legorun import wire
    rid = client.new_ids(4)
    frames = [wire.REQ.pack(rid, wire.WRITE, 1, 5, 3) + b"w" + b"hello",
              wire.REQ.pack(rid + 1, wire.APPEND, 1, 3, 0) + b"w" + b"abc",
              wire.REQ.pack(rid + 2, wire.READ, 1, 100, 0) + b"w",
              wire.REQ.pack(rid + 3, wire.READ, 7, 1, 0) + b"missing"]
    (pathlib.Path(shared.root) / "w").write_bytes(b"")
    replies = client.exchange(frames, "data")
    assert wire.REP.unpack_from(replies[0]) == (rid, 0, 5, 3)
    assert wire.REP.unpack_from(replies[1]) == (rid + 1, 0, 3, 8)   # landed at the old end
    assert replies[2][wire.REP.size:] == b"\0\0\0helloabc"
    assert wire.REP.unpack_from(replies[3])[1] == errno.ENOENT


def _experiments_after_import_grpc(env_extra):
    env = {k: v for k, v in os.environ.items() if k != "GRPC_EXPERIMENTS"}
    env.update(env_extra)
    code = ("import os; from legorun.grpc_transport import import_grpc; import_grpc(); "
            "print(os.environ.get('GRPC_EXPERIMENTS'))")
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, check=True).stdout.strip()


def test_server_transport_choice_is_not_left_in_the_environment():
    # gRPC reads the variable while it loads; whatever the server starts
    # later (and a guest's environment) sees the user's value or none.
    assert _experiments_after_import_grpc({}) == "None"
    assert _experiments_after_import_grpc({"GRPC_EXPERIMENTS": "event_engine_listener"}) \
        == "event_engine_listener"


def test_server_on_grpc_default_endpoints_still_serves_data(tmp_path):
    # The user's GRPC_EXPERIMENTS comes last and wins: gRPC's default back.
    from legorun import wire
    server = start_server(tmp_path / "root", f"unix:{tmp_path}/s.sock",
                          env_extra={"GRPC_EXPERIMENTS": "event_engine_listener"})
    try:
        with StorageClient(server.address) as c:
            data = os.urandom(MiB)
            rid = c.new_ids(2)
            (tmp_path / "root" / "f").write_bytes(b"")
            replies = c.exchange([wire.REQ.pack(rid, wire.WRITE, 1, MiB, 0) + b"f" + data,
                                  wire.REQ.pack(rid + 1, wire.READ, 1, MiB, 0) + b"f"], "data")
            assert wire.REP.unpack_from(replies[0]) == (rid, 0, MiB, 0)
            assert replies[1][wire.REP.size:] == data
    finally:
        server.stop()


def test_killed_server_makes_the_next_call_fail_promptly(tmp_path):
    server = start_server(tmp_path / "root", f"unix:{tmp_path}/s.sock")
    c = StorageClient(server.address)
    assert c.call(stat=pb.Stat(path="")).errno == 0
    server.proc.kill()
    server.proc.wait()
    with pytest.raises(ComponentError) as info:
        within(5, lambda: c.call(stat=pb.Stat(path="")))
    assert str(info.value).startswith(f"sComponent at unix:{tmp_path}/s.sock: ")
    with pytest.raises(ComponentError) as info:
        within(5, lambda: c.call(stat=pb.Stat(path="")))
    assert str(info.value) == f"sComponent at unix:{tmp_path}/s.sock: connection refused"
    c.close()


def test_connect_to_nothing_raises_one_line_error(tmp_path):
    c = StorageClient(f"unix:{tmp_path}/none.sock", name="mComponent")
    with pytest.raises(ComponentError) as info:
        within(5, lambda: c.connect(timeout=0.5))
    assert str(info.value).startswith(f"mComponent at unix:{tmp_path}/none.sock: ")
    assert "no such" in str(info.value)
    c.close()


def test_unix_socket_is_private_and_sigterm_exits_cleanly(tmp_path):
    server = start_server(tmp_path / "root", f"unix://{tmp_path}/s.sock")
    assert server.address == f"unix:{tmp_path}/s.sock"
    st = os.stat(tmp_path / "s.sock")
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert (tmp_path / "root").is_dir()  # created
    # A second server must not steal the live socket.
    second = subprocess.run(
        [sys.executable, "-m", "legorun_components.scomponent", "--listen", server.address,
         "--root", str(tmp_path / "root")], capture_output=True, text=True, timeout=15)
    assert second.returncode == 2 and "already in use" in second.stderr
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(10) == 0
    assert "Traceback" not in server.proc.stderr.read()
    assert not (tmp_path / "s.sock").exists()


@pytest.mark.parametrize("listen, message", [
    ("127.0.0.1:7777", "without a token"),
    ("nonsense", "bad --listen address"),
    ("127.0.0.1:99999", "bad port"),
    ("unix:/nonexistent-dir/x.sock", "no such file or directory"),
])
def test_bad_listen_refuses_to_start_with_one_line(tmp_path, listen, message):
    env = {k: v for k, v in os.environ.items() if k != common.TOKEN_ENV}
    r = subprocess.run([sys.executable, "-m", "legorun_components.scomponent", "--listen", listen,
                        "--root", str(tmp_path / "root")], capture_output=True, text=True,
                       env=env, timeout=15)
    assert r.returncode == 2 and r.stdout == ""
    assert len(r.stderr.splitlines()) == 1 and message in r.stderr, r.stderr


def test_tcp_requires_the_right_token(tmp_path):
    server = start_server(tmp_path / "root", "127.0.0.1:0", env_extra={common.TOKEN_ENV: "s3cret"})
    try:
        assert server.address.startswith("127.0.0.1:") and not server.address.endswith(":0")
        for token in (None, "wrong"):
            c = StorageClient(server.address, token=token)
            with pytest.raises(ComponentError) as info:
                c.call(stat=pb.Stat(path=""))
            assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
            c.close()
        c = StorageClient(server.address, token="s3cret")
        c.connect()
        assert c.call(stat=pb.Stat(path="")).errno == 0
        c.close()
    finally:
        server.stop()


def test_health_reports_serving_and_status_counts(shared, client, area):
    rel, absolute = area
    with open(f"{absolute}/data", "wb") as f:
        f.write(b"x" * 1000)
    with grpc.insecure_channel(shared.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "legorun.storage.v1.Storage"):
            r = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert r.status == health_pb2.HealthCheckResponse.SERVING
    client.call(stat=pb.Stat(path=f"{rel}/data"))
    s = client.status()
    assert s.root == os.path.realpath(shared.root)
    assert s.files >= 1 and s.bytes >= 1000 and s.requests >= 1
    assert s.requests_by_op["stat"] >= 1 and s.open_clients >= 1


# -- addresses -----------------------------------------------------------------

@pytest.mark.parametrize("text, kind, target", [
    ("unix:/tmp/a.sock", "unix", "unix:/tmp/a.sock"),
    ("unix:///tmp/a.sock", "unix", "unix:/tmp/a.sock"),
    ("localhost:50051", "tcp", "localhost:50051"),
    ("[::1]:50051", "tcp", "[::1]:50051"),
    ("0.0.0.0:0", "tcp", "0.0.0.0:0"),
])
def test_addresses_parse_in_grpc_forms(text, kind, target):
    a = common.parse_address(text)
    assert (a.kind, a.target) == (kind, target)
    assert common.is_tcp(text) == (kind == "tcp")


@pytest.mark.parametrize("text", ["", "unix:", "unix://rel", "::1:80", "host:", "host:http", "noport"])
def test_bad_addresses_are_rejected(text):
    with pytest.raises(common.AddressError):
        common.parse_address(text)
