"""File syscalls on a mount, forwarded to the sComponent.

Every handler first decides whether its path or fd is remote; a local one
returns None at once, so the local kernel serves it untouched.
"""
from __future__ import annotations

import errno as E
import os
import stat as S
import struct

from ..fdtable import ATTIC, OpenFile
from ..kernel.sysnums import NR
from ..paths import (FINAL, NO_SYMLINK, fd_link, join_rel, local_cwd, local_fd_path, normalize,
                     symlink_on_the_way, through_symlinks)
from .. import wire
from ..proto import storage as pb
from ..errors import ComponentError
from ..tracee import GuestError
from .base import Park, Rewrite, s32, s64

AT_FDCWD = -100
AT_SYMLINK_NOFOLLOW = 0x100
AT_REMOVEDIR = 0x200
AT_SYMLINK_FOLLOW = 0x400
AT_EMPTY_PATH = 0x1000
O_ACCMODE = 0o3
O_RDONLY = 0
O_WRONLY = 0o1
O_RDWR = 0o2
O_CREAT = 0o100
O_EXCL = 0o200
O_NOCTTY = 0o400
O_TRUNC = 0o1000
O_APPEND = 0o2000
O_NONBLOCK = 0o4000
O_DIRECTORY = 0o200000
O_NOFOLLOW = 0o400000
O_CLOEXEC = 0o2000000
O_PATH = 0o10000000
O_TMPFILE = 0o20000000 | O_DIRECTORY
O_LARGEFILE = 0o100000
SETFL_MASK = O_APPEND | O_NONBLOCK | 0o40000 | 0o1000000 | 0o20000  # APPEND NONBLOCK DIRECT NOATIME ASYNC
SEEK_SET, SEEK_CUR, SEEK_END, SEEK_DATA, SEEK_HOLE = 0, 1, 2, 3, 4
CHUNK = 1 << 20
MAX_IO = 0x7FFFF000  # the kernel's MAX_RW_COUNT
IOV_MAX = 1024
NR_OPENAT = NR["openat"]
NR_DUP = NR["dup"]
NR_FCNTL = NR["fcntl"]


# ---------------------------------------------------------------- resolution

def _cwd(s, t):
    fs = t.process.fs
    if fs.cwd is None:
        fs.cwd = local_cwd(t.tid)
        fs.cwd_far = s.mounts.far_from(fs.cwd)
    return fs.cwd


def resolve(s, t, dirfd: int, path: bytes, empty_ok: bool = False, follow: bool = True):
    """(Mount, rel) when (dirfd, path) names something on a mount, else None.

    'name/' and 'name/.' must name a directory: rel then keeps a trailing '/'
    (which normalization dropped), and the sComponent resolves it as the
    kernel does (ENOTDIR, EISDIR). Keys of legorun's own tables never have it.
    """
    target = _resolve(s, t, dirfd, path, empty_ok, follow)
    if target is not None and target[1] and (path.endswith(b"/") or path.endswith(b"/.")):
        return target[0], target[1] + "/"
    return target


def _resolve(s, t, dirfd: int, path: bytes, empty_ok: bool = False, follow: bool = True):
    """resolve() without the trailing-slash rule.

    With empty_ok and an empty path, the dirfd itself is meant (AT_EMPTY_PATH).
    """
    if not path:
        if not empty_ok:
            raise GuestError(E.ENOENT)
        return _fd_target(s, t, dirfd)
    mounts = s.mounts
    if path[0] == 47:  # '/'
        if mounts.surely_local(path):
            return _local(s, path, follow)
        text = normalize(os.fsdecode(path))
        target = mounts.match(text)
        if target is not None:
            return target
        if text.startswith(("/proc/", "/dev/")):
            return _magic_link(s, t, text)
        return _local(s, os.fsencode(text), follow)
    if dirfd == AT_FDCWD:
        fs = t.process.fs
        if fs.remote_cwd is not None:
            mount, base = fs.remote_cwd
            return _relative(s, mount, base, os.fsdecode(path))
        cwd = fs.cwd if fs.cwd is not None else _cwd(s, t)
        if fs.cwd_far and b".." not in path and b"/" not in path:
            return None  # a name in a local directory without mounts below it
        text = normalize(cwd + "/" + os.fsdecode(path))
        return mounts.match(text) or _local(s, os.fsencode(text), follow)
    text = os.fsdecode(path)
    ofd = t.process.fds.get(dirfd)
    if ofd is not None:
        if not ofd.is_dir:
            raise GuestError(E.ENOTDIR)
        return _relative(s, ofd.mount, ofd.path, text)
    try:
        base = local_fd_path(t.tid, dirfd)
    except OSError:
        raise GuestError(E.EBADF) from None
    if not base.startswith("/"):
        raise GuestError(E.ENOTDIR)
    full = normalize(base + "/" + text)
    return mounts.match(full) or _local(s, os.fsencode(full), follow)


def _local(s, path: bytes, follow: bool):
    """A lexically local absolute path: local, unless a local symlink on it
    leads onto a mount (then the call is made again with the path it leads to).
    `follow`: the call follows a final symlink."""
    where = symlink_on_the_way(path)
    if where == NO_SYMLINK or (where == FINAL and not follow):
        return None
    real = through_symlinks(os.fsdecode(path), follow)
    if s.mounts.match(normalize(real)) is None:
        return None
    raise Redirected(real)


def _magic_link(s, t, text: str):
    """/proc/self/fd/N (and friends) of a remote fd reopen the remote file, as
    the kernel's magic link would; another process's remote fd cannot be
    reached that way (EOPNOTSUPP): remote fds do not leave their process."""
    link = fd_link(text)
    if link is None:
        return None
    who, fd = link
    proc = t.process
    if who not in (None, "self", "thread-self") and int(who) != proc.pid and \
            not any(th.tid == int(who) for th in proc.threads):
        other = s.process_of(int(who))
        if other is not None and fd in other.fds:
            raise GuestError(E.EOPNOTSUPP)
        return None
    ofd = proc.fds.get(fd)
    return None if ofd is None else (ofd.mount, ofd.path)


def _relative(s, mount, base: str, text: str):
    """A path relative to a remote directory (the cwd or a dirfd)."""
    rel = join_rel(base, text)
    if rel is not None:
        return mount, rel
    # '..' above the mount root leaves the mount. If it lands on a local path,
    # the kernel must not see the relative form: its own cwd (or the dirfd's
    # placeholder) is not that directory. Make the call with the full path.
    path = normalize(mount.guest_name(base) + "/" + text)
    target = s.mounts.match(path)
    if target is None:
        raise Redirected(path)
    return target


def _fd_target(s, t, fd: int):
    ofd = t.process.fds.get(fd)
    if ofd is not None:
        return ofd.mount, ofd.path
    return None


def path_arg(s, t, dirfd: int, addr: int, empty_ok: bool = False, follow: bool = True):
    """Where the path argument at `addr` leads: (Mount, rel), or None if local.
    `follow`: the call follows a final symlink (stat does, lstat does not)."""
    t.path_addr = addr  # the argument a redirect would replace
    return resolve(s, t, dirfd, t.read_cstring(addr), empty_ok, follow)


