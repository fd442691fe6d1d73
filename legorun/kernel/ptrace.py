"""Raw ptrace(2), waitpid status decoding and x86_64 registers.

The lowest layer: ctypes calls and constants named as in <sys/ptrace.h>.
python-ptrace's binding lacks PTRACE_SEIZE/INTERRUPT/LISTEN and
PTRACE_O_TRACESECCOMP/EXITKILL, so the tracer speaks to libc directly.
"""
from __future__ import annotations

import ctypes
import os

_libc = ctypes.CDLL(None, use_errno=True)
_ptrace = _libc.ptrace
_ptrace.argtypes = (ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p)
_ptrace.restype = ctypes.c_long

PTRACE_CONT = 7
PTRACE_KILL = 8
PTRACE_SINGLESTEP = 9
PTRACE_GETREGS = 12
PTRACE_SETREGS = 13
PTRACE_DETACH = 17
PTRACE_SYSCALL = 24
PTRACE_SETOPTIONS = 0x4200
PTRACE_GETEVENTMSG = 0x4201
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
PTRACE_LISTEN = 0x4208
PTRACE_GETSIGMASK = 0x420A
PTRACE_SETSIGMASK = 0x420B

PTRACE_O_TRACESYSGOOD = 0x01
PTRACE_O_TRACEFORK = 0x02
PTRACE_O_TRACEVFORK = 0x04
PTRACE_O_TRACECLONE = 0x08
PTRACE_O_TRACEEXEC = 0x10
PTRACE_O_TRACEVFORKDONE = 0x20
PTRACE_O_TRACEEXIT = 0x40
PTRACE_O_TRACESECCOMP = 0x80
PTRACE_O_EXITKILL = 0x100000

PTRACE_EVENT_FORK = 1
PTRACE_EVENT_VFORK = 2
PTRACE_EVENT_CLONE = 3
PTRACE_EVENT_EXEC = 4
PTRACE_EVENT_VFORK_DONE = 5
PTRACE_EVENT_EXIT = 6
PTRACE_EVENT_SECCOMP = 7
PTRACE_EVENT_STOP = 128

WALL = 0x40000000


class user_regs_struct(ctypes.Structure):
    _fields_ = [(name, ctypes.c_ulonglong) for name in (
        "r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8",
        "rax", "rcx", "rdx", "rsi", "rdi", "orig_rax", "rip", "cs", "eflags",
        "rsp", "ss", "fs_base", "gs_base", "ds", "es", "fs", "gs")]


def _check(result: int, what: str, pid: int) -> int:
    if result == -1:
        err = ctypes.get_errno()
        if err:
            raise OSError(err, f"{what}({pid}): {os.strerror(err)}")
    return result


def seize(pid: int, options: int) -> None:
    _check(_ptrace(PTRACE_SEIZE, pid, None, options), "PTRACE_SEIZE", pid)


def cont(tid: int, sig: int = 0) -> None:
    _check(_ptrace(PTRACE_CONT, tid, None, sig), "PTRACE_CONT", tid)


def syscall(tid: int, sig: int = 0) -> None:
    _check(_ptrace(PTRACE_SYSCALL, tid, None, sig), "PTRACE_SYSCALL", tid)


def singlestep(tid: int, sig: int = 0) -> None:
    _check(_ptrace(PTRACE_SINGLESTEP, tid, None, sig), "PTRACE_SINGLESTEP", tid)


def listen(tid: int) -> None:
    _check(_ptrace(PTRACE_LISTEN, tid, None, None), "PTRACE_LISTEN", tid)


def detach(tid: int) -> None:
    _check(_ptrace(PTRACE_DETACH, tid, None, None), "PTRACE_DETACH", tid)


def getsigmask(tid: int) -> int:
    """The stopped thread's blocked-signal mask (bit n-1: signal n)."""
    mask = ctypes.c_uint64()
    _check(_ptrace(PTRACE_GETSIGMASK, tid, ctypes.sizeof(mask), ctypes.addressof(mask)),
           "PTRACE_GETSIGMASK", tid)
    return mask.value


def setsigmask(tid: int, mask: int) -> None:
    value = ctypes.c_uint64(mask & (1 << 64) - 1)
    _check(_ptrace(PTRACE_SETSIGMASK, tid, ctypes.sizeof(value), ctypes.addressof(value)),
           "PTRACE_SETSIGMASK", tid)


def interrupt(tid: int) -> None:
    _check(_ptrace(PTRACE_INTERRUPT, tid, None, None), "PTRACE_INTERRUPT", tid)


def getregs(tid: int, regs: user_regs_struct | None = None) -> user_regs_struct:
    if regs is None:
        regs = user_regs_struct()
    _check(_ptrace(PTRACE_GETREGS, tid, None, ctypes.addressof(regs)), "PTRACE_GETREGS", tid)
    return regs


def setregs(tid: int, regs: user_regs_struct) -> None:
    _check(_ptrace(PTRACE_SETREGS, tid, None, ctypes.addressof(regs)), "PTRACE_SETREGS", tid)


def geteventmsg(tid: int) -> int:
    msg = ctypes.c_ulong()
    _check(_ptrace(PTRACE_GETEVENTMSG, tid, None, ctypes.addressof(msg)), "PTRACE_GETEVENTMSG", tid)
    return msg.value


