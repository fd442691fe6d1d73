"""The terminal passes through: Ctrl-C reaches the guest once, Ctrl-Z stops the job."""
from __future__ import annotations

import contextlib
import os
import pty
import select
import signal
import sys
import textwrap
import time

PY = sys.executable

GUEST = textwrap.dedent("""
    import signal, sys, time
    hits = []
    signal.signal(signal.SIGINT, lambda *a: hits.append(1))
    print('ready', flush=True)
    deadline = time.time() + 1.5
    while time.time() < deadline:
        time.sleep(0.05)
    print('sigint', len(hits), flush=True)
""")


def _read_until(fd, text, timeout=30.0):
    buf = b""
    end = time.time() + timeout
    def done():  # the text and the rest of its line
        i = buf.find(text.encode())
        return i >= 0 and b"\n" in buf[i:]
    while not done() and time.time() < end:
        r, _, _ = select.select([fd], [], [], 0.2)
        if r:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            buf += chunk
    return buf.decode(errors="replace")


@contextlib.contextmanager
def _in_pty(argv):
    """(pid, master fd) of argv run as a session leader on a new pty; killed after."""
    pid, master = pty.fork()
    if pid == 0:  # a session leader with the pty as its controlling terminal, like a shell's job
        os.execv(argv[0], argv)
    try:
        yield pid, master
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.close(master)


def test_ctrl_c_reaches_the_guest_once():
    with _in_pty([PY, "-m", "legorun", "--", PY, "-c", GUEST]) as (pid, master):
        assert "ready" in _read_until(master, "ready")
        os.write(master, b"\x03")  # the terminal sends SIGINT to the foreground group
        out = _read_until(master, "sigint")
        assert "sigint 1" in out, out
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


def test_ctrl_z_stops_the_job_and_fg_resumes_it():
    guest = ("import time; print('ready', flush=True); time.sleep(1.5); "
             "print('resumed', flush=True)")
    # a shell with job control owns the terminal and runs legorun as a job
    script = (f"set -m; {PY} -m legorun -- {PY} -c \"{guest}\"; echo \"stopped $?\"; "
              "sleep 0.5; fg > /dev/null; echo \"done $?\"")
    with _in_pty(["/bin/bash", "--norc", "-c", script]) as (pid, master):
        assert "ready" in _read_until(master, "ready")
        os.write(master, b"\x1a")  # Ctrl-Z: SIGTSTP to the foreground job
        out = _read_until(master, "done")
        assert "stopped 148" in out, out  # 128 + SIGTSTP: the shell saw the job stop
        assert out.index("stopped 148") < out.index("\nresumed") < out.index("done 0"), out
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
