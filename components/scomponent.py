"""The sComponent: serves the files of one directory over gRPC (service Storage).

Stateless in the style of NFS v2 and LegoOS: every request names its file by
path (relative to --root) and data by absolute offset; the server opens,
acts and closes, and keeps no per-client state. No open-file cache either:
openat2 + close of a data frame's file cost ~5 us here, against ~300 us for
pwrite of 1 MiB into fresh tmpfs pages and ~0.4 ms of gRPC, so a cache would
buy <1% of a write for the invalidation rules renames, unlinks and
replacements would need.

Confinement: every path is resolved by openat2(2) with RESOLVE_IN_ROOT
against an O_PATH descriptor of the root, so '..' and symlinks (absolute or
relative, and renames racing with the lookup) resolve as if the root were
'/'. Operations then act on the resolved descriptor (fstat, fchownat with
AT_EMPTY_PATH, ...) or, for operations on a name (mkdir, unlink, rename,
...), on a single final component inside a parent directory resolved the
same way. No path string is ever handed to the kernel relative to '/'.
"""
from __future__ import annotations

import argparse
import bisect
import ctypes
import errno
import logging
import os
import stat
import sys
import threading
import time
from collections import Counter
from contextlib import contextmanager
from typing import Callable, Iterator

from legorun.grpc_transport import import_grpc, keep_frame_memory

grpc = import_grpc()  # before anything else loads it: see legorun/grpc_transport.py

from legorun import wire  # noqa: E402
from legorun.proto import storage_pb2 as pb  # noqa: E402
from legorun.proto import storage_pb2_grpc as pb_grpc  # noqa: E402

try:
    from . import common, locks
except ImportError:  # run as a file, not as legorun_components.scomponent
    import legorun_components.common as common
    import legorun_components.locks as locks

log = logging.getLogger("legorun.scomponent")

NAME = "scomponent"

# Kernel ABI constants, named as in the kernel headers (x86_64).
SYS_openat2 = 437
SYS_faccessat2 = 439
SYS_fchmodat2 = 452
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_BENEATH = 0x08
RESOLVE_IN_ROOT = 0x10
AT_SYMLINK_NOFOLLOW = 0x100
AT_EACCESS = 0x200
AT_EMPTY_PATH = 0x1000
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2
O_TMPFILE = 0o20000000 | os.O_DIRECTORY
O_LARGEFILE = 0o100000
O_PATH_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
DT_FIFO, DT_CHR, DT_DIR, DT_BLK, DT_REG, DT_LNK, DT_SOCK = 1, 2, 4, 6, 8, 10, 12

# Open flags a client may ask for; others (O_ASYNC, O_TMPFILE ...) make no
# sense for an open-then-close and are dropped or refused.
OPEN_FLAGS_ALLOWED = (
    os.O_ACCMODE | os.O_CREAT | os.O_EXCL | os.O_TRUNC | os.O_DIRECTORY | os.O_NOFOLLOW
    | os.O_APPEND | os.O_PATH | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC | O_LARGEFILE
    | os.O_SYNC | os.O_DSYNC | os.O_NOATIME)
# Every open by the server itself: never block on a FIFO, never acquire a tty.
SERVER_OPEN = os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK

READDIR_MAX = 4096
MAX_LENGTH = common.MAX_PAYLOAD

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.fchownat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_int]
_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Statfs(ctypes.Structure):
    _fields_ = [
        ("f_type", ctypes.c_long), ("f_bsize", ctypes.c_long),
        ("f_blocks", ctypes.c_uint64), ("f_bfree", ctypes.c_uint64), ("f_bavail", ctypes.c_uint64),
        ("f_files", ctypes.c_uint64), ("f_ffree", ctypes.c_uint64),
        ("f_fsid", ctypes.c_int * 2), ("f_namelen", ctypes.c_long), ("f_frsize", ctypes.c_long),
        ("f_flags", ctypes.c_long), ("f_spare", ctypes.c_long * 4),
    ]