class Redirected(Exception):
    """The path went through a symlink that leaves the mount's root: the call
    is to be made again with `path` (a guest path) in place of its path."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.path = path


def _redirect_path(mount, r) -> str:
    target = wire.from_wire(r.target)
    base = target if target.startswith("/") else mount.guest_name(r.link_dir) + "/" + target
    rest = wire.from_wire(r.rest).strip("/")
    path = normalize(base + ("/" + rest if rest else ""))
    return path + "/" if r.rest.endswith("/") and path != "/" else path


# ---------------------------------------------------------------- RPC

def rpc(s, mount, **op):
    """One request to the mount's sComponent; its errno becomes the guest's.

    A path that leaves the root through a symlink raises Redirected.
    """
    try:
        reply = s.storage(mount).call(**op)
    except ComponentError as e:
        s.component_failed(e)
        raise GuestError(E.EIO) from None
    if reply.errno:
        if reply.errno == E.EXDEV and reply.HasField("redirect"):
            raise Redirected(_redirect_path(mount, reply.redirect))
        raise GuestError(reply.errno)
    return reply


def rpc_many(s, mount, ops: list):
    try:
        replies = s.storage(mount).pipeline(ops)
    except ComponentError as e:
        s.component_failed(e)
        raise GuestError(E.EIO) from None
    return replies


# ---------------------------------------------------------------- attributes

STAT_FMT = struct.Struct("<QQQIIIiQqqqqqqqqq24x")


def pack_stat(mount, a) -> bytes:
    return STAT_FMT.pack(mount.dev, a.ino, a.nlink, a.mode, a.uid, a.gid, 0, a.rdev,
                         a.size, a.blksize, a.blocks,
                         a.atime_ns // 10**9, a.atime_ns % 10**9,
                         a.mtime_ns // 10**9, a.mtime_ns % 10**9,
                         a.ctime_ns // 10**9, a.ctime_ns % 10**9)


STATX_BASIC_STATS = 0x7FF


def pack_statx(mount, a) -> bytes:
    def ts(ns):
        return struct.pack("<qI4x", ns // 10**9, ns % 10**9)
    head = struct.pack("<IIQIIIHHQQQQ", STATX_BASIC_STATS, a.blksize, 0, a.nlink, a.uid, a.gid,
                       a.mode, 0, a.ino, a.size, a.blocks, 0)
    body = ts(a.atime_ns) + ts(0) + ts(a.ctime_ns) + ts(a.mtime_ns)
    devs = struct.pack("<IIII", os.major(a.rdev), os.minor(a.rdev), mount.dev >> 8, mount.dev & 0xFF)
    out = head + body + devs
    return out + bytes(256 - len(out))


def remote_stat(s, mount, rel: str, follow: bool = True):
    return rpc(s, mount, stat=pb.Stat(path=rel, follow=follow)).attr


def _stat_into(s, t, target, buf: int, follow: bool) -> int:
    mount, rel = target
    t.write_bytes(buf, pack_stat(mount, remote_stat(s, mount, rel, follow)))
    return 0


def sys_stat(s, t, a):
    target = path_arg(s, t, AT_FDCWD, a[0])
    return None if target is None else _stat_into(s, t, target, a[1], True)


def sys_lstat(s, t, a):
    target = path_arg(s, t, AT_FDCWD, a[0], follow=False)
    return None if target is None else _stat_into(s, t, target, a[1], False)


def sys_fstat(s, t, a):
    ofd = t.process.fds.get(s32(a[0]))
    if ofd is None:
        return None
    return _stat_into(s, t, (ofd.mount, ofd.path), a[1], True)


def sys_newfstatat(s, t, a):
    flags = s32(a[3])
    target = path_arg(s, t, s32(a[0]), a[1], empty_ok=bool(flags & AT_EMPTY_PATH),
                      follow=not flags & AT_SYMLINK_NOFOLLOW)
    if target is None:
        return None
    return _stat_into(s, t, target, a[2], not flags & AT_SYMLINK_NOFOLLOW)


def sys_statx(s, t, a):
    flags = s32(a[2])
    target = path_arg(s, t, s32(a[0]), a[1], empty_ok=bool(flags & AT_EMPTY_PATH),
                      follow=not flags & AT_SYMLINK_NOFOLLOW)
    if target is None:
        return None
    mount, rel = target
    attr = remote_stat(s, mount, rel, not flags & AT_SYMLINK_NOFOLLOW)
    t.write_bytes(a[4], pack_statx(mount, attr))
    return 0


STATFS_FMT = struct.Struct("<qqQQQQQqqqq4q")


def _statfs_into(s, t, target, buf: int) -> int:
    mount, rel = target
    r = rpc(s, mount, statfs=pb.Statfs(path=rel)).statfs
    t.write_bytes(buf, STATFS_FMT.pack(r.type, r.bsize, r.blocks, r.bfree, r.bavail, r.files,
                                       r.ffree, mount.dev, r.namelen, r.frsize, r.flags, 0, 0, 0, 0))
    return 0


def sys_statfs(s, t, a):
    target = path_arg(s, t, AT_FDCWD, a[0])
    return None if target is None else _statfs_into(s, t, target, a[1])


def sys_fstatfs(s, t, a):
    target = _fd_target(s, t, s32(a[0]))
    return None if target is None else _statfs_into(s, t, target, a[1])


def _access(s, target, mode: int) -> int:
    mount, rel = target
    rpc(s, mount, access=pb.Access(path=rel, mode=mode))
    return 0


def sys_access(s, t, a):
    target = path_arg(s, t, AT_FDCWD, a[0])
    return None if target is None else _access(s, target, s32(a[1]))


def sys_faccessat(s, t, a):
    target = path_arg(s, t, s32(a[0]), a[1])
    return None if target is None else _access(s, target, s32(a[2]))


def sys_faccessat2(s, t, a):
    flags = s32(a[3])
    target = path_arg(s, t, s32(a[0]), a[1], empty_ok=bool(flags & AT_EMPTY_PATH),
                      follow=not flags & AT_SYMLINK_NOFOLLOW)
    return None if target is None else _access(s, target, s32(a[2]))


def _readlink(s, t, target, buf: int, size: int) -> int:
    size = s32(size)
    if size <= 0:
        raise GuestError(E.EINVAL)
    mount, rel = target
    raw = t.read_cstring(t.path_addr)
    if raw.startswith((b"/proc/", b"/dev/")) and fd_link(normalize(os.fsdecode(raw))):
        data = os.fsencode(mount.guest_name(rel))  # the magic link names the file
    else:
        data = rpc(s, mount, readlink=pb.Readlink(path=rel)).data
    return t.write_bytes(buf, data[:size])


def sys_readlink(s, t, a):
    target = path_arg(s, t, AT_FDCWD, a[0], follow=False)
    return None if target is None else _readlink(s, t, target, a[1], a[2])


def sys_readlinkat(s, t, a):
    target = path_arg(s, t, s32(a[0]), a[1], follow=False)
    return None if target is None else _readlink(s, t, target, a[2], a[3])


def _chmod(s, target, mode):
    mount, rel = target
    rpc(s, mount, chmod=pb.Chmod(path=rel, mode=mode & 0o7777))
    return 0


def sys_chmod(s, t, a):
    target = path_arg(s, t, AT_FDCWD, a[0])
    return None if target is None else _chmod(s, target, a[1])


def sys_fchmod(s, t, a):
    target = _fd_target(s, t, s32(a[0]))
    return None if target is None else _chmod(s, target, a[1])


def sys_fchmodat(s, t, a):
    target = path_arg(s, t, s32(a[0]), a[1])
    return None if target is None else _chmod(s, target, a[2])


def sys_fchmodat2(s, t, a):
    flags = s32(a[3])
    target = path_arg(s, t, s32(a[0]), a[1], empty_ok=bool(flags & AT_EMPTY_PATH),
                      follow=not flags & AT_SYMLINK_NOFOLLOW)
    return None if target is None else _chmod(s, target, a[2])


def _chown(s, target, uid, gid, follow):
    mount, rel = target
    rpc(s, mount, chown=pb.Chown(path=rel, uid=s32(uid), gid=s32(gid), follow=follow))
    return 0


def sys_chown(s, t, a):
    target = path_arg(s, t, AT_FDCWD, a[0])
    return None if target is None else _chown(s, target, a[1], a[2], True)


def sys_lchown(s, t, a):
    target = path_arg(s, t, AT_FDCWD, a[0], follow=False)
    return None if target is None else _chown(s, target, a[1], a[2], False)


def sys_fchown(s, t, a):
    target = _fd_target(s, t, s32(a[0]))
    return None if target is None else _chown(s, target, a[1], a[2], True)


def sys_fchownat(s, t, a):
    flags = s32(a[4])
    target = path_arg(s, t, s32(a[0]), a[1], empty_ok=bool(flags & AT_EMPTY_PATH),
                      follow=not flags & AT_SYMLINK_NOFOLLOW)
    return None if target is None else _chown(s, target, a[2], a[3], not flags & AT_SYMLINK_NOFOLLOW)


UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2


def _utimens(s, target, times, follow=True):
    """times: None (now, now) or ((sec, nsec), (sec, nsec)) with UTIME_* in nsec."""
    mount, rel = target
    op = pb.Utimens(path=rel, follow=follow)
    if times is None:
        op.atime_now = op.mtime_now = True
    else:
        (asec, ansec), (msec, mnsec) = times
        for which, sec, nsec in (("atime", asec, ansec), ("mtime", msec, mnsec)):
            if nsec == UTIME_NOW:
                setattr(op, f"{which}_now", True)
            elif nsec == UTIME_OMIT:
                setattr(op, f"{which}_omit", True)
            elif not 0 <= nsec < 10**9:
                raise GuestError(E.EINVAL)
            else:
                setattr(op, f"{which}_ns", sec * 10**9 + nsec)
    rpc(s, mount, utimens=op)
    return 0


def _read_timespecs(t, addr):
    if addr == 0:
        return None
    asec, ansec, msec, mnsec = struct.unpack("<qqqq", t.read_bytes(addr, 32))
    return (asec, ansec), (msec, mnsec)


def _read_timevals(t, addr):
    if addr == 0:
        return None
    asec, ausec, msec, musec = struct.unpack("<qqqq", t.read_bytes(addr, 32))
    if not (0 <= ausec < 10**6 and 0 <= musec < 10**6):
        raise GuestError(E.EINVAL)
    return (asec, ausec * 1000), (msec, musec * 1000)


def sys_utimensat(s, t, a):
    dirfd, flags = s32(a[0]), s32(a[3])
    if a[1] == 0:  # utimensat(fd, NULL, ...) acts on the fd itself (futimens)
        target = _fd_target(s, t, dirfd)
    else:
        target = path_arg(s, t, dirfd, a[1], empty_ok=bool(flags & AT_EMPTY_PATH),
                      follow=not flags & AT_SYMLINK_NOFOLLOW)
    if target is None:
        return None
    return _utimens(s, target, _read_timespecs(t, a[2]), not flags & AT_SYMLINK_NOFOLLOW)


def sys_utimes(s, t, a):
    target = path_arg(s, t, AT_FDCWD, a[0])
    return None if target is None else _utimens(s, target, _read_timevals(t, a[1]))


def sys_futimesat(s, t, a):
    target = path_arg(s, t, s32(a[0]), a[1])
    return None if target is None else _utimens(s, target, _read_timevals(t, a[2]))


def sys_utime(s, t, a):
    target = path_arg(s, t, AT_FDCWD, a[0])
    if target is None:
        return None
    times = None
    if a[1]:
        atime, mtime = struct.unpack("<qq", t.read_bytes(a[1], 16))
        times = ((atime, 0), (mtime, 0))
    return _utimens(s, target, times)


def sys_truncate(s, t, a):
    target = path_arg(s, t, AT_FDCWD, a[0])
    if target is None:
        return None
    length = s64(a[1])
    if length < 0:
        raise GuestError(E.EINVAL)
    mount, rel = target
    s.invalidate_ahead(mount, rel)
    rpc(s, mount, truncate=pb.Truncate(path=rel, length=length))
    return 0


# ---------------------------------------------------------------- opening

def _umask(t) -> int:
    fs = t.process.fs
    if fs.umask is None:
        with open(f"/proc/{t.tid}/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    fs.umask = int(line.split()[1], 8)
                    break
            else:
                fs.umask = 0o022
    return fs.umask


def _open(s, t, target, flags: int, mode: int):
    mount, rel = target
    if flags & O_TMPFILE == O_TMPFILE:
        raise GuestError(E.EOPNOTSUPP)
    if flags & O_PATH:
        flags &= O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC
        attr = remote_stat(s, mount, rel, follow=not flags & O_NOFOLLOW)
        if flags & O_DIRECTORY and not S.S_ISDIR(attr.mode):
            raise GuestError(E.ENOTDIR)
    else:
        wire_flags = flags & (O_ACCMODE | O_CREAT | O_EXCL | O_TRUNC | O_DIRECTORY | O_NOFOLLOW)
        if flags & O_TRUNC:
            s.invalidate_ahead(mount, rel)
        attr = rpc(s, mount, open=pb.Open(path=rel, flags=wire_flags,
                                            mode=mode & 0o7777 & ~_umask(t))).attr
    ofd = OpenFile(mount, rel.rstrip("/"), flags & ~(O_CREAT | O_EXCL | O_TRUNC | O_CLOEXEC | O_NOCTTY),
                   is_dir=S.S_ISDIR(attr.mode))
    ofd.ino = attr.ino
    return _placeholder(s, t, ofd, bool(flags & O_CLOEXEC))


def _placeholder(s, t, ofd: OpenFile, cloexec: bool) -> Rewrite:
    """Let the kernel reserve the fd number: openat("/", O_PATH) at the guest's fd slot."""
    addr = t.scratch(16)

    def finish(tracer, t, fd):
        if fd < 0:
            return fd
        s.install_fd(tracer, t, fd, ofd, cloexec)
        return fd

    return Rewrite(NR_OPENAT, (AT_FDCWD, addr, O_PATH | (O_CLOEXEC if cloexec else 0), 0),
                   finish, pokes=((addr, b"/\0"),))