# ---- process_vm_readv / process_vm_writev: guest memory with the kernel's EFAULT rules

class iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


_process_vm_readv = _libc.process_vm_readv
_process_vm_readv.argtypes = (ctypes.c_int, ctypes.POINTER(iovec), ctypes.c_ulong,
                              ctypes.POINTER(iovec), ctypes.c_ulong, ctypes.c_ulong)
_process_vm_readv.restype = ctypes.c_ssize_t
_process_vm_writev = _libc.process_vm_writev
_process_vm_writev.argtypes = _process_vm_readv.argtypes
_process_vm_writev.restype = ctypes.c_ssize_t


def vm_read_into(pid: int, addr: int, buf, length: int) -> int:
    """Copy up to `length` bytes at guest `addr` into `buf` (a ctypes buffer).

    Returns the count copied, which is short when the range runs into an
    unmapped or unreadable page; raises OSError(EFAULT) if nothing was.
    """
    local = iovec(ctypes.addressof(buf), length)
    remote = iovec(addr, length)
    n = _process_vm_readv(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
    if n < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return n


class CStringReader:
    """Reads NUL-terminated strings (paths) from a guest: the hot path of every
    path syscall, so it reuses one buffer and one pair of iovecs."""

    FIRST = 256  # most paths fit; never crosses a page boundary on the first read

    def __init__(self) -> None:
        self.buf = ctypes.create_string_buffer(4097)
        self.addr = ctypes.addressof(self.buf)
        self.local = iovec(self.addr, 0)
        self.remote = iovec(0, 0)
        self.local_ref = ctypes.byref(self.local)
        self.remote_ref = ctypes.byref(self.remote)

    def read_chunk(self, pid: int, addr: int, length: int) -> bytes:
        """Up to `length` bytes (not crossing a page), cut at the first NUL.

        Returns (data, complete): complete is True when a NUL was found.
        """
        self.local.iov_len = length
        self.remote.iov_base = addr
        self.remote.iov_len = length
        n = _process_vm_readv(pid, self.local_ref, 1, self.remote_ref, 1, 0)
        if n <= 0:
            err = ctypes.get_errno() if n < 0 else 14
            raise OSError(err, os.strerror(err))
        self.buf[n] = 0
        data = ctypes.string_at(self.addr)
        return data, len(data) < n

    def read(self, pid: int, addr: int, limit: int = 4096) -> bytes:
        """The string at addr; OSError(EFAULT) if unreadable, ValueError past `limit`."""
        page_left = 4096 - (addr & 4095)
        data, complete = self.read_chunk(pid, addr, min(self.FIRST, page_left))
        if complete:
            return data
        out = data
        addr += len(data)
        while len(out) < limit:
            data, complete = self.read_chunk(pid, addr, 4096 - (addr & 4095))
            out += data
            if complete:
                return out
            addr += len(data)
        raise ValueError("string too long")


def vm_write(pid: int, addr: int, data: bytes | memoryview) -> int:
    """Copy `data` to guest `addr`; returns bytes written (short at a bad page)."""
    if not data:
        return 0
    cbuf = (ctypes.c_char * len(data)).from_buffer_copy(data) if not isinstance(data, ctypes.Array) else data
    local = iovec(ctypes.addressof(cbuf), len(data))
    remote = iovec(addr, len(data))
    n = _process_vm_writev(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
    if n < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return n


def vm_write_slice(pid: int, addr: int, data: bytes, start: int, length: int) -> int:
    """Copy data[start:start+length] to guest addr without copying it first."""
    if length <= 0:
        return 0
    base = ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value
    local = iovec(base + start, length)
    remote = iovec(addr, length)
    n = _process_vm_writev(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
    if n < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return n


_new_bytes = ctypes.pythonapi.PyBytes_FromStringAndSize
_new_bytes.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t)
_new_bytes.restype = ctypes.py_object


def fresh_bytes(size: int):
    """(a new, uninitialised bytes object of `size`, the address of its data).

    The caller fills it before anything else sees it: the one way to build a
    large bytes object from another process's memory without extra copies."""
    obj = _new_bytes(None, size)
    return obj, ctypes.cast(ctypes.c_char_p(obj), ctypes.c_void_p).value


def vm_read_frame(pid: int, addr: int, length: int, header: bytes) -> bytes:
    """header + up to `length` guest bytes at addr, as one bytes object filled
    straight from the guest; short when the range runs into a bad page."""
    h = len(header)
    frame, base = fresh_bytes(h + length)
    ctypes.memmove(base, header, h)
    local = iovec(base + h, length)
    remote = iovec(addr, length)
    n = _process_vm_readv(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0) if length else 0
    if n < 0:
        n = 0
    return frame if n == length else frame[:h + n]


def libc_syscall(nr: int, *args: int) -> int:
    """Call a raw syscall in this process; raises OSError on failure."""
    fn = _libc.syscall
    fn.restype = ctypes.c_long
    result = fn(ctypes.c_long(nr), *(ctypes.c_ulong(a & 0xFFFFFFFFFFFFFFFF) for a in args))
    if result == -1:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return result