_libc.utimensat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.POINTER(_Timespec), ctypes.c_int]
_libc.fstatfs.argtypes = [ctypes.c_int, ctypes.POINTER(_Statfs)]


def _check(result: int, what: str = "") -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), what)
    return result


class Redirected(OSError):
    """The path leaves the root through a symlink (see Redirect in the proto)."""

    def __init__(self, link_dir: str, target: str, rest: str):
        super().__init__(errno.EXDEV, "path leaves the served root through a symlink")
        self.link_dir, self.target, self.rest = link_dir, target, rest


MAX_SYMLINKS = 40


class ConfinedRoot:
    """A directory that paths can never leave.

    Resolution is openat2(RESOLVE_BENEATH): a symlink whose target leaves the
    root (absolute, or '..' past it) is never followed here; the request is
    answered with a redirect instead, so the client can follow it in its own
    view of the file system (where an absolute target may be another place on
    the same mount, or a local file).
    """

    def __init__(self, path: str):
        self.path = os.path.realpath(path)
        self.fd = os.open(self.path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)

    def open(self, path: str, flags: int, mode: int = 0) -> int:
        """openat2(root, path, flags, mode, RESOLVE_BENEATH); "" is the root.
        `path` is wire text (legorun.wire). The caller closes the returned fd."""
        path = wire.from_wire(path)
        how = _OpenHow(flags, mode, RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)
        if path.startswith("/"):
            path = path.lstrip("/")  # relative to the root, always
        raw = os.fsencode(path or ".")
        for _ in range(16):
            fd = _libc.syscall(SYS_openat2, self.fd, raw, ctypes.byref(how), ctypes.sizeof(how))
            if fd >= 0:
                return fd
            err = ctypes.get_errno()
            # EAGAIN: a rename raced with a '..' lookup; the kernel asks to retry.
            if err == errno.EXDEV:
                self.redirect(path, follow_last=not flags & os.O_NOFOLLOW)
            if err != errno.EAGAIN:
                raise OSError(err, os.strerror(err), path)
        raise OSError(errno.EAGAIN, os.strerror(errno.EAGAIN), path)

    def redirect(self, path: str, follow_last: bool) -> None:
        """The kernel refused `path` with EXDEV: find the symlink that leaves the
        root and raise Redirected for it (or ELOOP / the plain error)."""
        trailing = path.endswith("/")
        parts = [p for p in path.split("/") if p not in ("", ".")]
        hops = 0
        i = 0
        prefix: list = []
        while i < len(parts):
            comp = parts[i]
            if comp == "..":
                if not prefix:  # '..' past the root in the request itself
                    raise Redirected("", "..", "/".join(parts[i + 1:]) + ("/" if trailing else ""))
                prefix.pop()
                i += 1
                continue
            last = i == len(parts) - 1
            if last and not follow_last and not trailing:
                break
            try:
                with self.fd_of("/".join(prefix) or ".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC) as d:
                    target = os.readlink(comp, dir_fd=d)
            except OSError as e:
                if e.errno == errno.EINVAL:  # not a symlink
                    prefix.append(comp)
                    i += 1
                    continue
                raise
            hops += 1
            if hops > MAX_SYMLINKS:
                raise _oserror(errno.ELOOP, path)
            rest = parts[i + 1:]
            inside = [] if target.startswith("/") else list(prefix)
            escapes = target.startswith("/")
            for t in target.split("/"):
                if t in ("", "."):
                    continue
                if t == "..":
                    if not inside:
                        escapes = True
                        break
                    inside.pop()
                else:
                    inside.append(t)
            if escapes:
                raise Redirected("/".join(prefix), target, "/".join(rest) + ("/" if trailing else ""))
            parts = inside + rest  # a symlink that stays inside: keep walking
            prefix, i = [], 0
        raise _oserror(errno.EXDEV, path)

    @contextmanager
    def fd_of(self, path: str, flags: int, mode: int = 0) -> Iterator[int]:
        fd = self.open(path, flags, mode)
        try:
            yield fd
        finally:
            os.close(fd)

    @contextmanager
    def parent_of(self, path: str) -> Iterator[tuple[int, str]]:
        """(fd of the confined parent directory, final component).

        The final component keeps a trailing '/' (its meaning is the
        kernel's). It may be "", "." or ".." (see _plain_name): callers
        must not hand those to a *at call, which would resolve them
        relative to the parent without confinement.
        """
        path = wire.from_wire(path)
        stripped = path.rstrip("/")
        head, _, name = stripped.rpartition("/")
        if path.endswith("/") and name:
            name += "/"
        if not head and not stripped.startswith("/"):
            yield self.fd, name
            return
        with self.fd_of(head or "/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC) as fd:
            yield fd, name


def _plain_name(name: str) -> bool:
    """False for names that denote a directory itself rather than an entry."""
    return name.rstrip("/") not in ("", ".", "..")


def _oserror(err: int, path: str = "") -> OSError:
    return OSError(err, os.strerror(err), path)


def _fill_attr(attr: pb.Attr, st: os.stat_result) -> None:
    attr.ino = st.st_ino
    attr.mode = st.st_mode
    attr.nlink = st.st_nlink
    attr.uid = st.st_uid
    attr.gid = st.st_gid
    attr.size = st.st_size
    attr.blocks = st.st_blocks
    attr.blksize = st.st_blksize
    attr.rdev = st.st_rdev
    attr.atime_ns = st.st_atime_ns
    attr.mtime_ns = st.st_mtime_ns
    attr.ctime_ns = st.st_ctime_ns


def _dtype(entry: os.DirEntry) -> int:
    if entry.is_symlink():
        return DT_LNK
    if entry.is_dir(follow_symlinks=False):
        return DT_DIR
    if entry.is_file(follow_symlinks=False):
        return DT_REG
    mode = entry.stat(follow_symlinks=False).st_mode
    for test, dt in ((stat.S_ISFIFO, DT_FIFO), (stat.S_ISCHR, DT_CHR),
                     (stat.S_ISBLK, DT_BLK), (stat.S_ISSOCK, DT_SOCK)):
        if test(mode):
            return dt
    return 0


_new_bytes = ctypes.pythonapi.PyBytes_FromStringAndSize
_new_bytes.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t)
_new_bytes.restype = ctypes.py_object
_libc.pread.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int64]
_libc.pread.restype = ctypes.c_ssize_t


