"""Guests on a mount: real sComponent, real programs, bytes checked on the server's root."""
from __future__ import annotations

import os
import sys
import textwrap

from conftest import compile_c, legorun, native

PY = sys.executable


def test_python_guest_creates_appends_renames_and_unlinks_open_files(scomponent):
    script = textwrap.dedent("""
        import json, os, shutil, tempfile
        os.makedirs('/lego/work/sub', exist_ok=True)
        with open('/lego/work/a.txt', 'w') as f:
            f.write('first\\n')
        with open('/lego/work/a.txt', 'a') as f:
            f.write('second\\n')
        f = open('/lego/work/a.txt')
        os.rename('/lego/work/a.txt', '/lego/work/b.txt')      # renamed while open
        print('after rename:', f.read().split())
        g = open('/lego/work/b.txt')
        os.unlink('/lego/work/b.txt')                           # unlinked while open
        print('after unlink:', g.read().split(), os.path.exists('/lego/work/b.txt'))
        g.close(); f.close()
        json.dump({'k': [1, 2, 3]}, open('/lego/work/sub/data.json', 'w'))
        print('json:', json.load(open('/lego/work/sub/data.json')))
        shutil.copytree('/lego/work', '/lego/copy')
        print('tree:', sorted(os.listdir('/lego/copy')), sorted(os.listdir('/lego/copy/sub')))
        with tempfile.NamedTemporaryFile('w+', dir='/lego/work') as tmp:
            tmp.write('scratch'); tmp.flush(); tmp.seek(0)
            print('tempfile:', tmp.read(), os.path.dirname(tmp.name))
        st = os.stat('/lego/copy/sub/data.json')
        print('size:', st.st_size, 'isfile:', os.path.isfile('/lego/copy/sub/data.json'))
        shutil.rmtree('/lego/copy')
        print('exists after rmtree:', os.path.exists('/lego/copy'))
    """)
    r = legorun([PY, "-c", script], storage=scomponent.address)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        "after rename: ['first', 'second']",
        "after unlink: ['first', 'second'] False",
        "json: {'k': [1, 2, 3]}",
        "tree: ['sub'] ['data.json']",
        "tempfile: scratch /lego/work",
        "size: 16 isfile: True",
        "exists after rmtree: False",
    ]
    root = scomponent.root
    # the unlinked file is gone from the server once its last fd closed
    assert sorted(os.listdir(f"{root}/work")) == ["sub"]
    assert open(f"{root}/work/sub/data.json").read() == '{"k": [1, 2, 3]}'


def test_bash_redirections_and_coreutils_on_a_mount(scomponent):
    script = textwrap.dedent("""
        set -e
        mkdir -p /lego/t && cd /lego/t
        printf 'b\\nc\\na\\n' > in.txt
        sort < in.txt > out.txt
        echo tail >> out.txt
        cat out.txt
        cp out.txt copy.txt
        ls -l | awk 'NR > 1 {print $1, $5, $NF}'
        tar cf /lego/t.tar -C /lego t
        tar tf /lego/t.tar | sort
        pwd
    """)
    r = legorun(["bash", "-c", script], storage=scomponent.address)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        "a", "b", "c", "tail",
        "-rw-r--r-- 11 copy.txt", "-rw-r--r-- 6 in.txt", "-rw-r--r-- 11 out.txt",
        "t/", "t/copy.txt", "t/in.txt", "t/out.txt",
        "/lego/t",
    ]
    assert open(f"{scomponent.root}/t/out.txt").read() == "a\nb\nc\ntail\n"
    assert open(f"{scomponent.root}/t/copy.txt").read() == "a\nb\nc\ntail\n"
    assert os.path.getsize(f"{scomponent.root}/t.tar") >= 10240


def test_remote_fds_zero_and_one_get_the_numbers_the_kernel_gives(scomponent):
    with open(f"{scomponent.root}/in", "w") as f:
        f.write("3\n1\n2\n")
    r = legorun(["sh", "-c", "sort < /lego/in > /lego/out; ls -l /proc/self/fd/ > /dev/null"],
                storage=scomponent.address)
    assert r.returncode == 0, r.stderr
    assert open(f"{scomponent.root}/out").read() == "1\n2\n3\n"


BAD_POINTERS_C = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

static void show(const char *what, long r) {
    printf("%s: %ld %s\n", what, r, r < 0 ? strerrorname_np(errno) : "");
}

