"""The tracee behind one small door: registers, memory, syscall rewriting.

Syscall handlers speak in arguments and results; only this module (and the
tracer's event loop) touches ptrace and guest memory.
"""
from __future__ import annotations

import ctypes
import errno
import os
from dataclasses import dataclass, field

from .fdtable import FdTable
from .kernel import ptrace as pt

PAGE = 4096
PATH_MAX = 4096
RED_ZONE = 128

_strings = pt.CStringReader()
_ARG_REGS = ("rdi", "rsi", "rdx", "r10", "r8", "r9")


class GuestError(Exception):
    """A syscall fails in the guest with this errno."""

    def __init__(self, err: int, why: str = "") -> None:
        super().__init__(err, why or os.strerror(err))
        self.errno = err


@dataclass
class FsState:
    """What CLONE_FS shares: the working directory and the umask."""
    cwd: str | None = None             # local absolute cwd, None until first needed
    cwd_far: bool = False              # no mount at or below cwd (paths.MountTable.far_from)
    remote_cwd: tuple | None = None    # (Mount, rel path) when the cwd is on a mount
    umask: int | None = None

    def copy(self) -> "FsState":
        return FsState(self.cwd, self.cwd_far, self.remote_cwd, self.umask)


@dataclass(eq=False)
class Process:
    """A thread group (one mm): its fd table, fs state and filter coverage."""
    pid: int
    fds: FdTable
    fs: FsState
    covered_fds: set = field(default_factory=set)  # fd numbers a stacked filter traps
    threads: set = field(default_factory=set)
    lock_files: set = field(default_factory=set)  # (mount, path) with fcntl locks of this process
    excache: object = None     # legorun.memory.excache.ExCache when its memory is remote
    excache_off: bool = False  # remote memory given up for this process (made local)
    shares_mm: object = None   # the ExCache of the parent whose mm a vfork child runs in


class Thread:
    """One traced task (tid). Registers are fetched once per stop."""

    __slots__ = ("tid", "process", "regs", "on_exit", "pending_signal", "attached", "path_addr",
                 "clear_tid", "next_clear_tid")

    def __init__(self, tid: int, process: Process | None) -> None:
        self.tid = tid
        self.process = process
        self.regs = pt.user_regs_struct()
        self.on_exit = None        # continuation run at the next syscall-exit stop
        self.pending_signal = 0    # a signal that arrived during an injected syscall
        self.attached = False
        self.path_addr = 0         # the path argument the current handler read
        self.clear_tid = 0         # CLONE_CHILD_CLEARTID address (remote memory only)
        self.next_clear_tid = 0    # the same, for the thread this one is creating

    # ---- registers

    def fetch_regs(self) -> pt.user_regs_struct:
        return pt.getregs(self.tid, self.regs)

    def args(self) -> tuple:
        r = self.regs
        return (r.rdi, r.rsi, r.rdx, r.r10, r.r8, r.r9)

    def set_result(self, value: int) -> None:
        """Skip the syscall at a seccomp stop and make it return `value`."""
        self.regs.orig_rax = 0xFFFFFFFFFFFFFFFF
        self.regs.rax = value & 0xFFFFFFFFFFFFFFFF
        pt.setregs(self.tid, self.regs)

    # ---- memory (process_vm_* keeps the kernel's EFAULT rules)

    def _resident(self, addr: int, length: int) -> None:
        """With remote memory, bring the ExCache's pages of the range in first:
        legorun's own access to an evicted page would wait for a fault that
        only legorun can serve."""
        proc = self.process
        if proc is None:
            return
        cache = proc.excache or proc.shares_mm
        if cache is not None and cache.uffd.fd >= 0:
            cache.ensure(addr, length)

    def read_bytes(self, addr: int, length: int) -> bytes:
        """Read `length` bytes; raises GuestError(EFAULT) if any byte is unreadable."""
        if length == 0:
            return b""
        self._resident(addr, length)
        buf = ctypes.create_string_buffer(length)
        try:
            n = pt.vm_read_into(self.tid, addr, buf, length)
        except OSError as e:
            raise GuestError(errno.EFAULT) from e
        if n != length:
            raise GuestError(errno.EFAULT)
        return buf.raw

    def read_prefix(self, addr: int, length: int) -> bytes:
        """Read up to `length` bytes, stopping at the first unreadable page."""
        if length == 0:
            return b""
        self._resident(addr, length)
        buf = ctypes.create_string_buffer(length)
        try:
            n = pt.vm_read_into(self.tid, addr, buf, length)
        except OSError as e:
            raise GuestError(errno.EFAULT) from e
        return buf.raw[:n]

    def write_bytes(self, addr: int, data: bytes) -> int:
        """Write data; returns the count written before a bad page (EFAULT if none)."""
        if not data:
            return 0
        self._resident(addr, len(data))
        try:
            return pt.vm_write(self.tid, addr, data)
        except OSError as e:
            raise GuestError(errno.EFAULT) from e

    def write_slice(self, addr: int, data: bytes, start: int, length: int) -> int:
        """Write data[start:start+length]; short at a bad page, EFAULT if nothing."""
        self._resident(addr, length)
        try:
            return pt.vm_write_slice(self.tid, addr, data, start, length)
        except OSError as e:
            raise GuestError(errno.EFAULT) from e

    def read_frame(self, addr: int, length: int, header: bytes) -> bytes:
        """header + up to length bytes at addr (short at a bad page)."""
        self._resident(addr, length)
        return pt.vm_read_frame(self.tid, addr, length, header)

    def read_cstring(self, addr: int, limit: int = PATH_MAX) -> bytes:
        """A NUL-terminated string (a path): EFAULT, or ENAMETOOLONG past `limit`."""
        if addr == 0:
            raise GuestError(errno.EFAULT)
        self._resident(addr, limit)  # (at most two pages for a path)
        try:
            return _strings.read(self.tid, addr, limit)
        except OSError:
            raise GuestError(errno.EFAULT) from None
        except ValueError:
            raise GuestError(errno.ENAMETOOLONG) from None

    def scratch(self, size: int, below: int = 0) -> int:
        """An address below the stack's red zone where legorun may write `size`
        bytes (`below` more bytes further down, to keep two areas apart)."""
        return (self.regs.rsp - RED_ZONE - below - size) & ~0xF

    def poke(self, addr: int, data: bytes) -> None:
        """Write legorun's own data into the guest, ignoring page protections."""
        self._resident(addr, len(data))
        fd = os.open(f"/proc/{self.tid}/mem", os.O_RDWR)
        try:
            os.pwrite(fd, data, addr)
        finally:
            os.close(fd)