def read_reply(fd: int, rid: int, offset: int, length: int) -> bytes:
    """A READ reply frame, the file's bytes read straight into it (no copies
    in Python: the frame is a fresh bytes object filled by pread)."""
    size = wire.REP.size + length
    frame = _new_bytes(None, size)
    base = ctypes.cast(ctypes.c_char_p(frame), ctypes.c_void_p).value
    got = 0
    while got < length:
        n = _libc.pread(fd, base + wire.REP.size + got, length - got, offset + got)
        if n < 0:
            err = ctypes.get_errno()
            if err == errno.EINTR:
                continue
            if got:
                break
            raise OSError(err, os.strerror(err))
        if n == 0:
            break
        got += n
    ctypes.memmove(base, wire.REP.pack(rid, 0, got, offset), wire.REP.size)
    return frame if got == length else frame[:wire.REP.size + got]


def write_at(fd: int, data, offset: int, append: bool) -> tuple:
    """Write all of data (a bytes-like) at offset, or append it; returns
    (count, offset where it landed). Short only when an error follows a
    partial write, as write(2) reports it."""
    if append:
        # One write(2) on an O_APPEND fd: atomic against other appenders.
        count = os.write(fd, data)
        return count, os.lseek(fd, 0, os.SEEK_CUR) - count
    count = 0
    view = memoryview(data)
    while count < len(view):
        try:
            n = os.pwrite(fd, view[count:], offset + count)
        except OSError:
            if count:
                break
            raise
        if n == 0:
            break
        count += n
    return count, offset