int main(int argc, char **argv) {
    char path[4096];
    snprintf(path, sizeof path, "%s/f", argv[1]);
    int fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0644);
    show("open", fd >= 0 ? 0 : -1);
    show("write NULL", write(fd, NULL, 10));
    show("write ok", write(fd, "0123456789", 10));
    show("lseek", lseek(fd, 0, SEEK_SET));
    show("read NULL", read(fd, NULL, 10));
    show("read bad", read(fd, (void *)1, 10));
    /* a buffer whose second page is unmapped: a short count */
    char *two = mmap(NULL, 8192, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    munmap(two + 4096, 4096);
    memcpy(two + 4090, "abcdef", 6);
    show("pwrite straddling", pwrite(fd, two + 4090, 100, 0));
    show("pread straddling", pread(fd, two + 4094, 10, 0));
    show("open NULL", open(NULL, O_RDONLY));
    show("stat bad", stat(path, (struct stat *)1));
    show("stat NULL path", stat(NULL, (struct stat *)two));
    show("close", close(fd));
    show("read closed", read(fd, two, 1));
    return 0;
}
"""


def test_bad_pointers_get_efault_or_short_counts_as_natively(scomponent, tmp_path):
    exe = compile_c(tmp_path, "badptr", BAD_POINTERS_C, flags=("-w",))
    local = tmp_path / "local"
    local.mkdir()
    want = native([exe, str(local)])
    got = legorun([exe, "/lego"], storage=scomponent.address)
    assert want.returncode == 0
    assert "EFAULT" in want.stdout and "pwrite straddling: 6" in want.stdout
    assert got.returncode == 0, got.stderr
    assert got.stdout == want.stdout


def test_fork_child_shares_the_fd_offset_and_vfork_child_execs(scomponent):
    script = textwrap.dedent("""
        import os, subprocess, sys
        fd = os.open('/lego/shared', os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(fd, b'parent1 ')
        pid = os.fork()
        if pid == 0:
            os.write(fd, b'child ')
            os._exit(0)
        os.waitpid(pid, 0)
        os.write(fd, b'parent2')
        os.close(fd)
        # subprocess uses vfork + exec; the remote fd is the child's stdin
        with open('/lego/shared') as f:
            out = subprocess.run(['cat'], stdin=f, capture_output=True, text=True).stdout
        print('cat saw:', out)
        # close-on-exec: an O_CLOEXEC remote fd is gone in the exec'd program
        cfd = os.open('/lego/shared', os.O_RDONLY | os.O_CLOEXEC)
        keep = os.open('/lego/shared', os.O_RDONLY)
        os.set_inheritable(keep, True)
        probe = ("import os\\n"
                 "for fd in (%d, %d):\\n"
                 "    try: print(fd, len(os.read(fd, 100)))\\n"
                 "    except OSError as e: print(fd, e.strerror)\\n") % (cfd, keep)
        subprocess.run([sys.executable, '-c', probe], pass_fds=(keep,))
    """)
    r = legorun([PY, "-c", script], storage=scomponent.address)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "cat saw: parent1 child parent2"
    assert lines[1].endswith("Bad file descriptor")
    assert lines[2].endswith(" 21")
    assert open(f"{scomponent.root}/shared").read() == "parent1 child parent2"


def test_errors_from_the_server_reach_the_guest_as_errno(scomponent):
    script = textwrap.dedent("""
        import errno, os
        def err(f, *a):
            try:
                f(*a); return 'ok'
            except OSError as e:
                return errno.errorcode[e.errno]
        print(err(open, '/lego/missing'))
        open('/lego/x', 'w').close()
        print(err(os.open, '/lego/x', os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        print(err(os.mkdir, '/lego/x'))
        print(err(os.rmdir, '/lego'))
        print(err(os.listdir, '/lego/x'))
        print(err(os.rename, '/lego/x', '/tmp/elsewhere'))
        print(err(os.open, '/lego/x', os.O_RDONLY | os.O_DIRECTORY))
    """)
    r = legorun([PY, "-c", script], storage=scomponent.address)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["ENOENT", "EEXIST", "EEXIST", "EBUSY", "ENOTDIR", "EXDEV", "ENOTDIR"]


def test_big_and_odd_sized_io_round_trips_through_the_data_path(scomponent):
    script = textwrap.dedent("""
        import hashlib, os, random
        rnd = random.Random(7)
        blob = rnd.randbytes(5 * 1024 * 1024 + 12345)
        with open('/lego/big', 'wb', buffering=0) as f:
            assert f.write(blob) == len(blob)              # one write(2) of 5 MiB
        fd = os.open('/lego/big', os.O_RDWR)
        os.pwrite(fd, b'X' * 70000, 3 * 1024 * 1024 - 3)   # straddles pieces
        expect = bytearray(blob)
        expect[3 * 1024 * 1024 - 3:3 * 1024 * 1024 - 3 + 70000] = b'X' * 70000
        got = b''
        while True:                                         # odd-sized sequential reads
            chunk = os.read(fd, 777777)
            if not chunk:
                break
            got += chunk
        print(hashlib.sha256(got).hexdigest() == hashlib.sha256(expect).hexdigest(), len(got))
        # a sequential reader sees this run's own writes (no stale read-ahead)
        os.lseek(fd, 0, 0)
        first = os.read(fd, 65536)
        os.pwrite(fd, b'new!', 65536)
        print(os.read(fd, 4))
        with open('/lego/log', 'a') as a, open('/lego/log', 'a') as b:
            a.write('one\\n'); a.flush(); b.write('two\\n'); b.flush(); a.write('three\\n')
        print(open('/lego/log').read().split())
    """)
    r = legorun([PY, "-c", script], storage=scomponent.address)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [f"True {5 * 1024 * 1024 + 12345}", "b'new!'",
                                     "['one', 'two', 'three']"]
    assert os.path.getsize(f"{scomponent.root}/big") == 5 * 1024 * 1024 + 12345


def test_symlinks_on_a_mount_are_followed_in_the_guests_view(scomponent, tmp_path):
    local = tmp_path / "local.txt"
    local.write_text("local file\n")
    script = textwrap.dedent(f"""
        import os
        os.makedirs('/lego/real/sub')
        open('/lego/real/sub/f', 'w').write('remote file')
        os.symlink('/lego/real', '/lego/abs')              # absolute, to the same mount
        os.symlink('{local}', '/lego/tolocal')             # absolute, to a local file
        os.symlink('real/sub', '/lego/rel')                # relative, inside
        print(open('/lego/abs/sub/f').read(), open('/lego/rel/f').read())
        print(open('/lego/tolocal').read().strip(), os.path.getsize('/lego/tolocal'))
        print(sorted(os.listdir('/lego/abs')), os.path.islink('/lego/abs'), os.readlink('/lego/abs'))
        os.chdir('/lego/abs/sub')
        print(os.getcwd(), open('f').read())
        with open('/lego/abs/sub/new', 'w') as g:
            g.write('through the link')
    """)
    r = legorun([PY, "-c", script], storage=scomponent.address)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        "remote file remote file", "local file 11", "['sub'] True /lego/real",
        "/lego/real/sub remote file"]
    assert open(f"{scomponent.root}/real/sub/new").read() == "through the link"
    assert local.read_text() == "local file\n"


MMAP_PY = """
import mmap
open('/lego/m.bin', 'wb').write(b'hello mmap world')
with open('/lego/m.bin', 'rb') as f:
    m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    print(m[:10], len(m))
with open('/lego/m.bin', 'r+b') as f:
    try:
        mmap.mmap(f.fileno(), 0)
    except OSError as e:
        print('writable shared:', e.errno)
    p = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    p[:5] = b'HELLO'
    print(p[:5], open('/lego/m.bin', 'rb').read(5))
"""


def test_programs_and_mappings_of_remote_files_come_from_local_snapshots(scomponent, tmp_path):
    (tmp_path / "m.py").write_text(MMAP_PY)
    script = textwrap.dedent(f"""
        set -e
        cp /bin/echo /lego/myecho
        /lego/myecho exec from a mount
        printf '#!/bin/sh\\necho script says $1\\n' > /lego/s.sh
        chmod +x /lego/s.sh
        /lego/s.sh hi
        printf 'no x bit' > /lego/plain
        /lego/plain 2>/dev/null || echo "plain: $?"
        {PY} {tmp_path}/m.py
    """)
    r = legorun(["bash", "-c", script], storage=scomponent.address)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        "exec from a mount", "script says hi", "plain: 126",
        "b'hello mmap' 16", "writable shared: 19", "b'HELLO' b'hello'"]


def test_remote_fds_reopen_through_magic_links_but_never_leave_the_process(scomponent):
    script = textwrap.dedent("""
        import array, os, socket
        fd = os.open('/lego/f', os.O_RDWR | os.O_CREAT | os.O_TRUNC)
        os.write(fd, b'remote bytes')
        print(os.readlink(f'/proc/self/fd/{fd}'), open(f'/dev/fd/{fd}').read())
        a, b = socket.socketpair()
        try:
            a.sendmsg([b'x'], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array('i', [fd]))])
            print('sent')
        except OSError as e:
            print('sendmsg:', e.errno)
        r, w = os.pipe()   # a local fd passes as usual
        a.sendmsg([b'y'], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array('i', [r]))])
        msg, anc, _, _ = b.recvmsg(1, socket.CMSG_SPACE(4))
        print('local fd passed:', msg, len(anc))
    """)
    r = legorun([PY, "-c", script], storage=scomponent.address)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["/lego/f remote bytes", "sendmsg: 95",
                                     "local fd passed: b'y' 1"]
    assert "passing a remote fd" in r.stderr


def test_relative_paths_from_a_remote_cwd_that_leave_the_mount_reach_local_files(
        scomponent, tmp_path):
    (tmp_path / "l.txt").write_text("local!")
    ups = "../" * 3 + str(tmp_path).lstrip("/")
    script = textwrap.dedent(f"""
        import os
        os.makedirs('/lego/a/b')
        os.chdir('/lego/a/b')
        print(os.getcwd(), open('{ups}/l.txt').read())
        d = os.open('/lego/a', os.O_RDONLY | os.O_DIRECTORY)
        print(os.stat('../{ups[3:]}/l.txt', dir_fd=d).st_size, os.listdir('..'))
        os.chdir('{ups}')
        print(os.getcwd() == '{tmp_path}', open('l.txt').read())
    """)
    r = legorun([PY, "-c", script], storage=scomponent.address)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["/lego/a/b local!", "6 ['b']", "True local!"]


def test_fionread_and_unshare_of_the_fd_table(scomponent):
    script = textwrap.dedent("""
        import array, ctypes, fcntl, os, termios
        fd = os.open('/lego/f', os.O_RDWR | os.O_CREAT | os.O_TRUNC)
        os.write(fd, b'0123456789')
        os.lseek(fd, 3, 0)
        buf = array.array('i', [0])
        fcntl.ioctl(fd, termios.FIONREAD, buf)
        print('fionread', buf[0])
        libc = ctypes.CDLL(None, use_errno=True)
        print('unshare', libc.unshare(0x400))          # CLONE_FILES: a private table
        print(os.read(fd, 3))
    """)
    r = legorun([PY, "-c", script], storage=scomponent.address)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["fionread 7", "unshare 0", "b'345'"]


def test_local_symlinks_that_point_into_a_mount_are_followed_into_it(scomponent, tmp_path):
    os.symlink("/lego/real", tmp_path / "dirlink")
    os.symlink("/lego/real/f", tmp_path / "filelink")
    script = textwrap.dedent(f"""
        import os
        os.makedirs('/lego/real')
        open('/lego/real/f', 'w').write('on the mount')
        print(open('{tmp_path}/dirlink/f').read(), os.listdir('{tmp_path}/dirlink'))
        print(open('{tmp_path}/filelink').read(), os.path.isdir('{tmp_path}/dirlink'))
        print(os.path.islink('{tmp_path}/filelink'), os.readlink('{tmp_path}/filelink'))
        os.chdir('{tmp_path}')
        print(open('dirlink/f').read())
        open('dirlink/new', 'w').write('made through a local link')
    """)
    for env in (None, {**os.environ, "LEGORUN_NO_FASTPATH": "1"}):
        r = legorun([PY, "-c", script], storage=scomponent.address, env=env)
        assert r.returncode == 0, r.stderr
        assert r.stdout.splitlines() == ["on the mount ['f']", "on the mount True",
                                         "True /lego/real/f", "on the mount"]
        assert open(f"{scomponent.root}/real/new").read() == "made through a local link"
        os.unlink(f"{scomponent.root}/real/new")
        os.unlink(f"{scomponent.root}/real/f")
        os.rmdir(f"{scomponent.root}/real")


THREADS_C = r"""
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

