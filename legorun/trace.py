"""--trace: one line per forwarded syscall, as strace prints it, or JSON lines.

A line names the task, the call with its decoded arguments, the result
(`-1 ENOENT (No such file or directory)` for errors), who served it and how
long it took:

    4242  openat(AT_FDCWD, "/lego/in.txt", O_RDONLY|O_CLOEXEC) = 3 <sComponent 0.000412>

`-e trace=` takes strace's classes (%file, %desc, %memory, %process) and
names, comma-separated, `!` to negate, plus `excache` for memory events.
"""
from __future__ import annotations

import errno as E
import json
import os
import time

from ptrace.syscall.prototypes import SYSCALL_PROTOTYPES

from .tracee import GuestError

# strace's classes, for the syscalls legorun can forward
CLASSES = {
    "%file": {"open", "openat", "openat2", "creat", "stat", "lstat", "newfstatat", "statx",
              "access", "faccessat", "faccessat2", "readlink", "readlinkat", "chmod", "fchmodat",
              "fchmodat2", "chown", "lchown", "fchownat", "utime", "utimes", "futimesat",
              "utimensat", "truncate", "mkdir", "mkdirat", "rmdir", "unlink", "unlinkat", "rename",
              "renameat", "renameat2", "link", "linkat", "symlink", "symlinkat", "chdir", "statfs",
              "execve", "execveat", "mknod", "mknodat", "setxattr", "lsetxattr", "getxattr",
              "lgetxattr", "listxattr", "llistxattr", "removexattr", "lremovexattr", "getcwd",
              "inotify_add_watch", "name_to_handle_at", "chroot", "acct", "swapon"},
    "%desc": {"read", "write", "pread64", "pwrite64", "readv", "writev", "preadv", "pwritev",
              "preadv2", "pwritev2", "lseek", "close", "close_range", "dup", "dup2", "dup3",
              "fcntl", "flock", "ioctl", "fstat", "newfstatat", "statx", "fstatfs", "fsync",
              "fdatasync", "ftruncate", "fallocate", "getdents", "getdents64", "fchmod",
              "fchown", "fchdir", "sendfile", "copy_file_range", "splice", "tee", "mmap",
              "fadvise64", "readahead", "sync_file_range", "syncfs", "openat", "openat2",
              "fsetxattr", "fgetxattr", "flistxattr", "fremovexattr"},
    "%memory": {"mmap", "munmap", "mremap", "brk", "mprotect", "madvise", "mlock", "munlock",
                "mlockall", "munlockall", "msync"},
    "%process": {"execve", "execveat", "clone", "clone3", "fork", "vfork", "exit", "exit_group",
                 "wait4", "waitid", "kill", "tgkill"},
}
EXCACHE = "excache"

AT_FDCWD = -100
_OPEN_FLAGS = [(0o100, "O_CREAT"), (0o200, "O_EXCL"), (0o400, "O_NOCTTY"), (0o1000, "O_TRUNC"),
               (0o2000, "O_APPEND"), (0o4000, "O_NONBLOCK"), (0o10000, "O_DSYNC"),
               (0o200000, "O_DIRECTORY"), (0o400000, "O_NOFOLLOW"), (0o1000000, "O_NOATIME"),
               (0o2000000, "O_CLOEXEC"), (0o10000000, "O_PATH"), (0o40000, "O_DIRECT")]
_ACCESS = {0: "O_RDONLY", 1: "O_WRONLY", 2: "O_RDWR"}
_AT_FLAGS = [(0x100, "AT_SYMLINK_NOFOLLOW"), (0x200, "AT_REMOVEDIR"), (0x400, "AT_SYMLINK_FOLLOW"),
             (0x800, "AT_NO_AUTOMOUNT"), (0x1000, "AT_EMPTY_PATH"), (0x6000, "AT_STATX_SYNC_TYPE")]
STRING_MAX = 32  # strace's default -s


def parse_filter(expr: str | None):
    """`-e` expression -> (names, want_excache), names None meaning every syscall."""
    if not expr:
        return None, True
    if expr.startswith("trace="):
        expr = expr[len("trace="):]
    negate = expr.startswith("!")
    if negate:
        expr = expr[1:]
    names, excache = set(), False
    for item in filter(None, (p.strip() for p in expr.split(","))):
        if item in ("all", "%all"):
            names = None
            break
        if item == EXCACHE:
            excache = True
        elif item.startswith("%"):
            if item not in CLASSES:
                raise ValueError(f"unknown syscall class {item} (known: {', '.join(sorted(CLASSES))}, {EXCACHE})")
            names |= CLASSES[item]
        elif item in SYSCALL_PROTOTYPES or item in ("newfstatat", "statx", "openat2", "faccessat2",
                                                    "close_range", "fchmodat2", "clone3"):
            names.add(item)
        else:
            raise ValueError(f"invalid system call '{item}'")
    if negate:
        return _Not(names or set()), not excache
    return names, excache


class _Not:
    """Every name but these."""

    def __init__(self, names: set) -> None:
        self.names = names

    def __contains__(self, name: str) -> bool:
        return name not in self.names


def _flags(value: int, table, rest_hex=True) -> str:
    parts = [name for bit, name in table if value & bit]
    left = value
    for bit, _ in table:
        left &= ~bit
    if left and rest_hex:
        parts.append(hex(left))
    return "|".join(parts)


