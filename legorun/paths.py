"""Which guest paths are remote: mount points and path resolution.

Paths are resolved as the kernel would, relative to the cwd or a dirfd,
with '..'. Resolution is lexical: a local symlink that points into a mount
is not followed (listed in the compatibility page).
"""
from __future__ import annotations

import os
import posixpath
import re
from dataclasses import dataclass


@dataclass(eq=False)
class Mount:
    """A guest path whose subtree is served by a storage component."""
    guest_path: str   # normalized absolute path, e.g. "/lego"
    dev: int          # st_dev the guest sees for files on this mount
    storage: object = None  # set by the session: the client serving it

    def guest_name(self, rel: str) -> str:
        return self.guest_path if not rel else f"{self.guest_path}/{rel}"


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
        """(Mount, rel) if the normalized absolute path lies on a mount, else None."""
        for m in self.mounts:
            g = m.guest_path
            if abspath == g:
                return m, ""
            if abspath.startswith(g) and (g == "/" or abspath[len(g)] == "/"):
                return m, abspath[len(g):].lstrip("/")
        return None

    def by_dev(self, dev: int):
        for m in self.mounts:
            if m.dev == dev:
                return m
        return None


def join_rel(base: str, rel: str) -> str:
    """Join a mount-relative base and a relative path, keeping '..' inside the mount."""
    parts = [p for p in base.split("/") if p]
    for comp in rel.split("/"):
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


def local_cwd(tid: int) -> str:
    return os.readlink(f"/proc/{tid}/cwd")


def local_fd_path(tid: int, fd: int) -> str:
    return os.readlink(f"/proc/{tid}/fd/{fd}")