static int shared_fd = -1;

static void *worker(void *arg) {
    long id = (long)arg;
    char path[64], buf[64];
    snprintf(path, sizeof path, "/lego/t%ld", id);
    int fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0644);   /* a new remote fd per thread */
    for (int i = 0; i < 200; i++) {
        int n = snprintf(buf, sizeof buf, "%ld:%d\n", id, i);
        if (write(fd, buf, n) != n) return (void *)1;
    }
    lseek(fd, 0, SEEK_SET);
    char all[4096];
    ssize_t got = read(fd, all, sizeof all);
    close(fd);
    /* every thread also reads the fd the main thread opened before they started */
    char head[6] = {0};
    if (pread(shared_fd, head, 5, 0) != 5 || strcmp(head, "main!") != 0) return (void *)2;
    return (void *)(got > 0 ? 0 : 3);
}

int main(void) {
    shared_fd = open("/lego/shared", O_RDWR | O_CREAT | O_TRUNC, 0644);
    write(shared_fd, "main!", 5);
    pthread_t th[8];
    for (long i = 0; i < 8; i++) pthread_create(&th[i], NULL, worker, (void *)i);
    int bad = 0;
    for (int i = 0; i < 8; i++) { void *r; pthread_join(th[i], &r); bad += r != NULL; }
    printf("threads ok: %d\n", 8 - bad);
    return bad;
}
"""


def test_threads_open_and_use_remote_fds_concurrently(scomponent, tmp_path):
    exe = compile_c(tmp_path, "threads", THREADS_C, flags=("-pthread",))
    r = legorun([exe], storage=scomponent.address)
    assert (r.returncode, r.stdout) == (0, "threads ok: 8\n"), r.stderr
    for i in range(8):
        lines = open(f"{scomponent.root}/t{i}").read().splitlines()
        assert lines == [f"{i}:{n}" for n in range(200)]


def test_sendfile_and_splice_between_remote_files_and_local_fds(scomponent):
    script = textwrap.dedent("""
        import os, socket
        open('/lego/sf', 'wb').write(b'x' * 50000 + b'END')
        a, b = socket.socketpair()
        with open('/lego/sf', 'rb') as f:
            n = a.sendfile(f)                       # remote file -> socket
        a.close()
        got = b''
        while chunk := b.recv(65536):
            got += chunk
        print(n, len(got), got[-3:])
        r, w = os.pipe()
        fd = os.open('/lego/sf', os.O_RDONLY)
        print(os.splice(fd, w, 100, offset_src=49990), os.read(r, 100)[-5:])
        os.write(w, b'from the pipe')
        out = os.open('/lego/sp', os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        print(os.splice(r, out, 13), open('/lego/sp').read())
        s = socket.socket(socket.AF_UNIX)
        try:
            s.bind('/lego/sock')
        except OSError as e:
            print('bind on the mount:', e.errno)
    """)
    r = legorun([PY, "-c", script], storage=scomponent.address)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["50003 50003 b'END'", "13 b'xxEND'", "13 from the pipe",
                                     "bind on the mount: 95"]


def test_file_names_that_are_not_utf8_round_trip(scomponent):
    script = textwrap.dedent("""
        import os
        name = b'/lego/caf\\xe9-\\xff.txt'
        with open(name, 'wb') as f:
            f.write(b'latin-1 name')
        print(sorted(os.listdir(b'/lego')), open(name, 'rb').read(), os.stat(name).st_size)
        os.rename(name, b'/lego/d\\xe9j\\xe0')
        os.mkdir(b'/lego/dir\\x80')
        os.symlink(b'/lego/d\\xe9j\\xe0', b'/lego/dir\\x80/link\\xfe')
        print(os.readlink(b'/lego/dir\\x80/link\\xfe'), open(b'/lego/dir\\x80/link\\xfe', 'rb').read())
        os.chdir(b'/lego/dir\\x80')
        print(os.getcwdb())
    """)
    r = legorun([PY, "-c", script], storage=scomponent.address)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        "[b'caf\\xe9-\\xff.txt'] b'latin-1 name' 12",
        "b'/lego/d\\xe9j\\xe0' b'latin-1 name'",
        "b'/lego/dir\\x80'"]
    assert os.listdir(scomponent.root.encode()) and b"d\xe9j\xe0" in os.listdir(scomponent.root.encode())
