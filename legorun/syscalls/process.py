"""Process syscalls legorun must see: exec of a program, and ptrace."""
from __future__ import annotations

import errno as E
import os

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


SOL_SOCKET = 1
SCM_RIGHTS = 1
MSGHDR = 56
MMSGHDR = 64


def _passes_remote_fd(s, t, msghdr: int) -> bool:
    """Does this struct msghdr carry SCM_RIGHTS naming a remote fd?"""
    import struct
    control, controllen = struct.unpack_from("<QQ", t.read_bytes(msghdr + 32, 16))
    if not control or controllen < 16:
        return False
    data = t.read_bytes(control, min(controllen, 1 << 16))
    pos = 0
    while pos + 16 <= len(data):
        length, level, kind = struct.unpack_from("<Qii", data, pos)
        if length < 16:
            break
        if level == SOL_SOCKET and kind == SCM_RIGHTS:
            count = (min(length, len(data) - pos) - 16) // 4
            fds = struct.unpack_from(f"<{count}i", data, pos + 16)
            if any(fd in t.process.fds for fd in fds):
                return True
        pos += (length + 7) & ~7
    return False


def sys_sendmsg(s, t, a):
    """Remote fds do not leave their process: SCM_RIGHTS of one is refused."""
    if not t.process.fds or not _passes_remote_fd(s, t, a[1]):
        return None
    s.say_once(("scm", t.tid), f"pid {t.tid}: passing a remote fd over a socket is not supported (EOPNOTSUPP)")
    return -E.EOPNOTSUPP


def sys_sendmmsg(s, t, a):
    if not t.process.fds:
        return None
    for i in range(min(a[2] & 0xFFFFFFFF, 1024)):
        if _passes_remote_fd(s, t, a[1] + i * MMSGHDR):
            s.say_once(("scm", t.tid), f"pid {t.tid}: passing a remote fd over a socket is not supported (EOPNOTSUPP)")
            return -E.EOPNOTSUPP
    return None


def sys_pidfd_getfd(s, t, a):
    """Another process may not take a copy of a remote fd (it is legorun's)."""
    pidfd, target = s32(a[0]), s32(a[1])
    try:
        with open(f"/proc/{t.tid}/fdinfo/{pidfd}") as f:
            pid = next(int(line.split()[1]) for line in f if line.startswith("Pid:"))
    except (OSError, StopIteration, ValueError):
        return None
    other = s.process_of(pid)
    if other is not None and target in other.fds:
        return -E.EOPNOTSUPP
    return None


CLONE_FS = 0x200
CLONE_FILES = 0x400


def sys_unshare(s, t, a):
    """unshare(CLONE_FILES / CLONE_FS): this process stops sharing legorun's
    view of its fd table or cwd with the others it shared them with."""
    flags = a[0] & 0xFFFFFFFF
    if not flags & (CLONE_FILES | CLONE_FS):
        return None
    proc = t.process

    def finish(tracer, t, result):
        if result == 0:
            if flags & CLONE_FILES:
                proc.fds = proc.fds.copy_private()
            if flags & CLONE_FS:
                proc.fs = proc.fs.copy()
        return result
    return Rewrite(NR["unshare"], a, finish)


AF_UNIX = 1


def sys_bind_or_connect(s, t, a):
    """A Unix socket cannot live on a mount: bind or connect to a path there
    is refused with EOPNOTSUPP (abstract and local paths run untouched)."""
    length = a[2] & 0xFFFFFFFF
    if length <= 2 or a[1] == 0:
        return None
    try:
        head = t.read_bytes(a[1], min(length, 110))
    except GuestError:
        return None  # the kernel answers EFAULT itself
    if int.from_bytes(head[:2], "little") != AF_UNIX or head[2] == 0:
        return None
    path = head[2:].split(b"\0", 1)[0]
    from .files import resolve
    if resolve(s, t, AT_FDCWD, path) is None:
        return None
    raise GuestError(E.EOPNOTSUPP)