def _open_follows(flags: int) -> bool:
    return not (flags & O_NOFOLLOW or flags & (O_CREAT | O_EXCL) == O_CREAT | O_EXCL)


def sys_open(s, t, a):
    target = path_arg(s, t, AT_FDCWD, a[0], follow=_open_follows(s32(a[1])))
    return None if target is None else _open(s, t, target, s32(a[1]), a[2])


def sys_creat(s, t, a):
    target = path_arg(s, t, AT_FDCWD, a[0])
    return None if target is None else _open(s, t, target, O_CREAT | O_WRONLY | O_TRUNC, a[1])


def sys_openat(s, t, a):
    target = path_arg(s, t, s32(a[0]), a[1], follow=_open_follows(s32(a[2])))
    return None if target is None else _open(s, t, target, s32(a[2]), a[3])


def sys_openat2(s, t, a):
    size = a[3]
    if size < 24:
        raise GuestError(E.EINVAL)
    target = path_arg(s, t, s32(a[0]), a[1])
    if target is None:
        return None
    flags, mode, _resolve = struct.unpack("<QQQ", t.read_bytes(a[2], 24))
    return _open(s, t, target, flags, mode)


# ---------------------------------------------------------------- fd table

def sys_close(s, t, a):
    fd = s32(a[0])
    proc = t.process
    fds = proc.fds
    if fd not in fds:
        return None
    s.close_file_locks(proc, fds.get(fd))
    ofd = fds.remove(fd)
    if ofd is not None:
        s.release(ofd)
    s.record(t, NR_CLOSE, 0, 0.0, a)  # shown by --trace and -c like any forwarded call
    return None  # the kernel closes the placeholder and returns 0


def sys_close_range(s, t, a):
    first, last, flags = a[0] & 0xFFFFFFFF, a[1] & 0xFFFFFFFF, s32(a[2])
    fds = t.process.fds
    if flags & 2:  # CLOSE_RANGE_UNSHARE
        t.process.fds = fds = fds.copy_private()
    for fd in [fd for fd in fds.entries if first <= fd <= last]:
        if flags & 4:  # CLOSE_RANGE_CLOEXEC
            fds.set_cloexec(fd, True)
        else:
            ofd = fds.remove(fd)
            if ofd is not None:
                s.release(ofd)
    return None


def _dup_rewrite(s, t, nr, args, ofd, cloexec):
    def finish(tracer, t, newfd):
        if newfd >= 0:
            s.install_fd(tracer, t, newfd, ofd, cloexec)
        return newfd
    return Rewrite(nr, args, finish)


def sys_dup(s, t, a):
    ofd = t.process.fds.get(s32(a[0]))
    if ofd is None:
        return None
    return _dup_rewrite(s, t, NR_DUP, a, ofd, False)


def _dup2(s, t, a, nr, cloexec):
    old, new = s32(a[0]), s32(a[1])
    fds = t.process.fds
    ofd = fds.get(old)
    if ofd is None and new not in fds:
        return None
    if old == new:
        return None  # dup2 returns it unchanged; dup3 fails with EINVAL natively

    def finish(tracer, t, result):
        if result >= 0:
            if ofd is not None:
                s.install_fd(tracer, t, new, ofd, cloexec)
            else:
                gone = fds.remove(new)
                if gone is not None:
                    s.release(gone)
        return result
    return Rewrite(nr, a, finish)


def sys_dup2(s, t, a):
    return _dup2(s, t, a, NR["dup2"], False)


def sys_dup3(s, t, a):
    return _dup2(s, t, a, NR["dup3"], bool(s32(a[2]) & O_CLOEXEC))