class Operations:
    """One handler per Request op: handler(msg, reply) fills ``reply`` in
    place, or returns the bytes of Reply.data (read, readlink), or raises
    OSError (its errno goes to the client)."""

    def __init__(self, root: ConfinedRoot):
        self.root = root
        self.handlers: dict[str, Callable[[object, pb.Reply], bytes | None]] = {
            "stat": self.stat, "open": self.open, "read": self.read, "write": self.write,
            "readdir": self.readdir, "mkdir": self.mkdir, "unlink": self.unlink,
            "rmdir": self.rmdir, "rename": self.rename, "truncate": self.truncate,
            "fsync": self.fsync, "chmod": self.chmod, "chown": self.chown,
            "utimens": self.utimens, "symlink": self.symlink, "readlink": self.readlink,
            "link": self.link, "statfs": self.statfs, "fallocate": self.fallocate,
            "access": self.access,
        }

    def stat(self, m: pb.Stat, reply: pb.Reply) -> None:
        with self.root.fd_of(m.path, os.O_PATH | os.O_CLOEXEC | (0 if m.follow else os.O_NOFOLLOW)) as fd:
            _fill_attr(reply.attr, os.fstat(fd))

    def open(self, m: pb.Open, reply: pb.Reply) -> None:
        flags = m.flags
        if flags & O_TMPFILE == O_TMPFILE:
            raise _oserror(errno.EOPNOTSUPP, m.path)
        flags &= OPEN_FLAGS_ALLOWED
        if flags & os.O_PATH:
            flags = (flags & O_PATH_FLAGS) | os.O_CLOEXEC
        else:
            flags |= SERVER_OPEN
        mode = m.mode & 0o7777 if flags & os.O_CREAT else 0
        with self.root.fd_of(m.path, flags, mode) as fd:
            _fill_attr(reply.attr, os.fstat(fd))

    def read(self, m: pb.Read, reply: pb.Reply) -> bytes:
        with self.root.fd_of(m.path, os.O_RDONLY | SERVER_OPEN) as fd:
            return os.pread(fd, m.length, m.offset)

    def write(self, m: pb.Write, reply: pb.Reply) -> None:
        flags = os.O_WRONLY | SERVER_OPEN | (os.O_APPEND if m.append else 0)
        with self.root.fd_of(m.path, flags) as fd:
            count, offset = write_at(fd, m.data, m.offset, m.append)
        reply.written.count = count
        reply.written.offset = offset

    def readdir(self, m: pb.Readdir, reply: pb.Reply) -> None:
        limit = min(m.max_entries or READDIR_MAX, READDIR_MAX)
        with self.root.fd_of(m.path, os.O_RDONLY | os.O_DIRECTORY | SERVER_OPEN) as fd:
            with os.scandir(fd) as it:
                listing = sorted((os.fsencode(e.name), e) for e in it)
        after = os.fsencode(wire.from_wire(m.after))
        start = bisect.bisect_right(listing, after, key=lambda item: item[0]) if after else 0
        out = reply.entries
        taken = 0
        pos = start
        while pos < len(listing) and taken < limit:
            raw, entry = listing[pos]
            pos += 1
            name = wire.name_to_wire(raw)
            try:
                dtype = _dtype(entry)
            except FileNotFoundError:
                continue  # removed while we listed
            out.entries.add(name=name, ino=entry.inode(), type=dtype)
            taken += 1
        out.end = pos >= len(listing)

    def mkdir(self, m: pb.Mkdir, reply: pb.Reply) -> None:
        with self.root.parent_of(m.path) as (pfd, name):
            if not _plain_name(name):
                raise _oserror(errno.EEXIST, m.path)
            os.mkdir(name, m.mode & 0o7777, dir_fd=pfd)
            _fill_attr(reply.attr, os.stat(name, dir_fd=pfd, follow_symlinks=False))

    def unlink(self, m: pb.Unlink, reply: pb.Reply) -> None:
        with self.root.parent_of(m.path) as (pfd, name):
            if not _plain_name(name):
                raise _oserror(errno.EISDIR, m.path)
            os.unlink(name, dir_fd=pfd)

    def rmdir(self, m: pb.Rmdir, reply: pb.Reply) -> None:
        with self.root.parent_of(m.path) as (pfd, name):
            bare = name.rstrip("/")
            if bare == "":
                raise _oserror(errno.EBUSY, m.path)  # the root itself
            if bare == ".":
                raise _oserror(errno.EINVAL, m.path)
            if bare == "..":
                raise _oserror(errno.ENOTEMPTY, m.path)
            os.rmdir(name, dir_fd=pfd)

    def rename(self, m: pb.Rename, reply: pb.Reply) -> None:
        with self.root.parent_of(m.old_path) as (old_fd, old_name), \
                self.root.parent_of(m.new_path) as (new_fd, new_name):
            if not (_plain_name(old_name) and _plain_name(new_name)):
                raise _oserror(errno.EBUSY, m.old_path)
            _check(_libc.renameat2(old_fd, os.fsencode(old_name), new_fd, os.fsencode(new_name), m.flags),
                   m.old_path)

    def truncate(self, m: pb.Truncate, reply: pb.Reply) -> None:
        with self.root.fd_of(m.path, os.O_WRONLY | SERVER_OPEN) as fd:
            os.ftruncate(fd, m.length)
            _fill_attr(reply.attr, os.fstat(fd))

    def fsync(self, m: pb.Fsync, reply: pb.Reply) -> None:
        # Dirty pages belong to the inode, not to an fd: syncing through a
        # fresh fd makes every earlier write of this file durable.
        with self.root.fd_of(m.path, os.O_RDONLY | SERVER_OPEN) as fd:
            (os.fdatasync if m.data_only else os.fsync)(fd)

    def chmod(self, m: pb.Chmod, reply: pb.Reply) -> None:
        with self.root.fd_of(m.path, os.O_PATH | os.O_CLOEXEC) as fd:
            _check(_libc.syscall(SYS_fchmodat2, fd, b"", m.mode & 0o7777, AT_EMPTY_PATH), m.path)
            _fill_attr(reply.attr, os.fstat(fd))

    def chown(self, m: pb.Chown, reply: pb.Reply) -> None:
        flags = os.O_PATH | os.O_CLOEXEC | (0 if m.follow else os.O_NOFOLLOW)
        with self.root.fd_of(m.path, flags) as fd:
            _check(_libc.fchownat(fd, b"", m.uid & 0xFFFFFFFF, m.gid & 0xFFFFFFFF, AT_EMPTY_PATH), m.path)
            _fill_attr(reply.attr, os.fstat(fd))

    def utimens(self, m: pb.Utimens, reply: pb.Reply) -> None:
        def ts(ns: int, now: bool, omit: bool) -> _Timespec:
            if omit:
                return _Timespec(0, UTIME_OMIT)
            if now:
                return _Timespec(0, UTIME_NOW)
            return _Timespec(*divmod(ns, 1_000_000_000))

        times = (_Timespec * 2)(ts(m.atime_ns, m.atime_now, m.atime_omit),
                                ts(m.mtime_ns, m.mtime_now, m.mtime_omit))
        flags = os.O_PATH | os.O_CLOEXEC | (0 if m.follow else os.O_NOFOLLOW)
        with self.root.fd_of(m.path, flags) as fd:
            _check(_libc.utimensat(fd, b"", times, AT_EMPTY_PATH), m.path)
            _fill_attr(reply.attr, os.fstat(fd))

    def symlink(self, m: pb.Symlink, reply: pb.Reply) -> None:
        # The target is stored as given: it is confined when it is followed.
        with self.root.parent_of(m.path) as (pfd, name):
            if not _plain_name(name):
                raise _oserror(errno.EEXIST, m.path)
            os.symlink(wire.from_wire(m.target), name, dir_fd=pfd)
            _fill_attr(reply.attr, os.stat(name, dir_fd=pfd, follow_symlinks=False))

    def readlink(self, m: pb.Readlink, reply: pb.Reply) -> bytes:
        with self.root.fd_of(m.path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC) as fd:
            try:
                return os.fsencode(os.readlink("", dir_fd=fd))
            except FileNotFoundError:
                raise _oserror(errno.EINVAL, m.path)  # it exists: not a symlink

    def link(self, m: pb.Link, reply: pb.Reply) -> None:
        with self.root.parent_of(m.old_path) as (old_fd, old_name), \
                self.root.parent_of(m.new_path) as (new_fd, new_name):
            if not _plain_name(old_name):
                raise _oserror(errno.EPERM, m.old_path)  # a directory
            if not _plain_name(new_name):
                raise _oserror(errno.EEXIST, m.new_path)
            os.link(old_name, new_name, src_dir_fd=old_fd, dst_dir_fd=new_fd, follow_symlinks=False)
            _fill_attr(reply.attr, os.stat(new_name, dir_fd=new_fd, follow_symlinks=False))

    def statfs(self, m: pb.Statfs, reply: pb.Reply) -> None:
        buf = _Statfs()
        with self.root.fd_of(m.path, os.O_PATH | os.O_CLOEXEC) as fd:
            _check(_libc.fstatfs(fd, ctypes.byref(buf)), m.path)
        r = reply.statfs
        r.type = buf.f_type & 0xFFFFFFFFFFFFFFFF
        r.bsize, r.blocks, r.bfree, r.bavail = buf.f_bsize, buf.f_blocks, buf.f_bfree, buf.f_bavail
        r.files, r.ffree, r.namelen = buf.f_files, buf.f_ffree, buf.f_namelen
        r.frsize, r.flags = buf.f_frsize, buf.f_flags

    def fallocate(self, m: pb.Fallocate, reply: pb.Reply) -> None:
        with self.root.fd_of(m.path, os.O_WRONLY | SERVER_OPEN) as fd:
            _check(_libc.fallocate(fd, m.mode, m.offset, m.length), m.path)
            _fill_attr(reply.attr, os.fstat(fd))

    def access(self, m: pb.Access, reply: pb.Reply) -> None:
        with self.root.fd_of(m.path, os.O_PATH | os.O_CLOEXEC) as fd:
            _check(_libc.syscall(SYS_faccessat2, fd, b"", m.mode, AT_EMPTY_PATH | AT_EACCESS), m.path)


