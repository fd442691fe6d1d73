"""Advisory locks on a mount: held by the sComponent, so guests exclude each other."""
from __future__ import annotations

import sys
import textwrap

from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import legorun
from legorun_components.locks import F_RDLCK, F_UNLCK, F_WRLCK, LockTable

PY = sys.executable

LOCKS_SCRIPT = textwrap.dedent("""
    import errno, fcntl, os, struct, sys, time
    path = sys.argv[1]
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.lockf(fd, fcntl.LOCK_EX, 10, 0)          # bytes 0..9, F_SETLKW
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        cfd = os.open(path, os.O_RDWR)
        try:
            fcntl.lockf(cfd, fcntl.LOCK_EX | fcntl.LOCK_NB, 5, 0)
            print('child: got a held range', flush=True)
        except OSError as e:
            print('child: busy', errno.errorcode[e.errno], flush=True)
        fcntl.lockf(cfd, fcntl.LOCK_EX | fcntl.LOCK_NB, 5, 20)  # a free range
        print('child: free range ok', flush=True)
        # F_GETLK names the holder
        q = struct.pack('hhqqi4x', fcntl.F_WRLCK, 0, 0, 1, 0)
        t, _, start, length, holder = struct.unpack('hhqqi4x', fcntl.fcntl(cfd, fcntl.F_GETLK, q))
        print('child: getlk', t == fcntl.F_WRLCK, start, length, holder == os.getppid(), flush=True)
        os.write(w, b'x')
        fcntl.lockf(cfd, fcntl.LOCK_EX, 10, 0)     # blocks until the parent unlocks
        print('child: waited and got it', flush=True)
        os._exit(0)
    os.read(r, 1)
    time.sleep(0.3)
    print('parent: unlocking', flush=True)
    fcntl.lockf(fd, fcntl.LOCK_UN, 10, 0)
    os.waitpid(pid, 0)
    # flock is a separate space from fcntl locks, owned by the open file description
    a = os.open(path, os.O_RDONLY)
    b = os.open(path, os.O_RDONLY)
    fcntl.flock(a, fcntl.LOCK_EX)
    try:
        fcntl.flock(b, fcntl.LOCK_SH | fcntl.LOCK_NB)
        print('flock: shared while exclusive held')
    except OSError as e:
        print('flock: busy', errno.errorcode[e.errno])
    os.close(a)                                     # last fd of the description drops it
    fcntl.flock(b, fcntl.LOCK_SH | fcntl.LOCK_NB)
    print('flock: free after close')
""")


def test_fcntl_and_flock_locks_exclude_and_wake_as_natively(scomponent, tmp_path):
    script = tmp_path / "locks.py"
    script.write_text(LOCKS_SCRIPT)
    from conftest import native
    want = native([PY, str(script), str(tmp_path / "native.lock")])
    got = legorun([PY, str(script), "/lego/guest.lock"], storage=scomponent.address)
    assert want.returncode == 0, want.stderr
    assert got.returncode == 0, got.stderr
    assert got.stdout == want.stdout
    assert "child: busy EAGAIN" in got.stdout and "child: waited and got it" in got.stdout


SQLITE_SCRIPT = textwrap.dedent("""
    import multiprocessing as mp, os, sqlite3, sys
    db = sys.argv[1]
    def worker(n):
        c = sqlite3.connect(db, timeout=60)
        for i in range(40):
            with c:
                c.execute('insert into t values (?, ?)', (n, i))
        c.close()
    c = sqlite3.connect(db)
    c.execute('create table t (w, i)')
    c.commit()
    c.close()
    ps = [mp.get_context('fork').Process(target=worker, args=(n,)) for n in range(2)]
    for p in ps: p.start()
    for p in ps: p.join()
    c = sqlite3.connect(db)
    print(c.execute('select count(*), count(distinct w) from t').fetchone())
    print(c.execute('pragma journal_mode').fetchone()[0], c.execute('pragma integrity_check').fetchone()[0])
""")


def test_sqlite_rollback_journal_from_two_processes(scomponent, tmp_path):
    r = legorun([PY, "-c", SQLITE_SCRIPT, "/lego/two.db"], storage=scomponent.address)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["(80, 2)", "delete ok"]
    import sqlite3
    c = sqlite3.connect(f"{scomponent.root}/two.db")
    assert c.execute("select count(*) from t").fetchone() == (80,)


def test_locks_of_a_legorun_that_dies_are_released(scomponent, tmp_path):
    import subprocess
    holder = [PY, "-m", "legorun", "--storage", scomponent.address, "--", PY, "-c",
              "import fcntl, os, time; fd = os.open('/lego/l', os.O_RDWR | os.O_CREAT);"
              "fcntl.lockf(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)"]
    p = subprocess.Popen(holder, stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert p.stdout.readline() == "held\n"
        probe = ("import fcntl, os\nfd = os.open('/lego/l', os.O_RDWR)\n"
                 "try:\n    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB); print('free')\n"
                 "except OSError: print('busy')\n")
        assert legorun([PY, "-c", probe], storage=scomponent.address).stdout == "busy\n"
        os_killpg(p.pid)
        p.wait(10)
        assert legorun([PY, "-c", probe], storage=scomponent.address).stdout == "free\n"
    finally:
        if p.poll() is None:
            p.kill()


def os_killpg(pgid):
    import os
    import signal
    os.killpg(pgid, signal.SIGKILL)


ranges = st.tuples(st.integers(0, 40), st.integers(0, 12))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("ab"), st.sampled_from([F_RDLCK, F_WRLCK, F_UNLCK]),
                          ranges), max_size=25))
def test_lock_table_matches_a_byte_map_model(ops):
    """Each owner's locks, byte by byte, are what a naive per-byte model says."""
    table = LockTable()
    model = {"a": {}, "b": {}}  # owner -> byte -> type
    for owner, type_, (start, length) in ops:
        end = start + (length or 1000)
        other = model["b" if owner == "a" else "a"]
        clash = type_ != F_UNLCK and any(
            b in other and (type_ == F_WRLCK or other[b] == F_WRLCK) for b in range(start, end))
        assert table.set("f", 0, owner, type_, start, length or 0) is (not clash) if length else True
        if length == 0:  # to EOF: compare only the bytes the model tracks
            table.set("f", 0, owner, F_UNLCK, 0, 0)
            model[owner].clear()
            continue
        if not clash:
            for b in range(start, end):
                if type_ == F_UNLCK:
                    model[owner].pop(b, None)
                else:
                    model[owner][b] = type_
        for who in "ab":
            held = {}
            for h in table.owned(who):
                for b in range(h.start, h.end):
                    assert b not in held
                    held[b] = h.type
            assert held == model[who]