F_DUPFD, F_GETFD, F_SETFD, F_GETFL, F_SETFL = 0, 1, 2, 3, 4
F_GETLK, F_SETLK, F_SETLKW = 5, 6, 7
F_OFD_GETLK, F_OFD_SETLK, F_OFD_SETLKW = 36, 37, 38
F_DUPFD_CLOEXEC = 1030
FD_CLOEXEC = 1


def sys_fcntl(s, t, a):
    fd, cmd = s32(a[0]), s32(a[1])
    fds = t.process.fds
    ofd = fds.get(fd)
    if ofd is None:
        return None
    if cmd in (F_DUPFD, F_DUPFD_CLOEXEC):
        return _dup_rewrite(s, t, NR_FCNTL, a, ofd, cmd == F_DUPFD_CLOEXEC)
    if cmd == F_GETFD:
        return FD_CLOEXEC if fds.cloexec(fd) else 0
    if cmd == F_SETFD:
        fds.set_cloexec(fd, bool(a[2] & FD_CLOEXEC))
        return None  # the placeholder's flag follows, so exec closes it too
    if cmd == F_GETFL:
        return ofd.flags | O_LARGEFILE
    if cmd == F_SETFL:
        ofd.flags = (ofd.flags & ~SETFL_MASK) | (s32(a[2]) & SETFL_MASK)
        return 0
    if cmd in (F_GETLK, F_SETLK, F_SETLKW, F_OFD_GETLK, F_OFD_SETLK, F_OFD_SETLKW):
        return _fcntl_lock(s, t, ofd, cmd, a[2])
    raise GuestError(E.EINVAL)


FLOCK_FMT = struct.Struct("<hh4xqqi4x")  # struct flock (32 bytes)
F_RDLCK, F_WRLCK, F_UNLCK = 0, 1, 2
LOCK_SH, LOCK_EX, LOCK_NB, LOCK_UN = 1, 2, 4, 8
SPACE_RECORD, SPACE_FLOCK = 0, 1


def _lock_range(s, ofd, whence: int, start: int, length: int) -> tuple:
    if whence == SEEK_SET:
        base = 0
    elif whence == SEEK_CUR:
        base = ofd.offset
    elif whence == SEEK_END:
        base = remote_stat(s, ofd.mount, ofd.path).size
    else:
        raise GuestError(E.EINVAL)
    start += base
    if length < 0:
        start, length = start + length, -length
    if start < 0:
        raise GuestError(E.EINVAL)
    return start, length


def _take(s, ofd, lock: pb.Lock, wait: bool, on_taken, busy=E.EAGAIN):
    """Ask the server for a lock; park the thread while it is busy and `wait` holds."""
    def attempt():
        try:
            rpc(s, ofd.mount, lock=lock)
        except GuestError as e:
            if e.errno == E.EAGAIN:
                return None
            raise
        on_taken()
        return 0
    result = attempt()
    if result is not None:
        return result
    if not wait:
        raise GuestError(busy)
    return Park(attempt)


def _fcntl_lock(s, t, ofd, cmd: int, addr: int):
    l_type, l_whence, l_start, l_len, l_pid = FLOCK_FMT.unpack(t.read_bytes(addr, FLOCK_FMT.size))
    per_ofd = cmd in (F_OFD_GETLK, F_OFD_SETLK, F_OFD_SETLKW)
    if l_type not in (F_RDLCK, F_WRLCK, F_UNLCK) or (per_ofd and l_pid != 0):
        raise GuestError(E.EINVAL)
    start, length = _lock_range(s, ofd, l_whence, l_start, l_len)
    proc = t.process
    owner = s.ofd_lock_owner(ofd) if per_ofd else s.process_lock_owner(proc)
    if cmd in (F_GETLK, F_OFD_GETLK):
        if l_type == F_UNLCK:
            raise GuestError(E.EINVAL)
        r = rpc(s, ofd.mount, lock=pb.Lock(path=ofd.path, owner=owner, space=SPACE_RECORD,
                                            type=l_type, start=start, length=length, test=True)).lock
        if r.type == F_UNLCK:
            out = FLOCK_FMT.pack(F_UNLCK, l_whence, l_start, l_len, l_pid)
        else:
            out = FLOCK_FMT.pack(r.type, SEEK_SET, r.start, r.length, r.pid)
        t.write_bytes(addr, out)
        return 0
    if l_type == F_RDLCK and (ofd.flags & O_ACCMODE == O_WRONLY or ofd.flags & O_PATH):
        raise GuestError(E.EBADF)
    if l_type == F_WRLCK and (ofd.flags & O_ACCMODE == 0 or ofd.flags & O_PATH):
        raise GuestError(E.EBADF)
    lock = pb.Lock(path=ofd.path, owner=owner, space=SPACE_RECORD, type=l_type, start=start,
                   length=length, pid=-1 if per_ofd else proc.pid)

    def taken():
        if per_ofd:
            ofd.locked = True
        else:
            proc.lock_files.add((ofd.mount, ofd.path))
        if l_type == F_UNLCK:
            s.locks_released()
    return _take(s, ofd, lock, cmd in (F_SETLKW, F_OFD_SETLKW), taken)


def sys_flock(s, t, a):
    ofd = t.process.fds.get(s32(a[0]))
    if ofd is None:
        return None
    op = s32(a[1])
    kind = op & ~LOCK_NB
    types = {LOCK_SH: F_RDLCK, LOCK_EX: F_WRLCK, LOCK_UN: F_UNLCK}
    if kind not in types:
        raise GuestError(E.EINVAL)
    lock = pb.Lock(path=ofd.path, owner=s.ofd_lock_owner(ofd), space=SPACE_FLOCK,
                   type=types[kind], start=0, length=0, pid=t.process.pid)

    def taken():
        ofd.locked = True
        if kind == LOCK_UN:
            s.locks_released()
    return _take(s, ofd, lock, not op & LOCK_NB, taken, busy=E.EWOULDBLOCK)


FIONREAD = 0x541B


def sys_ioctl(s, t, a):
    ofd = t.process.fds.get(s32(a[0]))
    if ofd is None:
        return None
    if a[1] & 0xFFFFFFFF == FIONREAD and not ofd.is_dir:
        left = max(0, remote_stat(s, ofd.mount, ofd.path).size - ofd.offset)
        t.write_bytes(a[2], struct.pack("<i", min(left, 0x7FFFFFFF)))
        return 0
    raise GuestError(E.ENOTTY)


def sys_fanotify_mark(s, t, a):
    """fanotify_mark(fd, flags, mask, dirfd, pathname)."""
    if a[4] == 0:
        return None
    if resolve(s, t, s32(a[3]), t.read_cstring(a[4]), empty_ok=True) is None:
        return None
    raise GuestError(E.ENOSYS)


MAP_SHARED = 0x01
MAP_TYPE = 0x0F
MAP_ANONYMOUS = 0x20
PROT_WRITE = 0x2
NR_MMAP = NR["mmap"]
NR_CLOSE = NR["close"]


def snapshot(s, mount, rel: str) -> str:
    """A local, read-only copy of a remote file, for the kernel to map or exec.

    Copies are kept per (file, size, mtime): a changed file is copied again.
    """
    attr = remote_stat(s, mount, rel)
    if not S.S_ISREG(attr.mode):
        raise GuestError(E.EACCES if S.S_ISDIR(attr.mode) else E.ENODEV)
    key = (mount.guest_path, rel)
    cached = s.snapshots.get(key)
    if cached is not None and cached[:2] == (attr.size, attr.mtime_ns):
        return cached[2]
    ofd = OpenFile(mount, rel, O_RDONLY)
    local = os.path.join(s.snapshot_dir(),
                         f"{len(s.snapshots)}-{os.path.basename(wire.from_wire(rel))}"[:200])
    with open(local, "wb") as f:
        offset = 0
        while True:
            data = _pull(s, ofd, offset, 16 << 20)
            if not data:
                break
            f.write(data)
            offset += len(data)
    os.chmod(local, attr.mode & 0o555)
    s.snapshots[key] = (attr.size, attr.mtime_ns, local)
    return local


def _with_local_fd(t, local: str, then):
    """Open `local` in the guest (at the syscall's stop), run then(tracer, t, fd)
    and close that fd again: the guest's fd table looks untouched afterwards."""
    data = os.fsencode(local) + b"\0"
    addr = t.scratch(len(data), below=4096)

    def finish(tracer, t, fd):
        if fd < 0:
            return fd
        try:
            return then(tracer, t, fd)
        finally:
            tracer.inject_syscall(t, NR_CLOSE, (fd,))
    return Rewrite(NR_OPENAT, (AT_FDCWD, addr, O_RDONLY | O_CLOEXEC, 0), finish,
                   pokes=((addr, data),))


