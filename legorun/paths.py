"""Which guest paths are remote: mount points and path resolution.

Paths are resolved as the kernel would, relative to the cwd or a dirfd,
with '..'. Resolution is lexical, except that a local path whose directories
cross a symlink is resolved through it (the symlink may point into a mount).
"""
from __future__ import annotations

import ctypes
import errno
import os
import posixpath
import re
import stat

from .wire import from_wire, to_wire
from dataclasses import dataclass


@dataclass(eq=False)
class Mount:
    """A guest path whose subtree is served by a storage component."""
    guest_path: str   # normalized absolute path, e.g. "/lego"
    dev: int          # st_dev the guest sees for files on this mount
    storage: object = None  # set by the session: the client serving it

    def guest_name(self, rel: str) -> str:
        """The guest's path (a surrogate-escaped str) of `rel` (wire text)."""
        return self.guest_path if not rel else f"{self.guest_path}/{from_wire(rel)}"


_DOT_COMPONENT = re.compile(rb"/\.\.?(?:/|$)")
# Paths the C fast path and surely_local() leave to the full resolution.
MAGIC_PREFIXES = (b"/proc/", b"/dev/")
# /proc/self/fd/N, /proc/thread-self/fd/N, /proc/PID/fd/N, /dev/fd/N, /dev/stdin...
FD_LINK = re.compile(r"^/(?:proc/(self|thread-self|\d+)(?:/task/\d+)?|dev)/fd/(\d+)$")
STD_LINK = {"/dev/stdin": 0, "/dev/stdout": 1, "/dev/stderr": 2}


def fd_link(path: str):
    """(pid part or None, fd) when path is a magic link to an fd, else None."""
    if path in STD_LINK:
        return None, STD_LINK[path]
    m = FD_LINK.match(path)
    if m is None:
        return None
    return m.group(1), int(m.group(2))


def normalize(path: str) -> str:
    """Lexical normalization of an absolute path ('//' at the start folds too)."""
    path = posixpath.normpath(path)
    if path.startswith("//"):
        path = "/" + path.lstrip("/")
    return path


class MountTable:
    def __init__(self, guest_paths: list) -> None:
        self.mounts = []
        for i, p in enumerate(guest_paths):
            if not p.startswith("/"):
                raise ValueError(f"mount path must be absolute: {p}")
            # st_dev of a mount: a value no local device uses (major 0xfff, minor i)
            dev = (0xFFF << 8) | i
            self.mounts.append(Mount(normalize(p), dev))
        self.mounts.sort(key=lambda m: len(m.guest_path), reverse=True)
        self._prefixes = [os.fsencode(m.guest_path) for m in self.mounts]

    def surely_local(self, path: bytes) -> bool:
        """A fast, exact-when-True test for an absolute path: already normal
        (no '//', no '.' or '..' component), on no mount, and not one of the
        kernel's magic links to an fd (/proc/PID/fd/N, /dev/fd/N, /dev/stdin)."""
        if b"//" in path or (b"/." in path and _DOT_COMPONENT.search(path)):
            return False
        if path.startswith(MAGIC_PREFIXES):
            return False
        for prefix in self._prefixes:
            if path.startswith(prefix) and (len(path) == len(prefix) or path[len(prefix)] == 47):
                return False
        return True

    def far_from(self, cwd: str) -> bool:
        """True when no mount lies at or below the local directory `cwd`: a
        relative path without '..' from there cannot reach a mount."""
        base = cwd.rstrip("/") + "/"
        return not any(m.guest_path == cwd or m.guest_path.startswith(base) or
                       cwd.startswith(m.guest_path + "/") for m in self.mounts)

    def match(self, abspath: str):
        """(Mount, rel) if the normalized absolute path lies on a mount, else None.

        rel is wire text (legorun.wire.to_wire): what the sComponent is sent."""
        for m in self.mounts:
            g = m.guest_path
            if abspath == g:
                return m, ""
            if abspath.startswith(g) and (g == "/" or abspath[len(g)] == "/"):
                return m, to_wire(abspath[len(g):].lstrip("/"))
        return None

    def by_dev(self, dev: int):
        for m in self.mounts:
            if m.dev == dev:
                return m
        return None


def join_rel(base: str, rel: str) -> str:
    """Join a mount-relative base (wire text) and a relative guest path,
    keeping '..' inside the mount; the result is wire text."""
    parts = [p for p in base.split("/") if p]
    for comp in to_wire(rel).split("/"):
        if comp in ("", "."):
            continue
        if comp == "..":
            if parts:
                parts.pop()
            else:
                return None  # climbs above the mount root
        else:
            parts.append(comp)
    return "/".join(parts)


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_NO_SYMLINKS = _OpenHow(os.O_PATH | os.O_CLOEXEC | os.O_NOFOLLOW, 0, 0x04 | 0x02)
SYS_openat2 = 437


NO_SYMLINK, IN_DIRECTORIES, FINAL = 0, 1, 2


def symlink_on_the_way(path: bytes) -> int:
    """Where resolving this absolute path meets a symlink: NO_SYMLINK, among
    its IN_DIRECTORIES, or as its FINAL component.

    The kernel then may not resolve it as lexically as legorun does (a local
    symlink can point into a mount). A missing component is no such case: no
    symlink came before it. (The C fast path makes the same check.)"""
    fd = _libc.syscall(SYS_openat2, -100, path, ctypes.byref(_NO_SYMLINKS), 24)
    if fd < 0:
        if ctypes.get_errno() in (errno.ENOENT, errno.ENOTDIR, errno.EACCES):
            return NO_SYMLINK
        return IN_DIRECTORIES
    try:
        return FINAL if stat.S_ISLNK(os.fstat(fd).st_mode) else NO_SYMLINK
    finally:
        os.close(fd)


def through_symlinks(path: str, follow: bool) -> str:
    """The path with its symlinks resolved (the final one only if `follow`)."""
    if follow:
        return os.path.realpath(path)
    parent, _, name = path.rpartition("/")
    return posixpath.join(os.path.realpath(parent or "/"), name)


def local_cwd(tid: int) -> str:
    return os.readlink(f"/proc/{tid}/cwd")


def local_fd_path(tid: int, fd: int) -> str:
    return os.readlink(f"/proc/{tid}/fd/{fd}")
