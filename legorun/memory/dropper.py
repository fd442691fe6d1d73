"""The dropper: a thread of legorun's own in a guest process, that drops the
pages an eviction chose (process_madvise(MADV_DONTNEED) over all the runs)
while the rest of the process stays as it is.

Only the process itself can drop its pages (PLATFORM.md). Without the
dropper the faulting thread is interrupted, its registers saved, and it is
single-stepped through an injected process_madvise: some 0.6-0.9 ms an
eviction here, most of it ptrace stops and waits. The dropper costs two
futex wake-ups instead: legorun writes the iovec into a page both share,
bumps a sequence word and wakes it; it runs the call, stores the result and
wakes legorun. The faulting thread stays blocked in its fault all along (the
other threads of a multi-threaded process are held: ExCache._make_room).

It is started at a process's first eviction (a run that fits the ExCache has
no such thread) by four syscalls injected into the stopped faulting thread:
an mmap of MAP_SHARED anonymous memory (legorun maps the same pages through
/proc/PID/map_files), an mprotect of its code page, madvise(MADV_DONTFORK)
(a forked child starts its own), and a clone(CLONE_THREAD) made with every
signal blocked, so that the new thread inherits a full mask and never takes
a signal meant for the guest. legorun then detaches from it: it makes only
futex and process_madvise calls, which the seccomp filter lets through, and
ends with the process, or when told to (stop()). The guest sees one more
thread in /proc/self/task and a 28 KiB shared mapping in its maps.

The thread's code is dropper.S (the bytes below are its assembly; a test
checks they match).
"""
from __future__ import annotations

import ctypes
import errno
import mmap
import os
import signal
import struct
import time

from ..kernel import ptrace as pt
from ..kernel.sysnums import NR

PAGE = 4096
IOV_MAX = 1024
# dropper.S, assembled (as --64; objcopy -O binary -j .text)
CODE = bytes.fromhex(
    "0f054531edb8ca0000004c89e731f64489ea4531d20f05418b04244439e874e54189c5"
    "498b5424084883faff743eb8b801000048c7c7f0d8ffff498d74244041ba0400000045"
    "31c00f05498944241045896c2404b8ca000000498d7c2404be01000000ba010000000f"
    "05eb9945896c2404b83c000000418b7c24100f05")
# the mapping: the code page, the command block, a page of stack (unused: the
# thread calls nothing, but a thread should have one)
BLOCK = PAGE                       # +0 seq, +4 done, +8 count, +16 result, +64 iovec[]
IOV_AT = 64
SIZE = BLOCK + ((IOV_AT + 16 * IOV_MAX + PAGE - 1) & ~(PAGE - 1)) + PAGE
QUIT = -1

PROT_READ, PROT_WRITE, PROT_EXEC = 1, 2, 4
MAP_SHARED, MAP_ANONYMOUS = 0x01, 0x20
MADV_DONTFORK = 10
CLONE_THREAD_FLAGS = (0x100 | 0x200 | 0x400 | 0x800 | 0x10000 | 0x40000)  # VM FS FILES SIGHAND THREAD SYSVSEM
NR_FUTEX = NR["futex"]
FUTEX_WAIT, FUTEX_WAKE = 0, 1      # shared futexes: legorun and the thread are two processes

_libc = ctypes.CDLL(None, use_errno=True)
_futex = _libc.syscall           # (releases the GIL: for waits that may be long)
_futex.restype = ctypes.c_long
# The same call holding the GIL, for a wake and a wait of a few tens of
# microseconds: the gRPC threads are busy with the batch's store, and taking
# the GIL back from them after a call that let it go costs ~150 us (measured).
_futex_held = ctypes.PyDLL(None).syscall
_futex_held.restype = ctypes.c_long
SHORT_WAIT = 200_000             # ns: the drop is over by then, once its events are read


class timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class Dropper:
    """One process's dropper thread and legorun's view of its command block."""

    def __init__(self, pid: int, tid: int, base: int, view: mmap.mmap) -> None:
        self.pid = pid
        self.tid = tid            # the thread's id (untraced)
        self.view = view          # the same pages, here
        self.seq = 0
        self.block = ctypes.addressof(ctypes.c_char.from_buffer(view, BLOCK))

    # ---- starting it

    @classmethod
    def start(cls, tracer, cache, tid: int):
        """Start the dropper of `cache`'s process from its thread `tid`, which
        is stopped (PTRACE_EVENT_STOP); its registers and signal mask are put
        back after. None if it cannot be had (the thread is gone, the kernel
        refuses a step): the caller drops pages the old way."""
        saved = pt.getregs(tid)
        regs = pt.user_regs_struct()
        base = view = None
        try:
            base = _inject(tracer, cache, tid, saved, regs, cache.insn, NR["mmap"],
                           0, SIZE, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS,
                           (1 << 64) - 1, 0)
            if base >= -4095 & ((1 << 64) - 1):
                return None
            fd = os.open(f"/proc/{cache.pid}/map_files/{base:x}-{base + SIZE:x}", os.O_RDWR)
            try:
                view = mmap.mmap(fd, SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            finally:
                os.close(fd)
            view[:len(CODE)] = CODE
            if _inject(tracer, cache, tid, saved, regs, cache.insn, NR["mprotect"],
                       base, PAGE, PROT_READ | PROT_EXEC) \
                    or _inject(tracer, cache, tid, saved, regs, cache.insn, NR["madvise"],
                               base, SIZE, MADV_DONTFORK):
                raise OSError("mprotect or madvise refused")
            # the clone runs the syscall at the start of the code page: the
            # new thread goes on from the next instruction, r12 its block
            mask = pt.getsigmask(tid)
            pt.setsigmask(tid, (1 << 64) - 1)
            try:
                child = []
                result = _inject(tracer, cache, tid, saved, regs, base, NR["clone"],
                                 CLONE_THREAD_FLAGS, base + SIZE, 0, 0, 0,
                                 r12=base + BLOCK, clone=child)
            finally:
                pt.setsigmask(tid, mask)
            if result >= 1 << 63 or not child:
                raise OSError(errno.EPERM, "clone refused")
            new = child[0]
            _, status = os.waitpid(new, pt.WALL)  # its first stop (it was traced at birth)
            tracer.stats.ptrace_stops += 1
            if os.WIFSTOPPED(status):
                pt.detach(new)
            dropper = cls(cache.pid, new, base, view)
            # a call over no range: the kernel takes process_madvise on the
            # calling thread (Linux 6.14+), or the dropper is of no use
            if dropper.drop(tracer, cache, []) < 0:
                dropper.stop()
                return None
            return dropper
        except OSError:
            if view is not None:
                view.close()
            return None
        finally:
            try:
                pt.setregs(tid, saved)
            except OSError:
                pass  # the thread is gone: its exit follows

    # ---- using it

    def drop(self, tracer, cache, runs: list) -> int:
        """Drop these (start, length) runs (at most IOV_MAX); returns the
        call's result: the bytes dropped (the runs before the first refused
        one: mlock()ed), or -errno if the first was refused."""
        view = self.view
        if runs:
            struct.pack_into(f"<{2 * len(runs)}Q", view, BLOCK + IOV_AT,
                             *[x for run in runs for x in run])
        self.seq = (self.seq + 1) & 0xFFFFFFFF
        struct.pack_into("<q", view, BLOCK + 8, len(runs))
        struct.pack_into("<I", view, BLOCK, self.seq)  # last: the thread reads it first
        _futex_held(NR_FUTEX, ctypes.c_void_p(self.block), FUTEX_WAKE, 1)
        expected = sum(length for _, length in runs)
        removing = (runs[0][0], runs[-1][0] + runs[-1][1]) if runs else None
        covered = 0
        retry: list = []
        began = time.monotonic()
        done_at = self.block + 4
        short, pause = timespec(0, SHORT_WAIT), timespec(0, 20_000_000)
        waited = False
        try:
            while struct.unpack_from("<I", view, BLOCK + 4)[0] != self.seq:
                if covered >= expected:
                    # every REMOVE event read: the call returns at once
                    (_futex if waited else _futex_held)(
                        NR_FUTEX, ctypes.c_void_p(done_at), FUTEX_WAIT,
                        (self.seq - 1) & 0xFFFFFFFF, ctypes.byref(pause if waited else short))
                    waited = True
                else:  # the call waits for its REMOVE events to be read
                    tracer._wait_for(cache, 0.002)
                    covered += tracer._serve_meanwhile(cache, removing, retry)
                if time.monotonic() - began > 0.5 and not self.alive():
                    raise ProcessLookupError(self.tid)
        finally:
            tracer.pending_uffd += [(cache, m) for m in retry]
        return struct.unpack_from("<q", view, BLOCK + 16)[0]

    def alive(self) -> bool:
        try:
            pt.libc_syscall(NR["tgkill"], self.pid, self.tid, 0)
            return True
        except OSError:
            return False

    def stop(self, status: int = 0) -> None:
        """Tell the thread to end (the process goes local, or its last
        other thread exits) and let go of the pages. It exits with `status`:
        a process whose last threads end by exit(2) exits with the status of
        the one that ends last, which must be what the guest's gave."""
        if self.view is None:
            return
        self.seq = (self.seq + 1) & 0xFFFFFFFF
        struct.pack_into("<qq", self.view, BLOCK + 8, QUIT, status)
        struct.pack_into("<I", self.view, BLOCK, self.seq)
        _futex(NR_FUTEX, ctypes.c_void_p(self.block), FUTEX_WAKE, 1)
        self.block = 0
        self.view.close()
        self.view = None


def _inject(tracer, cache, tid: int, saved, regs, rip: int, nr: int, *args: int,
            r12: int | None = None, clone: list | None = None) -> int:
    """Run syscall `nr` in the stopped thread `tid` from the `syscall`
    instruction at `rip`, by single steps (a seccomp stop and a clone event
    on the way are stepped through; a signal that comes meanwhile is kept
    for the thread); returns its raw result (the thread's registers are left
    for the caller to restore). The new thread of a clone is added to
    `clone`."""
    pt.ctypes.pointer(regs)[0] = saved
    regs.rip, regs.rax = rip, nr
    for name, value in zip(("rdi", "rsi", "rdx", "r10", "r8", "r9"), args):
        setattr(regs, name, value & ((1 << 64) - 1))
    if r12 is not None:
        regs.r12 = r12
    pt.setregs(tid, regs)
    while True:
        pt.singlestep(tid)
        status = tracer._wait_serving(tid, cache, None)
        if status is None or not os.WIFSTOPPED(status):
            raise ProcessLookupError(tid)
        event = status >> 16
        if event == pt.PTRACE_EVENT_CLONE and clone is not None:
            clone.append(pt.geteventmsg(tid))
        if event:
            continue  # seccomp (mmap, mprotect, madvise, clone), the clone event
        sig = os.WSTOPSIG(status)
        pt.getregs(tid, regs)
        if regs.rip == rip + 2:
            if sig != signal.SIGTRAP:
                tracer.threads[tid].pending_signal = sig
            return regs.rax
        if sig != signal.SIGTRAP:
            tracer.threads[tid].pending_signal = sig