def _open_flags(v: int) -> str:
    v &= 0xFFFFFFFF
    head = _ACCESS.get(v & 3, str(v & 3))
    rest = _flags(v & ~3, _OPEN_FLAGS)
    return f"{head}|{rest}" if rest else head


def _quote(data: bytes, limit: int = STRING_MAX) -> str:
    out = []
    for b in data[:limit]:
        c = chr(b)
        if c == '"':
            out.append('\\"')
        elif c == "\\":
            out.append("\\\\")
        elif c == "\n":
            out.append("\\n")
        elif c == "\t":
            out.append("\\t")
        elif 32 <= b < 127:
            out.append(c)
        else:
            out.append(f"\\{b:o}")
    text = '"' + "".join(out) + '"'
    return text + "..." if len(data) > limit else text


def _s32(v: int) -> int:
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v >= 1 << 31 else v


def decode_args(t, name: str, args: tuple, result: int, strsize: int = STRING_MAX) -> list:
    """Each argument as strace would print it (strings read from the stopped guest)."""
    proto = SYSCALL_PROTOTYPES.get(name)
    if proto is None:
        return [hex(a) for a in args[:3]]
    out = []
    for (ctype, aname), value in zip(proto[1], args):
        out.append(_decode_one(t, name, ctype, aname, value, result, strsize))
    if name in ("open", "openat") and not args[1 if name == "open" else 2] & 0o100:
        out.pop()  # strace shows the mode only with O_CREAT
    return out


def _decode_one(t, name, ctype, aname, value, result, strsize=STRING_MAX) -> str:
    if ctype == "const char *" and aname in ("filename", "pathname", "oldname", "newname", "path",
                                              "name", "specialfile", "oldpath", "newpath"):
        try:
            return _quote(t.read_cstring(value), 4096)
        except GuestError:
            return hex(value)
    if aname in ("dfd", "dirfd", "olddfd", "newdfd", "olddirfd", "newdirfd") and _s32(value) == AT_FDCWD:
        return "AT_FDCWD"
    if aname == "flags" and name in ("open", "openat"):
        return _open_flags(value)
    if aname in ("flag", "flags") and name in ("newfstatat", "statx", "unlinkat", "fchownat",
                                               "utimensat", "faccessat2", "linkat"):
        return _flags(value & 0xFFFFFFFF, _AT_FLAGS) or "0"
    if aname in ("mode", "umode") and ctype in ("umode_t", "int", "mode_t"):
        return oct(value & 0o7777).replace("0o", "0")
    if aname == "buf" and name in ("write", "pwrite64") or (aname == "buf" and name in (
            "read", "pread64") and result > 0):
        count = min(strsize + 1, result if result > 0 else strsize + 1)
        try:
            return _quote(t.read_prefix(value, count), strsize)
        except GuestError:
            return hex(value)
    if ctype.endswith("*") or ctype.endswith("* *"):
        return "NULL" if value == 0 else hex(value)
    if ctype in ("int", "unsigned int") or aname in ("fd", "oldfd", "newfd"):
        return str(_s32(value))
    if ctype in ("off_t", "loff_t", "long"):
        return str(value - (1 << 64) if value >= 1 << 63 else value)
    return str(value)


def format_result(result: int) -> str:
    if result < 0 and -result < 4096:
        err = -result
        return f"-1 {E.errorcode.get(err, str(err))} ({os.strerror(err)})"
    return str(result) if result < 1 << 20 else hex(result)


class TraceWriter:
    """Writes trace lines (`out`) and/or JSON lines (`json_out`) for forwarded syscalls."""

    def __init__(self, out=None, json_out=None, expr: str | None = None,
                 strsize: int = STRING_MAX) -> None:
        self.strsize = strsize
        self.out = out
        self.json_out = json_out
        self.names, self.excache = parse_filter(expr)

    def wants(self, name: str) -> bool:
        return self.names is None or name in self.names

    def syscall(self, t, name: str, args: tuple, result: int, served_by: str, seconds: float) -> None:
        if not self.wants(name):
            return
        decoded = decode_args(t, name, args, result, self.strsize)
        if self.out is not None:
            self.out.write(f"{t.tid:<5} {name}({', '.join(decoded)}) = {format_result(result)} "
                           f"<{served_by} {seconds:.6f}>\n")
        if self.json_out is not None:
            err = -result if -4096 < result < 0 else 0
            self.json_out.write(json.dumps({
                "time": time.time(), "pid": t.process.pid if t.process else t.tid, "tid": t.tid,
                "event": "syscall", "name": name, "args": decoded,
                "result": -1 if err else result, "errno": E.errorcode.get(err) if err else None,
                "served_by": served_by, "seconds": seconds}) + "\n")

    def memory_event(self, pid: int, kind: str, address: int, pages: int, served_by: str,
                     seconds: float) -> None:
        """fault, fetch, writeback, evict: for `-e trace=excache` (the ExCache's events)."""
        if not self.excache:
            return
        if self.out is not None:
            self.out.write(f"{pid:<5} --- excache {kind} {address:#x} pages={pages} "
                           f"<{served_by} {seconds:.6f}> ---\n")
        if self.json_out is not None:
            self.json_out.write(json.dumps({
                "time": time.time(), "pid": pid, "event": kind, "address": address,
                "pages": pages, "served_by": served_by, "seconds": seconds}) + "\n")

    def close(self) -> None:
        for f in (self.out, self.json_out):
            if f is not None:
                f.flush()
