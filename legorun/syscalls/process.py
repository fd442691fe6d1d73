"""Process syscalls legorun must see: exec of a program, and ptrace."""
from __future__ import annotations

import errno as E
import os
import sys

from ..tracee import GuestError
from ..kernel.sysnums import NR
from .base import Rewrite, s32
from .files import AT_EMPTY_PATH, AT_FDCWD, path_arg, snapshot


def _exec(s, t, nr, dirfd, addr, argv, envp, flags=0):
    """A program on a mount runs from a local snapshot of it (the kernel maps
    what it executes); its argv is the guest's, /proc/self/exe names the copy."""
    target = path_arg(s, t, dirfd, addr, empty_ok=bool(flags & AT_EMPTY_PATH))
    if target is None:
        return None
    mount, rel = target
    local = snapshot(s, mount, rel.rstrip("/"))
    if not os.stat(local).st_mode & 0o111:
        raise GuestError(E.EACCES)
    data = os.fsencode(local) + b"\0"
    where = t.scratch(len(data), below=4096)
    if nr == NR["execveat"]:
        args = (AT_FDCWD, where, argv, envp, flags & ~AT_EMPTY_PATH)
    else:
        args = (where, argv, envp)
    return Rewrite(nr, args, _same, pokes=((where, data),))


def _same(tracer, t, result):
    return result


def sys_execve(s, t, a):
    return _exec(s, t, NR["execve"], AT_FDCWD, a[0], a[1], a[2])


def sys_execveat(s, t, a):
    return _exec(s, t, NR["execveat"], s32(a[0]), a[1], a[2], a[3], s32(a[4]))


def sys_ptrace(s, t, a):
    s.say(f"pid {t.tid} called ptrace, refused (EPERM): the guest is already traced by legorun")
    return -E.EPERM


def _affinity_target(t, pid: int) -> int:
    return t.tid if pid == 0 else pid


def sys_sched_getaffinity(s, t, a):
    """Report the CPUs the guest would have natively, not the one legorun pinned it to."""
    target = _affinity_target(t, s32(a[0]))
    if s.native_cpus is None or target in s.guest_set_affinity:
        return None
    mask = sum(1 << cpu for cpu in s.native_cpus)
    buf = a[2]

    def finish(tracer, t, result):
        if result > 0:
            t.write_bytes(buf, mask.to_bytes(result, "little"))
        return result
    return Rewrite(NR["sched_getaffinity"], a, finish)


def sys_sched_setaffinity(s, t, a):
    """A guest's own choice of CPUs is kept, and reported back to it as is."""
    s.guest_set_affinity.add(_affinity_target(t, s32(a[0])))
    return None
