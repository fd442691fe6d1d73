"""Memory syscalls legorun follows when the guest's memory is remote (--excache)."""
from __future__ import annotations

import errno as E

from ..kernel.sysnums import NR
from ..memory import uffd as U
from ..memory.excache import FEATURES, ExCache, find_syscall_insn
from .base import Rewrite, s32
from . import files

MAP_PRIVATE = 0x02
MAP_TYPE = 0x0F
MAP_ANONYMOUS = 0x20
MAP_GROWSDOWN = 0x100
MAP_HUGETLB = 0x40000
O_CLOEXEC = 0o2000000
O_NONBLOCK = 0o4000
CLONE_VM = 0x100
CLONE_VFORK = 0x4000
CLONE_THREAD = 0x10000
CLONE_CHILD_CLEARTID = 0x200000
CLONE_ARGS_CHILD_TID = 16   # offsetof(struct clone_args, child_tid)
NR_MMAP = NR["mmap"]
NR_BRK = NR["brk"]
NR_MPROTECT = NR["mprotect"]
NR_CLOSE = NR["close"]


def _remote_anonymous(s, a) -> bool:
    flags = s32(a[3])
    return (s.memory is not None and flags & MAP_ANONYMOUS
            and flags & MAP_TYPE == MAP_PRIVATE and not flags & (MAP_GROWSDOWN | MAP_HUGETLB)
            and a[1] > 0)


def sys_mmap(s, t, a):
    """File mappings of remote fds (files.sys_mmap), or anonymous memory to
    register with the process's ExCache."""
    if not (s32(a[3]) & MAP_ANONYMOUS):
        return files.sys_mmap(s, t, a)
    if not _remote_anonymous(s, a):
        return None
    proc = t.process
    if proc.excache is None:
        if proc.excache_off:
            return None
        return Rewrite(U.NR_USERFAULTFD, (O_CLOEXEC | O_NONBLOCK,), _setup(s, a))
    return Rewrite(NR_MMAP, a, _registered(s, a))


def _registered(s, a):
    def finish(tracer, t, result):
        cache = t.process.excache
        if result >= 0 and cache is not None:
            cache.register(result, a[1])
        return result
    return finish


def _setup(s, a):
    """At the first anonymous mmap: make the process's userfaultfd (in the
    guest, so it is bound to its mm), take a copy, then run the mmap."""
    def finish(tracer, t, guest_fd):
        proc = t.process
        if guest_fd < 0:
            proc.excache_off = True
            s.say_once("uffd", f"cannot serve the guest's memory remotely: userfaultfd failed "
                               f"({E.errorcode.get(-guest_fd, guest_fd)}); it stays local")
        else:
            try:
                uffd = U.Userfaultfd.take(proc.pid, guest_fd)
                uffd.api(FEATURES)
                insn = find_syscall_insn(proc.pid)
            except OSError as e:
                proc.excache_off = True
                s.say_once("uffd", f"cannot serve the guest's memory remotely ({e}); it stays local")
                uffd = None
            tracer.inject_syscall(t, NR_CLOSE, (guest_fd,))
            if uffd is not None:
                proc.excache = ExCache(s.memory, proc.pid, uffd, insn)
                s.memory.add(proc.excache)
                proc.excache.adopt_heap()
                proc.excache.adopt_stack()
        result = tracer.inject_syscall(t, NR_MMAP, a)
        if result >= 0 and proc.excache is not None:
            proc.excache.register(result, a[1])
        return result
    return finish


def sys_brk(s, t, a):
    """brk: the heap's new part is a mapping of its own for the kernel (the
    registered part cannot merge with it), so it is registered as it appears;
    a shrink arrives as an UNMAP event."""
    cache = t.process.excache
    if cache is None:
        return None

    def finish(tracer, t, result):
        cache = t.process.excache
        if cache is not None and result > 0:
            cache.heap_moved(result)
        return result
    return Rewrite(NR_BRK, a, finish)


def sys_mprotect(s, t, a):
    """mprotect: the mComponent's record of the regions it already holds
    follows (regions it learns later are recorded as they are then)."""
    if t.process.excache is None:
        return None
    start, length, prot = a[0], a[1], a[2] & 0xFFFFFFFF

    def finish(tracer, t, result):
        cache = t.process.excache
        if cache is not None and result == 0:
            cache.protected(start, length, prot)
        return result
    return Rewrite(NR_MPROTECT, a, finish)


def sys_new_task(s, t, a):
    """clone/clone3/fork/vfork. A thread shares its process's ExCache (the
    address its exit clears is noted: see Tracer); a forked child gets an
    ExCache of its own from the FORK event (Tracer._on_clone); a vfork child
    runs in its parent's until it execs. Only a child that shares the mm
    without vfork (clone(CLONE_VM) alone) has its parent's memory brought back
    first, and that memory stays local from then on."""
    proc = t.process
    cache = proc.excache
    if cache is None:
        return None
    nr = t.regs.orig_rax
    flags = ctid = 0
    if nr == NR["clone"]:
        flags, ctid = a[0], a[3]
    elif nr == NR["clone3"]:
        cache.ensure(a[0], CLONE_ARGS_CHILD_TID + 8)
        raw = t.read_bytes(a[0], CLONE_ARGS_CHILD_TID + 8)
        flags = int.from_bytes(raw[:8], "little")
        ctid = int.from_bytes(raw[CLONE_ARGS_CHILD_TID:], "little")
    elif nr == NR["vfork"]:
        flags = CLONE_VM | CLONE_VFORK
    if flags & CLONE_THREAD:
        t.next_clear_tid = ctid if flags & CLONE_CHILD_CLEARTID else 0
        return None
    if not flags & CLONE_VM or flags & CLONE_VFORK:
        return None
    cache.make_local()
    proc.excache = None
    proc.excache_off = True
    s.say_once(f"local{proc.pid}", f"pid {proc.pid} starts a child that shares its memory "
                                   "(clone with CLONE_VM): its memory is local from now on")
    return None