def sys_mmap(s, t, a):
    """A remote file is mapped from a local snapshot: read-only or private
    mappings see the file as of the mmap; writable shared ones are refused."""
    flags = s32(a[3])
    ofd = t.process.fds.get(s32(a[4]))
    if ofd is None or flags & MAP_ANONYMOUS:
        return None
    prot = a[2]
    shared = flags & MAP_TYPE in (MAP_SHARED, 0x03)
    if ofd.flags & O_PATH or ofd.flags & O_ACCMODE == O_WRONLY:
        raise GuestError(E.EACCES)
    if shared and prot & PROT_WRITE:
        if ofd.flags & O_ACCMODE != O_RDWR:
            raise GuestError(E.EACCES)
        raise GuestError(E.ENODEV)
    if ofd.is_dir:
        raise GuestError(E.ENODEV)
    local = snapshot(s, ofd.mount, ofd.path)

    def mmap(tracer, t, fd):
        return tracer.inject_syscall(t, NR_MMAP, (a[0], a[1], a[2], a[3], fd, a[5]))
    return _with_local_fd(t, local, mmap)


def sys_noop(s, t, a):
    if s32(a[0]) not in t.process.fds:
        return None
    return 0


def refuse_fd(err):
    def handler(s, t, a):
        if s32(a[0]) not in t.process.fds:
            return None
        raise GuestError(err)
    return handler


def refuse_path(err, dirfd: bool = False, path_arg_index: int | None = None, path_arg=None):
    """A path call refused with `err` on a mount (local paths run untouched)."""
    index = path_arg if path_arg is not None else (1 if dirfd else 0)

    def handler(s, t, a):
        d = s32(a[0]) if dirfd else AT_FDCWD
        if resolve(s, t, d, t.read_cstring(a[index]), empty_ok=dirfd) is None:
            return None
        raise GuestError(err)
    return handler


# ---------------------------------------------------------------- data

def _readable(ofd):
    if ofd.flags & O_PATH or ofd.flags & O_ACCMODE == O_WRONLY:
        raise GuestError(E.EBADF)
    if ofd.is_dir:
        raise GuestError(E.EISDIR)


def _writable(ofd):
    if ofd.flags & O_PATH or ofd.flags & O_ACCMODE not in (O_WRONLY, O_RDWR):
        raise GuestError(E.EBADF)


# Bytes per data frame; the pieces of one call travel pipelined. Each frame
# costs ~0.1 ms of gRPC on both sides, more than pipelining smaller pieces
# saves: a 1 MiB write took ~0.85 ms as one frame, ~1.05 ms as two.
PIECE = 1024 * 1024
BATCH = 8            # frames in flight per exchange (8 MiB)


def _client(s, mount):
    try:
        return s.storage(mount)
    except ComponentError as e:
        s.component_failed(e)
        raise GuestError(E.EIO) from None


def _exchange(s, mount, client, frames, kind):
    try:
        return client.exchange(frames, kind)
    except ComponentError as e:
        s.component_failed(e)
        raise GuestError(E.EIO) from None


def _wire_path(ofd) -> bytes:
    return ofd.path.encode("utf-8", "surrogateescape")


AHEAD_MAX = 4 << 20  # read-ahead of a sequential reader: at most one read's size, 4 MiB


def _read_frames(s, ofd, offset: int, count: int):
    """Yield (reply, count) for the file's bytes from offset, batch by batch,
    until count bytes, end of file or an error (raised if nothing was read).
    A read-ahead waiting at this offset is used first."""
    client = _client(s, ofd.mount)
    done = 0
    ahead, ofd.ahead = ofd.ahead, None
    if ahead is not None:
        a_offset, sizes, ids = ahead
        if a_offset != offset:
            client.forget(ids)
        else:
            replies = _collect(s, client, ids)
            for i, (reply, want) in enumerate(zip(replies, sizes)):
                _, err, got, _ = wire.REP.unpack_from(reply)
                if err:
                    if done == 0:
                        break  # ask again below: the error may be gone
                    return
                got = min(got, count - done)
                yield reply, got
                done += got
                if done >= count:
                    return
                if got < want:
                    return  # end of file
    path = _wire_path(ofd)
    REQ, REP = wire.REQ, wire.REP
    while done < count:
        sizes = _pieces(count - done)
        first = client.new_ids(len(sizes))
        frames, off = [], offset + done
        for i, n in enumerate(sizes):
            frames.append(REQ.pack(first + i, wire.READ, len(path), n, off) + path)
            off += n
        for reply, want in zip(_exchange(s, ofd.mount, client, frames, "data_read"), sizes):
            _, err, got, _ = REP.unpack_from(reply)
            if err:
                if done == 0:
                    raise GuestError(err)
                return
            yield reply, got
            done += got
            if got < want:
                return


def _pieces(count: int) -> list:
    sizes = []
    while count and len(sizes) < BATCH:
        sizes.append(min(PIECE, count))
        count -= sizes[-1]
    return sizes


def _collect(s, client, ids):
    try:
        return client.collect(ids)
    except ComponentError as e:
        s.component_failed(e)
        raise GuestError(E.EIO) from None


def _read_ahead(s, ofd, offset: int, count: int) -> None:
    """A sequential reader will want the next `count` bytes: ask for them now,
    so the server reads and sends them while the guest works."""
    count = min(count, AHEAD_MAX)
    client = _client(s, ofd.mount)
    path = _wire_path(ofd)
    sizes = _pieces(count)
    first = client.new_ids(len(sizes))
    frames, off = [], offset
    for i, n in enumerate(sizes):
        frames.append(wire.REQ.pack(first + i, wire.READ, len(path), n, off) + path)
        off += n
    try:
        ids = client.submit(frames, "data_read_ahead")
    except ComponentError as e:
        s.component_failed(e)
        return
    ofd.ahead = (offset, sizes, ids)


def _read_to(s, t, ofd, buf: int, count: int, offset: int) -> int:
    """read(2) into guest memory: short at end of file or at a bad page."""
    done = 0
    count = min(count, MAX_IO)
    for reply, got in _read_frames(s, ofd, offset, count):
        if not got:
            break
        n = t.write_slice(buf + done, reply, wire.REP.size, got) if done == 0 else \
            _try_slice(t, buf + done, reply, got)
        done += n
        if n < got:
            break
    if done == count and count and offset == ofd.seq_next:
        _read_ahead(s, ofd, offset + done, count)
    ofd.seq_next = offset + done
    return done


def _try_slice(t, addr, reply, got):
    try:
        return t.write_slice(addr, reply, wire.REP.size, got)
    except GuestError:
        return 0


def _pull(s, ofd, offset: int, count: int) -> bytes:
    """Up to count bytes at offset (short at end of file)."""
    return b"".join(reply[wire.REP.size:wire.REP.size + got]
                    for reply, got in _read_frames(s, ofd, offset, min(count, MAX_IO)))


def _send_writes(s, ofd, frames, sizes, at) -> tuple:
    client = _client(s, ofd.mount)
    s.invalidate_ahead(ofd.mount, ofd.path)
    done, where = 0, at
    for i, reply in enumerate(_exchange(s, ofd.mount, client, frames, "data_write")):
        _, err, got, landed = wire.REP.unpack_from(reply)
        if err:
            if done == 0:
                raise GuestError(err)
            break
        if i == 0:
            where = landed
        done += got
        if got < sizes[i]:
            break
    return done, where