_varint = wire.varint


_DATA_KEY = _varint((pb.Reply.DESCRIPTOR.fields_by_name["data"].number << 3) | 2)


def data_reply(rid: int, data: bytes) -> bytes:
    """The serialized Reply(id=rid, data=data), built with one copy of data
    instead of two (assigning to a protobuf bytes field copies, and so does
    serializing it)."""
    return b"".join((b"\x08", _varint(rid), _DATA_KEY, _varint(len(data)), data))


def serialize_reply(reply: pb.Reply | bytes) -> bytes:
    return reply if type(reply) is bytes else reply.SerializeToString()


def malformed(op: str | None, msg) -> str | None:
    """Why a request is malformed at the protocol level, or None."""
    if op is None:
        return "no op set"
    if op == "read" and msg.length > MAX_LENGTH:
        return f"read length {msg.length} exceeds {MAX_LENGTH} bytes"
    for field, value in msg.ListFields():
        if isinstance(value, str) and "\0" in value:
            return f"{op}.{field.name} contains a NUL byte"
    return None


class StorageServicer(pb_grpc.StorageServicer):
    def __init__(self, root: ConfinedRoot):
        self.ops = Operations(root)
        self.root = root
        self.started = time.monotonic()
        self._lock = threading.Lock()
        self._by_op: Counter[str] = Counter()
        self._requests = 0
        self._streams = 0
        self.locks = locks.LockTable()

    def _file_key(self, path: str):
        with self.root.fd_of(path, os.O_PATH | os.O_CLOEXEC) as fd:
            st = os.fstat(fd)
        return (st.st_dev, st.st_ino)

    def lock(self, m: pb.Lock, reply: pb.Reply, owners: set) -> None:
        """fcntl/flock locks, held for this stream (the stream is the lease)."""
        if m.type not in (locks.F_RDLCK, locks.F_WRLCK, locks.F_UNLCK) or m.space > 1:
            raise _oserror(errno.EINVAL, m.path)
        key = self._file_key(m.path)
        with self._lock:
            if m.test:
                held = self.locks.conflict(key, m.space, m.owner, m.type, m.start, m.length)
                if held is None:
                    reply.lock.type = locks.F_UNLCK
                else:
                    reply.lock.type = held.type
                    reply.lock.start = held.start
                    reply.lock.length = 0 if held.end == locks.EOF_ else held.end - held.start
                    reply.lock.pid = held.pid
                return
            if not self.locks.set(key, m.space, m.owner, m.type, m.start, m.length, m.pid):
                raise _oserror(errno.EAGAIN, m.path)
        owners.add(m.owner)

    def release_locks(self, m: pb.ReleaseLocks, reply: pb.Reply) -> None:
        key = self._file_key(m.path) if m.path else None
        with self._lock:
            self.locks.release(m.owner, key)

    def Call(self, request_iterator, context):
        handlers = self.ops.handlers
        owners: set = set()  # lock owners seen on this stream: released when it ends
        with self._lock:
            self._streams += 1
        try:
            for request in request_iterator:
                op = request.WhichOneof("op")
                msg = getattr(request, op) if op else None
                problem = malformed(op, msg)
                if problem:
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request {request.id}: {problem}")
                reply = pb.Reply(id=request.id)
                try:
                    if op == "lock":
                        data = self.lock(msg, reply, owners)
                    elif op == "release_locks":
                        data = self.release_locks(msg, reply)
                    else:
                        data = handlers[op](msg, reply)
                    if data is not None:
                        reply = data_reply(request.id, data)
                except Redirected as e:
                    reply = pb.Reply(id=request.id, errno=errno.EXDEV)
                    reply.redirect.link_dir = wire.to_wire(e.link_dir)
                    reply.redirect.target = wire.to_wire(e.target)
                    reply.redirect.rest = wire.to_wire(e.rest)
                except OSError as e:
                    reply = pb.Reply(id=request.id, errno=e.errno or errno.EIO)
                except (OverflowError, ValueError) as e:  # e.g. an offset beyond off_t
                    log.debug("%s: %s", op, e)
                    reply = pb.Reply(id=request.id, errno=errno.EINVAL)
                except Exception:
                    log.exception("%s failed", op)
                    reply = pb.Reply(id=request.id, errno=errno.EIO)
                with self._lock:
                    self._requests += 1
                    self._by_op[op] += 1
                yield reply
        finally:
            with self._lock:
                self._streams -= 1
                for owner in owners:
                    self.locks.release(owner)

    def Data(self, request_iterator, context):
        """The raw data path (legorun/wire.py): READ, WRITE and APPEND frames."""
        REQ, REP = wire.REQ, wire.REP
        hsize = REQ.size
        root = self.root
        for frame in request_iterator:
            if len(frame) < hsize:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "data frame shorter than its header")
            rid, op, path_len, length, offset = REQ.unpack_from(frame)
            path_end = hsize + path_len
            raw_path = frame[hsize:path_end]
            problem = None
            if op not in (wire.READ, wire.WRITE, wire.APPEND):
                problem = f"unknown data op {op}"
            elif len(frame) < path_end or b"\0" in raw_path:
                problem = "bad path in data frame"
            elif length > wire.MAX_FRAME_DATA:
                problem = f"data length {length} exceeds {wire.MAX_FRAME_DATA} bytes"
            elif op != wire.READ and len(frame) != path_end + length:
                problem = "data frame length does not match its header"
            if problem:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"frame {rid}: {problem}")
            path = raw_path.decode("utf-8", "surrogateescape")
            try:
                if op == wire.READ:
                    with root.fd_of(path, os.O_RDONLY | SERVER_OPEN) as fd:
                        reply = read_reply(fd, rid, offset, length)
                else:
                    data = memoryview(frame)[path_end:]
                    append = op == wire.APPEND
                    flags = os.O_WRONLY | SERVER_OPEN | (os.O_APPEND if append else 0)
                    with root.fd_of(path, flags) as fd:
                        done, at = write_at(fd, data, offset, append)
                    reply = REP.pack(rid, 0, done, at)
            except OSError as e:
                reply = REP.pack(rid, e.errno or errno.EIO, 0, 0)
            except (OverflowError, ValueError):
                reply = REP.pack(rid, errno.EINVAL, 0, 0)
            with self._lock:
                self._requests += 1
                self._by_op["data_read" if op == wire.READ else "data_write"] += 1
            yield reply

    def Status(self, request, context):
        files = size = 0
        stack = [self.root.path]
        while stack:
            try:
                with os.scandir(stack.pop()) as it:
                    for entry in it:
                        try:
                            if entry.is_dir(follow_symlinks=False):
                                stack.append(entry.path)
                            elif entry.is_file(follow_symlinks=False):
                                files += 1
                                size += entry.stat(follow_symlinks=False).st_size
                        except OSError:
                            continue
            except OSError:
                continue
        with self._lock:
            return pb.StatusReply(
                root=self.root.path, uptime_s=time.monotonic() - self.started, files=files,
                bytes=size, requests=self._requests, open_clients=self._streams,
                requests_by_op=dict(self._by_op), locks=len(self.locks))


