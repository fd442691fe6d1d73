"""Starting embedded components: a local server process, started when first needed."""
from __future__ import annotations

import os
import select
import subprocess
import sys
import tempfile
import time


class StartError(Exception):
    """An embedded component did not come up (one line for the user)."""


def data_home() -> str:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(base, "legorun")


def default_storage_root() -> str:
    """Where the embedded sComponent keeps files between runs."""
    return os.path.join(data_home(), "storage")


class EmbeddedComponent:
    """A component server run as a child process on a private Unix socket."""

    def __init__(self, kind: str, module: str, extra_args: list) -> None:
        self.kind = kind
        self.module = module
        self.extra_args = extra_args
        self.proc = None
        self.address = None
        self._dir = None

    def start(self, timeout: float = 15.0, cpus=None) -> str:
        """Start the server and wait until it listens; returns its address."""
        self.launch(cpus)
        return self.wait_ready(timeout)

    def launch(self, cpus=None) -> None:
        """Start the server process without waiting for it (see wait_ready)."""
        self._dir = tempfile.mkdtemp(prefix="legorun-")
        sock = os.path.join(self._dir, f"{self.kind}.sock")
        self.address = f"unix:{sock}"
        cmd = [sys.executable, "-m", self.module, "--listen", self.address,
               "--exit-with-parent", *self.extra_args]
        try:
            # Its own session: the terminal's Ctrl-C is for the guest, not for it.
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, start_new_session=True)
        except OSError as e:
            raise StartError(f"cannot start the {self.kind}: {e.strerror}") from e
        if cpus:
            os.sched_setaffinity(self.proc.pid, cpus)

    def wait_ready(self, timeout: float = 15.0) -> str:
        """Wait until the launched server listens; returns its address."""
        deadline = time.monotonic() + timeout
        line = b""
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.1)
            if ready:
                line = self.proc.stdout.readline()
                if line.startswith(b"listening on"):
                    return self.address
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace").strip().splitlines()
                raise StartError(f"the embedded {self.kind} exited: {err[-1] if err else 'no message'}")
        self.stop()
        raise StartError(f"the embedded {self.kind} did not start within {timeout:.0f} s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._dir:
            for name in os.listdir(self._dir):
                try:
                    os.unlink(os.path.join(self._dir, name))
                except OSError:
                    pass
            try:
                os.rmdir(self._dir)
            except OSError:
                pass
            self._dir = None