def _write_from(s, t, ofd, buf: int, count: int, offset: int | None) -> tuple:
    """write(2) from guest memory at offset (None: append atomically).

    Returns (count written, offset where it landed). Short at a bad page;
    EFAULT when not even the first byte is readable.
    """
    count = min(count, MAX_IO)
    client = _client(s, ofd.mount)
    path = _wire_path(ofd)
    REQ = wire.REQ
    append = offset is None
    piece = min(count, wire.MAX_FRAME_DATA) if append else PIECE
    total, landed = 0, offset
    while True:
        frames, sizes = [], []
        short = False
        while total + sum(sizes) < count and len(frames) < BATCH:
            pos = total + sum(sizes)
            want = min(piece, count - pos)
            first = client.new_ids(1)
            op = wire.APPEND if append else wire.WRITE
            where = 0 if append else offset + pos
            head = REQ.pack(first, op, len(path), want, where) + path
            frame = t.read_frame(buf + pos, want, head)
            got = len(frame) - len(head)
            if got == 0:
                short = True
                break
            if got < want:  # a bad page: write what precedes it
                frame = REQ.pack(first, op, len(path), got, where) + path + frame[len(head):]
                short = True
            frames.append(frame)
            sizes.append(got)
            if short or append:
                break
        if not frames:
            if total == 0 and count:
                raise GuestError(E.EFAULT)
            return total, landed
        done, where = _send_writes(s, ofd, frames, sizes, landed)
        if total == 0:
            landed = where
        total += done
        if short or append or done < sum(sizes) or total >= count:
            return total, landed


def _push(s, ofd, offset: int | None, data: bytes) -> tuple:
    """Write data (bytes held by legorun) at offset, or append; (count, offset)."""
    client = _client(s, ofd.mount)
    path = _wire_path(ofd)
    append = offset is None
    op = wire.APPEND if append else wire.WRITE
    total, landed = 0, offset
    step = wire.MAX_FRAME_DATA if append else PIECE
    mv = memoryview(data)
    pieces = [(i, mv[i:i + step]) for i in range(0, len(data), step)] or [(0, mv)]
    for b in range(0, len(pieces), BATCH):
        batch = pieces[b:b + BATCH]
        first = client.new_ids(len(batch))
        frames = [wire.REQ.pack(first + j, op, len(path), len(p), 0 if append else offset + i)
                  + path + bytes(p) for j, (i, p) in enumerate(batch)]
        done, where = _send_writes(s, ofd, frames, [len(p) for _, p in batch], landed)
        if total == 0:
            landed = where
        total += done
        if done < sum(len(p) for _, p in batch):
            break
    return total, landed


def sys_read(s, t, a):
    ofd = t.process.fds.get(s32(a[0]))
    if ofd is None:
        return None
    _readable(ofd)
    n = _read_to(s, t, ofd, a[1], a[2], ofd.offset)
    ofd.offset += n
    return n


def sys_pread64(s, t, a):
    ofd = t.process.fds.get(s32(a[0]))
    if ofd is None:
        return None
    _readable(ofd)
    if s64(a[3]) < 0:
        raise GuestError(E.EINVAL)
    return _read_to(s, t, ofd, a[1], a[2], a[3])


def sys_write(s, t, a):
    ofd = t.process.fds.get(s32(a[0]))
    if ofd is None:
        return None
    _writable(ofd)
    if ofd.flags & O_APPEND:
        n, at = _write_from(s, t, ofd, a[1], a[2], None)
        ofd.offset = at + n
        return n
    n, _ = _write_from(s, t, ofd, a[1], a[2], ofd.offset)
    ofd.offset += n
    return n


def sys_pwrite64(s, t, a):
    ofd = t.process.fds.get(s32(a[0]))
    if ofd is None:
        return None
    _writable(ofd)
    if s64(a[3]) < 0:
        raise GuestError(E.EINVAL)
    # Linux appends even for pwrite on an O_APPEND file
    return _write_from(s, t, ofd, a[1], a[2], None if ofd.flags & O_APPEND else a[3])[0]


def _iovecs(t, addr: int, count: int) -> list:
    count = s32(count)
    if count < 0 or count > IOV_MAX:
        raise GuestError(E.EINVAL)
    if count == 0:
        return []
    raw = t.read_bytes(addr, 16 * count)
    vecs = [struct.unpack_from("<QQ", raw, 16 * i) for i in range(count)]
    if sum(n for _, n in vecs) > 0x7FFFFFFFFFFFFFFF:
        raise GuestError(E.EINVAL)
    return vecs


def _readv(s, t, ofd, vecs, offset: int) -> int:
    total = sum(n for _, n in vecs)
    data = _pull(s, ofd, offset, total)
    done = 0
    for base, n in vecs:
        piece = data[done:done + n]
        if not piece:
            break
        wrote = t.write_bytes(base, piece) if done == 0 else _try_write(t, base, piece)
        done += wrote
        if wrote < len(piece):
            break
    return done


def _try_write(t, base, piece):
    try:
        return t.write_bytes(base, piece)
    except GuestError:
        return 0


def _gather(t, vecs) -> bytes:
    out = []
    for i, (base, n) in enumerate(vecs):
        try:
            piece = t.read_prefix(base, n) if n else b""
        except GuestError:
            if i == 0 or not out:
                raise
            break
        out.append(piece)
        if len(piece) < n:
            break
    data = b"".join(out)
    if not data and sum(n for _, n in vecs):
        raise GuestError(E.EFAULT)
    return data


def _writev(s, t, ofd, vecs, offset) -> int:
    data = _gather(t, vecs)
    if not data:
        return 0
    n, at = _push(s, ofd, offset, data)
    if offset is None:
        ofd.offset = at + n
    return n


def sys_readv(s, t, a):
    ofd = t.process.fds.get(s32(a[0]))
    if ofd is None:
        return None
    _readable(ofd)
    n = _readv(s, t, ofd, _iovecs(t, a[1], a[2]), ofd.offset)
    ofd.offset += n
    return n


def sys_writev(s, t, a):
    ofd = t.process.fds.get(s32(a[0]))
    if ofd is None:
        return None
    _writable(ofd)
    vecs = _iovecs(t, a[1], a[2])
    if ofd.flags & O_APPEND:
        return _writev(s, t, ofd, vecs, None)
    n = _writev(s, t, ofd, vecs, ofd.offset)
    ofd.offset += n
    return n


def sys_preadv(s, t, a):
    ofd = t.process.fds.get(s32(a[0]))
    if ofd is None:
        return None
    _readable(ofd)
    offset = s64(a[3])
    if offset == -1:  # preadv2 with -1 uses the file offset
        n = _readv(s, t, ofd, _iovecs(t, a[1], a[2]), ofd.offset)
        ofd.offset += n
        return n
    if offset < 0:
        raise GuestError(E.EINVAL)
    return _readv(s, t, ofd, _iovecs(t, a[1], a[2]), offset)


sys_preadv2 = sys_preadv
RWF_APPEND = 0x10


def sys_pwritev(s, t, a):
    ofd = t.process.fds.get(s32(a[0]))
    if ofd is None:
        return None
    _writable(ofd)
    offset = s64(a[3])
    vecs = _iovecs(t, a[1], a[2])
    if ofd.flags & O_APPEND:
        return _writev(s, t, ofd, vecs, None)
    if offset == -1:
        n = _writev(s, t, ofd, vecs, ofd.offset)
        ofd.offset += n
        return n
    if offset < 0:
        raise GuestError(E.EINVAL)
    return _writev(s, t, ofd, vecs, offset)


def sys_pwritev2(s, t, a):
    ofd = t.process.fds.get(s32(a[0]))
    if ofd is None:
        return None
    if s32(a[5]) & RWF_APPEND:
        _writable(ofd)
        return _writev(s, t, ofd, _iovecs(t, a[1], a[2]), None)
    return sys_pwritev(s, t, a)


def sys_lseek(s, t, a):
    ofd = t.process.fds.get(s32(a[0]))
    if ofd is None:
        return None
    offset, whence = s64(a[1]), s32(a[2])
    if ofd.is_dir:
        if whence == SEEK_SET and offset == 0:
            ofd.dir_after, ofd.dir_pos, ofd.dir_end = "", 0, False
            return 0
        if whence == SEEK_CUR and offset == 0:
            return ofd.dir_pos
        raise GuestError(E.EINVAL)
    if whence == SEEK_SET:
        new = offset
    elif whence == SEEK_CUR:
        new = ofd.offset + offset
    elif whence in (SEEK_END, SEEK_DATA, SEEK_HOLE):
        size = remote_stat(s, ofd.mount, ofd.path).size
        if whence == SEEK_END:
            new = size + offset
        elif offset < 0 or offset >= size:
            raise GuestError(E.ENXIO)
        else:
            new = offset if whence == SEEK_DATA else size
    else:
        raise GuestError(E.EINVAL)
    if new < 0:
        raise GuestError(E.EINVAL)
    ofd.offset = new
    return new


