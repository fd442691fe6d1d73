"""The launcher itself: exit statuses, signals, stop bounds, components that fail."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from conftest import compile_c, legorun, start_scomponent

PY = sys.executable


def test_exit_status_passes_through():
    assert legorun(["sh", "-c", "exit 7"]).returncode == 7
    assert legorun(["true"]).returncode == 0


def test_guest_killed_by_signal_kills_legorun_with_the_same_signal():
    r = legorun(["sh", "-c", "kill -TERM $$"])
    assert r.returncode == -signal.SIGTERM


def test_missing_program_fails_like_a_shell():
    r = legorun(["/no/such/program"])
    assert r.returncode == 127
    assert r.stderr.strip().splitlines() == ["legorun: /no/such/program: No such file or directory"]


def test_stdin_and_stdout_are_the_guests():
    r = legorun(["tr", "a-z", "A-Z"], input="hello\n")
    assert (r.returncode, r.stdout) == (0, "HELLO\n")


def test_descendants_that_outlive_the_guest_are_followed(tmp_path):
    marker = tmp_path / "late"
    r = legorun(["sh", "-c", f"(sleep 0.3; echo done > {marker}) & exit 3"])
    assert r.returncode == 3
    assert marker.read_text() == "done\n"  # legorun waited for the last tracee


def test_a_run_that_never_touches_a_mount_starts_no_component(tmp_path):
    stats = tmp_path / "stats.json"
    r = legorun([PY, "-c", "print(1)"], stats_file=stats,
                env={**os.environ, "XDG_DATA_HOME": str(tmp_path / "xdg")})
    assert r.returncode == 0
    assert r.stats["rpcs"] == {}
    assert not (tmp_path / "xdg").exists()


STOPS_C = r"""
#include <fcntl.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>
int main(int argc, char **argv) {
    int paths = atoi(argv[1]), reads = atoi(argv[2]);
    struct stat st;
    char buf[64];
    for (int i = 0; i < paths; i++) stat("/etc/hostname", &st);
    int fd = open("/dev/zero", O_RDONLY);
    for (int i = 0; i < reads; i++) { read(fd, buf, sizeof buf); fstat(fd, &st); }
    int rfd = open(argv[3], O_RDWR | O_CREAT, 0644);
    for (int i = 0; i < reads; i++) { pwrite(rfd, buf, 8, 0); }
    for (int i = 0; i < reads; i++) { read(fd, buf, sizeof buf); }  /* local again */
    return 0;
}
"""


@pytest.mark.parametrize("fast_path", [True, False], ids=["c-fast-path", "pure-python"])
def test_stops_are_one_per_path_syscall_and_none_for_local_fds(scomponent, tmp_path, fast_path):
    exe = compile_c(tmp_path, "stops", STOPS_C)
    env = dict(os.environ)
    if not fast_path:
        env["LEGORUN_NO_FASTPATH"] = "1"

    def stops(paths, reads):
        r = legorun([exe, str(paths), str(reads), "/lego/counted"], storage=scomponent.address,
                    stats_file=tmp_path / f"s{paths}-{reads}.json", env=env)
        assert r.returncode == 0, r.stderr
        return r.stats["ptrace_stops"], r.stats["syscalls"]

    base, _ = stops(0, 0)
    more_paths, _ = stops(100, 0)
    assert more_paths - base == 100            # one stop per local path syscall
    more_reads, calls = stops(0, 100)
    # reads and fstats of a local fd stop never; each pwrite to the remote fd stops once
    assert more_reads - base == 100
    assert calls["pwrite64"]["count"] == 100
    assert os.path.getsize(f"{scomponent.root}/counted") == 8


def test_dotted_and_doubled_paths_into_a_mount_are_never_taken_for_local(scomponent, tmp_path):
    """The C fast path answers only normal absolute paths off every mount."""
    (tmp_path / ".hidden").mkdir()
    script = textwrap.dedent(f"""
        import os
        open('/lego/f', 'w').close()
        os.mkdir('/lego/sub')
        for p in ('/lego/./f', '/lego/sub/../f', '/tmp/../lego/f', '//lego/f', '/lego/sub/..',
                  '{tmp_path}/.hidden', '{tmp_path}/.hidden/..'):
            os.stat(p)
        print('ok')
    """)
    r = legorun([PY, "-c", script], storage=scomponent.address, stats_file=tmp_path / "s.json")
    assert (r.returncode, r.stdout) == (0, "ok\n"), r.stderr
    # the five paths on the mount, and the fstat Python makes after opening /lego/f
    assert r.stats["syscalls"]["newfstatat"]["count"] == 6


def test_unreachable_component_is_one_line_and_status_2(tmp_path):
    r = legorun([PY, "-c", "open('/lego/x')"], storage=f"unix:{tmp_path}/nobody.sock")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "sComponent" in lines[0] and "nobody.sock" in lines[0], r.stderr


def test_component_that_dies_mid_run_gives_eio_and_one_line(tmp_path):
    server = start_scomponent(tmp_path)
    script = textwrap.dedent(f"""
        import os, sys, time
        with open('/lego/kept', 'w') as f:
            f.write('acknowledged')
        print('written', flush=True)
        while os.path.exists('{tmp_path}/go') is False:
            time.sleep(0.05)
        for i in range(2):
            try:
                open('/lego/kept').read()
                print('read ok')
            except OSError as e:
                print('error', e.errno == 5)
    """)
    cmd = [PY, "-m", "legorun", "--storage", server.address, "--", PY, "-c", script]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.stdout.readline() == "written\n"
    server.kill()
    (tmp_path / "go").touch()
    out, err = p.communicate(timeout=60)
    assert out.splitlines() == ["error True", "error True"]
    assert err.strip().count("\n") == 0 and "sComponent" in err, err
    assert open(f"{server.root}/kept").read() == "acknowledged"


def test_guest_that_calls_ptrace_gets_a_one_line_refusal():
    r = legorun([PY, "-c", "import ctypes; print(ctypes.CDLL(None).ptrace(0, 0, 0, 0))"])
    assert r.stdout.strip() == "-1"
    assert len(r.stderr.strip().splitlines()) == 1 and "ptrace" in r.stderr


def test_io_uring_is_refused_with_enosys():
    r = legorun([PY, "-c", "import ctypes, os; l = ctypes.CDLL(None, use_errno=True); "
                           "print(l.syscall(425, 1, 0), ctypes.get_errno())"])
    assert r.stdout.split() == ["-1", str(38)]


def test_a_mount_under_dev_or_proc_is_still_a_mount(scomponent, tmp_path):
    script = "open('/dev/legotest/f', 'w').write('x'); print(open('/dev/legotest/f').read())"
    r = legorun([PY, "-c", script], storage=scomponent.address, mounts=("/dev/legotest",))
    assert (r.returncode, r.stdout) == (0, "x\n"), r.stderr
    assert open(f"{scomponent.root}/f").read() == "x"
