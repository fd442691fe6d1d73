"""What a syscall handler may answer, and the helpers every family uses.

A handler is `handler(session, thread, args) -> outcome` where args are the
six raw register arguments and the outcome is one of:
  None       the local kernel runs the syscall untouched;
  int        the syscall is skipped and returns this (negative = -errno);
  Rewrite    the kernel runs a different syscall, and `finish` turns its
             result into the guest's result at the syscall-exit stop;
  Park       the call must wait (a lock): legorun retries it later.
Handlers raise tracee.GuestError(errno) to fail the call.
"""
from __future__ import annotations

from typing import Callable

from ..kernel import ptrace as pt

_ARGS = ("rdi", "rsi", "rdx", "r10", "r8", "r9")
_EXECS = (59, 322)  # execve, execveat


class Rewrite:
    __slots__ = ("nr", "args", "pokes", "finish_fn", "saved")

    def __init__(self, nr: int, args: tuple, finish: Callable, pokes: tuple = ()) -> None:
        self.nr = nr
        self.args = args
        self.pokes = pokes           # (addr, bytes) written into the guest first
        self.finish_fn = finish      # finish(tracer, thread, raw_result) -> guest result
        self.saved = None

    def apply(self, t) -> None:
        regs = t.regs
        self.saved = tuple(getattr(regs, r) for r in _ARGS)
        for addr, data in self.pokes:
            t.poke(addr, data)
        regs.orig_rax = self.nr
        for name, value in zip(_ARGS, self.args):
            setattr(regs, name, value & 0xFFFFFFFFFFFFFFFF)
        pt.setregs(t.tid, regs)

    def finish(self, tracer, t, result: int) -> int:
        return self.finish_fn(tracer, t, result)

    def restore(self, t, result: int = -1) -> None:
        """The guest sees its argument registers unchanged, as after any syscall
        (except after a successful exec: the registers are the new program's)."""
        if result == 0 and self.nr in _EXECS:
            return
        for name, value in zip(_ARGS, self.saved):
            setattr(t.regs, name, value)


class Park:
    """The call blocks (F_SETLKW, flock): the thread stays stopped and `retry()`
    is called again later; it returns None while still blocked, else the result."""
    __slots__ = ("retry",)

    def __init__(self, retry: Callable) -> None:
        self.retry = retry


def s32(v: int) -> int:
    """A register as a C int (fds, dirfds, flags)."""
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v >= 1 << 31 else v


def s64(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v