def _copy_between(s, src, src_off, dst, dst_off, count):
    data = _pull(s, src, src_off, count)
    if not data:
        return 0
    n, _ = _push(s, dst, dst_off, data)
    return n


BOUNCE = 16 * 1024  # bytes a remote<->local copy moves per call (callers loop)
NR_WRITE, NR_READ, NR_PREAD64 = NR["write"], NR["read"], NR["pread64"]


def _to_local(s, t, src, offset: int, out_fd: int, count: int, advance):
    """Copy from a remote file into a local fd (a socket, a pipe, a file): the
    guest's call becomes write(out_fd, bytes legorun put on its stack)."""
    data = _pull(s, src, offset, min(count, BOUNCE))
    if not data:
        return 0
    addr = t.scratch(len(data), below=4096)
    try:
        t.poke(addr, data)
    except OSError:
        raise GuestError(E.EINVAL) from None

    def finish(tracer, t, result):
        if result > 0:
            advance(result)
        return result
    return Rewrite(NR_WRITE, (out_fd, addr, len(data)), finish)


def _from_local(s, t, in_fd: int, offset, dst, dst_offset, count: int, advance):
    """Copy from a local fd into a remote file: the guest's call becomes a
    read (or pread at `offset`) into its stack, which legorun then writes."""
    n = min(count, BOUNCE)
    addr = t.scratch(n, below=4096)
    if offset is None:
        call = (NR_READ, (in_fd, addr, n))
    else:
        call = (NR_PREAD64, (in_fd, addr, n, offset))

    def finish(tracer, t, result):
        if result <= 0:
            return result
        written, _ = _push(s, dst, dst_offset, t.read_bytes(addr, result))
        advance(written)
        return written
    return Rewrite(call[0], call[1], finish)


def _advance_dst(dst, n):
    if not dst.flags & O_APPEND:
        dst.offset += n


def sys_sendfile(s, t, a):
    """sendfile(out_fd, in_fd, *offset, count) with either side remote."""
    fds = t.process.fds
    out_fd, in_fd = s32(a[0]), s32(a[1])
    dst, src = fds.get(out_fd), fds.get(in_fd)
    if dst is None and src is None:
        return None
    if src is not None:
        _readable(src)
    if dst is not None:
        _writable(dst)
    off = struct.unpack("<q", t.read_bytes(a[2], 8))[0] if a[2] else None
    if off is not None and off < 0:
        raise GuestError(E.EINVAL)

    def moved(n):
        if a[2]:
            t.write_bytes(a[2], struct.pack("<q", off + n))
        elif src is not None:
            src.offset += n
        if dst is not None:
            _advance_dst(dst, n)
    dst_at = None if dst is None or dst.flags & O_APPEND else dst.offset
    if src is not None and dst is not None:
        n = _copy_between(s, src, src.offset if off is None else off, dst, dst_at, a[3])
        moved(n)
        return n
    if src is not None:  # remote file -> local fd
        return _to_local(s, t, src, src.offset if off is None else off, out_fd, a[3],
                         lambda n: moved(n) if a[2] else setattr(src, "offset", src.offset + n))
    return _from_local(s, t, in_fd, off, dst, dst_at, a[3], moved)


def sys_copy_file_range(s, t, a):
    fds = t.process.fds
    src, dst = fds.get(s32(a[0])), fds.get(s32(a[2]))
    if src is None and dst is None:
        return None
    if src is None or dst is None:
        raise GuestError(E.EXDEV)
    _readable(src)
    _writable(dst)
    if dst.flags & O_APPEND:
        raise GuestError(E.EBADF)
    src_off = struct.unpack("<q", t.read_bytes(a[1], 8))[0] if a[1] else src.offset
    dst_off = struct.unpack("<q", t.read_bytes(a[3], 8))[0] if a[3] else dst.offset
    n = _copy_between(s, src, src_off, dst, dst_off, a[4])
    if a[1]:
        t.write_bytes(a[1], struct.pack("<q", src_off + n))
    else:
        src.offset += n
    if a[3]:
        t.write_bytes(a[3], struct.pack("<q", dst_off + n))
    else:
        dst.offset += n
    return n


def sys_splice(s, t, a):
    """splice(in, *off_in, out, *off_out, len, flags) between a pipe and a remote file."""
    fds = t.process.fds
    in_fd, out_fd = s32(a[0]), s32(a[2])
    src, dst = fds.get(in_fd), fds.get(out_fd)
    if src is None and dst is None:
        return None
    if src is not None and dst is not None:
        raise GuestError(E.EINVAL)  # one end is always a pipe
    if src is not None:
        _readable(src)
        off = struct.unpack("<q", t.read_bytes(a[1], 8))[0] if a[1] else src.offset

        def advanced(n):
            if a[1]:
                t.write_bytes(a[1], struct.pack("<q", off + n))
            else:
                src.offset += n
        return _to_local(s, t, src, off, out_fd, a[4], advanced)
    _writable(dst)
    off = struct.unpack("<q", t.read_bytes(a[3], 8))[0] if a[3] else None
    at = None if dst.flags & O_APPEND else (off if off is not None else dst.offset)

    def advanced_out(n):
        if a[3]:
            t.write_bytes(a[3], struct.pack("<q", off + n))
        else:
            _advance_dst(dst, n)
    return _from_local(s, t, in_fd, None, dst, at, a[4], advanced_out)


def sys_tee(s, t, a):
    fds = t.process.fds
    if s32(a[0]) in fds or s32(a[1]) in fds:
        raise GuestError(E.EINVAL)  # tee joins two pipes
    return None


def sys_fsync(s, t, a):
    ofd = t.process.fds.get(s32(a[0]))
    if ofd is None:
        return None
    rpc(s, ofd.mount, fsync=pb.Fsync(path=ofd.path, data_only=False))
    return 0


def sys_fdatasync(s, t, a):
    ofd = t.process.fds.get(s32(a[0]))
    if ofd is None:
        return None
    rpc(s, ofd.mount, fsync=pb.Fsync(path=ofd.path, data_only=True))
    return 0


def sys_ftruncate(s, t, a):
    ofd = t.process.fds.get(s32(a[0]))
    if ofd is None:
        return None
    length = s64(a[1])
    if length < 0:
        raise GuestError(E.EINVAL)
    if ofd.is_dir or ofd.flags & O_ACCMODE == 0:
        raise GuestError(E.EINVAL if ofd.is_dir else E.EINVAL)
    s.invalidate_ahead(ofd.mount, ofd.path)
    rpc(s, ofd.mount, truncate=pb.Truncate(path=ofd.path, length=length))
    return 0


def sys_fallocate(s, t, a):
    ofd = t.process.fds.get(s32(a[0]))
    if ofd is None:
        return None
    _writable(ofd)
    offset, length = s64(a[2]), s64(a[3])
    if offset < 0 or length <= 0:
        raise GuestError(E.EINVAL)
    s.invalidate_ahead(ofd.mount, ofd.path)
    rpc(s, ofd.mount, fallocate=pb.Fallocate(path=ofd.path, mode=s32(a[1]), offset=offset, length=length))
    return 0


# ---------------------------------------------------------------- directories

DIRENT64_HEAD = struct.Struct("<QqHB")
DT_DIR = 4


