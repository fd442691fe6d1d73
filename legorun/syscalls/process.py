"""Process syscalls legorun must see: exec of a program, and ptrace."""
from __future__ import annotations

import errno as E
import logging
import os
import sys

from ..tracee import GuestError
from .base import s32
from .files import AT_EMPTY_PATH, AT_FDCWD, path_arg

log = logging.getLogger(__name__)


def _exec(s, t, dirfd, addr, flags=0):
    target = path_arg(s, t, dirfd, addr, empty_ok=bool(flags & AT_EMPTY_PATH))
    if target is None:
        return None
    # A program on a mount would need a local snapshot to be mapped by the
    # kernel; until that exists the exec is refused, never run from a stale copy.
    raise GuestError(E.EACCES)


def sys_execve(s, t, a):
    return _exec(s, t, AT_FDCWD, a[0])


def sys_execveat(s, t, a):
    return _exec(s, t, s32(a[0]), a[1], s32(a[4]))


def sys_ptrace(s, t, a):
    s.say(f"pid {t.tid} called ptrace, refused (EPERM): the guest is already traced by legorun")
    return -E.EPERM