def add_storage_to_server(servicer: StorageServicer, server: grpc.Server) -> str:
    """Like the generated add_StorageServicer_to_server, except that Call may
    yield pre-serialized replies (bytes, see data_reply). Returns the
    service's full name."""
    name = pb.DESCRIPTOR.services_by_name["Storage"].full_name
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(name, {
        "Call": grpc.stream_stream_rpc_method_handler(
            servicer.Call, request_deserializer=pb.Request.FromString,
            response_serializer=serialize_reply),
        "Data": grpc.stream_stream_rpc_method_handler(servicer.Data),  # raw frames
        "Status": grpc.unary_unary_rpc_method_handler(
            servicer.Status, request_deserializer=pb.StatusRequest.FromString,
            response_serializer=pb.StatusReply.SerializeToString),
    })])
    return name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="legorun-scomponent",
        description="The sComponent: serve the files under --root to legorun over gRPC "
                    "(service legorun.storage.v1.Storage). Prints 'listening on ADDR' when ready.")
    common.add_server_arguments(parser, NAME)
    parser.add_argument("--root", metavar="DIR", required=True,
                        help="the directory served (created if missing); no path leaves it")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="legorun-scomponent: %(levelname)s: %(message)s")
    config = common.server_config_from_args(args, NAME)
    try:
        os.makedirs(args.root, exist_ok=True)
        root = ConfinedRoot(args.root)
    except OSError as e:
        common.die(f"cannot serve --root {args.root}: {e.strerror}")
    keep_frame_memory()
    servicer = StorageServicer(root)
    # Clients send modes with their own umask applied (Open.mode, Mkdir.mode):
    # the server's must not take more bits away.
    os.umask(0)

    def register(server: grpc.Server) -> list[str]:
        return [add_storage_to_server(servicer, server)]

    return common.serve(config, register)


if __name__ == "__main__":
    sys.exit(main())