def _dir_records(s, ofd, count: int, pack):
    """Fill up to `count` bytes of records, resuming after ofd.dir_after."""
    out = bytearray()
    if ofd.dir_pos < 2:  # '.' and '..' come first, as on most file systems
        for name in (".", "..")[ofd.dir_pos:]:
            rec = pack(ofd.ino, ofd.dir_pos + 1, DT_DIR, name.encode())
            if len(out) + len(rec) > count:
                return out
            out += rec
            ofd.dir_pos += 1
    while not ofd.dir_end:
        reply = rpc(s, ofd.mount, readdir=pb.Readdir(path=ofd.path, after=ofd.dir_after,
                                                      max_entries=max(8, count // 24)))
        batch = reply.entries
        for entry in batch.entries:
            if not ofd.path and entry.name == ATTIC:  # legorun's own, not the guest's
                ofd.dir_after = entry.name
                continue
            rec = pack(entry.ino, ofd.dir_pos + 1, entry.type, os.fsencode(wire.from_wire(entry.name)))
            if len(out) + len(rec) > count:
                return out
            out += rec
            ofd.dir_pos += 1
            ofd.dir_after = entry.name
        if batch.end or not batch.entries:
            ofd.dir_end = True
    return out


def _pack_dirent64(ino, off, dtype, name: bytes) -> bytes:
    reclen = (DIRENT64_HEAD.size + len(name) + 1 + 7) & ~7
    return DIRENT64_HEAD.pack(ino, off, reclen, dtype) + name + bytes(reclen - DIRENT64_HEAD.size - len(name))


def _pack_dirent(ino, off, dtype, name: bytes) -> bytes:
    # struct linux_dirent: u64 ino, s64 off, u16 reclen, name, NUL, pad, type in the last byte
    reclen = (18 + len(name) + 2 + 7) & ~7
    body = struct.pack("<QqH", ino, off, reclen) + name
    return body + bytes(reclen - len(body) - 1) + bytes([dtype])


def _getdents(s, t, a, pack):
    ofd = t.process.fds.get(s32(a[0]))
    if ofd is None:
        return None
    if not ofd.is_dir:
        raise GuestError(E.ENOTDIR)
    count = a[2] & 0xFFFFFFFF
    state = (ofd.dir_after, ofd.dir_pos, ofd.dir_end)
    out = _dir_records(s, ofd, count, pack)
    if not out and not ofd.dir_end:
        raise GuestError(E.EINVAL)  # the buffer cannot hold the next record
    try:
        t.write_bytes(a[1], bytes(out))
    except GuestError:
        ofd.dir_after, ofd.dir_pos, ofd.dir_end = state
        raise
    return len(out)


def sys_getdents64(s, t, a):
    return _getdents(s, t, a, _pack_dirent64)


def sys_getdents(s, t, a):
    return _getdents(s, t, a, _pack_dirent)


def sys_mkdir(s, t, a):
    target = path_arg(s, t, AT_FDCWD, a[0], follow=False)
    return None if target is None else _mkdir(s, t, target, a[1])


def sys_mkdirat(s, t, a):
    target = path_arg(s, t, s32(a[0]), a[1], follow=False)
    return None if target is None else _mkdir(s, t, target, a[2])


def _mkdir(s, t, target, mode):
    mount, rel = target
    if not rel:
        raise GuestError(E.EEXIST)
    rpc(s, mount, mkdir=pb.Mkdir(path=rel, mode=mode & 0o7777 & ~_umask(t)))
    return 0


def _rmdir(s, target):
    mount, rel = target
    if not rel:
        raise GuestError(E.EBUSY)
    rpc(s, mount, rmdir=pb.Rmdir(path=rel))
    return 0


def sys_rmdir(s, t, a):
    target = path_arg(s, t, AT_FDCWD, a[0], follow=False)
    return None if target is None else _rmdir(s, target)


def _unlink(s, target):
    mount, rel = target
    if not rel:
        raise GuestError(E.EISDIR)
    if s.is_open(mount, rel):
        s.silly_rename(mount, rel)
        return 0
    rpc(s, mount, unlink=pb.Unlink(path=rel))
    return 0


def sys_unlink(s, t, a):
    target = path_arg(s, t, AT_FDCWD, a[0], follow=False)
    return None if target is None else _unlink(s, target)


def sys_unlinkat(s, t, a):
    target = path_arg(s, t, s32(a[0]), a[1], follow=False)
    if target is None:
        return None
    return _rmdir(s, target) if s32(a[2]) & AT_REMOVEDIR else _unlink(s, target)


def _two_paths(s, t, d1, p1, d2, p2, follow_src=False):
    src = path_arg(s, t, d1, p1, follow=follow_src)
    dst = path_arg(s, t, d2, p2, follow=False)
    if src is None and dst is None:
        return None
    if src is None or dst is None or src[0] is not dst[0]:
        raise GuestError(E.EXDEV)
    return src, dst


def _rename(s, t, d1, p1, d2, p2, flags=0):
    pair = _two_paths(s, t, d1, p1, d2, p2)
    if pair is None:
        return None
    (mount, old), (_, new) = pair
    if not old or not new:
        raise GuestError(E.EBUSY)
    if s.is_open(mount, new) and not flags & 2:  # the replaced file stays readable by its fds
        s.silly_rename(mount, new)
    try:
        rpc(s, mount, rename=pb.Rename(old_path=old, new_path=new, flags=flags))
    except Redirected:  # through a symlink off the mount: another file system
        raise GuestError(E.EXDEV) from None
    s.renamed(mount, old, new, exchange=bool(flags & 2))
    return 0


def sys_rename(s, t, a):
    return _rename(s, t, AT_FDCWD, a[0], AT_FDCWD, a[1])


def sys_renameat(s, t, a):
    return _rename(s, t, s32(a[0]), a[1], s32(a[2]), a[3])


def sys_renameat2(s, t, a):
    return _rename(s, t, s32(a[0]), a[1], s32(a[2]), a[3], s32(a[4]))


def _link(s, t, d1, p1, d2, p2, flags=0):
    pair = _two_paths(s, t, d1, p1, d2, p2, follow_src=bool(flags & AT_SYMLINK_FOLLOW))
    if pair is None:
        return None
    (mount, old), (_, new) = pair
    try:
        rpc(s, mount, link=pb.Link(old_path=old, new_path=new))
    except Redirected:
        raise GuestError(E.EXDEV) from None
    return 0


def sys_link(s, t, a):
    return _link(s, t, AT_FDCWD, a[0], AT_FDCWD, a[1])


def sys_linkat(s, t, a):
    return _link(s, t, s32(a[0]), a[1], s32(a[2]), a[3], s32(a[4]))


def _symlink(s, t, target_addr, dirfd, path_addr):
    where = path_arg(s, t, dirfd, path_addr, follow=False)
    if where is None:
        return None
    target = wire.to_wire(os.fsdecode(t.read_cstring(target_addr)))
    if not target:
        raise GuestError(E.ENOENT)
    mount, rel = where
    rpc(s, mount, symlink=pb.Symlink(target=target, path=rel))
    return 0


def sys_symlink(s, t, a):
    return _symlink(s, t, a[0], AT_FDCWD, a[1])


def sys_symlinkat(s, t, a):
    return _symlink(s, t, a[0], s32(a[1]), a[2])


# ---------------------------------------------------------------- the cwd

def _enter(s, t, target):
    mount, rel = target
    attr = remote_stat(s, mount, rel)
    if not S.S_ISDIR(attr.mode):
        raise GuestError(E.ENOTDIR)
    fs = t.process.fs
    fs.remote_cwd = (mount, rel.rstrip("/"))
    return 0


def sys_chdir(s, t, a):
    target = path_arg(s, t, AT_FDCWD, a[0])
    if target is not None:
        return _enter(s, t, target)
    fs = t.process.fs
    if fs.remote_cwd is None:
        def finish(tracer, t, result):
            if result == 0:
                fs.cwd = None  # re-read when next needed
            return result
        return Rewrite(NR["chdir"], a, finish)
    # leaving a mount: the kernel's own cwd never moved, so give it the full path
    path = os.fsdecode(t.read_cstring(a[0]))
    mount, base = fs.remote_cwd
    local = path if path.startswith("/") else normalize(mount.guest_name(base) + "/" + path)
    addr = t.scratch(len(local) + 1)

    def finish(tracer, t, result):
        if result == 0:
            fs.remote_cwd, fs.cwd = None, None
        return result
    return Rewrite(NR["chdir"], (addr,), finish, pokes=((addr, os.fsencode(local) + b"\0"),))


def sys_fchdir(s, t, a):
    fd = s32(a[0])
    ofd = t.process.fds.get(fd)
    fs = t.process.fs
    if ofd is None:
        def finish(tracer, t, result):
            if result == 0:
                fs.remote_cwd, fs.cwd = None, None
            return result
        return Rewrite(NR["fchdir"], a, finish)
    if not ofd.is_dir:
        raise GuestError(E.ENOTDIR)
    fs.remote_cwd = (ofd.mount, ofd.path)
    return 0


def sys_getcwd(s, t, a):
    fs = t.process.fs
    if fs.remote_cwd is None:
        return None
    mount, rel = fs.remote_cwd
    path = os.fsencode(mount.guest_name(rel)) + b"\0"
    if (a[1] & 0xFFFFFFFFFFFFFFFF) < len(path):
        raise GuestError(E.ERANGE)
    t.write_bytes(a[0], path)
    return len(path)


def sys_umask(s, t, a):
    t.process.fs.umask = a[0] & 0o777
    return None
